"""Fast per-stage estimates for the planner's search: MACs, working set and band bytes of every
stage option (source checkpoint, end checkpoint, grid) at one input size, in one sweep.

A pack's region at a node is (rows interval) x (cols interval): the rules' windows act on rows and
columns separately, so one backward sweep of row and column intervals from every *target* (a
checkpoint, or the input of a reduction that a pass accumulates) with 1..8 tiles gives, for every
node, the summed and the largest tile extent -- and so, for every grid at once:

* MACs of a pass: sum over nodes of MACs per pixel x (sum of computed row extents) x (sum of column
  extents); with halo reuse (the schedule's default) a tile computes only the rows below those the
  tile above held, and the windows back-propagate from the rows computed, as the schedule does;
* the working set of a pack: the largest, over the steps of the stage, sum of the storages alive
  (liveness and bytes per pixel from the allocation profile, extents of the largest tile), plus the
  line buffers (the rows each value keeps for the tile below, across every column);
* the bands of a checkpoint alive while the next stage reads it: from the rows each grid row of the
  consumer reads and the band boundaries of the producer (the whole checkpoint when the consumer
  takes several passes), whether the consumer needs it whole, and what of it the consumer's last
  row of packs still reads (the planner chains these along a plan).

A checkpoint that is a cut (several values) is one target seeded at all its values at once (the
regions of their ancestors are unions, as one pack computes them); the planner's cuts are the live
values between two ops (splitpack.core.capture.graph.find_cuts), so everything before a cut's last
value in execution order is on its way and the running sums over execution order stay valid.

These are estimates (the largest tile for every node at once, all checkpoints' bands at their
widest together); the planner ranks its finalists with the exact replay (splitpack.core.cost.exact_peak).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from splitpack.core.cost.counts import node_macs
from splitpack.core.capture.graph import Shape, TracedModel, as_cut, shape_numel
from splitpack.core.plan.spec import Plan, Stage
from splitpack.core.cost.exact_peak import AllocationProfile
from splitpack.core.capture.rules import Rule, Window, spatial_dims
from splitpack.core.plan.schedule import StageGraph, bounds, node_kind, pass_level, stage_graphs, stage_rules

MAX_TILES = 8  # grids 1x1 .. 8x8, every rows x cols combination


@dataclass
class OpTimes:
    """What the search needs of a time model (splitpack.core.cost.time_model.Predictor.op_times): per op its
    seconds at full size, its fixed part and its full-size work at a pack's cost per element, per step and
    per pack the overheads, and seconds per copied byte."""

    full: dict[fx.Node, float]
    fixed: dict[fx.Node, float]
    split: dict[fx.Node, float]
    per_step: float
    per_pack: float
    copy_slope: float
EMPTY = 1 << 40
# tile t of a g-tile split sits at column OFFSETS[g - 1] + t of the (target, tile) arrays
OFFSETS = np.cumsum([0] + list(range(1, MAX_TILES)))
TILE_COLUMNS = int(OFFSETS[-1] + MAX_TILES)


def _tile_bounds(size: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of every tile of every g-tile split of ``size`` (g = 1..MAX_TILES); empty where g > size."""
    lo, hi = np.full(TILE_COLUMNS, EMPTY, np.int64), np.full(TILE_COLUMNS, -EMPTY, np.int64)
    for g in range(1, min(MAX_TILES, size) + 1):
        b = bounds(size, g)
        lo[OFFSETS[g - 1]:OFFSETS[g - 1] + g] = b[:-1]
        hi[OFFSETS[g - 1]:OFFSETS[g - 1] + g] = b[1:]
    return lo, hi


def _per_grid(lengths: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """(targets, TILE_COLUMNS) tile extents -> (targets, MAX_TILES): summed (np.add) or largest (np.maximum)
    per tile count."""
    return reduce.reduceat(lengths, OFFSETS, axis=1)


@dataclass
class _Intervals:
    """Row (d=0) or column (d=1) intervals per (target, tile column) of one node."""

    lo: np.ndarray
    hi: np.ndarray

    def union(self, other: "_Intervals") -> None:
        np.minimum(self.lo, other.lo, out=self.lo)
        np.maximum(self.hi, other.hi, out=self.hi)

    def clamp(self, size: int) -> "_Intervals":
        lo, hi = np.maximum(self.lo, 0), np.minimum(self.hi, size)
        empty = lo >= hi
        lo[empty], hi[empty] = EMPTY, -EMPTY
        return _Intervals(lo, hi)

    def lengths(self) -> np.ndarray:
        return np.maximum(self.hi - self.lo, 0)


def _first_tiles() -> np.ndarray:
    first = np.zeros(TILE_COLUMNS, bool)
    first[OFFSETS] = True
    return first


FIRST_TILES = _first_tiles()  # tile columns with no tile above them (the first of each split)


def reused_rows(rows: _Intervals) -> tuple[_Intervals, np.ndarray]:
    """(rows each tile computes, rows it takes from the tile above) for the rows each holds: the
    schedule's halo reuse (schedule._new_rows) for every tile count at once."""
    lo, hi = rows.lo, rows.hi
    above_lo, above_hi = np.roll(lo, 1, axis=1), np.roll(hi, 1, axis=1)
    overlap = ~FIRST_TILES & (above_lo <= lo) & (lo < above_hi) & (lo < hi)
    split = np.minimum(hi, above_hi)
    new_lo = np.where(overlap, split, lo)
    empty = new_lo >= hi
    computed = _Intervals(np.where(empty, EMPTY, new_lo), np.where(empty, -EMPTY, hi))
    return computed, np.where(overlap, split - lo, 0)


def _window(rule: Rule, k: int, d: int, iv: _Intervals, other: _Intervals) -> _Intervals:
    """The rule's input window along dim ``d`` for every interval at once (``other``: the other dim,
    for rules whose window needs a whole region)."""
    if isinstance(rule, Window):
        w = rule.dims[d]
        lo = iv.lo * w.stride - w.before
        hi = (iv.hi - 1) * w.stride - w.before + w.dilation * (w.kernel - 1) + 1
        return _Intervals(lo, hi)
    if type(rule).input_window is Rule.input_window:
        return _Intervals(iv.lo.copy(), iv.hi.copy())
    lo, hi = iv.lo.copy(), iv.hi.copy()
    for idx in zip(*np.nonzero(iv.lo < iv.hi)):
        region = [None, None]
        region[d] = (int(iv.lo[idx]), int(iv.hi[idx]))
        region[1 - d] = (int(other.lo[idx]), int(other.hi[idx])) if other.lo[idx] < other.hi[idx] else (0, 1)
        lo[idx], hi[idx] = rule.input_window(tuple(region), k)[d]
    return _Intervals(lo, hi)


@dataclass
class Sweep:
    """Per node, per target and tile count: summed and largest tile extent, rows and columns; and at
    checkpoints the row intervals themselves."""

    targets: list[fx.Node]
    row_sum: dict[fx.Node, np.ndarray] = field(default_factory=dict)  # (targets, MAX_TILES)
    col_sum: dict[fx.Node, np.ndarray] = field(default_factory=dict)
    row_max: dict[fx.Node, np.ndarray] = field(default_factory=dict)
    col_max: dict[fx.Node, np.ndarray] = field(default_factory=dict)
    row_count: dict[fx.Node, np.ndarray] = field(default_factory=dict)  # tiles with at least one row
    col_count: dict[fx.Node, np.ndarray] = field(default_factory=dict)
    computed_row_sum: dict[fx.Node, np.ndarray] = field(default_factory=dict)  # rows computed (halo reuse)
    kept_row_max: dict[fx.Node, np.ndarray] = field(default_factory=dict)  # largest rows kept for the tile below
    rows_at: dict[fx.Node, _Intervals] = field(default_factory=dict)  # checkpoints: (targets, TILE_COLUMNS)

    def column(self, target: fx.Node) -> int:
        return self.targets.index(target)


def sweep(stage: StageGraph, rules: dict[fx.Node, Rule], hw: dict[fx.Node, tuple[int, int]],
          targets: list[fx.Node], keep_rows: set[fx.Node]) -> Sweep:
    """One backward sweep of the region rules from every target (the schedule's ``_pack`` for all
    grids and targets at once)."""
    n = len(targets)
    seeds = {}
    for i, t in enumerate(targets):
        for node in as_cut(t):  # a cut seeds every value of it in the same tile column
            seeds.setdefault(node, []).append(i)
    need: dict[fx.Node, list[_Intervals]] = {}
    result = Sweep(list(targets))
    for node in reversed([stage.source] + stage.nodes):
        if node not in stage.spatial:
            continue
        for i in seeds.get(node, ()):
            if node not in need:
                need[node] = [_Intervals(np.full((n, TILE_COLUMNS), EMPTY, np.int64),
                                         np.full((n, TILE_COLUMNS), -EMPTY, np.int64)) for _ in range(2)]
            for d in range(2):  # a union: a value of a cut may also be read by a later value of it
                lo, hi = _tile_bounds(hw[node][d])
                np.minimum(need[node][d].lo[i], lo, out=need[node][d].lo[i])
                np.maximum(need[node][d].hi[i], hi, out=need[node][d].hi[i])
        if node not in need:
            continue
        rows, cols = need.pop(node)
        _summarise(result, node, rows, cols, keep_rows)
        if node is stage.source:
            continue
        rows, kept = reused_rows(rows)
        result.computed_row_sum[node] = _per_grid(rows.lengths(), np.add)
        result.kept_row_max[node] = _per_grid(kept, np.maximum)
        rule = rules[node]
        for k, x in enumerate(rule.spatial_inputs):
            window = [_window(rule, k, 0, rows, cols).clamp(hw[x][0]), _window(rule, k, 1, cols, rows).clamp(hw[x][1])]
            if x in need:
                need[x][0].union(window[0])
                need[x][1].union(window[1])
            else:
                need[x] = window
    return result


def _summarise(result: Sweep, node: fx.Node, rows: _Intervals, cols: _Intervals, keep_rows: set) -> None:
    r, c = rows.lengths(), cols.lengths()
    result.row_sum[node], result.col_sum[node] = _per_grid(r, np.add), _per_grid(c, np.add)
    result.row_max[node], result.col_max[node] = _per_grid(r, np.maximum), _per_grid(c, np.maximum)
    result.row_count[node], result.col_count[node] = _per_grid((r > 0).astype(np.int64), np.add), \
        _per_grid((c > 0).astype(np.int64), np.add)
    if node in keep_rows:
        result.rows_at[node] = rows


# --------------------------------------------------------------------------- stage options

@dataclass(frozen=True)
class Checkpoint:
    name: str  # the outermost module name of the node (names of the same node are one checkpoint)
    node: fx.Node  # a cut: its last value in execution order
    spatial: bool  # False: the global pooling (a last checkpoint only)
    members: tuple[fx.Node, ...] = ()  # a cut's values (empty: ``node`` alone)

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return self.members or (self.node,)

    @property
    def target(self) -> fx.Node | tuple[fx.Node, ...]:
        """What a pass writing it is seeded at: the node, or a cut's nodes."""
        return self.members or self.node


@dataclass
class StageOption:
    """Stage ``source -> end`` (indices into the planner's checkpoint list; 0 is the image) for every grid:
    arrays indexed [rows - 1, cols - 1]."""

    source: int
    end: int
    passes: int
    macs: np.ndarray  # MACs of the stage, batch 1
    unsplit_macs: int  # the same nodes run once unsplit
    working_set: np.ndarray  # bytes of the largest pack at its peak, batch 1
    valid: np.ndarray  # bool: every tile has at least one pixel
    read_lo: list[np.ndarray] | None  # per source value: (TILE_COLUMNS,) first row each grid row of each rows count reads
    read_hi: list[np.ndarray] | None
    _bands: np.ndarray | None = None  # cache of Estimator.band_bytes
    _reads_whole: np.ndarray | None = None  # cache: where the bands are the whole source (see reads_whole)
    _tail: np.ndarray | None = None  # cache: the source's bytes its last row of packs reads (see tail_bytes)
    seconds: np.ndarray | None = None  # predicted seconds of the stage, batch 1 (with a time model)
    unsplit_seconds: float = 0.0  # the same nodes run once unsplit

    def __post_init__(self):
        self.extra_macs = self.macs - self.unsplit_macs  # halo recompute and extra passes
        self.extra_seconds = None if self.seconds is None else self.seconds - self.unsplit_seconds
        self.least_working_set = float(self.working_set[self.valid].min()) if self.valid.any() else math.inf


class Estimator:
    """Stage options of a model at one input size (batch 1), and the terms the planner adds up."""

    def __init__(self, traced: TracedModel, checkpoints: list[Checkpoint], shapes: dict[fx.Node, Shape],
                 dtype: torch.dtype, profile: AllocationProfile, max_passes: int, max_span: int,
                 op_time: "OpTimes | None" = None):
        """``op_time``: per-op times of a time model (splitpack.core.cost.time_model); with it every stage
        option also gets its predicted seconds."""
        self.traced, self.checkpoints, self.shapes, self.profile = traced, checkpoints, shapes, profile
        self.op_time = op_time
        whole = stage_graphs(traced, Plan((Stage(checkpoints[-1].name, (1, 1)),)))[0]
        self.rules, layouts = stage_rules(traced, whole, shapes, {}, dtype)
        self.whole = whole
        self.hw = {n: tuple(spatial_dims(shapes[n], layouts[n])) for n in whole.spatial}
        self.pixel_numel = {n: shape_numel(shapes[n]) / max(1, self.hw[n][0] * self.hw[n][1]) for n in whole.spatial}
        self.index = traced.index
        reduction_inputs = [self.rules[r].spatial_inputs[0] for r in whole.reductions]
        self.targets = list(dict.fromkeys([c.target for c in checkpoints if c.spatial] + reduction_inputs))
        self.sweep = sweep(whole, self.rules, self.hw, self.targets,
                           {n for c in checkpoints if c.spatial for n in c.nodes})
        self.node_macs = {n: node_macs(n, traced.gm, shapes) for n in traced.nodes}
        self._macs_before = np.cumsum([self.node_macs[n] for n in traced.nodes])  # running unsplit MACs
        self.macs_per_pixel = self._macs_per_pixel()
        self._pass_macs = {t: self._cumulative_macs(t) for t in self.targets}
        self._pass_ws = {t: self._working_sets(t) for t in self.targets}
        if op_time is not None:
            self._pass_seconds = {t: self._cumulative_seconds(t) for t in self.targets}
            self._seconds_before = np.cumsum([op_time.full.get(n, 0.0) for n in traced.nodes])
        self._pass_lines = {t: self._cumulative_lines(t) for t in self.targets}
        self.step_peaks = self._unsplit_step_peaks()
        self.options = self._options(max_passes, max_span)

    # per-node facts ---------------------------------------------------------
    def _macs_per_pixel(self) -> dict[fx.Node, float]:
        out = {}
        for n in self.whole.nodes:
            if n in self.whole.spatial:
                macs = self.node_macs[n]
                if macs:
                    out[n] = macs / (self.hw[n][0] * self.hw[n][1])
        return out

    def itemsize(self, node: fx.Node) -> int:
        op = self.profile.ops.get(node)
        return op.itemsize if op is not None else self.profile.input_itemsize

    def full_bytes(self, c: Checkpoint) -> int:
        """Batch-1 bytes of a checkpoint's merged value(s) (the last stage writes them whole)."""
        return sum(shape_numel(self.shapes[n]) * self.itemsize(n) for n in c.nodes)

    def _pos(self, key: fx.Node | tuple[fx.Node, ...]) -> int:
        """Execution-order index of a node, or of a cut's last value."""
        return max(self.index[n] for n in as_cut(key))

    def _root(self, node: fx.Node) -> fx.Node:
        """The node whose storage ``node``'s value lives in (itself, or what it is in place in / a view of)."""
        op = self.profile.ops.get(node)
        while op is not None and op.alias is not None:
            node = node.all_input_nodes[op.alias]
            op = self.profile.ops.get(node)
        return node

    # MACs ---------------------------------------------------------------------
    def _running(self, target: fx.Node, weights: dict[fx.Node, float], rows: dict[fx.Node, np.ndarray],
                 cols: dict[fx.Node, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(node indices, running sums (n, 8, 8)) of weight x rows x columns over the nodes of ``weights``
        up to ``target``, for a pass seeded at ``target``."""
        col = self.sweep.column(target)
        nodes = [n for n in weights if n in rows and self.index[n] <= self._pos(target)]
        nodes.sort(key=self.index.__getitem__)
        if not nodes:
            return np.zeros(0, np.int64), np.zeros((0, MAX_TILES, MAX_TILES))
        r = np.stack([rows[n][col] for n in nodes]).astype(float)
        c = np.stack([cols[n][col] for n in nodes]).astype(float)
        w = np.array([weights[n] for n in nodes])
        return np.array([self.index[n] for n in nodes]), np.cumsum(np.einsum("m,mi,mj->mij", w, r, c), axis=0)

    def _cumulative_macs(self, target: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """(node indices, running MACs (n, 8, 8)) of a pass seeded at ``target``, over the MAC nodes before it."""
        return self._running(target, self.macs_per_pixel, self.sweep.computed_row_sum, self.sweep.col_sum)

    def _cumulative_lines(self, target: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """(node indices, running line-buffer bytes (n, 8, 8)): the rows each value keeps for the tile
        below, across every column, all alive together (an estimate: the largest rows kept)."""
        weights = {n: self.pixel_numel[n] * self.itemsize(n) for n in self.whole.spatial}  # a copy, even of a view
        return self._running(target, weights, self.sweep.kept_row_max, self.sweep.col_sum)

    @staticmethod
    def _between(cumulative: tuple[np.ndarray, np.ndarray], index: int) -> np.ndarray:
        """The running sum's total over the nodes after ``index``."""
        where, running = cumulative
        if not len(where):
            return np.zeros((MAX_TILES, MAX_TILES))
        end = running[-1]
        k = np.searchsorted(where, index, side="right")
        return end - running[k - 1] if k > 0 else end

    def pass_macs(self, source: fx.Node, target) -> np.ndarray:
        return self._between(self._pass_macs[target], self.index[source])

    def pass_lines(self, source: fx.Node, target) -> np.ndarray:
        return self._between(self._pass_lines[target], self.index[source])

    # seconds (with a time model) ----------------------------------------------
    def _cumulative_seconds(self, target: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """(node indices, running seconds (n, 8, 8)) of a pass seeded at ``target``: per spatial op its fixed
        cost per pack it runs in plus its per-pixel cost times the pixels computed."""
        col, s, times = self.sweep.column(target), self.sweep, self.op_time
        nodes = sorted((n for n in self.whole.nodes if n in self.whole.spatial and n in s.row_sum and n in times.full
                        and self.index[n] <= self._pos(target)), key=self.index.__getitem__)
        if not nodes:
            return np.zeros(0, np.int64), np.zeros((0, MAX_TILES, MAX_TILES))
        def stacked(table):
            return np.stack([table[n][col] for n in nodes]).astype(float)
        per_pixel = np.array([(times.split[n] - times.fixed[n]) / (self.hw[n][0] * self.hw[n][1]) for n in nodes])
        fixed = np.array([times.fixed[n] + times.per_step for n in nodes])
        seconds = np.einsum("m,mi,mj->mij", per_pixel, stacked(s.computed_row_sum), stacked(s.col_sum)) \
            + np.einsum("m,mi,mj->mij", fixed, stacked(s.row_count), stacked(s.col_count))
        return np.array([self.index[n] for n in nodes]), np.cumsum(seconds, axis=0)

    def pass_seconds(self, source: fx.Node, target: fx.Node) -> np.ndarray:
        return self._between(self._pass_seconds[target], self.index[source])

    def unsplit_seconds_between(self, first: fx.Node, last: fx.Node) -> float:
        return float(self._seconds_before[self.index[last]] - self._seconds_before[self.index[first]])

    def tail_seconds(self, c: Checkpoint) -> float:
        return float(self._seconds_before[-1] - self._seconds_before[self.index[c.node]])

    def _stage_seconds(self, source: fx.Node, end: Checkpoint, seeds: list[list[fx.Node]]) -> np.ndarray:
        """A stage's seconds for every grid: its passes, its global values and reductions once each, and per
        pack the read of its source and the write of its tile (the checkpoint copied once in all)."""
        per_target = [self.pass_seconds(source, t) for pass_seeds in seeds for t in pass_seeds]
        nodes = self.traced.nodes[self.index[source] + 1:self.index[end.node] + 1]
        once = sum(self.op_time.full.get(n, 0.0) for n in nodes if n not in self.whole.spatial)
        packs = np.outer(np.arange(1, MAX_TILES + 1), np.arange(1, MAX_TILES + 1))
        copies = self.op_time.per_pack * packs * len(seeds)
        if end.spatial:
            copies = copies + self.op_time.copy_slope * self.full_bytes(end)
        seconds = sum(per_target) + once + copies
        if len(seeds) > 1:  # one pack keeps its values from pass to pass
            seconds[0, 0] = max(m[0, 0] for m in per_target) + once + copies[0, 0]
        return seconds

    # working set --------------------------------------------------------------
    def _live_roots(self) -> dict[fx.Node, list[fx.Node]]:
        """Per spatial step, the storages alive while it runs (each a root node)."""
        if hasattr(self, "_live"):
            return self._live
        steps = [self.whole.source] + [n for n in self.whole.nodes if n in self.whole.spatial]
        last: dict[fx.Node, int] = {}
        for n in steps:
            root = self._root(n)
            end = max([self.index[u] for u in n.users] + [self.index[n]])
            last[root] = max(last.get(root, 0), end)
        live: dict[fx.Node, list[fx.Node]] = {n: [] for n in steps}
        positions = [self.index[n] for n in steps]
        for root, end in last.items():
            lo = np.searchsorted(positions, self.index[root])
            hi = np.searchsorted(positions, end, side="right")
            for n in steps[lo:hi]:
                live[n].append(root)
        self._live = live
        return live

    def _root_bytes(self, root: fx.Node) -> float:
        op = self.profile.ops.get(root)
        return op.new * self.pixel_numel[root] if op is not None and root in self.pixel_numel else 0.0

    def _live_pairs(self) -> tuple[np.ndarray, ...]:
        """Every (step, storage) alive together, steps in execution order: (step indices, pair -> step,
        pair -> swept node row, pair bytes per pixel), the stacked largest tile extents, and per step the
        op's temporaries whose size does not follow the pack's."""
        if not hasattr(self, "_pairs"):
            s, live = self.sweep, self._live_roots()
            rows = {n: i for i, n in enumerate(s.row_max)}
            row_max, col_max = np.stack(list(s.row_max.values())), np.stack(list(s.col_max.values()))
            steps = sorted((n for n in live if n in rows), key=self.index.__getitem__)
            step_of, nodes, weights, fixed = [], [], [], np.zeros(len(steps))
            for k, step in enumerate(steps):
                for root in live[step]:
                    if root in rows:
                        step_of.append(k), nodes.append(rows[root]), weights.append(self._root_bytes(root))
                op = self.profile.ops.get(step)
                if op is not None and op.extra:  # the op's temporaries
                    step_of.append(k), nodes.append(rows[step]), weights.append(op.extra * self.pixel_numel[step])
                fixed[k] = op.fixed if op is not None else 0
            self._pairs = (np.array([self.index[n] for n in steps]), np.array(step_of, np.int64),
                           np.array(nodes, np.int64), np.array(weights), row_max, col_max, fixed)
        return self._pairs

    def _working_sets(self, target: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """(step indices, largest live bytes (n, 8, 8) from each step up to ``target``), batch 1."""
        col = self.sweep.column(target)
        where, step_of, nodes, weights, row_max, col_max, fixed = self._live_pairs()
        n_steps = int(np.searchsorted(where, self._pos(target), side="right"))
        n_pairs = int(np.searchsorted(step_of, n_steps))
        parts = np.einsum("p,pi,pj->pij", weights[:n_pairs], row_max[nodes[:n_pairs], col],
                          col_max[nodes[:n_pairs], col])
        totals = np.zeros((n_steps, MAX_TILES, MAX_TILES))
        np.add.at(totals, step_of[:n_pairs], parts)
        totals += fixed[:n_steps, None, None]
        running = np.maximum.accumulate(totals[::-1], axis=0)[::-1]  # largest from each step on
        return where[:n_steps], running

    def pass_working_set(self, source: fx.Node, target: fx.Node) -> np.ndarray:
        where, running = self._pass_ws[target]
        k = np.searchsorted(where, self.index[source], side="right")
        return running[k] if k < len(where) else np.zeros((MAX_TILES, MAX_TILES))

    # the rest of the network -------------------------------------------------
    def _unsplit_step_peaks(self) -> dict[fx.Node, int]:
        from splitpack.core.cost.exact_peak import step_peaks

        return step_peaks(self.traced, self.profile, self.shapes)

    def tail_peak(self, c: Checkpoint) -> int:
        """Batch-1 peak of the rest of the network after the last checkpoint, run unsplit."""
        if self.index[c.node] > self._first_unused:
            # a value no op reads (e.g. a channel split's unused part) stays alive in the unsplit run to
            # its end; the split model's tail starts from the checkpoint alone, without it
            from splitpack.core.cost.exact_peak import rest_peak

            return rest_peak(self.traced, self.profile, self.shapes, c.nodes,
                             [self.full_bytes(Checkpoint("", n, True)) if c.spatial else 0 for n in c.nodes])
        after = [p for n, p in self.step_peaks.items() if self.index[n] > self.index[c.node]]
        return max(after + [self.full_bytes(c)])

    @property
    def _first_unused(self) -> int:
        """Index of the first node whose value nothing reads (len(nodes) if none)."""
        unused = [self.index[n] for n in self.traced.nodes if not n.users and n.op not in ("output", "placeholder")]
        return min(unused, default=len(self.traced.nodes))

    def _global_macs(self, source: fx.Node, end: Checkpoint) -> int:
        """MACs of the stage's global values (squeeze-excitation convolutions): computed once, after their pass."""
        nodes = self.traced.nodes[self.index[source] + 1:self.index[end.node] + 1]
        return sum(self.node_macs[n] for n in nodes if n not in self.whole.spatial)

    def unsplit_macs_between(self, first: fx.Node, last: fx.Node) -> int:
        """Unsplit MACs of the nodes after ``first`` up to ``last`` (execution order)."""
        return int(self._macs_before[self.index[last]] - self._macs_before[self.index[first]])

    def tail_macs(self, c: Checkpoint) -> int:
        return int(self._macs_before[-1] - self._macs_before[self.index[c.node]])

    # options ------------------------------------------------------------------
    def _levels_from(self, sources: tuple[fx.Node, ...], last: fx.Node, max_level: int) -> dict[fx.Node, int]:
        """stage_graphs' pass levels for a stage starting at ``sources`` (a checkpoint's nodes; valid for any
        end), up to ``last`` or the first node past ``max_level``."""
        level = dict.fromkeys(sources, 0)
        for n in self.traced.nodes[self._pos(sources) + 1:self.index[last] + 1]:
            parents = [p for p in n.all_input_nodes if p in level]
            if not parents and n not in self.traced.input_dependent:
                continue
            level[n] = pass_level(node_kind(self.traced, n), parents, level, self.traced.spatial)
            if level[n] > max_level:
                break
        return level

    def _seeds(self, source: fx.Node, end: Checkpoint, level: dict) -> list[list[fx.Node]]:
        """Per pass, the targets its packs are tiles of."""
        passes = max(level[n] for n in end.nodes) + (1 if end.spatial else 0)
        seeds: list[list[fx.Node]] = [[] for _ in range(passes)]
        for r in self.whole.reductions:
            if self.index[source] < self.index[r] <= self.index[end.node]:
                seeds[level[r] - 1].append(self.rules[r].spatial_inputs[0])
        if end.spatial:
            seeds[-1].append(end.target)
        return [list(dict.fromkeys(s)) for s in seeds]

    def _options(self, max_passes: int, max_span: int) -> list[StageOption]:
        sources = [(0, (self.traced.input_node,))] + [(i, c.nodes) for i, c in enumerate(self.checkpoints, 1)
                                                     if c.spatial]
        options = []
        for a, source_nodes in sources:
            last = min(len(self.checkpoints), a + max_span)
            level = self._levels_from(source_nodes, self.checkpoints[last - 1].node, max_passes)
            source = max(source_nodes, key=self.index.__getitem__)  # the running sums start after it
            for b in range(a + 1, last + 1):
                end = self.checkpoints[b - 1]
                if any(n not in level for n in end.nodes) or end.node is source:
                    break
                seeds = self._seeds(source, end, level)
                if len(seeds) > max_passes:
                    break
                options.append(self._option(a, b, source_nodes, end, seeds))
        return options

    def _option(self, a: int, b: int, sources: tuple[fx.Node, ...], end: Checkpoint,
                seeds: list[list]) -> StageOption:
        source = max(sources, key=self.index.__getitem__)
        per_target = [self.pass_macs(source, t) for pass_seeds in seeds for t in pass_seeds]
        macs = sum(per_target) + self._global_macs(source, end)
        if len(seeds) > 1:  # one pack (1x1) keeps its values from pass to pass: each node runs once
            macs[0, 0] = max(m[0, 0] for m in per_target) + self._global_macs(source, end)
        ws = np.max([self.pass_working_set(source, t) + self.pass_lines(source, t)
                     for pass_seeds in seeds for t in pass_seeds], axis=0)
        valid = np.ones((MAX_TILES, MAX_TILES), bool)
        for t in {n for pass_seeds in seeds for t in pass_seeds for n in as_cut(t)}:
            h, w = self.hw[t]
            valid[min(h, MAX_TILES):, :] = False
            valid[:, min(w, MAX_TILES):] = False
        unsplit = self.unsplit_macs_between(source, end.node)
        reads = [self.sweep.rows_at[n] for n in sources if n in self.sweep.rows_at]
        col = self.sweep.column(seeds[-1][0]) if reads else 0
        seconds = self._stage_seconds(source, end, seeds) if self.op_time is not None else None
        unsplit_s = self.unsplit_seconds_between(source, end.node) if self.op_time is not None else 0.0
        return StageOption(a, b, len(seeds), macs, unsplit, ws, valid,
                           [r.lo[col] for r in reads] if reads else None, [r.hi[col] for r in reads] if reads else None,
                           seconds=seconds, unsplit_seconds=unsplit_s)

    def band_bytes(self, c: Checkpoint, option: StageOption) -> np.ndarray:
        """Batch-1 bytes of checkpoint ``c``'s bands alive while ``option`` (whose source it is) reads it:
        (producer rows 1..8, consumer rows 1..8). Several passes read all of it first."""
        if option._bands is not None:
            return option._bands
        parts = [self._value_bands(n, option, k) for k, n in enumerate(c.nodes)]  # a cut: per value
        out, whole, tail = (sum(p[i] for p in parts) for i in range(3))
        option._bands, option._reads_whole = out, out >= whole
        option._tail = np.broadcast_to(tail, (MAX_TILES, MAX_TILES))
        return out

    def _value_bands(self, node: fx.Node, option: StageOption, k: int) -> tuple[np.ndarray, float, np.ndarray]:
        """(band bytes alive (producer rows, consumer rows), whole bytes, bytes the last row of packs reads)
        of the ``k``-th value of ``option``'s source."""
        h, w = self.hw[node]
        row_bytes = w * self.pixel_numel[node] * self.itemsize(node)
        out = np.full((MAX_TILES, MAX_TILES), h * row_bytes)
        if option.passes == 1:
            lo, hi = option.read_lo[k], option.read_hi[k]
            ok = lo < hi
            for rp in range(1, min(h, MAX_TILES) + 1):
                edges = np.array(bounds(h, rp))
                first = edges[np.searchsorted(edges, np.where(ok, lo, 0), side="right") - 1]
                last = edges[np.minimum(np.searchsorted(edges, np.where(ok, hi, 1) - 1, side="right"), rp)]
                rows = np.where(ok, np.minimum(last - first, h), 0)
                out[rp - 1] = np.maximum.reduceat(rows, OFFSETS) * row_bytes
        tail = np.full(MAX_TILES, h * row_bytes)
        if option.read_lo is not None:
            last_row = OFFSETS + np.arange(MAX_TILES)  # tile column of the last grid row of each rows count
            first = option.read_lo[k][last_row]
            tail = np.where(first < EMPTY, (h - np.clip(first, 0, h)) * row_bytes, tail)
        return out, h * row_bytes, tail

    def tail_bytes(self, c: Checkpoint, option: StageOption) -> np.ndarray:
        """(producer rows, consumer rows): batch-1 bytes of checkpoint ``c`` still alive while the last row of
        packs of ``option``'s last pass runs (what it reads; the rows above are released as the pass goes)."""
        self.band_bytes(c, option)
        return option._tail

    def reads_whole(self, c: Checkpoint, option: StageOption) -> np.ndarray:
        """(producer rows, consumer rows): where ``option`` needs all of checkpoint ``c`` at once (several
        passes, or a row of packs reading every row). Then the stages before it have finished when
        it reads: their bands are gone, and only ``c`` whole (and what follows) is alive from there on."""
        self.band_bytes(c, option)
        return option._reads_whole
