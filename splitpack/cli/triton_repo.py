"""Write a Triton model directory that serves a model with split-pack (config.pbtxt + model.py + weights)."""
from __future__ import annotations

import argparse
from pathlib import Path

from splitpack.cli import common
from splitpack.cli.params import add_flags, given
from splitpack.serving.config import DEPLOY, MODEL, ServingConfig
from splitpack.serving.triton.repo import VERSION, WEIGHTS_FILE, TritonModelSpec, generate_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, "triton")
    common.add_weights(parser, "ship")
    parser.add_argument("--name", help="Triton model name = directory (default: from --model)")
    parser.add_argument("--out", type=Path, default=Path("triton_repo"), metavar="DIR",
                        help="model repository (default: triton_repo)")
    common.add_check(parser)


def run(args: argparse.Namespace) -> int:
    spec = TritonModelSpec(ServingConfig.from_mapping(given(args, MODEL)), given(args, DEPLOY), name=args.name,
                           pretrained=args.pretrained, weights=args.weights, allow_pickle=args.allow_pickle)
    model_dir = generate_model_dir(spec, args.out, check=not args.no_check)
    shipped = [f"{VERSION}/{f.name}" for f in sorted((model_dir / VERSION).iterdir()) if f.name != "model.py"]
    print(f"wrote {model_dir}/config.pbtxt, {VERSION}/model.py, " + ", ".join(shipped)
          + ("" if (model_dir / VERSION / WEIGHTS_FILE).exists() else " (random weights)"))
    return 0
