#!/usr/bin/env python
"""Peak activation memory only (no timing), unsplit vs split, for sizes where timing takes too long.

    scripts/peak_memory.py resnet50 4096 "global_pool;16x16" "maxpool,layer3.0,global_pool;4x4,8x4,2x2"

Each plan is ``MERGE_LAYERS;GRIDS``; one run of each, measured with the same tracker as `make bench`.
"""
from __future__ import annotations

import argparse
import sys

import torch

import splitpack
from splitpack.measure.meter import peak_activation_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("size", type=int)
    p.add_argument("plans", nargs="+", help="MERGE_LAYERS;GRIDS")
    args = p.parse_args()
    torch.manual_seed(0)
    model = splitpack.create_model(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    base = peak_activation_bytes(model, x)
    print(f"{args.model} @{args.size}: unsplit {base / 2**20:.1f} MiB", flush=True)
    for plan in args.plans:
        merge, _, grid = plan.partition(";")
        split = splitpack.wrap(model, merge, grid or "2x2")
        peak = peak_activation_bytes(split, x)
        macs = split.cost(x.shape)["macs_ratio"]
        print(f"  {merge} @{grid}: {peak / 2**20:.1f} MiB, {base / peak:.2f}x lower, {macs:.2f}x MACs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
