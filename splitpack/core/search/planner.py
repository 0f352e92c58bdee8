"""The planner behind ``merge_layer: auto``: the Pareto front of staged plans by predicted peak
activation memory and MACs, and the plan an objective picks from it.

Search. A plan is a path over the exact-mode checkpoints (one per distinct node, and the cuts
:func:`planned_cuts` keeps, in execution order) from the image to a last checkpoint, one stage option
(source, end, rows x cols grid) per step. Its estimated peak (splitpack.core.cost.fast_estimate) is the largest working set of a pack, plus the
checkpoint bytes alive along the plan (:func:`chain_bands`: the bands of the checkpoints the next
stages are reading; a stage that reads its source whole -- a squeeze-excitation pass, one row of
packs -- starts only once the stages before it have finished, so their bands and its source are
not all alive with what follows), plus the last checkpoint written whole (or the unsplit rest of the
network, if that needs more); its MACs are the stages' (halo recompute and second passes included)
plus the rest of the network. For each cap ``T`` on the working set (a geometric ladder) a dynamic
programme over (checkpoint, grid rows of the stage that wrote it) x (MACs overhead in buckets) finds
the least checkpoint bytes for every overhead; the plans of all caps together give the estimated
front. The search runs twice: with chains, and with every checkpoint's bands counted as alive
together (an upper bound, which ranks plans of many small bands better).

Ranking. The finalists an objective picks from both fronts are predicted exactly
(splitpack.core.cost.exact_peak: the executor's memory behaviour replayed on the real program, MACs
read off the program) and the best of those wins.

Objectives: the smallest peak within a MACs cap (default :data:`DEFAULT_MAX_OVERHEAD`; plans
within :data:`PEAK_TIE` of it count as a tie, won by the fewest MACs), or the least MACs within a
memory budget (bytes for the whole batch); both when both are given. With ``max_latency`` (a ratio
to the unsplit model's predicted time on this device, splitpack.core.cost.time_model) the plans of
the front are timed by the device's time model: the smallest peak whose predicted latency ratio is
within it, or with a memory budget the fewest predicted seconds within the budget (and within it).

Strips. The search's grids stop at :data:`MAX_TILES` rows, and a full-width strip (a grid Rx1) with halo
reuse recomputes nothing: with ``max_latency`` the checkpoints of the front's plans of least estimated peak
(each also continued to the checkpoint after which the unsplit rest needs the least memory) are tried as
strips of :data:`STRIP_HEIGHTS` rows of each stage's smallest extent, timed and replayed like the rest: the
shortest strips predicted within ``max_latency`` win if their exact peak is smaller (a tie: faster); with a
memory budget, the tallest strips that fit it win if predicted faster. The default objective (the
smallest peak within a MACs cap) tries them too, each sequence also continued through every checkpoint
on the way (a stage per cut at a squeeze-excitation statistic's input recomputes nothing): the shortest
strips, replayed, win if their exact peak is smaller; then the tallest within :data:`PEAK_TIE` of it.

Execution. Where a time model is at hand, the chosen plan's way of running is tuned last
(:meth:`_SizeContext.tuned`): each stage's halo mode (reuse or recompute: on grids of several columns
reuse's joins copy every value a pack holds, and recomputing can be faster) by its predicted seconds,
then same-shaped packs batched into one call or not, each change kept only if it is predicted faster
and its exact peak stays within the objective's (the memory budget, or the chosen plan's peak within
:data:`PEAK_TIE`) and its MACs within the cap.

Measured. With ``measure`` (``max_latency`` alone) the search covers the whole front up to
:data:`MEASURE_SLACK` x the limit, and candidate plans are timed on the device
(:meth:`_SizeContext.measured_within_latency`): the smallest peak whose every timing is within the limit
less :data:`MEASURE_MARGIN` wins. The timings count page faults and warn above :data:`FAULT_WARNING` per call:
glibc's default heap makes the unsplit model fault on its large activations every call (splitpack.measure.heap).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from splitpack.core.cost.counts import unsplit_macs
from splitpack.core.cost.fast_estimate import MAX_TILES, Checkpoint, Estimator, StageOption
from splitpack.core.capture.graph import CUT_JOIN, TracedModel, find_cuts, model_device, trace
from splitpack.core.plan.spec import Plan, Stage
from splitpack.core.cost.exact_peak import allocation_profile
from splitpack.core.cost.plan_cost import PlanCost, plan_cost
from splitpack.core.cost.time_model import PROGRAM, PlanTime, Predictor, TimeModel, measured_ratio, time_model_for
from splitpack.core.plan.schedule import HALO_MODES, Program, build_program, node_kind, stage_graphs, \
    unsplittable_nodes
from splitpack.errors import SplitError

log = logging.getLogger("splitpack.planner")

DEFAULT_MAX_OVERHEAD = 1.25  # MACs split / unsplit when no cap and no budget is given
FRONT_OVERHEAD = 3.0  # the front covers plans up to this MACs ratio
# a stage spans at most six squeeze-excitation levels (each costs a pass over its packs, recomputed from the
# stage's source): a stage from a small checkpoint through several SE blocks holds only that source whole
# while its passes run, where a checkpoint per block would hold each block's larger output (SE-ResNet-50's
# layer3 is six SE blocks: seven passes)
MAX_PASSES = 7
MAX_SPAN = 40  # a stage spans at most this many checkpoints
MACS_BUCKETS = 160  # resolution of the MACs overhead in the dynamic programme
LADDER_STEP = 1.2  # ratio between consecutive working-set caps
FINALISTS = 6  # plans predicted exactly per objective
CONSERVATIVE_FINALISTS = 3  # ... and from the upper-bound search's front (smallest peak)
PEAK_TIE = 0.02  # smallest peak: plans within 2% of it are a tie, broken by fewer MACs
TIMED_CANDIDATES = 12  # plans of the search's front whose programs the time model predicts, per objective
LATENCY_SLACK = 1.05  # the search's seconds are estimates: it looks this far past max_latency
ESTIMATE_MARGIN = 1.05  # plans whose estimated seconds are within this of max_latency get their programs timed
MACS, SECONDS = "macs", "seconds"  # what the search's cost is
# measured latency (``measure``): plans predicted within this factor of max_latency are candidates, each run
# as a recorded program (or interpreted) interleaved with the unsplit model, best of MEASURE_REPEATS runs
MEASURE_SLACK = 1.25
MEASURE_REPEATS = 5
MEASURED_PLANS = 6  # plans ``wrap(..., measure_latency=True)`` times at most per input size
CONFIRMATIONS = 3  # picks timed a second time, smallest peak first, until one is within again
# a plan counts as measured within max_latency when each of its timings is within max_latency / (1 + margin):
# timings of the same plan (best of 5, interleaved) spread 2-20% between runs on this 2-core machine (median
# about 5%), so a pick measured just within the limit lands over it about half the time it is timed again
MEASURE_MARGIN = 0.10
# page faults per timed call (both models, the steady state: the fewest of any timed round) above which measuring
# warns that the C heap gives large activations back to the OS after every call (splitpack.measure.heap): 1000
# pages are 4 MiB touched afresh per call
FAULT_WARNING = 1000
# full-width strips (grids Rx1) of this many rows of each stage's smallest extent, tallest (fewest packs,
# fastest) first: with halo reuse a strip recomputes nothing, and the search's grids stop at 8 rows
STRIP_HEIGHTS = (8, 4, 2)


class BudgetTooSmall(SplitError, ValueError):
    """No plan fits the memory budget; the message states the smallest achievable peak."""


class LatencyTooLow(SplitError, ValueError):
    """No plan is predicted within ``max_latency``; the message states the best achievable ratio."""


def check_max_latency(value: float | None) -> float | None:
    """``max_latency``: None, or a latency ratio to the unsplit model > 0 (a plan may be faster than it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_latency: a latency ratio > 0 (split / unsplit, e.g. 1.1), got {value!r}")
    return float(value)


def check_measure(measure: int | bool, max_latency: float | None, memory_budget: int | None) -> None:
    """Measuring picks among candidates for ``max_latency`` alone (the latency objective without a budget)."""
    if measure and (max_latency is None or memory_budget is not None):
        raise ValueError("measure_latency: the planner measures candidates for max_latency alone (give "
                         "max_latency, without memory_budget)")


@dataclass(frozen=True)
class Point:
    """One plan of the front: predicted peak bytes (batch included) and MACs ratio."""

    plan: Plan
    peak_bytes: int
    macs_ratio: float
    exact: bool  # predicted by the exact replay (else the search's estimate)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": str(self.plan), **self.plan.to_dict(), "predicted_peak_bytes": self.peak_bytes,
                "predicted_macs_ratio": round(self.macs_ratio, 6), "exact": self.exact}


@dataclass(frozen=True)
class Execution:
    """How a plan's packs run: each stage's halo mode, and whether same-shaped packs of a grid row run
    as one batched call (see :func:`splitpack.wrap`)."""

    halo: tuple[str, ...]
    batch_packs: bool = False


@dataclass(frozen=True)
class Measurement:
    """One plan timed on the device while planning: its exact peak, predicted and measured latency ratios."""

    plan: Plan
    peak_bytes: int
    predicted_ratio: float
    ratio: float
    unsplit_ms: float
    split_ms: float
    page_faults: float = 0.0  # minor page faults per timed call, steady state (time_model.latencies_and_faults)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": str(self.plan), "predicted_peak_bytes": self.peak_bytes,
                "predicted_latency_ratio": round(self.predicted_ratio, 4), "measured_latency_ratio": round(self.ratio, 4),
                "unsplit_ms": round(self.unsplit_ms, 3), "split_ms": round(self.split_ms, 3),
                "page_faults_per_call": round(self.page_faults, 1)}


@dataclass
class PlanChoice:
    """The planner's answer for one input size."""

    plan: Plan
    predicted_peak_bytes: int  # for the batch of ``shape``
    predicted_macs_ratio: float
    macs: int  # for the batch
    unsplit_macs: int
    ops: int
    objective: str
    front: list[Point]
    seconds: float
    shape: tuple[int, ...]
    predicted_time: PlanTime | None = None  # when a latency objective (or a time model) was given
    halo: tuple[str, ...] = ()  # each stage's halo mode (empty: reuse everywhere)
    batch_packs: bool = False  # same-shaped packs of a grid row run as one call
    measured: list[Measurement] = field(default_factory=list)  # plans timed on the device (``measure``), in order

    @property
    def measured_latency_ratio(self) -> float | None:
        """The chosen plan's latency ratio as measured on the device while planning, the worst of its timings
        (None: not measured)."""
        return max((m.ratio for m in self.measured if m.plan == self.plan), default=None)

    @property
    def execution_kwargs(self) -> dict[str, Any]:
        """How the planner chose to run the plan, as :class:`splitpack.SplitPack`'s ``halo`` and ``batch_packs``:
        run it so, and what was predicted is what runs."""
        return {"halo": self.halo or "reuse", "batch_packs": self.batch_packs}

    @property
    def predicted_latency_ratio(self) -> float | None:
        return self.predicted_time.ratio if self.predicted_time is not None else None

    def to_dict(self) -> dict[str, Any]:
        timed = self.predicted_time
        return {"plan": self.plan.to_dict(), "plan_text": str(self.plan),
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "predicted_macs_ratio": round(self.predicted_macs_ratio, 6), "macs": self.macs,
                "unsplit_macs": self.unsplit_macs, "ops": self.ops, "objective": self.objective,
                "predicted_latency_ratio": round(timed.ratio, 4) if timed else None,
                "predicted_seconds": timed.seconds if timed else None,
                "predicted_unsplit_seconds": timed.unsplit_seconds if timed else None,
                "halo": list(self.halo) or ["reuse"] * len(self.plan.stages), "batch_packs": self.batch_packs,
                "measured_latency_ratio": self.measured_latency_ratio,
                "measured": [m.to_dict() for m in self.measured],
                "planning_seconds": round(self.seconds, 3), "input_shape": list(self.shape),
                "front": [p.to_dict() for p in self.front]}


def distinct_checkpoints(traced: TracedModel) -> list[Checkpoint]:
    """Exact-mode checkpoints, one per node (its outermost name: ``layer1`` for ``layer1.2.act3``), and the
    cuts between them (:func:`planned_cuts`), in execution order."""
    blocked = unsplittable_nodes(traced)
    names: dict[fx.Node, list[str]] = {}
    for name, node in traced.checkpoints.items():
        if node not in blocked:
            names.setdefault(node, []).append(name)
    single = [Checkpoint(min(names[n], key=lambda s: (s.count("."), names[n].index(s))), n, n in traced.spatial)
              for n in names]
    return sorted(single + planned_cuts(traced, blocked), key=lambda c: traced.index[c.node])


def planned_cuts(traced: TracedModel, blocked) -> list[Checkpoint]:
    """The cuts the planner considers (of splitpack.core.capture.graph.find_cuts): those whose values are all
    made after the single checkpoint before them -- the stretches a single checkpoint cannot split, such
    as HRNet's parallel branches -- not the block input plus each op inside a residual block; and those
    whose last value a reduction reads (a squeeze-excitation statistic: the next stage accumulates it
    from the stored cut instead of recomputing the block in a pass of its own)."""
    positions = sorted(traced.index[n] for n in traced.checkpoints.values())
    kept = []
    for name, nodes in find_cuts(traced).items():
        if any(n in blocked for n in nodes):
            continue
        if any(node_kind(traced, u) == "reduction" for u in nodes[-1].users):
            kept.append(Checkpoint(name, nodes[-1], True, nodes))
            continue
        if _inside_a_module(traced, name, nodes[-1]):
            continue
        first, last = (traced.index[n] for n in (nodes[0], nodes[-1]))
        before = [p for p in positions if p < last]
        if not before or before[-1] < first:
            kept.append(Checkpoint(name, nodes[-1], True, nodes))
    return kept


def _inside_a_module(traced: TracedModel, name: str, last: fx.Node) -> bool:
    """Whether a value of the cut is part way through a module (one whose output comes after the cut):
    such cuts multiply with the depth of the blocks; the planner keeps those between modules."""
    for member in name.split(CUT_JOIN):
        parts = member.split(".")
        for k in range(1, len(parts)):
            out = traced.module_outputs.get(".".join(parts[:k]))
            if out is not None and traced.index[out] > traced.index[last]:
                return True
    return False


def _first_obstacle(traced: TracedModel) -> str:
    """Why no checkpoint is reachable: the earliest op without a split rule, or no single live value."""
    blocked = unsplittable_nodes(traced)
    if not blocked:
        return "no module output is ever the only value the rest of the network needs"
    first = min(blocked.values(), key=lambda err: traced.index[err.node])
    return f"the first obstacle is {first.describe(traced.gm)}"


@dataclass
class _Path:
    """A plan as stage options and grids."""

    steps: tuple[tuple[StageOption, int, int], ...]  # (option, rows, cols)


class Planner:
    """Plans for one model: checkpoints, the allocation profile (once), estimates per input size."""

    def __init__(self, model: nn.Module | TracedModel, dtype: torch.dtype | None = None):
        self.traced = model if isinstance(model, TracedModel) else trace(model)
        self.model = model if isinstance(model, nn.Module) else self.traced.gm  # what ``measure`` runs unsplit
        self.dtype = dtype or self.traced.dtype
        self.checkpoints = distinct_checkpoints(self.traced)
        if not self.checkpoints:
            raise SplitError(f"nothing to plan: the model has no checkpoint exact split-pack can merge at; "
                             f"{_first_obstacle(self.traced)}")

    # ------------------------------------------------------------------ public
    def choose(self, shape, memory_budget: int | None = None, max_overhead: float | None = None,
               finalists: int = FINALISTS, whole_front: bool = False, dtype: torch.dtype | None = None,
               max_latency: float | None = None, time_model: TimeModel | None = None,
               latency_mode: str = PROGRAM, measure: int = 0, measure_repeats: int = MEASURE_REPEATS) -> PlanChoice:
        """The plan for inputs of ``shape`` (N, C, H, W): the smallest predicted peak within
        ``max_overhead`` (default 1.25x MACs), or with ``memory_budget`` (bytes, whole batch) the
        least MACs whose predicted peak fits (and within ``max_overhead`` if given too).
        With ``max_latency`` (predicted latency / the unsplit model's, ``latency_mode``: how the plan runs,
        "program" or "interpreter") the smallest peak within it, or with ``memory_budget`` the fewest
        predicted seconds within the budget (and within ``max_latency``); ``time_model``: the device's
        (default: from the cache, calibrated on first use). ``measure`` (with ``max_latency`` alone): time up to
        this many candidate plans on the device (:meth:`_SizeContext.measured_within_latency`) and keep the
        smallest peak *measured* within ``max_latency`` (less :data:`MEASURE_MARGIN`). ``whole_front``: search
        (and return) the front up to 3x MACs, not only what the objective needs."""
        start = time.perf_counter()
        shape = tuple(int(s) for s in shape)
        if max_overhead is not None and max_overhead < 1:
            raise ValueError(f"max_overhead: a MACs ratio >= 1, got {max_overhead}")
        max_latency = check_max_latency(max_latency)
        check_measure(measure, max_latency, memory_budget)
        timed = max_latency is not None
        cap = max_overhead if max_overhead is not None else (None if memory_budget or timed else DEFAULT_MAX_OVERHEAD)
        context = _SizeContext(self, shape, dtype or self.dtype, time_model, latency_mode, timed)
        # measuring needs the faster plans of larger peaks too: the whole front, as far as it may time plans
        stop = None if whole_front or measure else (math.nan if memory_budget is None else memory_budget)
        macs_cap = f" and {cap:g}x MACs" if cap else ""
        if timed:  # the search's cost is predicted seconds
            front = context.front(max(max_latency, 1.0) * (MEASURE_SLACK if measure else LATENCY_SLACK), stop,
                                  metric=SECONDS)
        else:
            front = context.front(FRONT_OVERHEAD if whole_front else max(cap or FRONT_OVERHEAD, 1.0), stop)
        if timed and memory_budget is None:
            def search() -> Point:
                nonlocal front
                try:
                    return context.smallest_peak_within_latency(front, max_latency, cap, finalists)
                except LatencyTooLow:  # the search stopped at the least estimated peak: look at the whole front
                    if stop is None:
                        raise
                    front = context.front(max(max_latency, 1.0) * LATENCY_SLACK, None, metric=SECONDS)
                    return context.smallest_peak_within_latency(front, max_latency, cap, finalists)
            point = _refined_by_strips(
                search, lambda p: context.strips_within_latency(p, front, max_latency, cap, finalists))
            objective = f"smallest peak within {max_latency:g}x predicted latency{macs_cap}"
        elif timed:
            point = _refined_by_strips(
                lambda: context.fastest_within_budget(front, memory_budget, max_latency, cap, finalists),
                lambda p: context.strips_within_budget(p, front, memory_budget, max_latency, cap, finalists))
            objective = f"fewest predicted seconds within {memory_budget} bytes and {max_latency:g}x latency{macs_cap}"
        elif memory_budget is None:
            point = context.strips_smallest_peak(context.smallest_peak(front, cap, finalists), front, cap, finalists)
            objective = f"smallest peak within {cap:g}x MACs"
        else:
            point = context.least_macs(front, memory_budget, cap, finalists)
            objective = f"least MACs within {memory_budget} bytes" + macs_cap
        measured = []
        if measure:
            point, measured = context.measured_within_latency(point, front, max_latency, cap, measure, measure_repeats)
            objective = f"smallest peak within {max_latency:g}x measured latency{macs_cap}"
        cost, predicted, execution = context.cost(point.plan), None, Execution(())
        if timed or time_model is not None:
            limit = memory_budget if memory_budget is not None else context.peak_tie(point.plan)
            execution, predicted, cost = context.tuned(point.plan, limit, cap)
        return PlanChoice(point.plan, cost.peak_bytes, cost.macs_ratio, cost.macs, cost.unsplit_macs, cost.ops,
                          objective, context.final_front(front), time.perf_counter() - start, shape, predicted,
                          execution.halo, execution.batch_packs, measured)

    def plan_time(self, plan: Plan, shape, time_model: TimeModel | None = None,
                  latency_mode: str = PROGRAM) -> PlanTime:
        """Predicted seconds of ``plan``'s program and of the unsplit model for inputs of ``shape`` (N, C, H, W)
        on this device (``time_model``: the device's, from the cache or calibrated on first use)."""
        return _SizeContext(self, tuple(int(s) for s in shape), self.dtype, time_model, latency_mode).plan_time(plan)

    def front(self, shape, max_overhead: float = FRONT_OVERHEAD, dtype: torch.dtype | None = None) -> list[Point]:
        """The estimated Pareto front (peak, MACs ratio) up to ``max_overhead``."""
        context = _SizeContext(self, tuple(shape), dtype or self.dtype)
        return context.final_front(context.front(max_overhead))


def plan_for(model: nn.Module | TracedModel, shape, memory_budget: int | None = None,
             max_overhead: float | None = None, dtype: torch.dtype | None = None,
             max_latency: float | None = None) -> PlanChoice:
    """The staged plan for ``model`` and inputs of ``shape`` (N, C, H, W); see :meth:`Planner.choose`."""
    return Planner(model, dtype).choose(shape, memory_budget, max_overhead, max_latency=max_latency)


class _SizeContext:
    """Everything the planner knows about one input size."""

    def __init__(self, planner: Planner, shape: tuple[int, ...], dtype: torch.dtype,
                 time_model: TimeModel | None = None, latency_mode: str = PROGRAM, timed: bool = False):
        """``timed``: the search estimates every stage's seconds too (the device's time model, calibrated
        on first use if ``time_model`` is None)."""
        if len(shape) != 4:
            raise ValueError(f"input shape: expected (N, C, H, W), got {shape}")
        self.planner, self.shape, self.batch, self.dtype = planner, shape, shape[0], dtype
        self.time_model, self.latency_mode = time_model, latency_mode
        self._times: dict[Plan, PlanTime] = {}
        self._programs: dict[Any, Program] = {}  # by plan (halo reuse, one by one), or (plan, Execution)
        self._estimated_seconds: dict[Plan, float] = {}
        traced = planner.traced
        self.profile, self.shapes = allocation_profile(traced, shape, dtype)
        self._predictor = None
        op_times = self.predictor().op_times(self.shapes, self.batch, latency_mode) if timed else None
        self.estimator = Estimator(traced, planner.checkpoints, self.shapes, dtype, self.profile,
                                   MAX_PASSES, MAX_SPAN, op_times)
        self.unsplit_macs = unsplit_macs(traced, self.shapes)  # one image
        self._costs: dict[Plan, PlanCost] = {}
        self._tuned: dict[tuple, tuple[Execution, PlanTime, PlanCost]] = {}
        self.pools: list[list[Point]] = []  # the last search's fronts: chained estimate, upper bound
        self._warned_faults = False  # measuring warns once about the C heap's page faults

    # ------------------------------------------------------------------ estimates
    def plan_of(self, path: _Path) -> Plan:
        cps = self.planner.checkpoints
        return Plan(tuple(Stage(cps[o.end - 1].name, (int(r), int(c))) for o, r, c in path.steps))

    def estimated_seconds(self, path: _Path) -> float:
        """The search's estimate of a path's seconds (a timed search only)."""
        last = self.planner.checkpoints[path.steps[-1][0].end - 1]
        return sum(float(o.seconds[r - 1, c - 1]) for o, r, c in path.steps) + self.estimator.tail_seconds(last)

    def estimate(self, path: _Path, chains: bool = True) -> tuple[float, float]:
        """(estimated peak bytes for the batch, MACs ratio) of a path; ``chains=False``: the upper bound
        that counts every checkpoint's bands as alive together (see :class:`_Search`)."""
        est, cps = self.estimator, self.planner.checkpoints
        working = max(o.working_set[r - 1, c - 1] for o, r, c in path.steps)
        chain = (0.0, 0.0, 0.0, 0.0)
        for (_, prev_r, _), (o, r, _) in zip(path.steps, path.steps[1:]):
            source = cps[o.source - 1]
            chain = chain_bands(*chain, est.band_bytes(source, o)[prev_r - 1, r - 1],
                                est.tail_bytes(source, o)[prev_r - 1, r - 1],
                                chains and est.reads_whole(source, o)[prev_r - 1, r - 1])
        last = cps[path.steps[-1][0].end - 1]
        whole = est.full_bytes(last) if last.spatial else 0
        peak = max(working + chain_peak(*chain, whole), est.tail_peak(last)) * self.batch
        macs = sum(o.macs[r - 1, c - 1] for o, r, c in path.steps) + est.tail_macs(last)
        return peak, macs / self.unsplit_macs

    def front(self, max_overhead: float, stop: float | None = None, metric: str = MACS) -> list[Point]:
        """The estimated front; :meth:`smallest_peak` draws its finalists from both estimates' fronts
        (kept in ``self.pools``), the front returned is the chained estimate's. ``metric`` SECONDS (a timed
        context): the search's cost is predicted seconds, up to ``max_overhead`` x the unsplit model's, the
        estimated seconds are kept per plan and the plans of both fronts are returned."""
        self.pools = []
        key = (lambda p: self._estimated_seconds[p.plan]) if metric == SECONDS else (lambda p: p.macs_ratio)
        for chains in (True, False):
            points = {}
            for path in _Search(self, max_overhead, stop, chains, metric).run():
                plan = self.plan_of(path)
                if plan not in points:
                    peak, ratio = self.estimate(path, chains)
                    points[plan] = Point(plan, int(peak), float(ratio), False)
                    if metric == SECONDS:
                        self._estimated_seconds.setdefault(plan, self.estimated_seconds(path))
            self.pools.append(pareto(list(points.values()), key))
        if metric == SECONDS:
            both = {p.plan: p for p in self.pools[1] + self.pools[0]}  # the chained estimate where both have it
            return sorted(both.values(), key=lambda p: (p.peak_bytes, key(p)))
        return self.pools[0]

    # ------------------------------------------------------------------ exact
    def program(self, plan: Plan) -> Program:
        if plan not in self._programs:
            traced = self.planner.traced
            self._programs[plan] = build_program(traced, stage_graphs(traced, plan), self.shapes, self.dtype)
        return self._programs[plan]

    def cost(self, plan: Plan) -> PlanCost:
        if plan not in self._costs:
            self._costs[plan] = plan_cost(self.planner.traced, plan, self.shape, self.dtype, (self.profile, self.shapes),
                                          self.program(plan))
        return self._costs[plan]

    def exact(self, plan: Plan) -> Point:
        cost = self.cost(plan)
        return Point(plan, cost.peak_bytes, cost.macs_ratio, True)

    def smallest_peak(self, front: list[Point], cap: float, finalists: int) -> Point:
        within = sorted((p for p in front if p.macs_ratio <= cap), key=lambda p: p.peak_bytes)
        if not within:
            raise ValueError(f"max_overhead {cap:g}: no plan needs so few MACs; the cheapest plan found needs "
                             f"{min(p.macs_ratio for p in front):.3f}x")
        # the chained estimate can be low where the upper bound is not: the best of each go to the replay
        other = [sorted((p for p in pool if p.macs_ratio <= cap), key=lambda p: p.peak_bytes)[:CONSERVATIVE_FINALISTS]
                 for pool in self.pools[1:] if front is self.pools[0]]
        within = list({p.plan: p for p in within[:finalists] + sum(other, [])}.values())
        checked = [self.exact(p.plan) for p in within]
        ok = [p for p in checked if p.macs_ratio <= cap] or checked
        return _smallest_peak(ok, lambda p: (p.macs_ratio, p.peak_bytes))

    def least_macs(self, front: list[Point], budget: int, cap: float | None, finalists: int) -> Point:
        order = sorted((p for p in front if cap is None or p.macs_ratio <= cap), key=lambda p: p.macs_ratio)
        fits = [p for p in order if p.peak_bytes <= budget]
        near = [p for p in order if p not in fits and p.peak_bytes <= budget * 1.5]
        for p in (fits + near)[:2 * finalists]:
            exact = self.exact(p.plan)
            if exact.peak_bytes <= budget and (cap is None or exact.macs_ratio <= cap):
                return exact
        limit = cap or FRONT_OVERHEAD
        best = self.smallest_peak(self.front(limit, math.nan), limit, finalists)
        if best.peak_bytes <= budget:  # the estimates ruled out every plan that fits, but this one does
            return best
        within = f" within {cap:g}x MACs" if cap else ""
        raise BudgetTooSmall(f"memory_budget {_mib(budget)} is below the smallest peak activation memory "
                             f"achievable{within} for input {list(self.shape)}: {_mib(best.peak_bytes)} "
                             f"(plan {best.plan}, {best.macs_ratio:.2f}x MACs)")

    # ------------------------------------------------------------------ time
    def predictor(self) -> Predictor:
        if self._predictor is None:
            traced = self.planner.traced
            model = self.time_model or time_model_for(traced, max(self.shape[2:]), self.dtype, progress=True)
            self._predictor = model.predictor(traced, self.dtype)
            self._unsplit_s = self._predictor.unsplit_seconds(self.shapes, self.batch)
        return self._predictor

    def plan_time(self, plan: Plan) -> PlanTime:
        """The plan's predicted seconds and latency ratio on this device (its program, by the time model)."""
        if plan not in self._times:
            predictor, last = self.predictor(), self.planner.traced.cut(plan.stages[-1].checkpoint)
            seconds = predictor.program_seconds(self.program(plan), self.shapes, last, self.batch, self.latency_mode)
            self._times[plan] = PlanTime(seconds, self._unsplit_s, self.latency_mode)
        return self._times[plan]

    def peak_tie(self, plan: Plan) -> float:
        """The peak a change to how ``plan`` runs may reach: its exact peak, within :data:`PEAK_TIE`."""
        return self.cost(plan).peak_bytes * (1 + PEAK_TIE)

    def tuned(self, plan: Plan, peak_limit: float, cap: float | None) -> tuple[Execution, PlanTime, PlanCost]:
        """:meth:`_tune`, once per plan and limits (measuring a plan tunes it, and so does the final choice)."""
        key = (plan, peak_limit, cap)
        if key not in self._tuned:
            self._tuned[key] = self._tune(plan, peak_limit, cap)
        return self._tuned[key]

    def _tune(self, plan: Plan, peak_limit: float, cap: float | None) -> tuple[Execution, PlanTime, PlanCost]:
        """The way to run ``plan`` predicted fastest (each stage's halo mode, packs batched or not) whose
        exact peak is within ``peak_limit`` and MACs within ``cap``; halo reuse one pack at a time (what
        the search assumed) if nothing else is faster within them. Stages are timed independently: a
        stage's program does not depend on how the others run."""
        stages = len(plan.stages)
        reuse = Execution(("reuse",) * stages)
        best = (reuse, self.plan_time(plan), self.cost(plan))
        predictor, last = self.predictor(), self.planner.traced.cut(plan.stages[-1].checkpoint)
        per_stage = {mode: predictor.stage_seconds(self._program(plan, Execution((mode,) * stages)), self.shapes,
                                                   self.batch, self.latency_mode) for mode in HALO_MODES}
        fastest = tuple(min(HALO_MODES, key=lambda m: per_stage[m][i]) for i in range(stages))
        for execution in dict.fromkeys([Execution(fastest), Execution(fastest, True), Execution(reuse.halo, True)]):
            if execution == reuse:
                continue
            program = self._program(plan, execution)
            seconds = predictor.program_seconds(program, self.shapes, last, self.batch, self.latency_mode)
            if seconds >= best[1].seconds:
                continue
            cost = plan_cost(self.planner.traced, plan, self.shape, self.dtype, (self.profile, self.shapes), program)
            if cost.peak_bytes <= peak_limit and (cap is None or cost.macs_ratio <= cap):
                best = (execution, PlanTime(seconds, self._unsplit_s, self.latency_mode), cost)
        return best

    def _program(self, plan: Plan, execution: Execution) -> Program:
        """The program of ``plan`` run as ``execution`` (reuse one by one: :meth:`program`)."""
        if execution == Execution(("reuse",) * len(plan.stages)):
            return self.program(plan)
        key = (plan, execution)
        if key not in self._programs:
            traced = self.planner.traced
            self._programs[key] = build_program(traced, stage_graphs(traced, plan), self.shapes, self.dtype,
                                                execution.halo, execution.batch_packs)
        return self._programs[key]

    def _timed(self, points: list[Point]) -> list[Point]:
        """``points`` with their programs' predicted times computed (the search's estimate ranks them)."""
        for p in points[:TIMED_CANDIDATES]:
            self.plan_time(p.plan)
        return [p for p in points if p.plan in self._times]

    def smallest_peak_within_latency(self, front: list[Point], max_latency: float, cap: float | None,
                                     finalists: int) -> Point:
        """The smallest exact peak among the plans whose programs are predicted within ``max_latency``
        (candidates: the timed search's front, smallest estimated peak first)."""
        order = sorted((p for p in front if cap is None or p.macs_ratio <= cap), key=lambda p: p.peak_bytes)
        limit = max_latency * ESTIMATE_MARGIN * self._unsplit_s
        fast = []
        for p in [p for p in order if self._estimated_seconds[p.plan] <= limit][:3 * TIMED_CANDIDATES]:
            if self.plan_time(p.plan).ratio <= max_latency:
                fast.append(p)
                if len(fast) == finalists:
                    break
        if not fast:
            self._latency_error(order, max_latency, "")
        return _smallest_peak([self.exact(p.plan) for p in fast[:finalists]], self._fastest)

    def measured_within_latency(self, chosen: Point, front: list[Point], max_latency: float, cap: float | None,
                                count: int, repeats: int) -> tuple[Point, list[Measurement]]:
        """The smallest exact peak *measured* within ``max_latency``, with :data:`MEASURE_MARGIN` to spare. The
        time model's errors have a direction per kind of op (copies cost more inside a program than calibrated,
        tiny ops less), so a plan predicted near the limit lands on either side of it. Candidates
        (:meth:`measure_pool`), by exact peak: larger peaks run faster (fewer packs, fewer joins), so a
        bisection from ``chosen`` times at most ``count`` of them, each run as it would be served (its tuned
        execution) interleaved with the unsplit model. The smallest peak within is timed again and kept if
        within again; else the search goes on among the larger peaks (up to :data:`CONFIRMATIONS` picks).
        None within: the fastest measured, with a warning."""
        threshold = max_latency / (1 + MEASURE_MARGIN)
        order = self.measure_pool(chosen, front, max_latency, cap)
        timings: list[Measurement] = []
        worst: dict[Plan, float] = {}

        def time_(i: int) -> bool:
            """Time ``order[i]`` (again); whether each of its timings is within the threshold."""
            plan = order[i].plan
            timings.append(self.measure(plan, cap, repeats))
            worst[plan] = max(worst.get(plan, 0.0), timings[-1].ratio)
            return worst[plan] <= threshold

        def within(i: int) -> bool:
            return worst[order[i].plan] <= threshold if order[i].plan in worst else time_(i)

        start = next(i for i, p in enumerate(order) if p.plan == chosen.plan)
        lo, hi = (0, start) if within(start) else (start + 1, len(order))
        for _ in range(CONFIRMATIONS):
            while lo < hi and len(worst) < count:  # bisect for the first plan measured within
                mid = (lo + hi) // 2
                if within(mid):
                    hi = mid
                else:
                    lo = mid + 1
            pick = hi if hi < len(order) and worst.get(order[hi].plan, math.inf) <= threshold else None
            if pick is None:
                break
            # the least of several noisy timings near the limit is likely low (the winner's curse): the pick is
            # timed again and kept only if that timing is within too, else the search goes on above it
            if time_(pick):
                return self.exact(order[pick].plan), timings
            lo = pick + 1
            hi = min((i for i in range(lo, len(order)) if worst.get(order[i].plan, math.inf) <= threshold),
                     default=len(order))
        fastest = min(worst, key=worst.__getitem__)
        log.warning("max_latency %g: no plan measured within %.3fx (the limit less a %g%% margin) for input %s; the "
                    "fastest measured is %.3fx (plan %s)", max_latency, threshold, MEASURE_MARGIN * 100,
                    list(self.shape), worst[fastest], fastest)
        return self.exact(fastest), timings

    def measure_pool(self, chosen: Point, front: list[Point], max_latency: float, cap: float | None) -> list[Point]:
        """The candidates :meth:`measured_within_latency` times, by exact peak (a tie: predicted faster first):
        ``chosen``, and the Pareto front (exact peak, predicted seconds) of the plans predicted within
        :data:`MEASURE_SLACK` of the limit among ``front``'s plans estimated within it, the plans timed so far
        (strips among them) and the strip variants of every height (:data:`STRIP_HEIGHTS`) through ``front``'s
        checkpoints -- taller strips are the faster plans of a larger peak that a search in measured time may
        have to fall back on."""
        limit = max_latency * MEASURE_SLACK
        plans = [p.plan for p in front if self._estimated_seconds.get(p.plan, math.inf) <= limit * self._unsplit_s]
        plans += [plan for plan, t in self._times.items() if t.ratio <= limit]
        plans += [plan for _, strips in self.strip_variants(front, FINALISTS) for plan in strips]
        pool = [self.exact(plan) for plan in dict.fromkeys(plans) if self.plan_time(plan).ratio <= limit]
        # the bisection needs larger peaks to run faster: the plans no other beats on both peak and seconds
        pool = pareto([p for p in pool if cap is None or p.macs_ratio <= cap],
                      lambda p: self.plan_time(p.plan).seconds)
        if chosen.plan not in {p.plan for p in pool}:
            pool.append(self.exact(chosen.plan))
        return sorted(pool, key=lambda p: (p.peak_bytes, self.plan_time(p.plan).seconds))

    def measure(self, plan: Plan, cap: float | None, repeats: int) -> Measurement:
        """``plan`` run as :meth:`tuned` would run it, its latency measured against the unsplit model's."""
        from splitpack.core.execute.module import SplitPack  # the executor is built on the planner's modules

        traced = self.planner.traced
        if self.dtype != traced.dtype:
            raise ValueError(f"measure: the model is {traced.dtype}, the plan is for {self.dtype}: plan in the "
                             "model's dtype")
        execution, predicted, cost = self.tuned(plan, self.peak_tie(plan), cap)
        split = SplitPack(self.planner.model, plan, traced=traced, halo=execution.halo, batch_packs=execution.batch_packs,
                          compile="program" if self.latency_mode == PROGRAM else False)
        x = torch.randn(self.shape, device=model_device(traced.gm)).to(self.dtype)
        ratio, unsplit_ms, split_ms, faults = measured_ratio(self.planner.model, split, x, repeats)
        log.info("measured plan %s: %.3fx the unsplit model (predicted %.3fx; %.1f / %.1f ms; %.0f page faults per "
                 "call)", plan, ratio, predicted.ratio, split_ms, unsplit_ms, faults)
        if faults > FAULT_WARNING and not self._warned_faults:
            self._warned_faults = True
            log.warning("measure_latency: %.0f page faults per timed call: the C heap gives large activations back "
                        "to the OS after every call and the unsplit model pays them again, so split plans measure "
                        "faster than they run in a process that keeps its heap. Serve with the model parameter "
                        "heap: kept, or start the process with MALLOC_MMAP_THRESHOLD_=2147483647 "
                        "MALLOC_TRIM_THRESHOLD_=2147483647 (glibc), for timings without them "
                        "(splitpack.measure.heap)", faults)
        return Measurement(plan, cost.peak_bytes, predicted.ratio, ratio, unsplit_ms, split_ms, faults)

    def _fastest(self, p: Point) -> tuple[float, int]:
        """A tie-break: the fewest predicted seconds, then the smaller peak."""
        return self.plan_time(p.plan).seconds, p.peak_bytes

    # ------------------------------------------------------------------ full-width strips
    def strip_plan(self, checkpoints: tuple[str, ...], height: int) -> Plan | None:
        """Full-width strips through ``checkpoints``: each stage's grid Rx1, R the strips of ``height`` rows
        its smallest extent (its output, or the input of the pooling it ends with) makes; None where a
        checkpoint does not follow the one before it."""
        try:
            stages = stage_graphs(self.planner.traced, Plan(tuple(Stage(c, (1, 1)) for c in checkpoints)))
        except ValueError:
            return None
        hw = self.estimator.hw
        rows = [min((hw[n][0] for n in g.spatial - set(g.sources) if n in hw), default=1) for g in stages]
        return Plan(tuple(Stage(g.checkpoint, (-(-r // height), 1)) for g, r in zip(stages, rows)))

    def strip_variants(self, front: list[Point], finalists: int,
                       through_every: bool = False) -> list[tuple[float, list[Plan]]]:
        """Strip plans (:meth:`strip_plan`, tallest strips first) through the checkpoints of ``front``'s
        plans of least estimated peak, each also continued to the checkpoint after which the rest of the
        network needs the least memory (strips reach as deep as little memory does) -- with
        ``through_every``, also through every checkpoint on the way there (a stage per checkpoint: no stage
        spans a squeeze-excitation block whose statistic's input a cut holds, so none recomputes it) --, and
        straight to that checkpoint in one stage (the fewest joins): ``finalists`` + 1 checkpoint sequences,
        each with the estimated bytes its last checkpoint and the unsplit rest need (a floor to its peak),
        least first."""
        cps, est = self.planner.checkpoints, self.estimator
        position = {c.name: i for i, c in enumerate(cps)}
        floor = {c.name: max(est.full_bytes(c) if c.spatial else 0, est.tail_peak(c)) * self.batch for c in cps}
        end = min(cps, key=lambda c: floor[c.name])  # the earliest such checkpoint
        sequences = []
        for p in sorted(front, key=lambda p: p.peak_bytes):
            names = tuple(s.checkpoint for s in p.plan.stages)
            last = position[names[-1]]
            sequences += [names] + ([names + (end.name,)] if last < position[end.name] else [])
            if through_every and last + 1 < position[end.name]:
                sequences.append(names + tuple(c.name for c in cps[last + 1:position[end.name] + 1]))
        sequences = list(dict.fromkeys(list(dict.fromkeys(sequences))[:finalists] + [(end.name,)]))
        sequences = sorted(sequences, key=lambda names: floor[names[-1]])
        return [(floor[names[-1]], plans) for names in sequences
                if None not in (plans := list(dict.fromkeys(self.strip_plan(names, h) for h in STRIP_HEIGHTS)))]

    def strips_smallest_peak(self, point: Point, front: list[Point], cap: float, finalists: int) -> Point:
        """``point`` or, where one has a smaller exact peak within ``cap`` (by more than :data:`PEAK_TIE`), a
        strip plan through the checkpoints of one of ``front``'s plans, continued through every checkpoint to
        the least memory: a stage that holds its source whole (a squeeze-excitation pass) releases the
        source's bands as its output's are written, and the shorter the strips, the less of both is alive
        beside the whole value (SE-ResNet-50 @512: 21.0 MiB with 8-row strips, 17.0 MiB with 2-row strips,
        the same MACs). Each sequence is replayed with its shortest strips; the winner's then with the
        tallest (fewest packs) within :data:`PEAK_TIE` of its peak."""
        # sequences from the plans of least estimated peak within the cap, and within half its overhead: the
        # strips of a plan of fewer MACs can need less memory (the estimate is of the search's grids)
        variants: dict[tuple[Plan, ...], float] = {}
        for within, count in ((front, finalists), ([p for p in front if p.macs_ratio <= 1 + (cap - 1) / 2],
                                                   finalists // 2)):
            for floor, plans in self.strip_variants(within, count, through_every=True):
                variants[tuple(plans)] = floor
        candidates, taller = [point], {}
        for plans, floor in sorted(variants.items(), key=lambda v: v[1]):
            if floor > min(p.peak_bytes for p in candidates) * (1 + PEAK_TIE):
                break
            if not plans:  # no strip heights
                continue
            shortest = self.exact(plans[-1])
            if shortest.macs_ratio <= cap:
                candidates.append(shortest)
                taller[shortest.plan] = plans[:-1]
        # strips recompute nothing: their MACs differ by rounding at the bands' edges, so a tie goes to the
        # fewer MACs only by 1% or more, else to the smaller peak
        best = _smallest_peak(candidates, lambda p: (round(p.macs_ratio, 2), p.peak_bytes))
        for plan in taller.get(best.plan, []):  # tallest first
            p = self.exact(plan)
            if p.peak_bytes <= best.peak_bytes * (1 + PEAK_TIE) and p.macs_ratio <= cap:
                return p
        return best

    def strips_within_latency(self, point: Point | None, front: list[Point], max_latency: float,
                              cap: float | None, finalists: int) -> Point | None:
        """``point`` (None: no plan of the search is within ``max_latency``) or, where one has a smaller exact
        peak (by more than :data:`PEAK_TIE`, or as small and predicted faster), the strip plan with the
        shortest strips predicted within ``max_latency`` through the checkpoints of one of ``front``'s plans
        (shorter strips: more packs, more seconds); None if neither."""
        candidates = [point] if point is not None else []
        for floor, plans in self.strip_variants(front, finalists):
            if candidates and floor > min(p.peak_bytes for p in candidates) * (1 + PEAK_TIE):
                break
            within = _leading(plans, lambda plan: self.plan_time(plan).ratio <= max_latency)
            if within and (cap is None or self.exact(plans[within - 1]).macs_ratio <= cap):
                candidates.append(self.exact(plans[within - 1]))
        return _smallest_peak(candidates, self._fastest) if candidates else None

    def strips_within_budget(self, point: Point | None, front: list[Point], budget: int, max_latency: float,
                             cap: float | None, finalists: int) -> Point | None:
        """``point`` (None: no plan of the search fits) or, where one is predicted faster, the fastest strip
        plan whose exact peak fits ``budget`` (and ``cap``) within ``max_latency``, through the checkpoints of
        one of ``front``'s plans (per sequence, the tallest strips that fit); None if neither."""
        best = point
        for floor, plans in self.strip_variants(front, finalists):
            if floor > budget:
                break
            over = _leading(plans, lambda plan: self.exact(plan).peak_bytes > budget)
            if over < len(plans):
                plan = plans[over]
                time_ = self.plan_time(plan)
                if (cap is None or self.exact(plan).macs_ratio <= cap) and time_.ratio <= max_latency \
                        and (best is None or time_.seconds < self.plan_time(best.plan).seconds):
                    best = self.exact(plan)
        return best

    def fastest_within_budget(self, front: list[Point], budget: int, max_latency: float, cap: float | None,
                              finalists: int) -> Point:
        """The fewest predicted seconds among the plans whose exact peak fits ``budget`` (and ``cap``), if
        within ``max_latency``. Candidates: the timed search's plans that fit (or nearly), fastest first."""
        order = sorted((p for p in front if cap is None or p.macs_ratio <= cap),
                       key=lambda p: self._estimated_seconds[p.plan])
        fits = [p for p in order if p.peak_bytes <= budget]
        near = [p for p in order if p not in fits and p.peak_bytes <= budget * 1.5]
        candidates = sorted(self._timed(fits + near), key=lambda p: self.plan_time(p.plan).seconds)
        for p in candidates[:2 * finalists]:
            exact = self.exact(p.plan)
            if exact.peak_bytes <= budget and (cap is None or exact.macs_ratio <= cap):
                if self.plan_time(p.plan).ratio > max_latency:
                    break
                return exact
        if not any(self.exact(p.plan).peak_bytes <= budget for p in candidates[:2 * finalists]):
            self.least_macs(self.front(FRONT_OVERHEAD, budget), budget, cap, finalists)  # BudgetTooSmall if none fits
        self._latency_error([p for p in candidates if self.exact(p.plan).peak_bytes <= budget] or order,
                            max_latency, f" within memory_budget {_mib(budget)}")

    def _latency_error(self, candidates: list[Point], max_latency: float, within: str) -> None:
        """Raise LatencyTooLow naming the best predicted ratio among ``candidates``."""
        by_estimate = sorted(candidates, key=lambda p: self._estimated_seconds.get(p.plan, 0.0))
        best = min(self._timed(by_estimate), key=lambda p: self.plan_time(p.plan).seconds)
        raise LatencyTooLow(f"max_latency {max_latency:g}: no plan{within} is predicted that fast for input "
                            f"{list(self.shape)} on this device; the best achievable is "
                            f"{self.plan_time(best.plan).ratio:.3f}x the unsplit model (plan {best.plan}, "
                            f"{_mib(best.peak_bytes)} predicted peak)")

    def final_front(self, front: list[Point]) -> list[Point]:
        """The front with the plans predicted exactly so far replaced by their exact numbers."""
        exact = {plan: self.exact(plan) for plan in self._costs}
        return pareto([exact.get(p.plan, p) for p in front] + [p for p in exact.values() if p.plan not in
                                                                {q.plan for q in front}])


def _refined_by_strips(search: Callable[[], Point], strips: Callable[[Point | None], Point | None]) -> Point:
    """``strips`` applied to the search's point; where the search has none within the objective
    (BudgetTooSmall, LatencyTooLow), the strips alone (they recompute nothing, and can fit where the
    search's grids do not), else the search's error."""
    try:
        point, failure = search(), None
    except (BudgetTooSmall, LatencyTooLow) as err:
        point, failure = None, err
    point = strips(point)
    if point is None:
        raise failure
    return point


def _smallest_peak(points: list[Point], tie_break: Callable[[Point], Any]) -> Point:
    """The point of least peak; the points within :data:`PEAK_TIE` of it are a tie, won by ``tie_break``'s least."""
    least = min(p.peak_bytes for p in points)
    return min((p for p in points if p.peak_bytes <= least * (1 + PEAK_TIE)), key=tie_break)


def _leading(items: list, holds: Callable[[Any], bool]) -> int:
    """How many of ``items`` lead the list with ``holds`` true, where it holds up to some item and not after
    it (a bisection: it asks about a few items only)."""
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(items[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def chain_bands(bands, whole, tail, held, band, band_tail, reads_whole):
    """Checkpoint bytes alive along a plan, one stage further. A *chain* is the stages since the last one
    that read its source whole: ``whole`` is that source and ``tail`` what of it its last row of packs
    still reads (the rows above are released as that pass goes); ``bands``: the bands of the checkpoints
    the chain's later stages read; ``held``: the most an earlier chain needed. A stage that reads its
    source whole (``reads_whole``; ``band`` is then that source, ``band_tail`` its part the stage's last
    row reads) starts a new chain: the stages before it have finished by then. While they finished,
    their bands stayed alive and the new source grew while the old one shrank to its tail. Otherwise the
    stage adds its source's bands to the chain."""
    grown = bands + np.maximum(whole, tail + band)
    return (np.where(reads_whole, 0.0, bands + band), np.where(reads_whole, band, whole),
            np.where(reads_whole, band_tail, tail), np.where(reads_whole, np.maximum(held, grown), held))


def chain_peak(bands, whole, tail, held, last):
    """Checkpoint bytes at the peak of a plan whose chain is (bands, whole, tail, held) and whose last
    checkpoint, written whole, has ``last`` bytes."""
    return np.maximum(held, bands + np.maximum(whole, tail + last))


def pareto(points: list[Point], key: Callable[[Point], float] = lambda p: p.macs_ratio) -> list[Point]:
    """Points no other point beats on both peak and ``key`` (the MACs ratio), by increasing peak."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.peak_bytes, key(p))):
        if not out or key(p) < key(out[-1]) * (1 - 1e-12) - 1e-12:
            out.append(p)
    return out


class _Search:
    """The dynamic programme over (checkpoint, rows of its stage) x MACs-overhead bucket, per working-set cap."""

    def __init__(self, context: _SizeContext, max_overhead: float, stop: float | None = None, chains: bool = True,
                 metric: str = MACS):
        """``chains``: count the bytes along a plan as :func:`chain_bands` does (a stage that reads its
        source whole starts a new chain); False: every checkpoint's bands alive together, an upper bound
        that ranks plans of many small bands better than the chained estimate does. ``metric``: what
        ``max_overhead`` caps and the buckets count, MACS or (a timed context) SECONDS."""
        self.context, self.est, self.chains = context, context.estimator, chains
        self.checkpoints = context.planner.checkpoints
        if metric == SECONDS:
            self.extra = lambda o: o.extra_seconds
            total = context.estimator.unsplit_seconds_between(context.planner.traced.input_node,
                                                              context.planner.traced.nodes[-1])
            self.bucket = max(total * 1e-6, (max_overhead - 1) * total / MACS_BUCKETS)
        else:
            self.extra = lambda o: o.extra_macs
            self.bucket = max(1.0, (max_overhead - 1) * context.unsplit_macs / MACS_BUCKETS)
        # caps from which on no plan is worth having: None = every cap (the whole front); a number (batch
        # bytes: a budget) = caps below it; math.nan = caps below the least peak found so far
        self.stop = stop if stop is None or math.isnan(stop) else stop / context.batch
        self.options = self.est.options
        self.by_source: dict[int, list[int]] = {}
        for k, o in enumerate(self.options):
            self.by_source.setdefault(o.source, []).append(k)
            if o.source > 0:
                self.est.band_bytes(self.checkpoints[o.source - 1], o)
        self.ends = {c: (self.est.full_bytes(c) if c.spatial else 0, self.est.tail_peak(c)) for c in self.checkpoints}

    def caps(self) -> list[float]:
        high = max(float(o.working_set[o.valid].max()) for o in self.options if o.valid.any())
        low = self._bottleneck()
        count = max(1, int(math.ceil(math.log(max(high / low, 1.0)) / math.log(LADDER_STEP))) + 1)
        return [low * LADDER_STEP ** k for k in range(count)]

    def _bottleneck(self) -> float:
        """The least largest working set of any complete plan (no MACs limit): the ladder's start."""
        best = {0: 0.0}
        for a in range(len(self.checkpoints) + 1):
            if a not in best:
                continue
            for k in self.by_source.get(a, ()):
                o = self.options[k]
                ws = np.where(o.valid, o.working_set, np.inf).min()
                best[o.end] = min(best.get(o.end, np.inf), max(best[a], ws))
        return max(1.0, min(v for k, v in best.items() if k > 0))

    def run(self) -> list[_Path]:
        paths, best = [], math.inf
        for cap in self.caps():
            if self.stop is not None and cap >= (best if math.isnan(self.stop) else self.stop):
                break
            found, peak = self._run_cap(cap)
            paths += found
            best = min(best, peak)
        return paths

    def _run_cap(self, cap: float) -> tuple[list[_Path], float]:
        nb = MACS_BUCKETS + 1
        states: dict[tuple[int, int], _State] = {(0, 0): _State.start(nb)}
        for a in range(len(self.checkpoints) + 1):
            here = [(a, r) for r in range(0, MAX_TILES + 1) if (a, r) in states]
            if not here:
                continue
            stacked = tuple(np.stack([getattr(states[s], f) for s in here]) for f in _State.CHAIN)
            rows = np.array([r for _, r in here])
            for k in self.by_source.get(a, ()):
                self._relax(k, cap, here, rows, stacked, states)
        return self._terminal_paths(cap, states)

    def _relax(self, k: int, cap: float, here, rows: np.ndarray, stacked: tuple[np.ndarray, np.ndarray],
               states) -> None:
        """Extend the plans reaching ``here`` (states at the option's source; ``stacked``: their running and
        held band bytes) by option ``k``, for every rows count, with the least-MACs columns count whose
        working set is within ``cap``."""
        o = self.options[k]
        if o.least_working_set > cap:
            return
        extra = np.where(o.valid & (o.working_set <= cap), self.extra(o), np.inf)
        cols = extra.argmin(axis=1)
        shifts = np.round(np.maximum(extra[np.arange(MAX_TILES), cols], 0) / self.bucket)
        usable = np.nonzero(shifts <= MACS_BUCKETS)[0]  # inf (nothing allowed) fails too
        if not len(usable):
            return
        if o.source == 0:
            which = np.zeros((len(usable), stacked[0].shape[1]), np.int64)
            best = [np.broadcast_to(v[0], which.shape) for v in stacked]
        elif not self.chains:  # every band adds up (whole, tail and held stay 0)
            cand = stacked[0][:, None, :] + o._bands[rows - 1][:, usable][:, :, None]
            which = cand.argmin(axis=0)
            best = [cand.min(axis=0)] + [np.zeros_like(cand[0])] * 3
        elif not (reads := o._reads_whole[rows - 1][:, usable]).any():  # it only adds bands to every chain
            value, whole, tail, held = stacked
            cand = value[:, None, :] + o._bands[rows - 1][:, usable][:, :, None]
            which = chain_peak(cand, whole[:, None, :], tail[:, None, :], held[:, None, :], 0.0).argmin(axis=0)
            pick = (which, np.arange(value.shape[1]))
            best = [np.take_along_axis(cand, which[None], 0)[0], whole[pick], tail[pick], held[pick]]
        elif reads.all():  # it starts a new chain from every state (an SE stage): chain_bands, fewer arrays
            value, whole, tail, held = (v[:, None, :] for v in stacked)
            band = o._bands[rows - 1][:, usable][:, :, None]
            grown = np.maximum(held, value + np.maximum(whole, tail + band))  # the new held
            which = np.maximum(grown, band).argmin(axis=0)[None]  # chain_peak of (0, band, tail, grown)
            new_whole = np.broadcast_to(band, grown.shape)
            new_tail = np.broadcast_to(o._tail[rows - 1][:, usable][:, :, None], grown.shape)
            best = [np.zeros(which.shape[1:])] + [np.take_along_axis(v, which, 0)[0] for v in (new_whole, new_tail, grown)]
            which = which[0]
        else:
            cand = chain_bands(*(v[:, None, :] for v in stacked),
                               *(a[rows - 1][:, usable][:, :, None] for a in (o._bands, o._tail, o._reads_whole)))
            which = chain_peak(*cand, 0.0).argmin(axis=0)[None]
            best = [np.take_along_axis(np.broadcast_to(v, cand[0].shape), which, 0)[0] for v in cand]
            which = which[0]
        key = chain_peak(*best, 0.0)  # the bytes that decide the peak: the DP keeps the least
        for j, r0 in enumerate(usable):
            shift = int(shifts[r0])
            span = MACS_BUCKETS + 1 - shift
            target = states.get((o.end, r0 + 1))
            if target is None:
                target = states[(o.end, r0 + 1)] = _State.empty(MACS_BUCKETS + 1)
            improved = np.nonzero(key[j, :span] < target.key()[shift:])[0]
            if len(improved):
                for field_, v in zip(_State.CHAIN, best):
                    getattr(target, field_)[improved + shift] = v[j, improved]
                target.how[improved + shift] = _State.encode(k, cols[r0] + 1, rows[which[j, improved]], improved)

    def _terminal_paths(self, cap: float, states) -> tuple[list[_Path], float]:
        """Paths of the plans on this cap's front (estimated peak vs MACs bucket), and its least peak."""
        peaks, buckets, keys = [], [], []
        for (end, r), state in states.items():
            if end == 0:
                continue
            whole, tail = self.ends[self.checkpoints[end - 1]]
            finite = np.nonzero(np.isfinite(state.value))[0]
            chain = (getattr(state, f)[finite] for f in _State.CHAIN)
            peaks.append(np.maximum(cap + chain_peak(*chain, whole), tail))
            buckets.append(finite)
            keys += [(end, r)] * len(finite)
        if not keys:
            return [], math.inf
        peaks, buckets = np.concatenate(peaks), np.concatenate(buckets)
        order = np.lexsort((buckets, peaks))
        paths, lowest = [], math.inf
        for i in order:
            if buckets[i] < lowest:
                lowest = buckets[i]
                paths.append(self._walk(states, keys[i], int(buckets[i])))
        return paths, float(peaks[order[0]])

    def _walk(self, states, state, bucket) -> _Path:
        steps = []
        while state != (0, 0):
            k, cols, prev_rows, prev_bucket = _State.decode(int(states[state].how[bucket]))
            o = self.options[k]
            steps.append((o, state[1], cols))
            state, bucket = (o.source, prev_rows), prev_bucket
        return _Path(tuple(reversed(steps)))


@dataclass
class _State:
    """Least checkpoint bytes per MACs bucket of the plans reaching one (checkpoint, rows), as
    :func:`chain_bands` counts them (``value``: the chain's bands, ``whole``, ``tail``, ``held``); and how
    (option, columns, rows before, bucket before), packed into one integer."""

    CHAIN = ("value", "whole", "tail", "held")
    value: np.ndarray
    whole: np.ndarray
    tail: np.ndarray
    held: np.ndarray
    how: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "_State":
        return cls(*(np.full(n, np.inf) for _ in cls.CHAIN), np.zeros(n, np.int64))

    @classmethod
    def start(cls, n: int) -> "_State":
        state = cls.empty(n)
        for f in cls.CHAIN:
            getattr(state, f)[0] = 0.0
        return state

    def key(self) -> np.ndarray:
        return chain_peak(*(getattr(self, f) for f in self.CHAIN), 0.0)

    @staticmethod
    def encode(option, cols, prev_rows, prev_bucket):
        return ((np.asarray(option, np.int64) * 16 + cols) * 16 + prev_rows) * 4096 + prev_bucket

    @staticmethod
    def decode(code: int) -> tuple[int, int, int, int]:
        code, prev_bucket = divmod(code, 4096)
        code, prev_rows = divmod(code, 16)
        option, cols = divmod(code, 16)
        return option, cols, prev_rows, prev_bucket
