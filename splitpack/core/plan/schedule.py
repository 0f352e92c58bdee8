"""From a staged plan to a program: stages, passes, packs and steps for one input size.

A *stage* runs packs of its source (the image, or the previous checkpoint's
merged activation) up to its checkpoint. Its ops are spatial (computed region by
region), reductions (spatial in, global out: accumulated over the tiles each pack
owns) and global (computed once from finished reductions). A global value that
gates spatial work again, as in squeeze-excitation, needs its reductions done
first, so a stage takes several *passes* over its packs: pass p accumulates the
reductions of level p (those whose inputs need only globals of lower levels), and
the last pass computes the checkpoint. Every pass recomputes the packs from the
stage's source; only the source and the checkpoint exist at full size.

*Halo reuse* (line buffers, ``halo="reuse"``, the default): packs of a pass run in raster order,
and a pack reuses the rows its upper neighbour in the same grid column already computed instead
of recomputing them. For a value whose rows [a, b) this pack needs while the pack above held rows
[a', b') with a' <= a < b', the pack computes only rows [min(b, b'), b) and joins them to the rows
[a, min(b, b')) the pack above kept for it (a copy of its value's tail, so the value itself is
freed as before). The input regions are then worked out from the rows computed, not the rows
held, so a kept row is never computed twice: full-width strips (grids Rx1) recompute nothing, and
grids with several columns recompute only the horizontal halo. ``halo="recompute"`` computes every
pack's whole region (the reference the tests compare with, and a way to bisect).

*Batched packs* (``batch_packs``): packs of one grid row that do the same work on regions of the same
shape (the inner columns of a grid; the border columns differ by their padding) run as one call, their
values concatenated on the batch dimension, so a row of k packs is one kernel per op instead of k.
Packs of one row do not depend on each other (a pack takes rows only from the pack above it), and the
packs of a batch are alive together: the exact peak replay counts them as one batch k times larger.

A checkpoint that is a cut (several values, possibly at different resolutions) is read and
written tensor by tensor: the stage's grid is laid over each value's own extent, pack ``i`` writes
tile ``i`` of every value of its target cut, and reads of a source cut are per value.

The program is plain data: the executor runs it, the cost model sums it, and a
compiler can turn it into straight-line code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from splitpack.core.capture.graph import Shape, TracedModel, describe_op, module_path
from splitpack.core.plan.spec import Grid, Plan
from splitpack.core.capture.rules import NCHW, Layout, MetaQuery, NoRule, OpContext, Reduce, Region, Rule, make_rule, \
    mutates_input, spatial_dims

Narrow = tuple[int, int, int]  # (axis, start, length)
HALO_MODES = ("reuse", "recompute")
Pads = tuple[int, int, int, int]  # F.pad amounts (left, right, top, bottom) past the true border


def bounds(size: int, parts: int) -> list[int]:
    """Split ``size`` into ``parts`` near-equal intervals; returns the boundaries."""
    return [size * i // parts for i in range(parts + 1)]


def tiles(hw: tuple[int, int], grid: Grid) -> list[Region]:
    """The grid's tiles of an extent, row by row (raster order)."""
    hb, wb = bounds(hw[0], grid[0]), bounds(hw[1], grid[1])
    return [((hb[r], hb[r + 1]), (wb[c], wb[c + 1])) for r in range(grid[0]) for c in range(grid[1])]


class Unsplittable(Exception):
    """Carries the node that has no rule (``node``) and the reason (message)."""

    def __init__(self, node: fx.Node, reason: str):
        super().__init__(reason)
        self.node = node

    def describe(self, gm: fx.GraphModule) -> str:
        """``op GroupNorm at module 'norm' (norm) cannot be split: <reason>``."""
        return (f"op {describe_op(self.node, gm)} at module {module_path(self.node) or '<model>'!r} "
                f"({self.node.name}) cannot be split: {self}")


# --------------------------------------------------------------------------- size-independent structure

@dataclass
class StageGraph:
    """One stage's nodes and their pass levels (structure only; rules come per input size)."""

    number: int  # 1-based
    checkpoint: str
    grid: Grid
    sources: tuple[fx.Node, ...]  # the image input, or the previous stage's checkpoint node(s) (a cut: several)
    targets: tuple[fx.Node, ...]  # this stage's checkpoint node(s)
    nodes: list[fx.Node]  # input-dependent nodes after the sources, execution order
    spatial: set[fx.Node]  # spatial nodes of the stage (the source included)
    reductions: list[fx.Node]
    metas: set[fx.Node]  # non-tensor values read off spatial ones (x.shape)
    level: dict[fx.Node, int]  # spatial: highest global level it needs; global: the pass that makes it

    @property
    def source(self) -> fx.Node:
        """The one source of a stage that reads a single value (the image, or a one-node checkpoint)."""
        if len(self.sources) != 1:
            raise ValueError(f"stage {self.number} reads a cut of {len(self.sources)} values")
        return self.sources[0]

    @property
    def target(self) -> fx.Node:
        """The one target of a stage that writes a single value (a one-node checkpoint)."""
        if len(self.targets) != 1:
            raise ValueError(f"stage {self.number} writes a cut of {len(self.targets)} values")
        return self.targets[0]

    @property
    def spatial_target(self) -> bool:
        return self.targets[0] in self.spatial

    @property
    def passes(self) -> int:
        return max(self.level[t] for t in self.targets) + (1 if self.spatial_target else 0)


def pass_level(kind: str | None, parents: list[fx.Node], level: dict[fx.Node, int], spatial) -> int:
    """The pass level of a node of kind ``kind`` (:func:`node_kind`) from its parents' levels: a reduction
    comes one pass after the spatial values it reduces, a size query needs only its global inputs,
    anything else is as late as its latest input."""
    if kind == "reduction":
        return max(level[p] + (1 if p in spatial else 0) for p in parents)
    if kind == "meta":
        return max((level[p] for p in parents if p not in spatial), default=0)
    return max((level[p] for p in parents), default=0)


def stage_graphs(traced: TracedModel, plan: Plan) -> list[StageGraph]:
    """The stages of ``plan``; ValueError where a checkpoint does not follow the one before it (a cut
    that does not separate the next checkpoint from the image)."""
    stages, sources = [], (traced.input_node,)
    for number, stage in enumerate(plan.stages, 1):
        targets = traced.cut(stage.checkpoint)
        nodes = [n for n in traced.ancestors(targets, sources) if n not in sources]
        if traced.input_node in nodes:
            raise ValueError(f"merge layer {stage.checkpoint!r} does not follow {plan.stages[number - 2].checkpoint!r}: "
                             "it also needs values made before that")
        spatial = {n for n in nodes if n in traced.spatial} | set(sources)
        reductions, metas, level = [], set(), dict.fromkeys(sources, 0)
        for n in nodes:
            kind = node_kind(traced, n)
            if kind == "reduction":
                reductions.append(n)
            elif kind == "meta":
                metas.add(n)
            level[n] = pass_level(kind, [p for p in n.all_input_nodes if p in level], level, spatial)
        stages.append(StageGraph(number, stage.checkpoint, stage.grid, sources, targets, nodes, spatial,
                                 reductions, metas, level))
        sources = targets
    return stages


# --------------------------------------------------------------------------- per-size program

@dataclass
class Step:
    """One op of one pack, with its input cuts worked out in advance."""

    node: fx.Node
    rule: Rule
    region: Region  # the output region computed (a reduction: the input tile accumulated)
    inputs: list[tuple[fx.Node, tuple[Narrow, ...], Pads | None]]  # source, narrows, border pads
    frees: tuple[fx.Node, ...]  # values no later step of the pack reads
    reduce: bool = False  # accumulate a partial reduction instead of producing a value
    padding: tuple[int, int] | None = None  # border padding the op applies itself (no padded copy)
    held: Region | None = None  # the value's region (``region`` plus the rows taken from ``carry``)
    carry: Region | None = None  # rows kept by the pack above, joined before ``region`` (halo reuse)
    keep: Region | None = None  # rows of the value kept for the pack below (its ``carry``)
    keep_cut: tuple[Narrow, ...] = ()  # ``narrow`` calls that cut ``keep`` out of the value

    @property
    def computes(self) -> bool:
        """False when the rows kept by the pack above are the whole value (nothing new to compute)."""
        return self.region[0][0] < self.region[0][1]


@dataclass
class PackProgram:
    tile: Region  # of the pass's main extent (the checkpoint, or the reductions' inputs)
    reads: dict[fx.Node, Region]  # per stage source: the region this pack reads (absent: the pack above read it all)
    steps: list[Step]
    writes: dict[fx.Node, Region] = field(default_factory=dict)  # per target: the tile written (final pass)
    # per target read by later steps too (a cut of a value and one made from it): narrows to its tile
    write_cuts: dict[fx.Node, tuple[Narrow, ...]] = field(default_factory=dict)
    release_below: dict[fx.Node, int] = field(default_factory=dict)  # per source: rows no later pack reads
    copy_read: bool = False  # an in-place op writes to a source: read copies, not views shared by packs
    column: int = 0  # grid column: the packs of one column hand rows down to each other (halo reuse)


@dataclass
class PassProgram:
    packs: list[PackProgram]
    reductions: list[fx.Node]  # finalised after the pass
    after: list[fx.Node]  # global values computed once the pass is done
    groups: list[tuple[int, ...]] = field(default_factory=list)  # packs run as one batched call, in order

    def __post_init__(self):
        if not self.groups:
            self.groups = [(i,) for i in range(len(self.packs))]


@dataclass
class StageProgram:
    graph: StageGraph
    rules: dict[fx.Node, Rule]
    shapes: dict[fx.Node, Shape]
    layouts: dict[fx.Node, Layout]
    before: list[fx.Node]  # global values that need no pass (sizes)
    passes: list[PassProgram]
    counts: dict[fx.Node, int]  # pixels each reduction averages over
    # per target (a spatial checkpoint): its rows written by each grid row
    bands: dict[fx.Node, list[tuple[int, int]]] = field(default_factory=dict)
    keep: bool = False  # one pack: its values stay alive from pass to pass instead of being recomputed


@dataclass
class Program:
    stages: list[StageProgram]
    consts: list[fx.Node]  # input-independent values the stages read (parameters, constants)


def rule_for(node: fx.Node, ctx: OpContext, kind: str) -> Rule:
    """The rule of a stage node of ``kind`` "spatial", "reduction" or "meta"; raises Unsplittable."""
    try:
        rule = make_rule(node, ctx)
    except NoRule as err:
        raise Unsplittable(node, str(err)) from None
    if kind == "reduction" and not isinstance(rule, Reduce):
        raise Unsplittable(node, "a fixed-size value computed from a whole feature map (not a reduction over H and W)")
    if kind == "meta" and not isinstance(rule, MetaQuery):
        raise Unsplittable(node, "a non-tensor value computed from a feature map")
    return rule


def node_kind(traced: TracedModel, node: fx.Node) -> str | None:
    """Which rule an input-dependent node needs: "spatial", "reduction", "meta", or None (a global value
    computed once from other global values)."""
    if node in traced.spatial:
        return "spatial"
    if any(p in traced.spatial for p in node.all_input_nodes):
        return "reduction" if node in traced.reference_shapes else "meta"
    return None


def stage_rules(traced: TracedModel, stage: StageGraph, shapes, source_layouts: dict[fx.Node, Layout],
                dtype: torch.dtype) -> tuple[dict, dict]:
    """Rules of every spatial node, reduction and size query of the stage (``source_layouts``: of each
    source, NCHW where absent); raises Unsplittable."""
    layouts = {s: source_layouts.get(s, NCHW) for s in stage.sources}
    ctx = OpContext(traced.gm, shapes, layouts, stage.spatial, dtype)
    rules = {}
    for node in stage.nodes:
        kind = node_kind(traced, node)
        if kind is not None:
            rules[node] = rule_for(node, ctx, kind)
    return rules, ctx.layouts


def unsplittable_nodes(traced: TracedModel) -> dict[fx.Node, Unsplittable]:
    """For every input-dependent node exact mode cannot reach, the first op on its way that has no
    rule (at the model's default size)."""
    ctx = OpContext(traced.gm, traced.reference_shapes, {traced.input_node: NCHW}, traced.spatial, traced.dtype)
    blocked: dict[fx.Node, Unsplittable] = {}
    for node in traced.nodes:
        if node not in traced.input_dependent or node is traced.input_node:
            continue
        upstream = next((blocked[p] for p in node.all_input_nodes if p in blocked), None)
        if upstream is not None:
            blocked[node] = upstream
            continue
        kind = node_kind(traced, node)
        if kind is not None:
            try:
                rule_for(node, ctx, kind)
            except Unsplittable as err:
                blocked[node] = err
    return blocked


def _union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return (min(a[0][0], b[0][0]), max(a[0][1], b[0][1])), (min(a[1][0], b[1][0]), max(a[1][1], b[1][1]))


def _clamp(window: Region, hw: tuple[int, int]) -> Region:
    return tuple((max(lo, 0), min(hi, size)) for (lo, hi), size in zip(window, hw))


def narrows(have: Region, want: Region, layout: Layout) -> tuple[Narrow, ...]:
    """``narrow`` calls that cut ``want`` (full-size coordinates) out of a value holding ``have``."""
    cuts = []
    for d, axis in enumerate(layout):
        if want[d] != have[d]:
            cuts.append((axis, want[d][0] - have[d][0], want[d][1] - want[d][0]))
    return tuple(cuts)


def border_pads(window: Region, clamped: Region) -> Pads | None:
    """F.pad amounts for the part of ``window`` past the border (NCHW), or None."""
    (h0, h1), (w0, w1) = window
    (c_h0, c_h1), (c_w0, c_w1) = clamped
    pads = (c_w0 - w0, w1 - c_w1, c_h0 - h0, h1 - c_h1)
    return pads if any(pads) else None


def _new_rows(held: Region, above: Region | None) -> Region:
    """The part of ``held`` a pack computes when the pack above in its column held ``above`` of the
    same value: the rows below what it can take from there (all of ``held`` without an overlap).
    The columns held may be fewer than above's (a reader that computes nothing new here)."""
    if above is None or not above[1][0] <= held[1][0] <= held[1][1] <= above[1][1]:
        return held  # the columns kept above must include the columns held here
    (a, b), (a_above, b_above) = held[0], above[0]
    if not a_above <= a < b_above:
        return held
    return (min(b, b_above), b), held[1]


def _rewritten_after_read(stage: StageGraph, gm: fx.GraphModule) -> set[fx.Node]:
    """Values an in-place op writes to while a later op still reads them, with those ops: kept rows
    would miss the write, so these are computed whole in every pack."""
    order = {n: k for k, n in enumerate(stage.nodes)}
    blocked = set()
    for node in stage.nodes:
        target = mutates_input(node, gm)
        if target is not None and any(order.get(u, -1) > order[node] for u in target.users):
            blocked |= {target, node}
    return blocked


def check_halo(halo: str) -> str:
    """``halo`` if it is one of :data:`HALO_MODES`; ValueError naming them otherwise."""
    if halo not in HALO_MODES:
        raise ValueError(f"halo must be one of {HALO_MODES}, got {halo!r}")
    return halo


def stage_halos(halo, stages: int) -> tuple[str, ...]:
    """Each stage's halo mode: ``halo`` is one mode for every stage, or one per stage (a sequence, or
    a comma string such as ``"reuse,recompute"``)."""
    modes = halo.split(",") if isinstance(halo, str) else list(halo)
    if len(modes) == 1:
        modes = modes * stages
    if len(modes) != stages:
        raise ValueError(f"halo: one mode for every stage or one per stage ({stages}), got {halo!r}")
    return tuple(check_halo(m.strip()) for m in modes)


class _StageBuilder:
    def __init__(self, gm: fx.GraphModule, stage: StageGraph, rules, shapes, layouts, halo: str = "reuse"):
        check_halo(halo)
        self.gm, self.stage, self.rules, self.shapes, self.layouts = gm, stage, rules, shapes, layouts
        self.reuse = halo == "reuse"
        self.whole = _rewritten_after_read(stage, gm) if self.reuse else set()

    def hw(self, node: fx.Node) -> tuple[int, int]:
        return spatial_dims(self.shapes[node], self.layouts[node])

    def _grid_tiles(self, node: fx.Node, what: str) -> list[Region]:
        hw, (rows, cols) = self.hw(node), self.stage.grid
        if rows > hw[0] or cols > hw[1]:
            raise ValueError(f"grid {rows}x{cols} of stage {self.stage.number} is finer than {what} "
                             f"({hw[0]}x{hw[1]}): every pack needs at least one pixel")
        return tiles(hw, self.stage.grid)

    def pass_program(self, level: int, final: bool, carried: set[fx.Node] | None = None) -> PassProgram:
        """``carried``: values a single-pack stage kept from its earlier passes (not recomputed)."""
        stage = self.stage
        reductions = [r for r in stage.reductions if stage.level[r] == level]
        seeds: list[tuple[fx.Node, list[Region], bool]] = []  # node, tiles, is-a-reduction-input
        for r in reductions:
            x = self.rules[r].spatial_inputs[0]
            seeds.append((r, self._grid_tiles(x, f"the input of reduction {r.name}"), True))
        write = final and stage.spatial_target
        if write:
            for target in stage.targets:
                seeds.append((target, self._grid_tiles(target, f"checkpoint {stage.checkpoint!r}"), False))
        columns, packs, held = stage.grid[1], [], []
        for i in range(stage.grid[0] * stage.grid[1]):
            above = held[i - columns] if self.reuse and i >= columns else None
            pack, need = self._pack(seeds, i, write, carried or set(), above)
            pack.column = i % columns
            if above is not None:
                self._keep_for(packs[i - columns], pack)
            packs.append(pack)
            held.append(need)
        if final:
            self._set_releases(packs)
        after = [n for n in stage.nodes if n not in stage.spatial and n not in stage.reductions
                 and n not in stage.metas and stage.level[n] == level]
        return PassProgram(packs, reductions, after)

    def _pack(self, seeds, i: int, write: bool, carried: set[fx.Node],
              above: dict[fx.Node, Region] | None) -> tuple[PackProgram, dict[fx.Node, Region]]:
        """The pack's program and the region of every value it holds. ``above``: the regions the
        pack above in the same column held (halo reuse), or None."""
        stage, rules = self.stage, self.rules
        need: dict[fx.Node, Region] = {}
        owned: dict[fx.Node, Region] = {}  # reduction -> the tile of its input this pack accumulates
        for node, node_tiles, is_reduction in seeds:
            if is_reduction:
                owned[node] = node_tiles[i]
                x = rules[node].spatial_inputs[0]
                need[x] = _union(need.get(x), node_tiles[i])
            else:
                need[node] = node_tiles[i]
        new: dict[fx.Node, Region] = {}  # the rows each value computes (the rest comes from above)
        for node in reversed(stage.nodes):
            if node not in need or node not in stage.spatial:
                continue
            rule = rules[node]
            reusable = above is not None and node not in self.whole and node not in carried
            new[node] = _new_rows(need[node], above.get(node) if reusable else None)
            if new[node][0][0] == new[node][0][1]:
                continue  # every row comes from the pack above: no input read
            if new[node] != need[node] and not self._reads_pixels(rule, new[node]):
                new[node] = need[node]  # new rows that are all border padding (F.pad): computed with the rest
            for k, x in enumerate(rule.spatial_inputs):
                window = _clamp(rule.input_window(new[node], k), self.hw(x))
                need[x] = _union(need.get(x), window)
        steps = []
        for node in stage.nodes:
            if node in owned:
                x = rules[node].spatial_inputs[0]
                steps.append(Step(node, rules[node], owned[node],
                                  [(x, narrows(need[x], owned[node], self.layouts[x]), None)], (), reduce=True))
            elif node in need and node in stage.spatial and node not in carried:
                steps.append(self._step(node, need, new[node]))
        self.set_frees(steps)
        tile = seeds[0][1][i]
        copy_read = any(mutates_input(step.node, self.gm) in stage.sources for step in steps)
        reads = {s: need[s] for s in stage.sources if s in need}
        writes = {node: tiles_[i] for node, tiles_, is_reduction in seeds if write and not is_reduction}
        write_cuts = {node: narrows(need[node], region, self.layouts[node]) for node, region in writes.items()
                      if need[node] != region}
        return PackProgram(tile, reads, steps, writes, write_cuts, copy_read=copy_read), need

    def _reads_pixels(self, rule: Rule, region: Region) -> bool:
        """Whether computing ``region`` reads at least one real pixel of every spatial input."""
        for k, x in enumerate(rule.spatial_inputs):
            (r0, r1), (c0, c1) = _clamp(rule.input_window(region, k), self.hw(x))
            if r0 >= r1 or c0 >= c1:
                return False
        return True

    def _step(self, node: fx.Node, need, region: Region) -> Step:
        """The step computing ``region`` of ``node``, whose value holds ``need[node]`` (the rows above
        ``region`` come from the pack above)."""
        rule, held = self.rules[node], need[node]
        carry = ((held[0][0], region[0][0]), held[1]) if region[0][0] > held[0][0] else None
        if region[0][0] == region[0][1]:
            return Step(node, rule, region, [], (), held=held, carry=carry)
        inputs, padding = [], None
        for k, src in enumerate(rule.spatial_inputs):
            window = rule.input_window(region, k)
            clamped = _clamp(window, self.hw(src))
            pads = border_pads(window, clamped)
            if pads is not None and len(rule.spatial_inputs) == 1:
                (r0, r1), (c0, c1) = clamped
                padding = rule.native_padding(pads, (r1 - r0, c1 - c0), region)
                pads = None if padding is not None else pads
            inputs.append((src, narrows(need[src], clamped, self.layouts[src]), pads))
        return Step(node, rule, region, inputs, (), padding=padding, held=held, carry=carry)

    def _keep_for(self, upper: PackProgram, lower: PackProgram) -> None:
        """Make ``upper`` keep the rows ``lower`` (the next pack of its column) takes from it."""
        wanted = {step.node: step.carry for step in lower.steps if step.carry is not None}
        for step in upper.steps:
            if step.node in wanted:
                step.keep = wanted[step.node]
                step.keep_cut = narrows(step.held, step.keep, self.layouts[step.node])

    def set_frees(self, steps: list[Step]) -> None:
        last: dict[fx.Node, int] = {}
        for k, step in enumerate(steps):
            for src, _, _ in step.inputs:
                last[src] = k
        targets = self.stage.targets
        for k, step in enumerate(steps):
            step.frees = tuple(dict.fromkeys(src for src, _, _ in step.inputs if last[src] == k and src not in targets))

    def _set_releases(self, packs: list[PackProgram]) -> None:
        """After each pack, the rows of each source that no later pack of the final pass reads."""
        lowest: dict[fx.Node, int] = {}
        for pack in reversed(packs):
            pack.release_below = dict(lowest)
            for src, region in pack.reads.items():
                lowest[src] = min(lowest.get(src, region[0][0]), region[0][0])


def _extent(region: Region | None):
    return None if region is None else tuple(hi - lo for lo, hi in region)


def _step_shape(step: Step) -> tuple:
    """Everything a step does but where: two packs whose steps all match run as one batched call."""
    where = step.region if step.rule.positional else _extent(step.region)
    return (step.node, where, tuple(step.inputs), step.frees, step.reduce, step.padding, _extent(step.held),
            _extent(step.carry), _extent(step.keep), step.keep_cut, step.computes)


def pack_shape(pack: PackProgram) -> tuple:
    """What must match for packs to be batched: the reads, the writes and every step, up to position."""
    return (tuple((src, _extent(r)) for src, r in pack.reads.items()),
            tuple((t, _extent(r)) for t, r in pack.writes.items()), tuple(pack.write_cuts.items()), pack.copy_read,
            tuple(_step_shape(s) for s in pack.steps))


def batch_groups(packs: list[PackProgram], columns: int, limit: int) -> list[tuple[int, ...]]:
    """Runs of at most ``limit`` neighbouring packs of one grid row with the same :func:`pack_shape`."""
    groups: list[tuple[int, ...]] = []
    for row in range(0, len(packs), columns):
        run: list[int] = []
        for i in range(row, row + columns):
            if run and (len(run) == limit or pack_shape(packs[i]) != pack_shape(packs[run[0]])):
                groups.append(tuple(run))
                run = []
            run.append(i)
        groups.append(tuple(run))
    return groups


def batch_limit(batch_packs: bool | int) -> int:
    """``batch_packs`` -> the most packs one call runs: False (or 0, 1) one, True a whole grid row, k at most k."""
    if isinstance(batch_packs, bool):
        return 1 << 30 if batch_packs else 1
    if not isinstance(batch_packs, int) or batch_packs < 0:
        raise ValueError(f"batch_packs must be True, False or a number of packs, got {batch_packs!r}")
    return max(1, batch_packs)


def _batchable(stage: StageGraph, keep: bool) -> bool:
    """A stage whose packs can run batched: several packs, and no size query (a size read off a value
    is the image's batch size, not the batched call's)."""
    return not keep and stage.grid[1] > 1 and not stage.metas


def build_program(traced: TracedModel, stages: list[StageGraph], shapes, dtype: torch.dtype,
                  halo="reuse", batch_packs: bool | int = False) -> Program:
    """The program of ``stages`` for one input size and dtype (``shapes``: full-size shapes at batch 1);
    ``halo``: "reuse" (packs take the rows their upper neighbour computed) or "recompute", for every
    stage or one per stage (:func:`stage_halos`); ``batch_packs``: run same-shaped packs of a grid row
    as one call (True: a whole row; k: at most k)."""
    limit = batch_limit(batch_packs)
    programs, source_layouts = [], {}
    for stage, stage_halo in zip(stages, stage_halos(halo, len(stages))):
        rules, layouts = stage_rules(traced, stage, shapes, source_layouts, dtype)
        builder = _StageBuilder(traced.gm, stage, rules, shapes, layouts, stage_halo)
        keep = stage.grid == (1, 1) and stage.passes > 1
        passes, carried = [], set()
        for level in range(1, stage.passes + 1):
            passes.append(builder.pass_program(level, level == stage.passes, carried if keep else None))
            carried |= {step.node for step in passes[-1].packs[0].steps if not step.reduce} | set(stage.sources)
        if keep:  # free each value after its last use in any pass
            builder.set_frees([step for pass_ in passes for step in pass_.packs[0].steps])
        if limit > 1 and _batchable(stage, keep):
            for pass_ in passes:
                pass_.groups = batch_groups(pass_.packs, stage.grid[1], limit)
        before = [n for n in stage.nodes if n not in stage.spatial and n not in stage.reductions
                  and stage.level[n] == 0]
        counts = {r: _pixels(shapes, layouts, rules[r]) for r in stage.reductions}
        program = StageProgram(stage, rules, shapes, layouts, before, passes, counts, keep=keep)
        if stage.spatial_target:
            for target in stage.targets:
                rows = bounds(builder.hw(target)[0], stage.grid[0])
                program.bands[target] = [(rows[r], rows[r + 1]) for r in range(stage.grid[0])]
            source_layouts = {t: layouts[t] for t in stage.targets}
        programs.append(program)
    return Program(programs, _consts(traced, stages))


def _pixels(shapes, layouts, rule: Rule) -> int:
    x = rule.spatial_inputs[0]
    h, w = spatial_dims(shapes[x], layouts[x])
    return h * w


def _consts(traced: TracedModel, stages: list[StageGraph]) -> list[fx.Node]:
    """Input-independent nodes the stages read, in an order that computes each after its inputs."""
    consts, seen = [], set()

    def add(n: fx.Node):
        if n in seen or n in traced.input_dependent:
            return
        seen.add(n)
        for p in n.all_input_nodes:
            add(p)
        consts.append(n)

    for stage in stages:
        for node in stage.nodes:
            for p in node.all_input_nodes:
                add(p)
    return consts


def full_shape(shape: torch.Size, batch: int) -> tuple[int, ...]:
    return (batch, *tuple(shape)[1:])
