"""Package a model with split-pack as a TorchServe .mar (settings in its model-config.yaml)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from splitpack.cli import common
from splitpack.cli.params import add_flags, given
from splitpack.serving.config import DEPLOY, MODEL
from splitpack.serving.torchserve.archive import (DEFAULT_MODEL_STORE, HANDLER_SECTION, build_archive,
                                                  read_archive_config, read_model_config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, "torchserve")
    common.add_weights(parser, "archive")
    parser.add_argument("--config", metavar="YAML",
                        help="a model-config.yaml (TorchServe keys + handler: section) to start from; "
                             "the flags above override its values")
    parser.add_argument("--name", help="archive/model name (default: from --model)")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_STORE), metavar="DIR",
                        help=f"model store to write NAME.mar into (default: {DEFAULT_MODEL_STORE})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive")
    common.add_check(parser)


def _load_yaml(path: str) -> dict:
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return content


def run(args: argparse.Namespace) -> int:
    base = _load_yaml(args.config) if args.config else None
    config = read_model_config(base or {}, given(args, MODEL))
    path = build_archive(config, given(args, DEPLOY), pretrained=args.pretrained, weights=args.weights,
                         allow_pickle=args.allow_pickle, base=base,
                         name=args.name, version=args.version, export_path=args.out, force=args.force,
                         check=not args.no_check)
    name, archived = read_archive_config(path)
    print(f"wrote {path} (model {name!r}): {json.dumps(archived[HANDLER_SECTION])}")
    return 0
