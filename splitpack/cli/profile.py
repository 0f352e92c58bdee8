"""Profile activation memory layer by layer, unsplit and split (the poster's Fig. 3)."""
from __future__ import annotations

import argparse
import json

import torch

from splitpack.cli import common
from splitpack.measure.profile import hooked_modules, plot_profiles, profile_model
from splitpack.measure.units import MiB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "profile with")
    common.add_input(parser)
    parser.add_argument("--merge-layers", nargs="*", default=[], metavar="LAYER",
                        help="merge layers to profile split, one profile each (several go on one plot)")
    common.add_split(parser, merge_layer=False)
    parser.add_argument("--layers", choices=["leaf", "candidates"], default="leaf",
                        help="unsplit markers: every leaf module (default) or the merge-layer candidates only")
    common.add_device(parser)
    common.add_json(parser, "the full profile")
    parser.add_argument("--png", help="write the plot here")


def run(args: argparse.Namespace) -> int:
    import splitpack

    model, spec = common.build_model(args)
    model = model.to(args.device)
    every = list(splitpack.merge_layers(model))
    # leaves plus the candidates, so split runs (marked at candidates) line up with the unsplit one
    layers = every if args.layers == "candidates" else list(dict.fromkeys(
        [n for n, _ in hooked_modules(model)] + every))
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=args.device)
    profiles = profile_model(model, x, args.merge_layers, args.grid, args.mode, layers)
    baseline = profiles[0].peak_bytes
    title = f"{spec.title} @{args.size} batch {args.batch_size}"
    result = {
        "model": spec.title, "size": args.size, "batch_size": args.batch_size, "device": str(x.device),
        "measured_by": "cuda-allocator" if x.device.type == "cuda" else "cpu-activation-tracker",
        "unsplit_peak_bytes": baseline, "unsplit_peak_layer": profiles[0].peak_layer,
        "split": [{"merge_layer": p.merge_layer, "grid": p.grid, "mode": p.mode, "peak_bytes": p.peak_bytes,
                   "peak_layer": p.peak_layer, "peak_reduction": 1 - p.peak_bytes / baseline if baseline else 0.0}
                  for p in profiles[1:]],
        "profiles": [p.to_dict() for p in profiles],
    }
    if args.png:
        common.write_plot(args.png, lambda path: plot_profiles(profiles, path, title))
        result["png"] = args.png
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{title}: unsplit peak {baseline / MiB:.2f} MiB at {profiles[0].peak_layer}")
    for s in result["split"]:
        print(f"  merge at {s['merge_layer']} ({s['grid']}, {s['mode']}): peak {s['peak_bytes'] / MiB:.2f} MiB "
              f"at {s['peak_layer']} ({-100 * s['peak_reduction']:+.1f}%)")
    if args.png:
        print(f"plot: {args.png}")
    return 0
