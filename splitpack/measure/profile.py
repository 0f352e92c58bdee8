"""Profile activation memory layer by layer, unsplit and split (the poster's Fig. 3).

For every layer, in execution order, two numbers: the activation bytes alive
right after the layer's output exists (``after_bytes``) and the most alive at
any moment since the previous layer finished (``peak_bytes``: the layer's own
peak, inputs and output alive together). The peak layer is the one whose
``peak_bytes`` is the maximum, which by construction is where the tracker
measures the run's peak.

Unsplit: forward hooks on the model's modules. Split (a warm call, after the
first one built split-pack's per-size plan): the engine's ``on_layer`` callback (called after each merge-layer candidate's output, per
pack in the head and once in the tail); without it, forward hooks on the
original modules. Measured by :func:`splitpack.measure.meter.peak_meter` (CPU
tracker or CUDA allocator) and its per-layer windows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from splitpack.core.plan.spec import grid_text, parse_grid
from splitpack.measure.meter import peak_meter

MiB = 1024**2


@dataclass
class LayerPoint:
    label: str
    after_bytes: int
    peak_bytes: int
    pack: int | None = None  # 0.. in the split head (one point per pack), None elsewhere


@dataclass
class Profile:
    name: str
    merge_layer: str | None
    grid: str | None
    mode: str | None
    peak_bytes: int
    peak_layer: str
    layers: list[LayerPoint]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hooked_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules to mark: ``names`` if given, else every leaf that computes something.

    nn.Identity placeholders (timm's drop_block, aa, ...) are left out: they add
    labels without changing memory.
    """
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in the model")
        return [(n, modules[n]) for n in names]
    return [(n, m) for n, m in model.named_modules()
            if n and not list(m.children()) and not isinstance(m, nn.Identity)]


def _points(windows: list[tuple[str, int, int]], head: set[str]) -> list[LayerPoint]:
    seen: dict[str, int] = {}
    points = []
    for label, after, peak in windows:
        pack = None
        if label in head:
            pack = seen.get(label, 0)
            seen[label] = pack + 1
        points.append(LayerPoint(label, after, peak, pack))
    return points


def _finish(name, merge_layer, grid, mode, tracker, head: set[str]) -> Profile:
    points = _points(tracker.windows, head)
    top = max(points, key=lambda p: p.peak_bytes)
    # the window peaks cover the whole call (a final mark closes it), so their
    # maximum is the tracker's own peak
    assert top.peak_bytes == tracker.peak, (top.peak_bytes, tracker.peak)
    return Profile(name, merge_layer, grid, mode, int(tracker.peak), top.label, points)


def _metered_call(tracker, fn: Callable, x: torch.Tensor, detach: Callable[[], Any]) -> None:
    """``fn(x)`` under ``tracker``, the output marked and dropped inside the window; then ``detach``
    the marking hooks, even if the call failed."""
    try:
        with torch.inference_mode(), tracker:
            out = fn(x)
            tracker.mark("output")
            del out
    finally:
        detach()


def profile_unsplit(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None) -> Profile:
    """Per-layer memory of ``model(x)``; ``layers`` = module names to mark (default: all leaves)."""
    tracker = peak_meter(x.device)
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: tracker.mark(n))
               for n, m in hooked_modules(model, layers)]
    _metered_call(tracker, model, x, lambda: [h.remove() for h in handles])
    return _finish("unsplit", None, None, None, tracker, head=set())


def _head_names(model: nn.Module, merge_layer: str) -> set[str]:
    """Candidate names up to and including the merge layer (the per-pack part)."""
    import splitpack

    names = list(splitpack.merge_layers(model))
    return set(names[: names.index(merge_layer) + 1]) if merge_layer in names else set()


def profile_split(model: nn.Module, x: torch.Tensor, merge_layer: str, grid=(2, 2), mode: str = "exact") -> Profile:
    """Per-layer memory of the split-pack model merged at ``merge_layer``."""
    import splitpack

    grid = parse_grid(grid)
    wrapped = splitpack.wrap(model, merge_layer=merge_layer, grid=grid, mode=mode)
    # the first call builds the per-size plan (kept between requests, like weights):
    # profile a warm call, as a serving replica runs
    with torch.inference_mode():
        wrapped(x)
    tracker = peak_meter(x.device)
    wrapped.on_layer = tracker.mark  # the engine names each merge-layer candidate as its output is made
    _metered_call(tracker, wrapped, x, lambda: setattr(wrapped, "on_layer", None))
    name = f"split@{merge_layer} {grid_text(grid)} {mode}"
    return _finish(name, merge_layer, grid_text(grid), mode, tracker, head=_head_names(model, merge_layer))


def profile_model(model: nn.Module, x: torch.Tensor, merge_layers: Sequence[str] = (), grid=(2, 2),
                  mode: str = "exact", layers: Sequence[str] | None = None) -> list[Profile]:
    """The unsplit profile followed by one split profile per merge layer."""
    profiles = [profile_unsplit(model, x, layers)]
    for layer in merge_layers:
        profiles.append(profile_split(model, x, layer, grid, mode))
    return profiles


# --- plot ------------------------------------------------------------------------

def _runs(prof: Profile, position: dict[str, int]) -> list[tuple[list[int], list[float]]]:
    """(x, MiB) line segments: one per pack of the split head, one for the rest."""
    groups: dict[int | None, list[LayerPoint]] = {}
    for p in prof.layers:
        if p.label in position:
            groups.setdefault(p.pack, []).append(p)
    runs = []
    for _, points in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        points = sorted(points, key=lambda p: position[p.label])
        runs.append(([position[p.label] for p in points], [p.peak_bytes / MiB for p in points]))
    return runs


def plot_profiles(profiles: list[Profile], path: str, title: str) -> None:
    """Activation memory while each layer runs (its window peak), one colour per run.

    The x axis is the unsplit run's layers in execution order; split runs are
    marked at merge-layer candidates only (a point covers the layers since the
    previous candidate), their head once per pack. Triangles mark each run's
    peak, dotted lines the merge layers.
    """
    from splitpack.measure.plot import pyplot

    plt = pyplot()

    reference = [p.label for p in profiles[0].layers]
    position: dict[str, int] = {}
    for i, label in enumerate(reference):
        position.setdefault(label, i)
    fig, ax = plt.subplots(figsize=(min(16.0, max(9.0, len(reference) * 0.12)), 5.5))
    for k, prof in enumerate(profiles):
        colour = "black" if k == 0 else f"C{(k - 1) % 10}"
        label = f"{prof.name}: peak {prof.peak_bytes / MiB:.2f} MiB at {prof.peak_layer}"
        if k == 0:
            ax.plot(range(len(reference)), [p.peak_bytes / MiB for p in prof.layers], lw=2, color=colour, label=label)
        else:
            for j, (xs, ys) in enumerate(_runs(prof, position)):
                ax.plot(xs, ys, marker=".", ms=3, color=colour, alpha=0.85, label=label if j == 0 else None)
            if prof.merge_layer in position:
                ax.axvline(position[prof.merge_layer], color=colour, ls=":", lw=1)
        top = max(prof.layers, key=lambda p: p.peak_bytes)
        if top.label in position:
            ax.plot([position[top.label]], [top.peak_bytes / MiB], marker="v", ms=9, color=colour)
    step = max(1, len(reference) // 70)
    ax.set_xticks(range(0, len(reference), step))
    ax.set_xticklabels(reference[::step], rotation=90, fontsize=6)
    ax.set_ylabel("activation memory while the layer runs (MiB)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
