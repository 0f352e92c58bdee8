"""Runs a program (splitpack.core.plan.schedule): the reference interpreter of split-pack.

Memory discipline: packs run one at a time and free every intermediate after its
last use. A checkpoint that the next stage reads is stored as row bands and made
*on demand*: the next stage pulls rows from the stage that writes them only when a
pack needs them, and frees the bands that no later pack reads. Stages therefore run
interleaved, row band by row band, and a checkpoint exists in full only where a
stage must see all of it (a pass that accumulates a squeeze-excitation statistic).

A checkpoint that is a cut (several values) has one storage per value; the bands of all of them are
written by the same stage, so they share one :class:`Producer`.

Halo reuse: a step that takes rows from the pack above joins them to the rows it computes
(:meth:`Executor._join`), and a step whose rows the pack below takes keeps a copy of them
(:meth:`Executor._keep`) in the line buffers of its grid column until that pack runs.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx

from splitpack.core.capture.rules import Layout, Region
from splitpack.core.plan.schedule import Narrow, Program, StageProgram, full_shape

OnNode = Callable[[fx.Node], None] | None


class PackPart:
    """Pack ``index`` of a value kept for a batch of ``count`` packs (their line buffers share it)."""

    __slots__ = ("value", "index", "count")

    def __init__(self, value: Any, index: int, count: int):
        self.value, self.index, self.count = value, index, count


class Env(dict):
    """Values of one scope, falling back to an outer scope (pack -> stage globals -> constants)."""

    def __init__(self, outer: dict):
        super().__init__()
        self.outer = outer

    def __missing__(self, key):
        return self.outer[key]

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self.outer


def cut(value: Any, narrows: tuple[Narrow, ...]) -> Any:
    """Apply ``narrow`` calls to a tensor, or to every part of a tuple of channel splits."""
    if isinstance(value, (tuple, list)):
        return type(value)(cut(v, narrows) for v in value)
    for axis, start, length in narrows:
        value = value.narrow(axis, start, length)
    return value


def region_narrows(region: Region, layout: Layout) -> tuple[Narrow, ...]:
    return tuple((axis, lo, hi - lo) for (lo, hi), axis in zip(region, layout))


def join_rows(kept: Any, new: Any, axis: int) -> Any:
    """Rows kept by the pack above followed by the rows computed (every part of a tuple of channel splits)."""
    if isinstance(kept, (tuple, list)):
        return type(kept)(join_rows(k, n, axis) for k, n in zip(kept, new))
    return torch.cat([kept, new], dim=axis)


def copy_rows(value: Any, narrows: tuple[Narrow, ...]) -> Any:
    """A copy of the rows a pack keeps for the pack below (not a view: the value itself is freed)."""
    if isinstance(value, (tuple, list)):
        return type(value)(copy_rows(v, narrows) for v in value)
    return cut(value, narrows).clone()


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-d tensor (or a view of one: a band, a pack) keeps its channels innermost (NHWC).

    Read from the channel and spatial strides only: ``is_contiguous(memory_format=...)`` also checks the
    batch stride, which a view of a band has at batch 2 but ignores at batch 1, so the same program
    would allocate in different formats at different batch sizes (and could not be recorded batch-free).
    """
    if t.dim() != 4:
        return False
    channels, height, width = t.shape[1:]
    if channels == 1 or height * width == 1:  # both formats are the same memory order
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return t.stride(1) < (t.stride(3) if width > 1 else t.stride(2))


def empty_like_layout(sample: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of ``shape`` with ``sample``'s dtype, device and memory format."""
    fmt = torch.channels_last if is_channels_last(sample) else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=sample.dtype, device=sample.device, memory_format=fmt)


# --------------------------------------------------------------------------- checkpoint storage
# The storage classes hold the bookkeeping (which band, which rows are written, what to release);
# the leaves that touch values (_allocate, _copy_in, _gather, read of a whole value) are what a
# replay of the executor's memory behaviour (splitpack.core.cost.exact_peak) overrides.

class Whole:
    """A full-size value (the image, or the last checkpoint before the rest of the network)."""

    def __init__(self, value: torch.Tensor | None, layout: Layout, shape=None):
        self.value, self.layout, self.shape = value, layout, shape

    def read(self, region: Region) -> torch.Tensor:
        return cut(self.value, region_narrows(region, self.layout))

    def write(self, region: Region, part: torch.Tensor) -> None:
        if self.value is None:
            self.value = self._allocate(part)
        self._copy_in(region, part)

    def _allocate(self, part: torch.Tensor) -> torch.Tensor:
        return empty_like_layout(part, self.shape)

    def _copy_in(self, region: Region, part: torch.Tensor) -> None:
        cut(self.value, region_narrows(region, self.layout)).copy_(part)

    def release_below(self, row: int) -> None:
        pass


class Producer:
    """The stage that writes a checkpoint's bands (of every value of a cut), suspended between its
    rows of packs: ``run_to(n)`` resumes it until its first ``n`` rows of packs are written."""

    def __init__(self, rows_done: Iterator[int], grid_rows: int):
        self.rows_done, self.grid_rows, self.done = rows_done, grid_rows, 0

    def run_to(self, grid_rows: int) -> None:
        while self.done < grid_rows:
            self.done = next(self.rows_done)
            if self.done == self.grid_rows:
                for _ in self.rows_done:  # let the writer finish (it frees what it read)
                    pass


class Bands:
    """A checkpoint's value stored as row bands (one per grid row of the stage that writes it).

    ``producer`` is the writing stage: reading rows that are not written yet resumes it until they are.
    """

    def __init__(self, rows: list[tuple[int, int]], layout: Layout, shape):
        self.rows, self.layout, self.shape = rows, layout, shape
        self.bands: list[Any] = [None] * len(rows)
        self.producer: Producer | None = None

    def ensure(self, row_end: int) -> None:
        self.producer.run_to(next(i for i, (_, hi) in enumerate(self.rows) if hi >= row_end) + 1)

    def _band(self, region: Region) -> int:
        return next(i for i, (lo, hi) in enumerate(self.rows) if lo <= region[0][0] < hi)

    def write(self, region: Region, part: torch.Tensor) -> None:
        i = self._band(region)
        if self.bands[i] is None:
            self.bands[i] = self._allocate(i, part)
        self._copy_in(i, region, part)

    def read(self, region: Region) -> torch.Tensor:
        (r0, r1), _ = region
        self.ensure(r1)
        overlapping = [i for i, (lo, hi) in enumerate(self.rows) if not (hi <= r0 or lo >= r1)]
        return self._gather(region, overlapping)

    def release_below(self, row: int) -> None:
        for i, (lo, hi) in enumerate(self.rows):
            if hi <= row:
                self.bands[i] = None

    def _allocate(self, i: int, part: torch.Tensor) -> torch.Tensor:
        lo, hi = self.rows[i]
        shape = list(self.shape)
        shape[self.layout[0]] = hi - lo
        return empty_like_layout(part, shape)

    def _copy_in(self, i: int, region: Region, part: torch.Tensor) -> None:
        lo = self.rows[i][0]
        local = ((region[0][0] - lo, region[0][1] - lo), region[1])
        cut(self.bands[i], region_narrows(local, self.layout)).copy_(part)

    def _gather(self, region: Region, overlapping: list[int]) -> torch.Tensor:
        """The region's rows from the bands that hold them (a copy when it spans several)."""
        (r0, r1), cols = region
        parts = []
        for i in overlapping:
            lo, hi = self.rows[i]
            local = ((max(r0, lo) - lo, min(r1, hi) - lo), cols)
            parts.append(cut(self.bands[i], region_narrows(local, self.layout)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.layout[0])


# --------------------------------------------------------------------------- running a program

def run_consts(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, Any]:
    """Parameters and constants the stages read (input-independent nodes), computed once."""
    values: dict[fx.Node, Any] = {}
    interp = fx.Interpreter(gm)
    interp.env = values
    for n in nodes:
        values[n] = interp.run_node(n)
    return values


class Executor:
    """Interprets a program over a batch; ``on_node`` is told about every op as it runs (profiling).

    The walk (:meth:`_walk`, :meth:`_stage`, :meth:`_run_packs`: stages interleaved band by band,
    passes, packs, steps, frees) is the one loop over a program. What it does with values is in its
    leaves -- :meth:`_output` (a checkpoint's storage), :meth:`_clone_read`, :meth:`_tile`, :meth:`_cut_input`,
    :meth:`_accumulate`, :meth:`_compute`, :meth:`_join`, :meth:`_keep`, :meth:`_finalize`,
    :meth:`_global` -- which the peak
    replay (splitpack.core.cost.exact_peak) overrides to count bytes instead of computing tensors,
    as torch.fx's ShapeProp overrides ``Interpreter.run_node``.
    """

    def __init__(self, gm: fx.GraphModule | None, program: Program, on_node: OnNode = None):
        self.gm, self.program, self.on_node = gm, program, on_node
        self._interpreter: fx.Interpreter | None = None
        self.group = 1  # packs in the call being run (batched packs)

    def run(self, x: torch.Tensor, consts: dict[fx.Node, Any]) -> Any:
        """The last checkpoint's value (full size, or the global pooling's result; a tuple of values, in
        the cut's order, for a cut)."""
        self.dtype, self.batch, self.consts = x.dtype, x.shape[0], consts
        return self._walk(Whole(x, (-2, -1)))

    # ----------------------------------------------------------------------- the walk

    def _walk(self, image) -> Any:
        stages = self.program.stages
        sources = {stages[0].graph.source: image}
        for i, stage in enumerate(stages):
            outs = {t: self._output(stage, t, last=i == len(stages) - 1) for t in stage.graph.targets}
            rows = self._stage(stage, sources, outs)
            producer = Producer(rows, stage.graph.grid[0])
            for out in outs.values():
                if isinstance(out, Bands):
                    out.producer = producer  # the next stage pulls rows as its packs need them
            sources = outs
        for _ in rows:  # drive the last stage; it pulls everything before it
            pass
        values = tuple(out.value for out in outs.values())
        return values[0] if len(values) == 1 else values

    def _stage(self, stage: StageProgram, sources: dict, outs: dict) -> Iterator[int]:
        """Runs the stage (``sources``, ``outs``: the storages of its source and target values); after each
        row of packs of its last pass, yields how many rows of packs are done."""
        graph = stage.graph
        globals_ = Env(self.consts)
        self._run_globals(stage, stage.before, globals_)
        columns = graph.grid[1]
        kept = Env(globals_) if stage.keep else None  # one pack whose values live from pass to pass
        for pass_ in stage.passes:
            sums: dict[fx.Node, list] = {}
            lines: list[dict] = [{} for _ in range(columns)]  # per grid column: rows kept for the pack below
            for group in pass_.groups:
                packs = [pass_.packs[i] for i in group]
                self._run_packs(stage, packs, sources, globals_, sums, outs, kept, lines)
                if packs[-1].writes and (group[-1] + 1) % columns == 0:
                    yield (group[-1] + 1) // columns
            for r in pass_.reductions:
                total, kind = sums.pop(r)
                globals_[r] = self._finalize(stage, r, total, kind)
                self._notify(r)
            self._run_globals(stage, pass_.after, globals_)
        for source in sources.values():
            source.release_below(1 << 62)  # nothing of the previous checkpoint is read any more
        if not graph.spatial_target:
            outs[graph.target].value = globals_[graph.target]

    def _run_packs(self, stage: StageProgram, packs: list, sources: dict, globals_: Env, sums: dict, outs: dict,
                   kept: Env | None, lines: list[dict]) -> None:
        """One pack, or packs of one grid row with the same shape run as one batched call (their values
        concatenated on the batch dimension, pack after pack). ``sources``, ``outs``: the storages of the
        stage's source and target values. ``lines``: per grid column, the rows the pack above kept (taken
        here) and those kept here for the pack below."""
        pack, count = packs[0], len(packs)
        env = kept if kept is not None else Env(globals_)
        for src, region in pack.reads.items():
            if dict.__contains__(env, src):
                continue
            if count > 1:  # a copy already: an in-place op may write to it
                env[src] = self._read_packs(stage, sources[src], src, [p.reads[src] for p in packs])
            else:
                read = sources[src].read(region)
                env[src] = self._clone_read(stage, src, region, read) if pack.copy_read else read
                del read
        for p in packs:  # once read: a read across bands is a copy, the bands can go
            for src, row in p.release_below.items():
                sources[src].release_below(row)
        self.group = count  # set after the read: a read can run the writing stage's packs first
        # ``held`` and ``part`` are the references a step keeps until the next step replaces them (the
        # input it read last, a reduction's partial sum): they decide when storages are freed, so
        # the walk keeps them here, for the executor and the replay alike.
        held = part = None
        for step in pack.steps:
            values = Env(env)
            if count > 1:
                self._batch_globals(stage, step, values, globals_)
            for src, narrows, pads in step.inputs:
                held = env[src]
                values[src] = self._cut_input(stage, step, src, held, narrows, pads)
            value = None
            if step.reduce:
                held = values[step.inputs[0][0]]
                sums[step.node], part = self._accumulate(stage, step, held, sums.get(step.node))
            elif step.computes:
                value = self._compute(stage, step, values)
            del values
            for p in step.frees:
                del env[p]
            if not step.reduce:
                if step.carry is not None:  # joined once the inputs are gone: the copy does not meet them
                    held = None
                    value = self._join(stage, step, self._take_rows(stage, step, packs, lines), value)
                env[step.node] = value
                if step.keep is not None:
                    self._hand_down(packs, lines, step.node, self._keep(stage, step, value))
                del value
                self._notify(step.node)
        for target, region in pack.writes.items():
            if count == 1:
                outs[target].write(region, self._tile(env[target], pack.write_cuts.get(target, ())))
                continue
            for i, p in enumerate(packs):
                outs[target].write(p.writes[target], self._tile(self._pack_part(env[target], i),
                                                                p.write_cuts.get(target, ())))
        self.group = 1

    def _batch_globals(self, stage: StageProgram, step, values: Env, globals_: Env) -> None:
        """The image-sized globals a batched step reads (a squeeze-excitation gate), repeated per pack."""
        for p in step.node.all_input_nodes:
            if dict.__contains__(globals_, p) and isinstance(stage.shapes.get(p), torch.Size):
                values[p] = self._repeat_global(stage, p, globals_[p])

    def _take_rows(self, stage: StageProgram, step, packs: list, lines: list[dict]) -> Any:
        """The rows the packs above kept for ``step``: as kept when they were kept as this batch
        (or one pack), else their parts concatenated."""
        slots = [lines[p.column].pop(step.node) for p in packs]
        first = slots[0]
        if len(slots) == 1 and not isinstance(first, PackPart):
            return first
        if isinstance(first, PackPart) and first.count == len(slots) and all(
                isinstance(s, PackPart) and s.value is first.value and s.index == i for i, s in enumerate(slots)):
            return first.value
        parts = [self._pack_part(s.value, s.index) if isinstance(s, PackPart) else s for s in slots]
        del slots, first
        return parts[0] if len(parts) == 1 else self._cat_packs(stage, step, parts)

    @staticmethod
    def _hand_down(packs: list, lines: list[dict], node: fx.Node, rows: Any) -> None:
        """Keep ``rows`` (of one pack, or of a batch of packs) in the line buffers of the packs' columns."""
        if len(packs) == 1:
            lines[packs[0].column][node] = rows
            return
        for i, p in enumerate(packs):
            lines[p.column][node] = PackPart(rows, i, len(packs))

    def _run_globals(self, stage: StageProgram, nodes: list[fx.Node], globals_: Env) -> None:
        """Global values (SE gates, pooled features, sizes), computed once from finished reductions."""
        for node in nodes:
            globals_[node] = self._global(stage, node, globals_)
            self._notify(node)

    def _notify(self, node: fx.Node) -> None:
        if self.on_node is not None:
            self.on_node(node)

    # ----------------------------------------------------------------------- the leaves

    def _output(self, stage: StageProgram, target: fx.Node, last: bool):
        """The storage of one value of the stage's checkpoint: written whole (the last stage's, or a global
        pooling's, set when the stage ends) or as row bands the next stage reads."""
        if not stage.graph.spatial_target:
            return Whole(None, None)
        layout = stage.layouts[target]
        shape = full_shape(stage.shapes[target], self.batch)
        return Whole(None, layout, shape) if last else Bands(stage.bands[target], layout, shape)

    def _read_packs(self, stage: StageProgram, source, src: fx.Node, regions: list[Region]) -> torch.Tensor:
        """The reads of source value ``src`` by a batch of packs, concatenated on the batch dimension (a copy)."""
        parts = [source.read(region) for region in regions]
        return torch.cat(parts)

    def _repeat_global(self, stage: StageProgram, node: fx.Node, value: Any) -> Any:
        """A global value of the image, once per pack of the batch (as the batched values are ordered)."""
        return value.repeat(self.group, *[1] * (value.dim() - 1))

    def _pack_part(self, value: Any, index: int) -> Any:
        """Pack ``index``'s part of a batched value (a view)."""
        return cut(value, ((0, index * self.batch, self.batch),))

    def _cat_packs(self, stage: StageProgram, step, parts: list) -> Any:
        """Parts of packs made into one batched value (a copy)."""
        if isinstance(parts[0], (tuple, list)):
            return type(parts[0])(torch.cat(p) for p in zip(*parts))
        return torch.cat(parts)

    def _clone_read(self, stage: StageProgram, src: fx.Node, region: Region, read: torch.Tensor) -> torch.Tensor:
        """A copy of the pack's read of source ``src`` (an in-place op writes to a stage source)."""
        return read.clone()

    def _tile(self, value: Any, narrows: tuple[Narrow, ...]) -> Any:
        """The tile of a checkpoint value a pack writes (a view; the value may hold more rows for later steps)."""
        return cut(value, narrows)

    def _cut_input(self, stage: StageProgram, step, src: fx.Node, value: Any, narrows, pads) -> Any:
        """A step's input: the part of ``value`` the step reads, padded at the image border."""
        t = cut(value, narrows)
        return t if pads is None else F.pad(t, pads, value=step.rule.pad_value)

    def _accumulate(self, stage: StageProgram, step, t: torch.Tensor, total: list | None) -> tuple[list, Any]:
        """A reduction's running total with this pack's part added ([total, input dtype]), and the part
        (of a batch of packs: each pack's part added in turn, as when they run one by one)."""
        part = step.rule.partial(t)
        acc = total[0] if total else None
        for i in range(self.group):
            acc = step.rule.combine(acc, part if self.group == 1 else self._pack_part(part, i))
        return [acc, t.dtype], part

    def _compute(self, stage: StageProgram, step, values: Env) -> Any:
        return step.rule.compute(values, step.region) if step.padding is None \
            else step.rule.compute(values, step.region, step.padding)

    def _join(self, stage: StageProgram, step, kept: Any, new: Any) -> Any:
        """The step's value: the rows the pack above kept, then the rows computed (None: no new row)."""
        return kept if new is None else join_rows(kept, new, stage.layouts[step.node][0])

    def _keep(self, stage: StageProgram, step, value: Any) -> Any:
        """A copy of the rows of the step's value that the pack below takes."""
        return copy_rows(value, step.keep_cut)

    def _finalize(self, stage: StageProgram, r: fx.Node, total: Any, dtype: torch.dtype) -> Any:
        return stage.rules[r].finalize(total, stage.counts[r], dtype)

    def _global(self, stage: StageProgram, node: fx.Node, globals_: Env) -> Any:
        """A global value; a size query reads a stand-in of the full-size value on the meta device."""
        if self._interpreter is None:
            self._interpreter = fx.Interpreter(self.gm)
        scope = Env(globals_)
        for p in node.all_input_nodes:
            if p in stage.graph.spatial:
                scope[p] = _stand_in(stage.shapes[p], self.batch, self.dtype)
        self._interpreter.env = scope
        try:
            return self._interpreter.run_node(node)
        finally:
            self._interpreter.env = {}  # holds no value past the call


def _stand_in(shape, batch: int, dtype: torch.dtype):
    """A full-size value on the meta device (no memory): what a size query of a spatial value reads."""
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
        return tuple(_stand_in(s, batch, dtype) for s in shape)
    return torch.empty(full_shape(shape, batch), device="meta", dtype=dtype)
