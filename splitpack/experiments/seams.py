"""Feature maps after several layers: unsplit vs seed vs exact split-pack, with difference maps (poster Figs. 3-4).

Seed mode (no halo) gives each pack zero borders where its neighbours should be,
so the merged activation carries seams along the pack boundaries; this shows
where they appear and how they spread and fade in the layers after the merge.
Exact mode (halo) has none: its difference maps are float noise.

The feature map after a layer is read as the input of the first module that
consumes it (a forward pre-hook), so it is observed in the engine's own run of the
network after the merge, for every mode alike.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODES = ("unsplit", "seed", "exact")


def tap_modules(model: nn.Module, layers: list[str], strict: bool = True) -> dict[str, str]:
    """layer -> name of the first module that takes the layer's output as input
    (``strict=False``: leave out layers whose output no module reads directly)."""
    from splitpack.core.capture.graph import trace

    traced = trace(model)
    taps = {}
    for layer in layers:
        node = traced.checkpoints.get(layer)
        if node is None:
            raise ValueError(f"unknown layer {layer!r}; valid: {', '.join(traced.checkpoints)}")
        users = sorted((u for u in node.users if u.op == "call_module"), key=traced.index.__getitem__)
        if not users and not strict:
            continue
        if not users:
            raise ValueError(f"layer {layer!r}: no module reads its output directly, cannot observe it")
        taps[layer] = str(users[0].target)
    return taps


class _Recorder:
    """Forward pre-hooks keeping the last real (non-fake) input of each tap module."""

    def __init__(self, model: nn.Module, taps: dict[str, str]):
        self.values: dict[str, torch.Tensor] = {}
        self.recording = False
        self._handles = []
        for layer, module_name in taps.items():
            hook = self._hook(layer)
            self._handles.append(model.get_submodule(module_name).register_forward_pre_hook(hook))

    def _hook(self, layer: str):
        from torch._subclasses.fake_tensor import FakeTensor

        def record(_module, args):
            x = args[0]
            if self.recording and isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                self.values[layer] = x.detach().clone()

        return record

    def capture(self, fn, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fn(x)  # warm-up: split-pack plans its first call at a size with fake tensors
        self.values, self.recording = {}, True
        try:
            out = fn(x)
        finally:
            self.recording = False
        return out, self.values

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def feature_maps(model: nn.Module, x: torch.Tensor, layers: list[str], merge_layer: str, grid: int = 2) -> dict:
    """{mode: {"logits": tensor, "maps": {layer: tensor}}} for unsplit, seed and exact.

    ``layers`` must be ``merge_layer`` or later (earlier ones run per pack)."""
    import splitpack

    order = splitpack.merge_layers(model)
    early = [l for l in layers if l in order and order.index(l) < order.index(merge_layer)]
    if early:
        raise ValueError(f"layers {early} run before the merge layer {merge_layer!r}: pick later ones")
    recorder = _Recorder(model, tap_modules(model, layers))
    runs = {"unsplit": model,
            "seed": splitpack.wrap(model, merge_layer, grid=(grid, grid), mode="seed"),
            "exact": splitpack.wrap(model, merge_layer, grid=(grid, grid), mode="exact")}
    result = {}
    try:
        with torch.inference_mode():
            for mode, fn in runs.items():
                logits, maps = recorder.capture(fn, x)
                missing = [l for l in layers if l not in maps]
                if missing:
                    raise RuntimeError(f"{mode}: feature maps of {missing} were not observed")
                result[mode] = {"logits": logits, "maps": maps}
    finally:
        recorder.remove()
    return result


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float | None:
    """||a - ref|| / ||ref|| over the whole feature map; None when the shapes differ (seed
    packs whose side is not a multiple of the stride so far give a larger merged map)."""
    if a.shape != ref.shape:
        return None
    return float((a - ref).norm() / ref.norm().clamp_min(1e-12))


def _max_abs_diff(a: torch.Tensor, ref: torch.Tensor) -> float | None:
    return float((a - ref).abs().max()) if a.shape == ref.shape else None


def seam_report(result: dict, layers: list[str]) -> dict:
    ref = result["unsplit"]
    report = {"layers": {}, "logits": {}}
    for layer in layers:
        report["layers"][layer] = {
            "shape": list(ref["maps"][layer].shape),
            "seed_shape": list(result["seed"]["maps"][layer].shape),
            **{f"{m}_rel_error": relative_error(result[m]["maps"][layer], ref["maps"][layer]) for m in ("seed", "exact")},
            **{f"{m}_max_abs_diff": _max_abs_diff(result[m]["maps"][layer], ref["maps"][layer]) for m in ("seed", "exact")},
        }
    for m in ("seed", "exact"):
        report["logits"][m] = {
            "max_abs_diff": float((result[m]["logits"] - ref["logits"]).abs().max()),
            "same_top1": bool((result[m]["logits"].argmax(1) == ref["logits"].argmax(1)).all()),
        }
    return report


def plot_seams(result: dict, shown: list[str], curve: list[str], png: str | Path, title: str, grid: int) -> None:
    """One row per shown layer: unsplit | seed | |seed-unsplit| | exact | |exact-unsplit|; then the
    relative error of every curve layer (depth) for seed and exact."""
    from splitpack.measure.plot import pyplot

    plt = pyplot()

    ref = result["unsplit"]["maps"]
    rows = len(shown)
    fig = plt.figure(figsize=(14, 2.6 * rows + 3.2))
    gs = fig.add_gridspec(rows + 1, 5, height_ratios=[1] * rows + [1.15])
    for r, layer in enumerate(shown):
        base = ref[layer][0]
        energy = base.abs().mean(0)  # channel-mean |activation|
        scale = float(energy.mean()) or 1.0
        diffs = {m: (result[m]["maps"][layer][0] - base).abs().mean(0) / scale
                 if result[m]["maps"][layer].shape == ref[layer].shape else None for m in ("seed", "exact")}
        vmax = float(diffs["seed"].max()) if diffs["seed"] is not None else 1.0  # exact alone: show it as ~0
        panels = [("unsplit", energy, "viridis", None), ("seed", result["seed"]["maps"][layer][0].abs().mean(0), "viridis", None),
                  ("|seed - unsplit|", diffs["seed"], "magma", vmax), ("exact", result["exact"]["maps"][layer][0].abs().mean(0), "viridis", None),
                  ("|exact - unsplit|", diffs["exact"], "magma", vmax)]
        emax = float(energy.max())
        for c, (name, img, cmap, dmax) in enumerate(panels):
            ax = fig.add_subplot(gs[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if img is None:
                got = tuple(result[name.strip("|").split()[0]]["maps"][layer].shape[-2:])
                ax.text(0.5, 0.5, f"merged map is {got[0]}x{got[1]},\nunsplit {tuple(base.shape[-2:])[0]}x"
                        f"{tuple(base.shape[-2:])[1]}: packs not a\nmultiple of the stride", ha="center",
                        va="center", fontsize=7, transform=ax.transAxes)
                ax.set_title(name, fontsize=8)
                continue
            im = ax.imshow(img.numpy(), cmap=cmap, vmin=0, vmax=dmax if dmax is not None else emax)
            if dmax is not None:
                mode = name.split()[0].strip("|")
                ax.set_title(f"{name}\nrel. error {relative_error(result[mode]['maps'][layer], ref[layer]):.2g}", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            else:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{layer}\n{tuple(base.shape)}", fontsize=8)
    ax = fig.add_subplot(gs[rows, :])
    for mode, style in (("seed", "o-"), ("exact", "s-")):
        errs = [relative_error(result[mode]["maps"][l], ref[l]) for l in curve]
        errs = [float("nan") if e is None else max(e, 1e-9) for e in errs]  # nan: sizes differ
        ax.semilogy(range(len(curve)), errs, style, label=f"{mode} mode")
    ax.set_xticks(range(len(curve)))
    ax.set_xticklabels(curve, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("||split - unsplit|| / ||unsplit||")
    ax.set_title("relative feature-map error after the merge, by depth (exact: float noise, floored at 1e-9)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
