"""Which merge layers are worth measuring: a cheap estimate from one unsplit profile.

An approximate halo model (receptive-field radius per layer) beside the engine's
exact rules, used only to pick the few candidates :mod:`splitpack.capacity.planner`
measures. To be replaced by the staged-plan planner (issue 12); the planner only
uses :class:`CandidateSearch`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class CandidateSearch:
    """Merge layers to measure for a grid and mode, from one unsplit profile of ``model`` on ``x``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, every: Sequence[str]):
        self.model, self.x, self.every = model, x, list(every)
        self._geometry = None

    def _profile(self):
        if self._geometry is None:
            from splitpack.measure.profile import profile_unsplit

            profile = profile_unsplit(self.model, self.x, layers=self.every)
            self._geometry = (profile, *layer_geometry(self.model, self.x, self.every))
        return self._geometry

    def choose(self, valid: Sequence[str], grid: tuple[int, int], mode: str, k: int) -> tuple[list[str], dict[str, int]]:
        """(the ``k`` merge layers to measure, their estimated split peak bytes)."""
        profile, radii, aliases, shapes = self._profile()
        # one name per merge point, and only maps the grid can cut (not pooled 1x1 vectors)
        distinct = [n for n in valid if n not in aliases and len(shapes.get(n, ())) == 4
                    and shapes[n][-2] >= grid[0] and shapes[n][-1] >= grid[1]]
        batch = self.x.shape[0]
        merged = {n: math.prod(shapes[n]) * self.x.element_size() * batch for n in distinct}
        estimates = estimate_split_peaks(profile, distinct, grid, mode, radii, self.x.shape[-1], merged)
        return pick_candidates(estimates, list(valid), k), estimates


def layer_geometry(model: nn.Module, x: torch.Tensor,
                   names: Sequence[str]) -> tuple[dict[str, float], dict[str, str], dict[str, tuple[int, ...]]]:
    """(receptive-field radius in input pixels, alias, output shape) per named layer, from one batch-1 forward.

    Radius: an upper bound of the halo an exact pack carries at that layer:
    every window op (conv, pool) met so far in execution order adds
    (kernel extent - 1) / 2 times its input's stride relative to the image;
    parallel branches are counted as if chained.
    Alias: names whose output is the very tensor of the layer before them,
    not modified in place (a block and its last activation), are one merge
    point; all but its outermost name map to that name.
    """
    image_h = x.shape[-2]
    radius = 0.0
    radii: dict[str, float] = {}
    aliases: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    last: list = [None, None]  # (name, output) of the previous named layer
    wanted = set(names)

    def on_leaf(module, inputs, _output):
        nonlocal radius
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
            return
        k = getattr(module, "kernel_size", None)
        if k is None:
            return
        k = k if isinstance(k, int) else k[0]
        d = getattr(module, "dilation", 1)
        d = d if isinstance(d, int) else d[0]
        radius += (d * (k - 1)) / 2 * (image_h / inputs[0].shape[-2])

    def on_named(name):
        def hook(_m, inputs, output):  # returns None: a forward hook's return value replaces the output
            radii.setdefault(name, radius)
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))
            in_place = any(i is output for i in inputs)  # e.g. ReLU(inplace): a new value in the same tensor
            if last[1] is not None and output is last[1] and not in_place:
                aliases[name] = aliases.get(last[0], last[0])
            last[0], last[1] = name, output
        return hook

    handles = []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(on_leaf))
    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_hook(on_named(name)))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
        last[1] = None
    # name each merge point by its outermost module ("layer1" rather than "layer1.1.act2")
    groups: dict[str, list[str]] = {}
    for name, first in aliases.items():
        groups.setdefault(first, [first]).append(name)
    aliases = {}
    for members in groups.values():
        canonical = min(members, key=lambda n: (n.count("."), members.index(n)))
        aliases.update({n: canonical for n in members if n != canonical})
    return radii, aliases, shapes


def estimate_split_peaks(profile, names: Sequence[str], grid: tuple[int, int], mode: str,
                         radii: dict[str, float] | None = None, size: int | None = None,
                         merged_bytes: dict[str, int] | None = None) -> dict[str, int]:
    """Cheap split peak estimate per merge layer from the unsplit profile at candidate granularity.

    head: the unsplit peak up to the layer scaled to one pack (exact mode: the
    pack plus its halo, from :func:`receptive_radii`), plus the merged
    activation kept for the whole image; tail: the unsplit peak after the layer.
    Used only to choose which candidates to measure.
    """
    rows, cols = grid
    points = profile.layers
    index: dict[str, int] = {}
    for i, p in enumerate(points):
        index.setdefault(p.label, i)
    estimates = {}
    for name in names:
        if name not in index:
            continue
        i = index[name]
        share = 1.0 / (rows * cols)
        if mode == "exact" and radii is not None and size:
            r = radii.get(name, 0.0)
            share = min(1.0, 1 / rows + 2 * r / size) * min(1.0, 1 / cols + 2 * r / size)
        head = max(p.peak_bytes for p in points[: i + 1])
        tail = max((p.peak_bytes for p in points[i + 1:]), default=0)
        # the merged activation: the layer's output for the whole image (after_bytes
        # over-counts a container's input, which its caller still holds)
        merged = merged_bytes.get(name, points[i].after_bytes) if merged_bytes else points[i].after_bytes
        estimates[name] = int(max(head * share + merged, tail))
    return estimates


ESTIMATE_TOLERANCE = 0.10


def pick_candidates(estimates: dict[str, int], order: Sequence[str], k: int,
                    tolerance: float = ESTIMATE_TOLERANCE) -> list[str]:
    """The ``k`` earliest merge layers whose estimate is within ``tolerance`` of the best one.

    Earliest, because a later merge runs more of the network per pack: more halo
    to recompute in exact mode, and in seed mode more layers that see the pack
    seams (accuracy drops as the merge moves deeper). Fewer than ``k`` near the
    best: the rest by estimate.
    """
    if not estimates:
        return []
    best = min(estimates.values())
    near = sorted((n for n in estimates if estimates[n] <= best * (1 + tolerance)), key=order.index)
    rest = sorted((n for n in estimates if n not in near), key=lambda n: (estimates[n], order.index(n)))
    return (near + rest)[:k]


