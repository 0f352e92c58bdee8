#!/usr/bin/env python
"""Run the benchmark matrix of BENCHMARKS.md (`make bench`): memory and latency ratios, exact and seed.

``--suite single`` (one merge layer), ``staged`` (staged plans through SE blocks to the global pooling) or ``flat`` (ResNet-50 at 1024/2048/4096 with the same pack size).
"""
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
def exact(model: str, size: int, plans: list[tuple[str, str]]) -> list[tuple]:
    """Batch-1 exact-mode rows of one model and size, one per (merge layer, grid)."""
    return [(model, size, 1, merge_layer, grid, "exact") for merge_layer, grid in plans]


SINGLE = [
    *exact("resnet50", 1024, [("layer1", "2x2"), ("layer2", "2x2"), ("layer2", "3x3"), ("layer2", "4x4")]),
    ("resnet50", 1024, 1, "layer2", "3x3", "seed"),
    *exact("mobilenetv2_100", 224, [("blocks.1", "2x2"), ("blocks.2", "2x2"), ("blocks.2", "4x4"), ("blocks.3", "4x4")]),
    *exact("mobilenetv2_100", 512, [("blocks.2", "2x2"), ("blocks.2", "4x4"), ("blocks.3", "4x4")]),
    # the last layer before the first SE block
    *exact("efficientnet_b0", 600, [("blocks.0.0.aa", "2x2"), ("blocks.0.0.aa", "4x4")]),
    ("efficientnet_b0", 600, 1, "blocks.2", "2x2", "seed"),
]


def blocks(prefix: str, counts: list[int]) -> list[str]:
    """Every block of a timm model: ``blocks("blocks", [1, 2])`` = blocks.0.0, blocks.1.0, blocks.1.1."""
    return [f"{prefix}.{i}.{j}" for i, n in enumerate(counts) for j in range(n)]


def per_block(names: list[str], grids: list[str], last: str, last_grid: str = "1x1") -> tuple[str, str]:
    """A checkpoint after every block (each stage holds at most one SE gate), then ``last``."""
    return ",".join(names + [last]), ",".join(grids + [last_grid])


B7_EARLY = blocks("blocks", [4, 7, 7])  # tf_efficientnet_b7 stages at 300, 150 and 75 px (input 600)
B0 = blocks("blocks", [1, 2, 2, 3, 3, 4, 1])  # efficientnet_b0 at 600: 300, 150, 75, 38, 38, 19, 19 px
MV3 = blocks("blocks", [1, 2, 3, 4, 2, 3, 1])
RESNET50 = [f"layer{i + 1}.{j}" for i, n in enumerate([3, 4, 6, 3]) for j in range(n)]
# Hand-picked plans (splitpack plan searches them): a checkpoint after every high-resolution block, fine
# grids where the maps are large, one pack (values kept between SE passes) where they are small.
STAGED = [
    ("tf_efficientnet_b7", 600, 1, *per_block(B7_EARLY, ["8x8"] * 4 + ["4x4"] * 7 + ["2x2"] * 7, "global_pool"), "exact"),
    ("efficientnet_b0", 600, 1, *per_block(B0, ["8x8"] + ["4x4"] * 4 + ["2x2"] * 11, "global_pool", "2x2"), "exact"),
    ("resnet50", 1024, 1, "maxpool,layer3.0,layer4.0,global_pool", "4x4,8x4,4x2,2x2", "exact"),
    ("seresnet50", 512, 1, "maxpool,layer2.0,layer3.0,layer4.0,global_pool", "4x4,4x4,2x2,1x1,1x1", "exact"),
    ("mobilenetv3_large_100", 512, 1, *per_block(MV3, ["4x4"] * 6 + ["2x2"] * 6 + ["1x1"] * 4, "global_pool"),
     "exact"),
    ("efficientnet_b0", 512, 1, *per_block(B0, ["8x8"] * 5 + ["4x4"] * 6 + ["1x1"] * 5, "global_pool"), "exact"),
    ("cspresnet50", 512, 1, "stages.0,stages.1,stages.2,stages.3,head.global_pool", "4x4,4x4,4x4,2x2,1x1", "exact"),
    ("res2net50_14w_8s", 512, 1, *per_block(RESNET50, ["4x4"] * 7 + ["2x2"] * 6 + ["1x1"] * 3, "global_pool"),
     "exact"),
]
# The same 256-px packs at every size: one stage from the image into the global pooling, so no
# full-size activation exists at all and the peak is set by the pack, not the image.
FLAT = [("resnet50", size, 1, "global_pool", f"{size // 256}x{size // 256}", "exact") for size in (1024, 2048, 4096)]
SUITES = {"single": SINGLE, "staged": STAGED, "flat": FLAT}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--suite", choices=SUITES, default="single")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="substring filter on the model name")
    p.add_argument("--out", default="benchmarks/results.json")
    args = p.parse_args()
    rows, models = [], {}
    matrix = [m for m in SUITES[args.suite] if not args.only or args.only in m[0]]
    for name, size, batch, merge, grid, mode in tqdm(matrix, desc="bench", file=sys.stderr):
        model = models.setdefault(name, create_model(name))
        rows.append(bench(name, size, merge, grid, mode, batch, args.repeats, model=model))
        tqdm.write(json.dumps(rows[-1]), file=sys.stderr)
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    print(f"| model | size | plan (merge layers @ grids) | mode | peak unsplit MiB | peak split MiB | "
          f"memory ratio | MACs ratio | latency ratio | max abs err / output scale |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        macs = f"{r['macs_ratio']:.2f}x" if r["macs_ratio"] is not None else "-"
        print(f"| {r['model']} | {r['size']} | {_short_plan(r)} | {r['mode']} | "
              f"{r['baseline_peak_bytes'] / 2**20:.1f} | {r['split_peak_bytes'] / 2**20:.1f} | "
              f"**{r['memory_ratio']:.2f}x** | {macs} | {r['latency_ratio']:.2f}x | "
              f"{r['max_abs_error'] / r['output_scale']:.1e} |")
    return 0


def _short_plan(row: dict) -> str:
    """``layer2 @3x3``; long staged plans as ``N stages: first @g .. last @g`` (the JSON has them whole)."""
    names, grids = row["merge_layer"].split(","), row["grid"].split(",")
    if len(names) <= 5:
        return ", ".join(f"{n} @{g}" for n, g in zip(names, grids))
    return f"{len(names)} stages: {names[0]} @{grids[0]} .. {names[-1]} @{grids[-1]}"


if __name__ == "__main__":
    sys.exit(main())
