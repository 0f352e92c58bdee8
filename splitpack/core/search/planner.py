"""The planner behind ``merge_layer: auto``: the Pareto front of staged plans by predicted peak
activation memory and MACs, and the plan an objective picks from it.

Search. A plan is a path over the exact-mode checkpoints (one per distinct node, in execution
order) from the image to a last checkpoint, one stage option (source, end, rows x cols grid) per
step. Its estimated peak (splitpack.core.cost.fast_estimate) is the largest working set of a pack, plus the
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
memory budget (bytes for the whole batch); both when both are given.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from splitpack.core.cost.counts import unsplit_macs
from splitpack.core.cost.fast_estimate import MAX_TILES, Checkpoint, Estimator, StageOption
from splitpack.core.capture.graph import TracedModel, trace
from splitpack.core.plan.spec import Plan, Stage
from splitpack.core.cost.exact_peak import allocation_profile
from splitpack.core.cost.plan_cost import PlanCost, plan_cost
from splitpack.core.plan.schedule import unsplittable_nodes
from splitpack.errors import SplitError

log = logging.getLogger("splitpack.planner")

DEFAULT_MAX_OVERHEAD = 1.25  # MACs split / unsplit when no cap and no budget is given
FRONT_OVERHEAD = 3.0  # the front covers plans up to this MACs ratio
MAX_PASSES = 3  # a stage spans at most two squeeze-excitation levels (each costs a pass over its packs)
MAX_SPAN = 40  # a stage spans at most this many checkpoints
MACS_BUCKETS = 160  # resolution of the MACs overhead in the dynamic programme
LADDER_STEP = 1.2  # ratio between consecutive working-set caps
FINALISTS = 6  # plans predicted exactly per objective
PEAK_TIE = 0.02  # smallest peak: plans within 2% of it are a tie, broken by fewer MACs


class BudgetTooSmall(SplitError, ValueError):
    """No plan fits the memory budget; the message states the smallest achievable peak."""


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

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "plan_text": str(self.plan),
                "predicted_peak_bytes": self.predicted_peak_bytes,
                "predicted_macs_ratio": round(self.predicted_macs_ratio, 6), "macs": self.macs,
                "unsplit_macs": self.unsplit_macs, "ops": self.ops, "objective": self.objective,
                "planning_seconds": round(self.seconds, 3), "input_shape": list(self.shape),
                "front": [p.to_dict() for p in self.front]}


def distinct_checkpoints(traced: TracedModel) -> list[Checkpoint]:
    """Exact-mode checkpoints, one per node (its outermost name: ``layer1`` for ``layer1.2.act3``)."""
    blocked = unsplittable_nodes(traced)
    names: dict[fx.Node, list[str]] = {}
    for name, node in traced.checkpoints.items():
        if node not in blocked:
            names.setdefault(node, []).append(name)
    ordered = sorted(names, key=traced.index.__getitem__)
    return [Checkpoint(min(names[n], key=lambda s: (s.count("."), names[n].index(s))), n, n in traced.spatial)
            for n in ordered]


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
        self.dtype = dtype or self.traced.dtype
        self.checkpoints = distinct_checkpoints(self.traced)
        if not self.checkpoints:
            raise SplitError(f"nothing to plan: the model has no checkpoint exact split-pack can merge at; "
                             f"{_first_obstacle(self.traced)}")

    # ------------------------------------------------------------------ public
    def choose(self, shape, memory_budget: int | None = None, max_overhead: float | None = None,
               finalists: int = FINALISTS, whole_front: bool = False, dtype: torch.dtype | None = None) -> PlanChoice:
        """The plan for inputs of ``shape`` (N, C, H, W): the smallest predicted peak within
        ``max_overhead`` (default 1.25x MACs), or with ``memory_budget`` (bytes, whole batch) the
        least MACs whose predicted peak fits (and within ``max_overhead`` if given too).
        ``whole_front``: search (and return) the front up to 3x MACs, not only what the objective needs."""
        start = time.perf_counter()
        shape = tuple(int(s) for s in shape)
        if max_overhead is not None and max_overhead < 1:
            raise ValueError(f"max_overhead: a MACs ratio >= 1, got {max_overhead}")
        cap = max_overhead if max_overhead is not None else (None if memory_budget else DEFAULT_MAX_OVERHEAD)
        context = _SizeContext(self, shape, dtype or self.dtype)
        stop = None if whole_front else (math.nan if memory_budget is None else memory_budget)
        front = context.front(FRONT_OVERHEAD if whole_front else max(cap or FRONT_OVERHEAD, 1.0), stop)
        if memory_budget is None:
            point, objective = context.smallest_peak(front, cap, finalists), f"smallest peak within {cap:g}x MACs"
        else:
            point = context.least_macs(front, memory_budget, cap, finalists)
            objective = f"least MACs within {memory_budget} bytes" + (f" and {cap:g}x MACs" if cap else "")
        cost = context.cost(point.plan)
        return PlanChoice(point.plan, cost.peak_bytes, cost.macs_ratio, cost.macs, cost.unsplit_macs, cost.ops,
                          objective, context.final_front(front), time.perf_counter() - start, shape)

    def front(self, shape, max_overhead: float = FRONT_OVERHEAD, dtype: torch.dtype | None = None) -> list[Point]:
        """The estimated Pareto front (peak, MACs ratio) up to ``max_overhead``."""
        context = _SizeContext(self, tuple(shape), dtype or self.dtype)
        return context.final_front(context.front(max_overhead))


def plan_for(model: nn.Module | TracedModel, shape, memory_budget: int | None = None,
             max_overhead: float | None = None, dtype: torch.dtype | None = None) -> PlanChoice:
    """The staged plan for ``model`` and inputs of ``shape`` (N, C, H, W); see :meth:`Planner.choose`."""
    return Planner(model, dtype).choose(shape, memory_budget, max_overhead)


class _SizeContext:
    """Everything the planner knows about one input size."""

    def __init__(self, planner: Planner, shape: tuple[int, ...], dtype: torch.dtype):
        if len(shape) != 4:
            raise ValueError(f"input shape: expected (N, C, H, W), got {shape}")
        self.planner, self.shape, self.batch, self.dtype = planner, shape, shape[0], dtype
        traced = planner.traced
        self.profile, self.shapes = allocation_profile(traced, shape, dtype)
        self.estimator = Estimator(traced, planner.checkpoints, self.shapes, dtype, self.profile,
                                   MAX_PASSES, MAX_SPAN)
        self.unsplit_macs = unsplit_macs(traced, self.shapes)  # one image
        self._costs: dict[Plan, PlanCost] = {}
        self.pools: list[list[Point]] = []  # the last search's fronts: chained estimate, upper bound

    # ------------------------------------------------------------------ estimates
    def plan_of(self, path: _Path) -> Plan:
        cps = self.planner.checkpoints
        return Plan(tuple(Stage(cps[o.end - 1].name, (int(r), int(c))) for o, r, c in path.steps))

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

    def front(self, max_overhead: float, stop: float | None = None) -> list[Point]:
        """The estimated front; :meth:`smallest_peak` draws its finalists from both estimates' fronts
        (kept in ``self.pools``), the front returned is the chained estimate's."""
        self.pools = []
        for chains in (True, False):
            points = {}
            for path in _Search(self, max_overhead, stop, chains).run():
                plan = self.plan_of(path)
                if plan not in points:
                    peak, ratio = self.estimate(path, chains)
                    points[plan] = Point(plan, int(peak), float(ratio), False)
            self.pools.append(pareto(list(points.values())))
        return self.pools[0]

    # ------------------------------------------------------------------ exact
    def cost(self, plan: Plan) -> PlanCost:
        if plan not in self._costs:
            self._costs[plan] = plan_cost(self.planner.traced, plan, self.shape, self.dtype, (self.profile, self.shapes))
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
        other = [sorted((p for p in pool if p.macs_ratio <= cap), key=lambda p: p.peak_bytes)[:finalists]
                 for pool in self.pools[1:] if front is self.pools[0]]
        within = list({p.plan: p for p in within[:finalists] + sum(other, [])}.values())
        checked = [self.exact(p.plan) for p in within]
        ok = [p for p in checked if p.macs_ratio <= cap] or checked
        least = min(p.peak_bytes for p in ok)  # then the fewest MACs among the plans within PEAK_TIE of it
        return min((p for p in ok if p.peak_bytes <= least * (1 + PEAK_TIE)), key=lambda p: (p.macs_ratio, p.peak_bytes))

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

    def final_front(self, front: list[Point]) -> list[Point]:
        """The front with the plans predicted exactly so far replaced by their exact numbers."""
        exact = {plan: self.exact(plan) for plan in self._costs}
        return pareto([exact.get(p.plan, p) for p in front] + [p for p in exact.values() if p.plan not in
                                                                {q.plan for q in front}])


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


def pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both peak and MACs ratio, by increasing peak."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.peak_bytes, p.macs_ratio)):
        if not out or p.macs_ratio < out[-1].macs_ratio - 1e-12:
            out.append(p)
    return out


class _Search:
    """The dynamic programme over (checkpoint, rows of its stage) x MACs-overhead bucket, per working-set cap."""

    def __init__(self, context: _SizeContext, max_overhead: float, stop: float | None = None, chains: bool = True):
        """``chains``: count the bytes along a plan as :func:`chain_bands` does (a stage that reads its
        source whole starts a new chain); False: every checkpoint's bands alive together, an upper bound
        that ranks plans of many small bands better than the chained estimate does."""
        self.context, self.est, self.chains = context, context.estimator, chains
        self.checkpoints = context.planner.checkpoints
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
        extra = np.where(o.valid & (o.working_set <= cap), o.extra_macs, np.inf)
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
