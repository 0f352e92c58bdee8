"""Run one replica and print its memory as JSON lines (used by `capacity --measure-replicas` and scripts/validate_capacity_gpu.py)."""
from __future__ import annotations

import argparse

from splitpack.cli import arg_type, common
from splitpack.serving.config import UNSPLIT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, weights=None)
    common.add_input(parser)
    common.add_split(parser)
    common.add_device(parser)
    parser.add_argument("--repeats", type=arg_type(int, "repeats"), default=1, help="timed calls (default: 1)")
    parser.add_argument("--hold", action="store_true",
                        help="after the first report keep running inference until stdin closes, then report again")


def run(args: argparse.Namespace) -> int:
    from splitpack.capacity.probe import run_probe

    merge_layer = None if args.merge_layer == UNSPLIT else args.merge_layer
    return run_probe(common.model_spec(args), args.size, args.batch_size, merge_layer, args.grid, args.mode,
                     args.device, args.repeats, args.hold)
