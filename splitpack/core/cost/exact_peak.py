"""Peak activation memory of a split-pack program, predicted without running it at full size.

* :func:`replay_peak` (the prediction the planner and the cost report use) replays the
  executor's memory behaviour on a program, which is plain data: the same stages interleaved
  band by band, the same packs, steps, input cuts, border pads, frees, band allocations and
  releases, checkpoint writes, and then the unsplit rest of the network -- with byte counts in
  place of tensors. What each op allocates (a fresh output, nothing for an in-place result or a
  view, temporaries inside the op) comes from one run of the unsplit model on fake tensors
  (:func:`allocation_profile`, which also gives the shapes), per element of the op's output.
* :func:`fake_run_peak` is the reference: the real code (executor and rest of the network) on
  fake tensors under a byte-counting dispatch mode, i.e. the same ops, frees and interleaving as
  a real run, without memory. Exact, but about a millisecond per op; the tests check the replay
  against it, and it against the measuring tracker (splitpack.measure.meter).

Both count what the measuring tracker counts: storages created by ops while the code runs, each
alive while any tensor that uses it is; parameters, buffers and the input are not counted. Both run
under ``torch.inference_mode`` like the meter and the servers: there an op such as ``max_pool2d``
runs as itself, while under ``no_grad`` it decomposes into ops that allocate more (pooling indices).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from splitpack.core.capture.graph import Shape, TracedModel
from splitpack.core.capture.rules import Reduce, Region, spatial_dims
from splitpack.core.plan.schedule import Program, StageProgram



# --------------------------------------------------------------------------- the byte tracker

def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (fake and meta storages all have data pointer 0)."""
    return StorageWeakRef(t.untyped_storage()).cdata


def _counted(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta" and not value.is_sparse


class ByteTracker(TorchDispatchMode):
    """Bytes of op-created storages alive op by op, for real or fake tensors.

    A storage counts from the op that creates it until no tensor uses it; an output that shares
    storage with an input it did not create (a view of a parameter or of the input) is not counted.
    ``window_peak`` is the peak since :meth:`open_window`.
    """

    def __init__(self, fake_mode: FakeTensorMode | None = None):
        """``fake_mode``: the fake-tensor mode the code runs in, which holds real inputs (parameters) as
        fake copies: a view of one is a view of that copy's storage."""
        super().__init__()
        self.fake_mode = fake_mode
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0
        self.window_peak = 0

    def open_window(self) -> None:
        self.window_peak = self.current

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, input_keys: set[int]) -> None:
        key = storage_key(t)
        entry = self.live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            if key in input_keys or not nbytes:
                return
            entry = self.live[key] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.window_peak = max(self.window_peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if _counted(a)]
        input_keys = {storage_key(a) for a in inputs}
        if self.fake_mode is not None:
            input_keys |= {storage_key(self.fake_mode.from_tensor(a)) for a in inputs if not isinstance(a, FakeTensor)}
        for t in tree_flatten(out)[0]:
            if _counted(t):
                self._track(t, input_keys)
        return out


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


@dataclass
class AllocationProfile:
    ops: dict[fx.Node, OpBytes]  # input-dependent nodes with a tensor output
    const_bytes: dict[fx.Node, int]  # input-independent nodes that allocate (the same at every size)
    input_itemsize: int


def _numel(shape: Shape) -> int:
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
        return sum(math.prod(s) for s in shape)
    return math.prod(shape)


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
        self.ops[n] = OpBytes((after - before) / numel, (peak - after) / numel, outputs[0].element_size(),
                              alias if after == before else None)
        return out


def allocation_profile(traced: TracedModel, shape, dtype: torch.dtype | None = None,
                       device: Any = None) -> tuple[AllocationProfile, dict[fx.Node, Shape]]:
    """What every node allocates, and every node's full-size shape (as graph.node_shapes gives them),
    from one batch-1 run of the model on fake tensors of ``shape`` (N, C, H, W; N is ignored)."""
    from splitpack.core.capture.graph import model_device

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


class _Whole:
    """A full-size value: the image (not counted) or the last checkpoint (allocated at its first write)."""

    def __init__(self, nbytes: int = 0, meter: _Meter | None = None):
        self.value, self.nbytes, self.meter = None, nbytes, meter

    def read(self, region: Region):
        return self.value

    def write(self, region: Region, part) -> None:
        if self.value is None:
            self.value = self.meter.alloc(self.nbytes)

    def release_below(self, row: int) -> None:
        pass


class _Bands:
    """executor.Bands with byte counts: a band is allocated at its first write, read across bands
    is a copy, released bands are dropped."""

    def __init__(self, rows: list[tuple[int, int]], pixel_bytes: int, width: int, meter: _Meter):
        self.rows, self.pixel_bytes, self.width, self.meter = rows, pixel_bytes, width, meter
        self.bands: list[_Storage | None] = [None] * len(rows)
        self.written = 0
        self.producer: Iterator[int] | None = None

    def ensure(self, row_end: int) -> None:
        while self.written < row_end:
            self.written = next(self.producer)
            if self.written == self.rows[-1][1]:
                for _ in self.producer:
                    pass

    def write(self, region: Region, part) -> None:
        i = next(i for i, (lo, hi) in enumerate(self.rows) if lo <= region[0][0] < hi)
        if self.bands[i] is None:
            lo, hi = self.rows[i]
            self.bands[i] = self.meter.alloc((hi - lo) * self.width * self.pixel_bytes)

    def read(self, region: Region):
        (r0, r1), _ = region
        self.ensure(r1)
        parts = [band for (lo, hi), band in zip(self.rows, self.bands) if not (hi <= r0 or lo >= r1)]
        return parts[0] if len(parts) == 1 else self.meter.alloc(_area(region) * self.pixel_bytes)

    def release_below(self, row: int) -> None:
        for i, (lo, hi) in enumerate(self.rows):
            if hi <= row:
                self.bands[i] = None


def _op_output(meter: _Meter, profile: AllocationProfile, node: fx.Node, numel: float, inputs):
    """The storage an op's output lives in (a new one, or the input's it is computed in place in / a
    view of), after the op's temporaries came and went. ``inputs.get(node)``: an input's storage."""
    op = profile.ops.get(node)
    if op is None:
        return None
    out = inputs.get(node.all_input_nodes[op.alias]) if op.alias is not None else meter.alloc(op.new * numel)
    meter.spike(op.extra * numel)
    return out


class _Scope:
    """An op's inputs as the executor's Env sees them: the step's cut values, then the pack's, then globals."""

    def __init__(self, *scopes: dict):
        self.scopes = scopes

    def get(self, key, default=None):
        return next((scope[key] for scope in self.scopes if key in scope), default)


class _Replay:
    """Mirrors :class:`splitpack.core.execute.executor.Executor` -- the same references held in the same places,
    so Python frees a :class:`_Storage` where the executor's tensor is freed -- with byte counts."""

    def __init__(self, program: Program, profile: AllocationProfile, batch: int, meter: _Meter):
        self.program, self.profile, self.batch, self.meter = program, profile, batch, meter

    def _pixel_numel(self, stage: StageProgram, node: fx.Node) -> float:
        shape = stage.shapes[node]
        h, w = spatial_dims(shape, stage.layouts[node])
        return _numel(shape) / (h * w) * self.batch

    def _itemsize(self, node: fx.Node) -> int:
        op = self.profile.ops.get(node)
        return op.itemsize if op is not None else self.profile.input_itemsize

    def run(self):
        consts = [self.meter.alloc(self.profile.const_bytes.get(n, 0)) for n in self.program.consts]
        source = _Whole()
        stages = self.program.stages
        for i, stage in enumerate(stages):
            out = self._output(stage, last=i == len(stages) - 1)
            rows = self._stage(stage, source, out)
            if isinstance(out, _Bands):
                out.producer = rows
            source = out
        for _ in rows:
            pass
        del consts, source, rows
        return out.value

    def _output(self, stage: StageProgram, last: bool):
        graph = stage.graph
        if not graph.spatial_target:
            return _Whole()
        pixel_bytes = self._pixel_numel(stage, graph.target) * self._itemsize(graph.target)
        h, w = spatial_dims(stage.shapes[graph.target], stage.layouts[graph.target])
        if last:
            return _Whole(pixel_bytes * h * w, self.meter)
        return _Bands(stage.bands, pixel_bytes, w, self.meter)

    def _stage(self, stage: StageProgram, source, out) -> Iterator[int]:
        graph = stage.graph
        globals_: dict[fx.Node, Any] = {}
        self._run_globals(stage, stage.before, globals_)
        columns = graph.grid[1]
        kept: dict | None = {} if stage.keep else None  # one pack whose values live from pass to pass
        for pass_ in stage.passes:
            sums: dict[fx.Node, list] = {}
            for i, pack in enumerate(pass_.packs):
                self._run_pack(stage, pack, source, globals_, sums, out, kept)
                if pack.release_below is not None:
                    source.release_below(pack.release_below)
                if pack.write is not None and (i + 1) % columns == 0:
                    yield pack.write[0][1]
            for r in pass_.reductions:
                total, itemsize = sums.pop(r)
                globals_[r] = self._finalize(stage, r, total, itemsize)
            self._run_globals(stage, pass_.after, globals_)
        source.release_below(1 << 62)
        if not graph.spatial_target:
            out.value = globals_[graph.target]

    def _finalize(self, stage: StageProgram, r: fx.Node, acc, acc_itemsize: int):
        """Reduce.finalize: a mean divides (a new tensor), then casts to the output dtype (new if it differs)."""
        numel = _numel(stage.shapes[r]) * self.batch
        if stage.rules[r].kind == "mean":
            acc = self.meter.alloc(numel * acc_itemsize)
        out_itemsize = self._itemsize(r)
        return acc if out_itemsize == acc_itemsize else self.meter.alloc(numel * out_itemsize)

    def _partial_itemsize(self, rule: Reduce, x: fx.Node) -> int:
        size = self._itemsize(x)
        if rule.kind in ("amax", "amin"):
            return size
        return 8 if size == 8 else 4  # Reduce.partial accumulates in float32 (float64 for float64)

    def _run_pack(self, stage: StageProgram, pack, source, globals_, sums, out, kept: dict | None) -> None:
        env: dict[fx.Node, Any] = kept if kept is not None else {}
        if stage.graph.source not in env:
            read = source.read(pack.read)
            env[stage.graph.source] = self._copy(stage, pack.read) if pack.copy_read else read
        for step in pack.steps:
            values: dict[fx.Node, Any] = {}
            for src, narrows, pads in step.inputs:
                t = env[src]
                values[src] = t if pads is None else self.meter.alloc(self._padded_bytes(stage, step, src))
            if step.reduce:
                x = step.inputs[0][0]
                t = values[x]
                itemsize = self._partial_itemsize(step.rule, x)
                part = self.meter.alloc(_numel(stage.shapes[step.node]) * self.batch * itemsize)
                total = sums.get(step.node)
                sums[step.node] = [total[0] if total else part, itemsize]
            else:
                numel = self._pixel_numel(stage, step.node) * _area(step.region)
                env[step.node] = _op_output(self.meter, self.profile, step.node, numel, _Scope(values, env, globals_))
            del values
            for p in step.frees:
                del env[p]
        if pack.write is not None:
            out.write(pack.write, env[stage.graph.target])

    def _copy(self, stage: StageProgram, region: Region) -> "_Storage | None":
        """A clone of the pack's read (an in-place op writes to the stage source)."""
        source = stage.graph.source
        return self.meter.alloc(self._pixel_numel(stage, source) * _area(region) * self._itemsize(source))

    def _padded_bytes(self, stage: StageProgram, step, src: fx.Node) -> float:
        window = step.rule.input_window(step.region, step.rule.spatial_inputs.index(src))
        return self._pixel_numel(stage, src) * _area(window) * self._itemsize(src)

    def _run_globals(self, stage: StageProgram, nodes: list[fx.Node], globals_: dict) -> None:
        for node in nodes:
            shape = stage.shapes.get(node)
            if isinstance(shape, torch.Size):
                globals_[node] = _op_output(self.meter, self.profile, node, _numel(shape) * self.batch, globals_)


def _interpret(meter: _Meter, profile: AllocationProfile, nodes: list[fx.Node], shapes, batch: int,
               box: list, peaks: dict[fx.Node, int] | None = None) -> None:
    """The rest of the network (or the whole unsplit model) as the garbage-collecting fx interpreter
    runs it: each value freed after its last use among ``nodes``. ``nodes[0]`` is the input: the image
    (not counted) or the last checkpoint, whose storage ``box`` hands over (and keeps no longer).
    ``peaks``: filled with the peak while each node runs."""
    last_use: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for p in n.all_input_nodes:
            last_use[p] = n
    freed_after: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_use.items():
        freed_after.setdefault(user, []).append(value)
    env: dict[fx.Node, Any] = {nodes[0]: box.pop() if box else None}
    for n in nodes[1:]:
        overall, meter.peak = meter.peak, meter.current
        for p in n.all_input_nodes:  # an input-independent value made before the cut is recomputed here
            if p not in env:
                env[p] = meter.alloc(profile.const_bytes.get(p, 0))
        if n in profile.const_bytes:
            env[n] = meter.alloc(profile.const_bytes[n])
        else:
            shape = shapes.get(n)
            env[n] = _op_output(meter, profile, n, _numel(shape) * batch if shape is not None else 0, env)
        if peaks is not None:
            peaks[n] = meter.peak
        meter.peak = max(overall, meter.peak)
        for p in freed_after.get(n, ()):
            env.pop(p, None)


def replay_peak(traced: TracedModel, program: Program, profile: AllocationProfile, batch: int,
                shapes: dict[fx.Node, Shape], last_checkpoint: fx.Node) -> int:
    """Predicted peak activation bytes of the split program for a batch of ``batch``, then of the
    rest of the network from ``last_checkpoint`` (``shapes``: full-size shapes at batch 1)."""
    meter = _Meter()
    box = [_Replay(program, profile, batch, meter).run()]  # the merged value's only owner, as in SplitPack.forward
    rest = [n for n in traced.nodes[traced.index[last_checkpoint] + 1:] if n.op not in ("placeholder", "output")]
    _interpret(meter, profile, [last_checkpoint] + rest, shapes, batch, box)
    return meter.peak


def unsplit_peak(traced: TracedModel, profile: AllocationProfile, batch: int, shapes: dict[fx.Node, Shape]) -> int:
    """Predicted peak activation bytes of the unsplit model (run by the garbage-collecting interpreter)."""
    meter = _Meter()
    _interpret(meter, profile, [n for n in traced.nodes if n.op != "output"], shapes, batch, [])
    return meter.peak


def step_peaks(traced: TracedModel, profile: AllocationProfile, shapes: dict[fx.Node, Shape],
               batch: int = 1) -> dict[fx.Node, int]:
    """The unsplit interpreter's peak while each node runs (what the rest of the network after a
    checkpoint needs: the planner's tail estimate)."""
    peaks: dict[fx.Node, int] = {}
    _interpret(_Meter(), profile, [n for n in traced.nodes if n.op != "output"], shapes, batch, [], peaks)
    return peaks


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs for one batch, predicted without running it at full size."""

    peak_bytes: int  # peak activation bytes (the replay)
    macs: int  # convolution and linear MACs, halo recompute and extra passes included
    unsplit_macs: int
    ops: int  # ops executed (every step of every pack and pass, global values, the rest of the network)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.unsplit_macs if self.unsplit_macs else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"predicted_peak_bytes": self.peak_bytes, "macs": self.macs, "unsplit_macs": self.unsplit_macs,
                "macs_ratio": self.macs_ratio, "ops": self.ops}


def plan_cost(traced: TracedModel, plan, shape, dtype: torch.dtype | None = None,
              profile: tuple[AllocationProfile, dict] | None = None) -> PlanCost:
    """The cost of ``plan`` (a splitpack.core.plan.spec.Plan) for inputs of ``shape`` (N, C, H, W).
    ``profile``: :func:`allocation_profile`'s result for this size, when the caller has it."""
    from splitpack.core.cost.counts import program_macs, program_ops, unsplit_macs
    from splitpack.core.plan.schedule import build_program, stage_graphs

    dtype = dtype or traced.dtype
    allocations, shapes = profile or allocation_profile(traced, shape, dtype)
    program = build_program(traced, stage_graphs(traced, plan), shapes, dtype)
    last = traced.checkpoints[plan.stages[-1].checkpoint]
    rest = traced.nodes[traced.index[last] + 1:]
    return PlanCost(replay_peak(traced, program, allocations, shape[0], shapes, last),
                    program_macs(traced, program, shapes, rest) * shape[0], unsplit_macs(traced, shapes) * shape[0],
                    program_ops(program, rest))
