"""Package a model with split-pack as a TorchServe .mar (settings in its model-config.yaml)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE, HANDLER_SECTION, build_archive, read_archive_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="timm model name (or tv:NAME for torchvision)")
    parser.add_argument("--config", metavar="YAML",
                        help="a model-config.yaml (TorchServe keys + handler: section) to archive as is; "
                             "replaces the split and batching options below")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="real ImageNet weights, offline (tf_efficientnet_lite0/1/2)")
    weights.add_argument("--weights", metavar="FILE", help="state dict file (.pt/.pth) for the model")
    parser.add_argument("--merge-layer", default="", help="module name to merge packs at; empty = unsplit")
    parser.add_argument("--grid", default="2x2", help="packs as ROWSxCOLS (default 2x2)")
    parser.add_argument("--mode", choices=["exact", "seed"], default="exact")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--native-resolution", action="store_true",
                        help="serve at the image's own size (longest side <= --max-side) instead of the model's "
                             "eval resize/crop")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--max-pixels", type=int, default=50_000_000, help="reject images declaring more pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="TorchServe batchSize")
    parser.add_argument("--max-batch-delay", type=int, default=50, metavar="MS", help="TorchServe maxBatchDelay")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe min/maxWorkers")
    parser.add_argument("--response-timeout", type=int, default=120, metavar="S")
    parser.add_argument("--name", help="archive/model name (default: from --model)")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--export-path", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip loading the settings and running the sample image before archiving")


def run(args: argparse.Namespace) -> int:
    model_config = None
    if args.config:
        try:
            model_config = yaml.safe_load(Path(args.config).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{args.config}: not valid YAML ({err})") from None
        if not isinstance(model_config, dict):
            raise ValueError(f"{args.config}: expected a YAML mapping")
    path = build_archive(
        args.model, model_config=model_config, pretrained=args.pretrained, weights=args.weights,
        merge_layer=args.merge_layer, grid=args.grid, mode=args.mode, topk=args.topk,
        native_resolution=args.native_resolution, max_side=args.max_side, max_pixels=args.max_pixels,
        batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, workers=args.workers,
        response_timeout_s=args.response_timeout, name=args.name, version=args.version,
        export_path=args.export_path, force=args.force, validate=not args.no_validate,
    )
    name, config = read_archive_config(path)
    print(f"wrote {path} (model {name!r}): {json.dumps(config[HANDLER_SECTION])}")
    return 0
