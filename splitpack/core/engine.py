"""The public face of the engine: ``wrap``, ``merge_layers`` and :class:`SplitPack` (splitpack.core.execute.module)."""
from __future__ import annotations

from torch import nn

from splitpack.core.capture.graph import find_cuts, trace
from splitpack.core.compile.recording import DEFAULT_MAX_BATCH
from splitpack.core.execute.module import MODES, PLAN_CACHE_SIZE, SplitPack
from splitpack.core.plan.schedule import batch_limit, unsplittable_nodes
from splitpack.core.plan.spec import AutoPlan, parse_plan
from splitpack.core.search.auto import AutoSplitPack

__all__ = ["MODES", "PLAN_CACHE_SIZE", "SplitPack", "merge_layers", "wrap"]


# --------------------------------------------------------------------------- public API

def wrap(model: nn.Module, merge_layer, grid=(2, 2), mode: str = "exact", *, compile=False,
         cuda_graphs: bool = False, max_batch: int = DEFAULT_MAX_BATCH, memory_budget: int | None = None,
         max_overhead: float | None = None, max_latency: float | None = None, halo="reuse",
         batch_packs: bool | int = False, measure_latency: bool = False) -> nn.Module:
    """Run ``model`` with split-pack inference.

    ``merge_layer`` is a checkpoint (module name), a staged plan (a list or comma string of
    checkpoints, e.g. ``["layer2", "global_pool"]``), and ``grid`` the packs of each stage (one
    grid, or one per stage: ``[4, 2]``, ``"4x4,2x2"``). Stage 1 runs packs of the image up to
    the first checkpoint; each next stage runs packs of the previous checkpoint; the rest of the
    network runs once. ``mode="exact"`` gives each pack the halo its receptive field needs, so
    ``wrap(model, ...)(x)`` equals ``model(x)``; ``mode="seed"`` runs each pack on its own (the
    poster's method; seams).

    ``compile`` (exact mode): False interprets the plan op by op (the reference path);
    ``"program"`` records each input size's plan once into a straight-line program and runs
    that; True (``"inductor"``) runs that program through ``torch.compile``. ``cuda_graphs``
    replays each size and batch bucket from a captured CUDA graph (CUDA inputs; see
    :mod:`splitpack.core.compile.cudagraphs`), the buckets 1, 2, 4, ... up to ``max_batch`` (a
    server's largest batch); larger batches run without. Outputs are the same as the interpreter's.

    ``halo`` (exact mode): "reuse" (default) -- each pack takes the rows its upper neighbour in the
    same grid column computed (line buffers) instead of recomputing them, so full-width strips
    (grid Rx1) recompute nothing; "recompute" -- every pack computes its whole halo (to compare, or
    to bisect; on grids of several columns it can be the faster mode: reuse's joins copy every value a
    pack holds). One mode, or one per stage (``["reuse", "recompute"]`` or ``"reuse,recompute"``; the
    planner picks them per stage, see :class:`splitpack.core.search.planner.PlanChoice`). Outputs are the
    same either way.

    ``batch_packs`` (exact mode, a given plan): packs of one grid row with the same shape (the inner
    columns of a grid) run as one call, concatenated on the batch dimension: fewer, larger kernels
    for more memory (the packs of a call are alive together; the predicted peak counts them). True
    batches a whole row, a number k at most k packs, False (default) runs packs one by one.

    ``merge_layer="auto"``: the planner (:mod:`splitpack.core.search.planner`) picks the staged plan for
    each input size on its first call -- the smallest predicted peak within ``max_overhead`` x the
    unsplit MACs (default 1.25), or with ``memory_budget`` (peak activation bytes per image) the
    least MACs that fit -- and returns a :class:`splitpack.core.search.auto.AutoSplitPack`.
    ``max_latency`` (a ratio to the unsplit model's time on this device, predicted by the device's time
    model, :mod:`splitpack.core.cost.time_model`, calibrated on first use): the smallest peak predicted
    within it, or with ``memory_budget`` the fewest predicted seconds within the budget.
    ``measure_latency`` (with ``max_latency`` alone): the planner also times a few candidate plans on this
    device (each against the unsplit model, best of a few runs) and keeps the smallest peak *measured* within
    ``max_latency`` -- seconds to a minute more planning per input size, for a pick that does not hang on the
    time model's error.
    """
    plan = parse_plan(merge_layer, grid, memory_budget=memory_budget, max_overhead=max_overhead,
                      max_latency=max_latency, measure_latency=measure_latency)
    if isinstance(plan, AutoPlan):
        if halo != "reuse" or batch_limit(batch_packs) > 1:
            raise ValueError("halo and batch_packs are for a given plan: with merge_layer='auto' the planner "
                             "picks them (by predicted time, with max_latency or a time model)")
        return AutoSplitPack(model, plan, mode, compile=compile, cuda_graphs=cuda_graphs, max_batch=max_batch)
    if memory_budget is not None or max_overhead is not None or max_latency is not None or measure_latency:
        raise ValueError("memory_budget and max_overhead are for merge_layer='auto' (the planner's objective), "
                         "and so are max_latency and measure_latency")
    return SplitPack(model, plan, grid, mode, compile=compile, cuda_graphs=cuda_graphs, max_batch=max_batch,
                     halo=halo, batch_packs=batch_packs)


def merge_layers(model: nn.Module, mode: str | None = None, cuts: bool = False) -> list[str]:
    """Valid merge-layer (checkpoint) names in execution order.

    ``mode="exact"``: those exact mode can split up to (through squeeze-excitation and up to the
    global pooling); ``mode="seed"``: the spatial ones. ``cuts=True`` (exact mode): the cuts too
    (module outputs joined by ``+`` that together are all the rest needs; see
    :func:`splitpack.core.capture.graph.find_cuts`), ordered by their last value.
    """
    traced = trace(model)
    if mode == "seed" and cuts:
        raise ValueError("cuts are exact mode's merge layers")
    if mode is None and not cuts:
        return list(traced.checkpoints)
    if mode == "seed":
        return [name for name, node in traced.checkpoints.items() if node in traced.spatial]
    if mode not in (None, "exact"):
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocked = unsplittable_nodes(traced)
    names = {name: (node,) for name, node in traced.checkpoints.items() if mode is None or node not in blocked}
    if cuts:
        names.update((name, nodes) for name, nodes in find_cuts(traced).items()
                     if mode is None or not any(n in blocked for n in nodes))
    return sorted(names, key=lambda name: max(traced.index[n] for n in names[name]))
