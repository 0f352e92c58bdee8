"""``splitpack plan``: the planner's choice for a model and input size, its front, and one
measurement of the chosen plan (predicted vs measured peak) beside the unsplit model."""
from __future__ import annotations

import time
from typing import Any

import torch

from splitpack.measure.units import MiB


def plan_report(model_name: str, size: int, batch_size: int = 1, memory_budget: int | None = None,
                max_overhead: float | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                measure: bool = True, model: torch.nn.Module | None = None, max_latency: float | None = None,
                latency_mode: str = "program", measure_latency: bool = False) -> dict[str, Any]:
    """The JSON document of ``splitpack plan`` (``model``: the one to plan, default ``model_name`` built)."""
    import splitpack
    from splitpack.core.search.planner import MEASURED_PLANS, Planner

    model = model if model is not None else splitpack.create_model(model_name)
    model = model.to(device=device, dtype=dtype).eval()
    shape = (batch_size, 3, size, size)
    start = time.perf_counter()
    planner = Planner(model)
    traced_s = time.perf_counter() - start
    choice = planner.choose(shape, memory_budget, max_overhead, whole_front=True, max_latency=max_latency,
                            latency_mode=latency_mode, measure=MEASURED_PLANS if measure_latency else 0)
    timed = choice.predicted_time
    report = {
        "model": model_name, "size": size, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "objective": choice.objective, "plan": choice.plan.to_dict(),
        "plan_text": str(choice.plan), "merge_layer": choice.plan.merge_layer_text, "grid": choice.plan.grid_text,
        "predicted_peak_bytes": choice.predicted_peak_bytes, "predicted_macs_ratio": choice.predicted_macs_ratio,
        "macs": choice.macs, "unsplit_macs": choice.unsplit_macs, "ops": choice.ops,
        "predicted_latency_ratio": timed.ratio if timed else None, "latency_mode": timed.mode if timed else None,
        "predicted_seconds": timed.seconds if timed else None,
        "predicted_unsplit_seconds": timed.unsplit_seconds if timed else None,
        "measured_latency_ratio": choice.measured_latency_ratio, "measured_plans": [m.to_dict() for m in choice.measured],
        "checkpoints": len(planner.checkpoints), "trace_seconds": round(traced_s, 3),
        "planning_seconds": round(choice.seconds, 3), "front": [p.to_dict() for p in choice.front],
        "measured_peak_bytes": None, "baseline_peak_bytes": None, "measured_by": None,
    }
    if measure:
        report.update(_measure(model, choice.plan, planner.traced, shape, dtype, device))
    return report


def _measure(model, plan, traced, shape, dtype, device) -> dict[str, Any]:
    """One call of the chosen plan and one of the unsplit model, each under the peak meter."""
    from splitpack.core.engine import SplitPack
    from splitpack.measure.meter import peak_activation_bytes

    x = torch.randn(shape, dtype=dtype, device=device)
    split = SplitPack(model, plan, traced=traced)
    split.program(x.shape, x.dtype, x.device)  # planning is not part of the call's peak
    return {"measured_peak_bytes": peak_activation_bytes(split, x), "baseline_peak_bytes": peak_activation_bytes(model, x),
            "measured_by": "cuda-allocator" if x.device.type == "cuda" else "cpu-activation-tracker"}


def format_report(r: dict[str, Any], front_rows: int = 12) -> str:
    lines = [f"{r['model']} @{r['size']} batch {r['batch_size']} {r['dtype']} on {r['device']}: "
             f"{r['checkpoints']} checkpoints, planned in {r['planning_seconds']:.1f} s (trace {r['trace_seconds']:.1f} s)",
             f"chosen ({r['objective']}): {r['plan_text']}",
             f"  predicted peak {r['predicted_peak_bytes'] / MiB:.2f} MiB, {r['predicted_macs_ratio']:.3f}x MACs, "
             + (f"{r['predicted_latency_ratio']:.3f}x latency ({r['predicted_seconds'] * 1e3:.1f} ms vs "
                f"{r['predicted_unsplit_seconds'] * 1e3:.1f} ms unsplit, as {r['latency_mode']}), "
                if r.get("predicted_latency_ratio") is not None else "") + f"{r['ops']} ops"]
    if r["measured_peak_bytes"] is not None:
        error = r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1 if r["measured_peak_bytes"] else 0.0
        lines.append(f"  measured peak {r['measured_peak_bytes'] / MiB:.2f} MiB (prediction {100 * error:+.1f}%); "
                     f"unsplit {r['baseline_peak_bytes'] / MiB:.2f} MiB: "
                     f"{r['baseline_peak_bytes'] / max(1, r['measured_peak_bytes']):.2f}x lower")
    lines.append(f"front ({len(r['front'])} plans; * = exact replay, else the search's estimate):")
    for p in r["front"][:front_rows]:
        lines.append(f"  {p['predicted_peak_bytes'] / MiB:9.2f} MiB {p['predicted_macs_ratio']:7.3f}x "
                     f"{'*' if p['exact'] else ' '} {p['plan']}")
    if len(r["front"]) > front_rows:
        lines.append(f"  ... {len(r['front']) - front_rows} more (--json lists them all)")
    return "\n".join(lines)


def plot_front(r: dict[str, Any], path) -> None:
    """Peak activation memory vs MACs ratio of the front, the chosen plan marked, unsplit as a line."""
    from splitpack.measure.plot import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    front = r["front"]
    for exact, marker, label in ((False, "o", "front (estimated)"), (True, "s", "front (exact replay)")):
        points = [p for p in front if p["exact"] == exact]
        if points:
            ax.scatter([p["predicted_macs_ratio"] for p in points], [p["predicted_peak_bytes"] / MiB for p in points],
                       marker=marker, s=18, label=label, alpha=0.8)
    ax.scatter([r["predicted_macs_ratio"]], [r["predicted_peak_bytes"] / MiB], marker="*", s=220, color="red",
               zorder=5, label=f"chosen: {r['plan_text']}"[:90])
    if r["measured_peak_bytes"] is not None:
        ax.scatter([r["predicted_macs_ratio"]], [r["measured_peak_bytes"] / MiB], marker="x", s=80, color="black",
                   zorder=6, label="chosen, measured")
        ax.axhline(r["baseline_peak_bytes"] / MiB, color="grey", ls="--", lw=1, label="unsplit, measured")
    ax.set_xlabel("MACs, split / unsplit")
    ax.set_ylabel("peak activation memory (MiB)")
    ax.set_yscale("log")
    ax.set_title(f"{r['model']} @{r['size']} batch {r['batch_size']}: {r['objective']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
