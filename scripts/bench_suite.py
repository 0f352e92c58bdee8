#!/usr/bin/env python
"""Run the benchmark matrix of BENCHMARKS.md (`make bench`): memory and latency ratios, exact and seed."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from tqdm import tqdm

from splitpack.experiments.bench import bench
from splitpack.models import create_model

# (model, size, batch, merge layer, grid, mode)
MATRIX = [
    ("resnet50", 1024, 1, "layer1", "2x2", "exact"),
    ("resnet50", 1024, 1, "layer2", "2x2", "exact"),
    ("resnet50", 1024, 1, "layer2", "3x3", "exact"),
    ("resnet50", 1024, 1, "layer2", "4x4", "exact"),
    ("resnet50", 1024, 1, "layer2", "3x3", "seed"),
    ("mobilenetv2_100", 224, 1, "blocks.1", "2x2", "exact"),
    ("mobilenetv2_100", 224, 1, "blocks.2", "2x2", "exact"),
    ("mobilenetv2_100", 224, 1, "blocks.2", "4x4", "exact"),
    ("mobilenetv2_100", 224, 1, "blocks.3", "4x4", "exact"),
    ("mobilenetv2_100", 512, 1, "blocks.2", "2x2", "exact"),
    ("mobilenetv2_100", 512, 1, "blocks.2", "4x4", "exact"),
    ("mobilenetv2_100", 512, 1, "blocks.3", "4x4", "exact"),
    ("efficientnet_b0", 600, 1, "blocks.0.0.aa", "2x2", "exact"),  # last layer before the first SE block
    ("efficientnet_b0", 600, 1, "blocks.0.0.aa", "4x4", "exact"),
    ("efficientnet_b0", 600, 1, "blocks.2", "2x2", "seed"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="substring filter on the model name")
    p.add_argument("--out", default="benchmarks/results.json")
    args = p.parse_args()
    rows, models = [], {}
    matrix = [m for m in MATRIX if not args.only or args.only in m[0]]
    for name, size, batch, merge, grid, mode in tqdm(matrix, desc="bench", file=sys.stderr):
        model = models.setdefault(name, create_model(name))
        rows.append(bench(name, size, merge, grid, mode, batch, args.repeats, model=model))
        tqdm.write(json.dumps(rows[-1]), file=sys.stderr)
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    print(f"| model | size | merge layer | grid | mode | peak unsplit MiB | peak split MiB | memory ratio | "
          f"latency ratio | max abs err / output scale |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['merge_layer']} | {r['grid']} | {r['mode']} | "
              f"{r['baseline_peak_bytes'] / 2**20:.1f} | {r['split_peak_bytes'] / 2**20:.1f} | "
              f"**{r['memory_ratio']:.2f}x** | {r['latency_ratio']:.2f}x | "
              f"{r['max_abs_error'] / r['output_scale']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
