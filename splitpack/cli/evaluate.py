"""Accuracy and memory of split-pack strategies vs resizing the input, on real images (poster Fig. 4)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from splitpack.cli import UsageError, arg_type, common
from splitpack.experiments.evaluate import (DEFAULT_EXACT_GRIDS, DEFAULT_GRIDS, DEFAULT_SCALES, default_strategies,
                                            evaluate, labelled_images, markdown, parse_size, parse_strategy, plot)
from splitpack.publish import staged_path, write_text


def _csv(kind):
    return lambda text: [kind(t) for t in text.split(",") if t.strip()]


def _count_or_names(text: str) -> int | list[str]:
    return int(text) if text.strip().isdigit() else _csv(str)(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "evaluate")
    parser.add_argument("--data", help="ImageNet-style folder: labels.tsv, or synset sub-folders (required unless --from-json)")
    parser.add_argument("--size", action="append",
                        help="input size in pixels, or a multiple of the native size (2x); repeat for several "
                             "(one plot panel each). Default: native")
    parser.add_argument("--limit", type=int, help="evaluate the first K images only")
    parser.add_argument("--limit-large", type=int,
                        help="at most K images for sizes above native (they cost ~(size/native)^2 as much)")
    parser.add_argument("--strategies", type=arg_type(_csv(parse_strategy), "strategies"),
                        help="explicit comma list (unsplit, exact:LAYER:G, seed:LAYER:G, resize:S) instead of the default set")
    parser.add_argument("--grids", type=arg_type(_csv(int), "grids"), default=list(DEFAULT_GRIDS),
                        help="seed-mode grids NxN (default 2,3,4)")
    parser.add_argument("--exact-grids", type=arg_type(_csv(int), "grids"), default=list(DEFAULT_EXACT_GRIDS),
                        help="exact-mode grids NxN (default 2,4)")
    parser.add_argument("--exact-layers", type=_count_or_names, default=4,
                        help="exact-mode merge layers: comma list, or a count spread over the exact-capable "
                             "block-level merge layers (default 4)")
    parser.add_argument("--seed-layers", type=_count_or_names,
                        help="seed-mode merge layers: comma list, or a count spread over the block-level merge "
                             "layers (default: every block-level merge layer)")
    parser.add_argument("--scales", type=arg_type(_csv(float), "scales"), default=list(DEFAULT_SCALES),
                        help="resize scales (default 0.5,0.6,0.7,0.8,0.9)")
    parser.add_argument("--batch-size", type=arg_type(common.positive_int, "batch size"), default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    common.add_json(parser, "the full report (instead of the markdown tables)")
    parser.add_argument("--out", help="write the full report (JSON) here")
    parser.add_argument("--png", help="write the accuracy-vs-memory plot here")
    parser.add_argument("--markdown", help="write markdown tables here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--from-json", help="redraw --png/--markdown from an earlier --out report, evaluate nothing")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        _write_outputs(json.loads(Path(args.from_json).read_text()), args)
        return 0
    if not (args.model_name or args.model_class) or not args.data:
        raise UsageError("--model and --data are required (or --from-json REPORT)")
    report = _evaluate(args)
    _write_outputs(report, args)
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec = common.build_model(args)
    items = labelled_images(args.data)
    strategies = args.strategies or default_strategies(model, args.grids, args.exact_grids, args.exact_layers,
                                                       args.seed_layers, args.scales)
    if args.limit:
        items = items[: args.limit]
    native = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if hasattr(model, "pretrained_cfg") else 224
    sizes = [parse_size(s, native) for s in (args.size or [str(native)])]
    report = {
        "model": spec.title,
        "pretrained": bool(args.pretrained),
        "weights": args.weights,
        "data": str(args.data),
        "command": "splitpack evaluate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["evaluate"] else None,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "method2": "not reproduced: retraining at a smaller size needs an ImageNet training set",
        "runs": [],
    }
    for size in sizes:
        subset = items[: args.limit_large] if args.limit_large and size > native else items
        result = evaluate(model, subset, strategies, size=size, batch_size=args.batch_size,
                          progress=not args.quiet, desc=f"{spec.title}@{size}")
        report["runs"].append(result)
        if result["n_skipped"]:
            print(f"{spec.title}@{size}: skipped {result['n_skipped']} unreadable file(s)", file=sys.stderr)
    return report


def _write_outputs(report: dict, args: argparse.Namespace) -> None:
    text = markdown(report)
    print(json.dumps(report, indent=1) if args.json else text)
    if args.out:
        write_text(args.out, json.dumps(report, indent=1))
    if args.markdown:
        write_text(args.markdown, text)
    if args.png:
        with staged_path(args.png) as tmp:
            plot(report, tmp)
