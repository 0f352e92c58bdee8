"""Peak activation memory of a split-pack program, predicted without running it at full size.

* :func:`replay_peak` (the prediction the planner and the cost report use) runs the executor's
  own walk over a program (:class:`_Replay` subclasses the Executor and overrides only its leaves,
  the way torch.fx's ShapeProp overrides ``Interpreter.run_node``): the same stages interleaved
  band by band, the same packs, steps, input cuts, border pads, frees, band allocations and
  releases, checkpoint writes, and then the unsplit rest of the network -- with byte counts in
  place of tensors. What each op allocates (a fresh output, nothing for an in-place result or a
  view, temporaries inside the op) comes from one run of the unsplit model on fake tensors
  (:func:`allocation_profile`, which also gives the shapes), per element of the op's output.
* :func:`fake_run_peak` is the reference: the real code (executor and rest of the network) on
  fake tensors under a byte-counting dispatch mode, i.e. the same ops, frees and interleaving as
  a real run, without memory. Exact, but about a millisecond per op; the tests check the replay
  against it, and it against the measuring tracker (splitpack.measure.meter). Both count with the
  one byte tracker (splitpack.core.cost.bytes).

Both count what the measuring tracker counts: storages created by ops while the code runs, each
alive while any tensor that uses it is; parameters, buffers and the input are not counted. Both run
under ``torch.inference_mode`` like the meter and the servers: there an op such as ``max_pool2d``
runs as itself, while under ``no_grad`` it decomposes into ops that allocate more (pooling indices).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from splitpack.core.capture.graph import Shape, TracedModel, as_cut, model_device, shape_numel
from splitpack.core.cost.bytes import ByteTracker, storage_key
from splitpack.core.capture.rules import Reduce, Region, spatial_dims
from splitpack.core.capture.rules.window import fixed_temporary_bytes
from splitpack.core.execute.executor import Bands, Executor, Whole
from splitpack.core.plan.schedule import Program, StageProgram



def fake_run_peak(fn: Callable[[torch.Tensor], Any], shape, dtype: torch.dtype = torch.float32,
                  device: Any = "cpu") -> int:
    """Peak activation bytes of ``fn(x)`` for an input of ``shape``, run on fake tensors (no memory,
    no compute). A SplitPack must have its program for ``shape`` built beforehand (``sp.program(shape)``)."""
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        x = torch.empty(tuple(shape), dtype=dtype, device=device)
        with ByteTracker(fake_mode) as tracker:
            out = fn(x)
        del out
    return tracker.peak


# --------------------------------------------------------------------------- what each op allocates

@dataclass(frozen=True)
class OpBytes:
    """What one node's op allocates, per element of its output."""

    new: float  # bytes it leaves allocated (its output's item size for a fresh output; 0 in place or a view)
    extra: float  # bytes alive inside the op beyond that, at its peak (temporaries)
    itemsize: int  # of its output
    alias: int | None = None  # in place or a view: index in node.all_input_nodes of the input it shares
    fixed: int = 0  # temporaries whose size does not follow the output's (a standardised kernel), bytes


@dataclass
class AllocationProfile:
    ops: dict[fx.Node, OpBytes]  # input-dependent nodes with a tensor output
    const_bytes: dict[fx.Node, int]  # input-independent nodes that allocate (the same at every size)
    input_itemsize: int


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _Profiler(fx.Interpreter):
    """Runs the model once on fake tensors (garbage-collecting values like the rest-of-network
    interpreter), recording each node's full-size shape and what its op allocates."""

    def __init__(self, traced: TracedModel, tracker: ByteTracker):
        super().__init__(traced.gm, garbage_collect_values=True)
        self.traced, self.tracker = traced, tracker
        self.ops: dict[fx.Node, OpBytes] = {}
        self.const_bytes: dict[fx.Node, int] = {}
        self.shapes: dict[fx.Node, Shape] = {}

    def run_node(self, n: fx.Node):
        inputs = {p: _tensors(self.env[p]) for p in n.all_input_nodes if p in self.env}
        before = self.tracker.current
        self.tracker.open_window()
        out = super().run_node(n)
        outputs = _tensors(out)
        if not outputs:
            return out
        self.shapes[n] = outputs[0].shape if isinstance(out, torch.Tensor) else tuple(t.shape for t in outputs)
        if n.op == "placeholder":
            return out
        after, peak = self.tracker.current, self.tracker.window_peak
        if n not in self.traced.input_dependent:
            if after > before:
                self.const_bytes[n] = after - before
            return out
        numel = sum(t.numel() for t in outputs) or 1
        keys = {storage_key(t) for t in outputs}
        alias = next((i for i, p in enumerate(n.all_input_nodes)
                      if keys & {storage_key(t) for t in inputs.get(p, ())}), None)
        fixed = min(peak - after, fixed_temporary_bytes(self._submodule(n))) if n.op == "call_module" else 0
        self.ops[n] = OpBytes((after - before) / numel, (peak - after - fixed) / numel, outputs[0].element_size(),
                              alias if after == before else None, fixed)
        return out

    def _submodule(self, n: fx.Node) -> torch.nn.Module:
        return self.traced.gm.get_submodule(n.target)


def allocation_profile(traced: TracedModel, shape, dtype: torch.dtype | None = None,
                       device: Any = None) -> tuple[AllocationProfile, dict[fx.Node, Shape]]:
    """What every node allocates, and every node's full-size shape (as graph.node_shapes gives them),
    from one batch-1 run of the model on fake tensors of ``shape`` (N, C, H, W; N is ignored)."""
    dtype = dtype or traced.dtype
    device = device or model_device(traced.gm)
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        x = torch.empty((1, *tuple(shape)[1:]), dtype=dtype, device=device)
        tracker = ByteTracker(fake_mode)
        profiler = _Profiler(traced, tracker)
        with tracker:
            profiler.run(x)
        itemsize = x.element_size()
    shapes = {n: s for n, s in profiler.shapes.items() if n in traced.index}
    return AllocationProfile(profiler.ops, profiler.const_bytes, itemsize), shapes


# --------------------------------------------------------------------------- the replay

class _Meter:
    def __init__(self):
        self.current = 0
        self.peak = 0

    def alloc(self, nbytes: float) -> "_Storage | None":
        nbytes = int(round(nbytes))
        return _Storage(self, nbytes) if nbytes > 0 else None

    def spike(self, nbytes: float) -> None:
        """Temporaries inside an op, gone when it returns."""
        self.peak = max(self.peak, self.current + int(round(nbytes)))


class _Storage:
    """One storage of the replay: counted while referenced (Python frees it where the executor's
    tensor would be freed, because the replay keeps the executor's references)."""

    __slots__ = ("meter", "nbytes")

    def __init__(self, meter: _Meter, nbytes: int):
        self.meter, self.nbytes = meter, nbytes
        meter.current += nbytes
        meter.peak = max(meter.peak, meter.current)

    def __del__(self):
        self.meter.current -= self.nbytes


def _area(region: Region) -> int:
    (h0, h1), (w0, w1) = region
    return max(0, h1 - h0) * max(0, w1 - w0)


class _ReplayWhole(Whole):
    """A full-size value: the image (not counted) or the last checkpoint (allocated at its first write)."""

    def __init__(self, nbytes: int = 0, meter: _Meter | None = None):
        super().__init__(None, None)
        self.nbytes, self.meter = nbytes, meter

    def read(self, region: Region):
        return self.value

    def _allocate(self, part):
        return self.meter.alloc(self.nbytes)

    def _copy_in(self, region: Region, part) -> None:
        pass


class _ReplayBands(Bands):
    """Bands with byte counts: a band is allocated at its first write, a read across bands is a copy."""

    def __init__(self, rows: list[tuple[int, int]], pixel_bytes: float, width: int, meter: _Meter):
        super().__init__(rows, None, None)
        self.pixel_bytes, self.width, self.meter = pixel_bytes, width, meter

    def _allocate(self, i: int, part):
        lo, hi = self.rows[i]
        return self.meter.alloc((hi - lo) * self.width * self.pixel_bytes)

    def _copy_in(self, i: int, region: Region, part) -> None:
        pass

    def _gather(self, region: Region, overlapping: list[int]):
        parts = [self.bands[i] for i in overlapping]
        return parts[0] if len(parts) == 1 else self.meter.alloc(_area(region) * self.pixel_bytes)


def _lookup(values, node: fx.Node):
    return values[node] if node in values else None


def _op_output(meter: _Meter, profile: AllocationProfile, node: fx.Node, numel: float, inputs,
               temporaries: float | None = None):
    """The storage an op's output lives in (a new one, or the input's it is computed in place in / a
    view of), after the op's temporaries came and went (``temporaries`` bytes where a split rule computes
    differently from the unsplit op, else the op's own). ``inputs``: the storages of values in scope."""
    op = profile.ops.get(node)
    if op is None:
        return None
    out = _lookup(inputs, node.all_input_nodes[op.alias]) if op.alias is not None else meter.alloc(op.new * numel)
    if isinstance(out, tuple) and node.target is operator.getitem:  # one part of a joined channel split
        out = out[node.args[1]]
    meter.spike(op.extra * numel + op.fixed if temporaries is None else temporaries)
    return out


class _Replay(Executor):
    """The executor's walk with byte counts in place of tensors: it overrides only the leaves, so
    it holds the executor's references in the same places and Python frees a :class:`_Storage`
    where the executor's tensor is freed."""

    def __init__(self, program: Program, profile: AllocationProfile, batch: int, meter: _Meter):
        super().__init__(None, program)
        self.profile, self.batch, self.meter = profile, batch, meter
        self.consts = {}  # the constants' storages are counted in :meth:`run`, never aliased

    def _pixel_numel(self, stage: StageProgram, node: fx.Node, packs: int | None = None) -> float:
        """Elements per pixel of ``node``'s value for the batch of images times ``packs`` (default: the
        packs of the call being run)."""
        shape = stage.shapes[node]
        h, w = spatial_dims(shape, stage.layouts[node])
        return shape_numel(shape) / (h * w) * self.batch * (self.group if packs is None else packs)

    def _itemsize(self, node: fx.Node) -> int:
        op = self.profile.ops.get(node)
        return op.itemsize if op is not None else self.profile.input_itemsize

    def run(self):
        consts = [self.meter.alloc(self.profile.const_bytes.get(n, 0)) for n in self.program.consts]
        value = self._walk(_ReplayWhole())
        del consts
        return value

    def _output(self, stage: StageProgram, target: fx.Node, last: bool):
        if not stage.graph.spatial_target:
            return _ReplayWhole()
        pixel_bytes = self._pixel_numel(stage, target, 1) * self._itemsize(target)
        h, w = spatial_dims(stage.shapes[target], stage.layouts[target])
        if last:
            return _ReplayWhole(pixel_bytes * h * w, self.meter)
        return _ReplayBands(stage.bands[target], pixel_bytes, w, self.meter)

    def _read_packs(self, stage: StageProgram, source, src: fx.Node, regions: list[Region]):
        parts = [source.read(region) for region in regions]
        return self.meter.alloc(self._pixel_numel(stage, src, len(regions)) * _area(regions[0]) * self._itemsize(src))

    def _repeat_global(self, stage: StageProgram, node: fx.Node, value):
        return self.meter.alloc(shape_numel(stage.shapes[node]) * self.batch * self.group * self._itemsize(node))

    def _pack_part(self, value, index: int):
        return value  # a view: the batch's storage

    def _cat_packs(self, stage: StageProgram, step, parts: list):
        return self.meter.alloc(self._value_bytes(stage, step.node, step.carry))

    def _clone_read(self, stage: StageProgram, src: fx.Node, region: Region, read) -> "_Storage | None":
        return self.meter.alloc(self._pixel_numel(stage, src) * _area(region) * self._itemsize(src))

    def _tile(self, value, narrows):
        return value  # a view: no bytes

    def _cut_input(self, stage: StageProgram, step, src: fx.Node, value, narrows, pads):
        """A cut is a view (no bytes); a border pad is a new tensor of the step's input window."""
        if pads is None:
            return value
        window = step.rule.input_window(step.region, step.rule.spatial_inputs.index(src))
        return self.meter.alloc(self._pixel_numel(stage, src) * _area(window) * self._itemsize(src))

    def _accumulate(self, stage: StageProgram, step, t, total: list | None):
        itemsize = self._partial_itemsize(step.rule, step.inputs[0][0])
        part = self.meter.alloc(shape_numel(stage.shapes[step.node]) * self.batch * self.group * itemsize)
        return [total[0] if total else part, itemsize], part

    def _partial_itemsize(self, rule: Reduce, x: fx.Node) -> int:
        size = self._itemsize(x)
        if rule.kind in ("amax", "amin"):
            return size
        return 8 if size == 8 else 4  # Reduce.partial accumulates in float32 (float64 for float64)

    def _compute(self, stage: StageProgram, step, values):
        pixel_numel = self._pixel_numel(stage, step.node)
        pixels = step.rule.temporary_pixels(step.region)
        op = self.profile.ops.get(step.node)
        temporaries = None if pixels is None or op is None else pixels * pixel_numel * self._itemsize(step.node) + op.fixed
        return _op_output(self.meter, self.profile, step.node, pixel_numel * _area(step.region), values, temporaries)

    def _value_bytes(self, stage: StageProgram, node: fx.Node, region: Region) -> float:
        return self._pixel_numel(stage, node) * _area(region) * self._itemsize(node)

    def _join(self, stage: StageProgram, step, kept, new):
        """A concatenation: a new value of the whole region held (the kept rows alone: no copy). A channel
        split's parts are joined one by one (:func:`join_rows`): a storage each, freed part by part."""
        if not step.computes:
            return kept
        shape = stage.shapes[step.node]
        nbytes = self._value_bytes(stage, step.node, step.held)
        if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
            return tuple(self.meter.alloc(nbytes * shape_numel(part) / shape_numel(shape)) for part in shape)
        return self.meter.alloc(nbytes)

    def _keep(self, stage: StageProgram, step, value):
        return self.meter.alloc(self._value_bytes(stage, step.node, step.keep))

    def _finalize(self, stage: StageProgram, r: fx.Node, acc, acc_itemsize: int):
        """Reduce.finalize: a mean divides (a new tensor), then casts to the output dtype (new if it differs)."""
        numel = shape_numel(stage.shapes[r]) * self.batch
        if stage.rules[r].kind == "mean":
            acc = self.meter.alloc(numel * acc_itemsize)
        out_itemsize = self._itemsize(r)
        return acc if out_itemsize == acc_itemsize else self.meter.alloc(numel * out_itemsize)

    def _global(self, stage: StageProgram, node: fx.Node, globals_):
        shape = stage.shapes.get(node)
        if isinstance(shape, torch.Size):
            return _op_output(self.meter, self.profile, node, shape_numel(shape) * self.batch, globals_)
        return None


def _interpret(meter: _Meter, profile: AllocationProfile, nodes: list[fx.Node], shapes, batch: int,
               box: list, peaks: dict[fx.Node, int] | None = None, inputs: int = 1) -> None:
    """The rest of the network (or the whole unsplit model) as the garbage-collecting fx interpreter
    runs it: each value freed after its last use among ``nodes``. The first ``inputs`` nodes are the
    input: the image (not counted) or the last checkpoint (a cut: its nodes), whose storage (a
    tuple of them for a cut) ``box`` hands over (and keeps no longer).
    ``peaks``: filled with the peak while each node runs."""
    last_use: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for p in n.all_input_nodes:
            last_use[p] = n
    freed_after: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_use.items():
        freed_after.setdefault(user, []).append(value)
    given = box.pop() if box else None
    env: dict[fx.Node, Any] = dict(zip(nodes[:inputs], given if inputs > 1 else (given,)))
    del given
    for n in nodes[inputs:]:
        overall, meter.peak = meter.peak, meter.current
        for p in n.all_input_nodes:  # an input-independent value made before the cut is recomputed here
            if p not in env:
                env[p] = meter.alloc(profile.const_bytes.get(p, 0))
        if n in profile.const_bytes:
            env[n] = meter.alloc(profile.const_bytes[n])
        else:
            shape = shapes.get(n)
            env[n] = _op_output(meter, profile, n, shape_numel(shape) * batch if shape is not None else 0, env)
        if peaks is not None:
            peaks[n] = meter.peak
        meter.peak = max(overall, meter.peak)
        for p in freed_after.get(n, ()):
            env.pop(p, None)


def replay_peak(traced: TracedModel, program: Program, profile: AllocationProfile, batch: int,
                shapes: dict[fx.Node, Shape], last_checkpoint: fx.Node | tuple[fx.Node, ...]) -> int:
    """Predicted peak activation bytes of the split program for a batch of ``batch``, then of the
    rest of the network from ``last_checkpoint`` (a node, or a cut's nodes; ``shapes``: full-size
    shapes at batch 1)."""
    meter = _Meter()
    box = [_Replay(program, profile, batch, meter).run()]  # the merged value's only owner, as in SplitPack.forward
    cut = as_cut(last_checkpoint)
    rest = [n for n in traced.rest(cut) if n.op not in ("placeholder", "output")]
    _interpret(meter, profile, list(cut) + rest, shapes, batch, box, inputs=len(cut))
    return meter.peak


def unsplit_peak(traced: TracedModel, profile: AllocationProfile, batch: int, shapes: dict[fx.Node, Shape]) -> int:
    """Predicted peak activation bytes of the unsplit model (run by the garbage-collecting interpreter)."""
    meter = _Meter()
    _interpret(meter, profile, [n for n in traced.nodes if n.op != "output"], shapes, batch, [])
    return meter.peak


def rest_peak(traced: TracedModel, profile: AllocationProfile, shapes: dict[fx.Node, Shape],
              checkpoint: fx.Node | tuple[fx.Node, ...], checkpoint_bytes: int | list[int]) -> int:
    """Batch-1 peak of the rest of the network after ``checkpoint`` (a node, or a cut's nodes with the bytes
    of each), run by the garbage-collecting interpreter from the checkpoint alone (as the split model's
    tail runs; replay_peak without a program)."""
    meter = _Meter()
    cut = as_cut(checkpoint)
    rest = [n for n in traced.rest(cut) if n.op not in ("placeholder", "output")]
    sizes = checkpoint_bytes if isinstance(checkpoint_bytes, list) else [checkpoint_bytes]
    box = [tuple(meter.alloc(b) for b in sizes) if len(cut) > 1 else meter.alloc(sizes[0])]  # its only owner
    _interpret(meter, profile, list(cut) + rest, shapes, 1, box, inputs=len(cut))
    return meter.peak


def step_peaks(traced: TracedModel, profile: AllocationProfile, shapes: dict[fx.Node, Shape],
               batch: int = 1) -> dict[fx.Node, int]:
    """The unsplit interpreter's peak while each node runs (what the rest of the network after a
    checkpoint needs: the planner's tail estimate)."""
    peaks: dict[fx.Node, int] = {}
    _interpret(_Meter(), profile, [n for n in traced.nodes if n.op != "output"], shapes, batch, [], peaks)
    return peaks
