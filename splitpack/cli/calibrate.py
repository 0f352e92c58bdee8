"""Calibrate this device's time model for a model (the ops timed at a few sizes, cached for `plan --max-latency`)."""
from __future__ import annotations

import argparse
import json

import torch

from splitpack.argtypes import arg_type, positive_int
from splitpack.cli import common
from splitpack.cli.plan import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, None)
    parser.add_argument("--size", type=arg_type(positive_int, "size"), default=None,
                        help="the largest input height = width to plan for (default: the model's own)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_device(parser)
    parser.add_argument("--threads", type=arg_type(positive_int, "thread count"), default=None,
                        help="torch threads to time with (default: torch's; the cache is per thread count)")
    parser.add_argument("--force", action="store_true", help="time the ops again even where the cache has them")
    common.add_json(parser, "the cache file and what it holds for this model")


def run(args: argparse.Namespace) -> int:
    from splitpack.core.capture.graph import reference_input_size, trace
    from splitpack.core.cost.time_model import TimingStore, calibrate, device_key

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, spec = common.build_model(args)
    model = model.to(device=args.device, dtype=dtype).eval()
    size = args.size or reference_input_size(model)[-1]
    traced = trace(model)
    store = TimingStore(device_key(args.device, dtype))
    if args.force:
        store.data.update(ops={}, models={}, view_s=None)
    timed = calibrate(traced, size, dtype, args.device, store, progress=not args.json)
    report = {"model": spec.title, "size": size, "device_key": store.key, "cache": str(store.path),
              "op_signatures": len(timed.ops), "view_us": round(timed.view_s * 1e6, 3),
              "copy_gb_per_s": round(1e-9 / timed.copy.slope, 3) if timed.copy.slope else None}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['model']} calibrated up to {size}x{size} on {store.key}: {report['op_signatures']} op "
              f"signatures in {report['cache']}")
    return 0
