#!/usr/bin/env python
"""Where split-pack's remaining peak memory goes: merged tensor, head phase, tail phase (BENCHMARKS.md).

usage: scripts/memory_breakdown.py MODEL SIZE MERGE_LAYER GRID
"""
from __future__ import annotations

import sys

import torch

import splitpack
from splitpack.measure.meter import peak_activation_bytes, tracked_call

MiB = 2**20


def main(name: str, size: str, merge: str, grid: str) -> None:
    model = splitpack.create_model(name)
    x = torch.randn(1, 3, int(size), int(size))
    split = splitpack.wrap(model, merge, grid)
    split(x)  # build the plan outside the measurement
    merged, head_peak = tracked_call(split._run_exact, x)  # merged tensor + one pack's working set
    tail_peak = peak_activation_bytes(lambda t: split._run_tail([t.clone()]), merged)  # clone = merged
    print(f"{name}@{size} {merge} {grid}: unsplit {peak_activation_bytes(model, x) / MiB:.1f} MiB; "
          f"split {peak_activation_bytes(split, x) / MiB:.1f} MiB; merged tensor "
          f"{merged.numel() * merged.element_size() / MiB:.1f} MiB; head phase {head_peak / MiB:.1f} MiB; "
          f"tail phase (incl. merged) {tail_peak / MiB:.1f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:5])
