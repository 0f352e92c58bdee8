#!/usr/bin/env python
"""Where split-pack's remaining peak memory goes: merged tensor, head phase, tail phase (BENCHMARKS.md).

usage: scripts/memory_breakdown.py MODEL SIZE MERGE_LAYER GRID

Built on the per-layer profile (splitpack.measure.profile): the head phase is every
window up to the last pack's merge layer, the tail phase every window after it,
both measured by the same meter in one run of the split model.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

import splitpack  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402
from splitpack.measure.profile import profile_split  # noqa: E402
from splitpack.measure.units import MiB  # noqa: E402


def merged_bytes(model: torch.nn.Module, x: torch.Tensor, merge_layer: str) -> int:
    """Bytes of the merge layer's output for the whole image (what split-pack's packs write into)."""
    seen = []
    hook = dict(model.named_modules())[merge_layer].register_forward_hook(
        lambda _m, _i, out: seen.append(out.numel() * out.element_size()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        hook.remove()
    return seen[0]


def breakdown(name: str, size: int, merge_layer: str, grid: str) -> dict[str, int]:
    model = splitpack.create_model(name)
    x = torch.randn(1, 3, size, size)
    profile = profile_split(model, x, merge_layer, grid)
    head = [p.peak_bytes for p in profile.layers if p.pack is not None]
    tail = [p.peak_bytes for p in profile.layers if p.pack is None]
    return {"unsplit": peak_activation_bytes(model, x), "split": profile.peak_bytes,
            "merged": merged_bytes(model, x, merge_layer), "head": max(head), "tail": max(tail)}


def main(name: str, size: str, merge_layer: str, grid: str) -> None:
    b = breakdown(name, int(size), merge_layer, grid)
    print(f"{name}@{size} {merge_layer} {grid}: unsplit {b['unsplit'] / MiB:.1f} MiB; split {b['split'] / MiB:.1f} MiB; "
          f"merged tensor {b['merged'] / MiB:.1f} MiB; head phase {b['head'] / MiB:.1f} MiB; "
          f"tail phase (incl. merged) {b['tail'] / MiB:.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:5])
