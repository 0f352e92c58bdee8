"""Arguments several commands share, spelled the same everywhere."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from splitpack.cli import arg_type
from splitpack.core.plan.spec import grid_text, parse_grid

MODES = ("exact", "seed")


def grid_arg(text: str) -> str:
    """``--grid``: one grid ``RxC`` (or ``N`` for NxN), or one per stage (``4x4,2x2``), normalised to ``RxC``."""
    return ",".join(grid_text(parse_grid(g)) for g in text.split(","))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def add_model(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="timm model name, or tv:NAME for torchvision")


def add_input(parser: argparse.ArgumentParser, batch_help: str = "images per batch (default: 1)") -> None:
    """``--size`` and ``--batch-size`` of the random input a measurement runs on."""
    parser.add_argument("--size", type=arg_type(positive_int, "size"), required=True, help="input height = width")
    parser.add_argument("--batch-size", type=arg_type(positive_int, "batch size"), default=1, help=batch_help)


def add_split(parser: argparse.ArgumentParser, *, merge_layer: bool = True, merge_required: bool = False) -> None:
    """``--merge-layer``, ``--grid RxC`` and ``--mode``."""
    if merge_layer:
        parser.add_argument("--merge-layer", required=merge_required,
                            help="module name to merge the packs at (splitpack.merge_layers lists them), or a "
                                 "staged plan: one per stage, comma-separated (maxpool,layer3.0,global_pool)")
    parser.add_argument("--grid", type=arg_type(grid_arg, "grid"), default="2x2",
                        help="packs as RxC, or one grid per stage (4x4,2x2) (default: 2x2)")
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact (halo, output equals the unsplit model; default) or seed (no halo)")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where to measure: cpu or cuda[:N] (default: cpu)")


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def write_plot(path: str | Path, draw: Callable[[Path], None]) -> Path:
    """``draw(file)`` into a temporary file moved onto ``path`` when it succeeded."""
    from splitpack.publish import staged_path

    with staged_path(path) as tmp:
        draw(tmp)
    return Path(path)


def add_weights(parser: argparse.ArgumentParser, what: str = "package") -> None:
    """``--pretrained`` or ``--weights FILE`` (neither: random weights, with a warning)."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help=f"{what} splitpack's offline ImageNet weights (tf_efficientnet_lite0/1/2)")
    weights.add_argument("--weights", metavar="FILE", help=f"state dict file (.pt/.pth) to {what}")


def add_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading the settings as the server will and classifying the sample image")
