"""A per-device time model: what a plan's program costs in seconds on the machine that runs it.

Calibration times the model's own ops where they run: the traced graph is run node by node at a
few image sizes (batch 1, the caller's torch thread count and dtype), each op timed on its real
inputs as the run reaches it -- in sequence, as a real run meets it (its input just written, the
weights not yet in cache; calling one op again and again on the same tensors times it hot in cache,
which on this CPU made MobileNetV2 @224 look 1.7x faster than it runs) -- and the median over a few
runs kept. Ops with the same *signature* (the op and its channel counts: the
16 identical 3x3 convolutions of a ResNet stage are one signature) pool their timings, and each
signature gets ``seconds = fixed + slope * work`` (work: elements of the op's largest tensor, which
for a given signature is proportional to the area it computes) piecewise between the calibrated
sizes: on a CPU an op whose tensors fit in cache costs less per element than the same op at full
size (ResNet-50's layer-1 1x1 convolution: 1.3x less on this project's machine), which is how a split
plan with more MACs can run about as fast as the unsplit model. Copies (the pads, band writes and
band gathers a plan adds) get the same fit over bytes, and a view (a ``narrow``) one constant.

The timings are cached per device in ``<cache>/timing/<device key>.json`` (``<cache>`` is
``$SPLITPACK_CACHE_DIR`` or ``~/.cache/splitpack``; the key names the device, torch version, thread
count and dtype), so a model is calibrated once per machine (``splitpack calibrate``) or on first use.

Prediction reads a plan's *program* (splitpack.core.plan.schedule): every step of every pack and pass
costs its op at the region it computes, plus a view per input cut, a copy per padded input, the
pack's read (a gather when it spans bands) and its write into the checkpoint -- packs run batched as
one op per step over their summed work, their reads concatenated (a copy) --, plus per step the
interpreter's Python overhead when the plan is interpreted (a recorded program, ``compile="program"``,
keeps one aten call per op but drops the interpreter); then the unsplit rest of the network. The
unsplit model is the same sum over its ops at full size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx

from splitpack.core.capture.graph import Shape, TracedModel, model_device, shape_numel
from splitpack.core.capture.rules import spatial_dims
from splitpack.core.cost.faults import minor_faults
from splitpack.core.plan.schedule import Program, StageProgram, Step

CACHE_ENV = "SPLITPACK_CACHE_DIR"
FORMAT = 3  # version of the cache file's layout (2: ops timed in sequence, medians; 3: one thread by CPU time)
INTERPRETED, PROGRAM = "interpreter", "program"
MODES = (INTERPRETED, PROGRAM)
INTERPRETER_STEP_S = 25e-6  # Python overhead of one interpreted step, where the cache has no measurement
MIN_CALIBRATION_SIZE = 32
TYPICAL_PACKS = 16  # the search prices a pack's work at the per-element cost of a 4x4 grid's tile
OP_BUDGET_S = 0.02  # repeat a copy's timing until this much time was spent on it (at least MIN_REPEATS)
MIN_REPEATS, MAX_REPEATS = 2, 8
RUNS, LONG_RUNS, LONG_RUN_S = 5, 3, 1.0  # timed runs of the model per size (fewer where one takes > 1 s)
COPY_BYTES = (1 << 14, 1 << 18, 1 << 22, 1 << 25)


# --------------------------------------------------------------------------- the fit

@dataclass(frozen=True)
class LinearFit:
    """``seconds = fixed + slope * work``."""

    fixed: float
    slope: float

    def __call__(self, work: float) -> float:
        return self.fixed + self.slope * work


def fit_linear(points: Iterable[tuple[float, float]]) -> LinearFit:
    """Least squares of ``fixed + slope * work`` on (work, seconds) points, in relative error (a 10 us op
    counts as much as a 10 ms one), with ``fixed`` and ``slope`` kept >= 0."""
    pts = [(float(w), float(s)) for w, s in points if s > 0]
    if not pts:
        raise ValueError("fit_linear: no timing points")
    works = {w for w, _ in pts}
    if len(works) == 1:  # one size only: a constant
        return LinearFit(min(s for _, s in pts), 0.0)
    # minimise sum(((fixed + slope w) / s - 1)^2): normal equations of the weighted problem
    a11 = sum(1 / s ** 2 for _, s in pts)
    a12 = sum(w / s ** 2 for w, s in pts)
    a22 = sum(w * w / s ** 2 for w, s in pts)
    b1 = sum(1 / s for _, s in pts)
    b2 = sum(w / s for w, s in pts)
    det = a11 * a22 - a12 * a12
    fixed, slope = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    if slope < 0:  # time does not grow with the work: a constant
        return LinearFit(b1 / a11, 0.0)
    if fixed < 0:  # through the origin
        return LinearFit(0.0, b2 / a22)
    return LinearFit(fixed, slope)


@dataclass(frozen=True)
class PiecewiseFit:
    """``seconds = fixed + slope * work`` piecewise: through the median time at each calibrated work
    (``knots``, times made non-decreasing), from ``fixed`` at no work (the line through the two smallest
    knots, kept within [0, their time]), and beyond the largest knot at its time per element."""

    fixed: float
    knots: tuple[tuple[float, float], ...]  # (work, seconds), increasing work

    def __call__(self, work: float) -> float:
        (w0, s0), (wn, sn) = self.knots[0], self.knots[-1]
        if work <= w0:
            return self.fixed + (s0 - self.fixed) * work / w0
        if work >= wn:
            return sn * work / wn
        for (wa, sa), (wb, sb) in zip(self.knots, self.knots[1:]):
            if work <= wb:
                return sa + (sb - sa) * (work - wa) / (wb - wa)
        raise AssertionError("unreachable")

    @property
    def segments(self) -> list[LinearFit]:
        """The line of each piece, from no work to the largest knot."""
        points = [(0.0, self.fixed), *self.knots]
        return [LinearFit(sa - (sb - sa) / (wb - wa) * wa, (sb - sa) / (wb - wa))
                for (wa, sa), (wb, sb) in zip(points, points[1:])]


def fit_piecewise(points: Iterable[tuple[float, float]]) -> PiecewiseFit:
    """The :class:`PiecewiseFit` of (work, seconds) points (several per work: their median)."""
    by_work: dict[float, list[float]] = {}
    for w, s in points:
        if s > 0 and w > 0:
            by_work.setdefault(float(w), []).append(float(s))
    if not by_work:
        raise ValueError("fit_piecewise: no timing points")
    knots, slowest = [], 0.0
    for w in sorted(by_work):
        slowest = max(slowest, statistics.median(by_work[w]))  # more work never takes less time
        knots.append((w, slowest))
    if len(knots) == 1:
        return PiecewiseFit(knots[0][1], tuple(knots))
    (w0, s0), (w1, s1) = knots[:2]
    fixed = min(max(s0 - (s1 - s0) / (w1 - w0) * w0, 0.0), s0)
    return PiecewiseFit(fixed, tuple(knots))


# --------------------------------------------------------------------------- signatures

def _op_text(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return " ".join(repr(gm.get_submodule(node.target)).split())
    name = getattr(node.target, "__name__", str(node.target))
    constants = [a for a in node.args if not isinstance(a, fx.Node)]
    kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    return f"{node.op}:{name}{constants!r}{kwargs!r}"


def _channels(shape: Shape | None) -> Any:
    if shape is None:
        return None
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
        return [_channels(s) for s in shape]
    return [len(shape), int(shape[1]) if len(shape) > 1 else 0]


def node_signature(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, Shape]) -> str:
    """What an op's time depends on besides its size: the op (module with its settings, or function
    with its constant arguments) and the channel counts of its inputs and output."""
    inputs = [_channels(shapes.get(p)) for p in node.all_input_nodes]
    return f"{_op_text(node, gm)}|{json.dumps(inputs)}|{json.dumps(_channels(shapes.get(node)))}"


def node_work(node: fx.Node, shapes: dict[fx.Node, Shape]) -> int:
    """Elements of the op's largest tensor (its output, or for a reduction its input) at ``shapes``' size."""
    sizes = [shape_numel(shapes[p]) for p in node.all_input_nodes if p in shapes]
    return max(sizes + [shape_numel(shapes[node]) if node in shapes else 1])


def timed_nodes(traced: TracedModel) -> list[fx.Node]:
    """The ops whose time a prediction adds up: input-dependent calls."""
    return [n for n in traced.nodes if n.op.startswith("call_") and n in traced.input_dependent]


# --------------------------------------------------------------------------- the cache

def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "splitpack")
    return Path(root) / "timing"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_key(device: Any = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None) -> str:
    """The cache key: device name, torch version, torch threads (CPU), dtype."""
    device = torch.device(device)
    threads = threads if threads is not None else torch.get_num_threads()
    parts = [device.type, device_name(device), f"torch{torch.__version__}",
             f"{threads}threads" if device.type == "cpu" else "", str(dtype).removeprefix("torch.")]
    text = "-".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


class TimingStore:
    """The cached timings of one device key: per signature its (work, seconds) points, the copy and view
    timings, the interpreter's step overhead, and which models were calibrated up to which size."""

    def __init__(self, key: str, directory: Path | None = None):
        self.key = key
        self.path = (directory or cache_dir()) / f"{key}.json"
        self.data: dict[str, Any] = {"format": FORMAT, "key": key, "ops": {}, "copy": [], "view_s": None,
                                     "interpreter_step_s": None, "models": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, ValueError):
                loaded = None
            if isinstance(loaded, dict) and loaded.get("format") == FORMAT and loaded.get("key") == key:
                self.data = loaded

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # readers never see half a file

    def calibrated_size(self, fingerprint: str) -> int:
        return max(self.data["models"].get(fingerprint, [0]))

    def add_points(self, signature: str, points: list[tuple[int, float]]) -> None:
        self.data["ops"].setdefault(signature, []).extend([int(w), float(s)] for w, s in points)


def model_fingerprint(signatures: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(set(signatures))).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- calibration

def _best_of(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    call()  # warm-up (allocator, caches)
    sync()
    best, spent, count = math.inf, 0.0, 0
    while count < MIN_REPEATS or (spent < OP_BUDGET_S and count < MAX_REPEATS):
        start = time.perf_counter()
        call()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, count = min(best, elapsed), spent + elapsed, count + 1
    return best


def op_clock(device: torch.device) -> Callable[[], float]:
    """What calibration times ops with: the wall clock, or on a CPU with one torch thread the process's CPU
    time -- the same on an idle machine, but on a busy one the wall clock of a long op includes the time
    the process waited for a core, which would price large ops higher than small ones."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class _TimingInterpreter(fx.Interpreter):
    """Runs the graph, timing every input-dependent call as the run reaches it."""

    def __init__(self, traced: TracedModel, sync, clock=time.perf_counter):
        super().__init__(traced.gm, garbage_collect_values=True)
        self.traced, self.sync, self.clock = traced, sync, clock
        self.seconds: dict[fx.Node, float] = {}
        self.shapes: dict[fx.Node, Shape] = {}

    def run_node(self, n: fx.Node):
        if n.op.startswith("call_") and n in self.traced.input_dependent:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                self.sync()
                start = self.clock()
                out = getattr(self, n.op)(n.target, args, kwargs)
                self.sync()
                self.seconds[n] = self.clock() - start
        else:
            out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = out.shape
        elif isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            self.shapes[n] = tuple(t.shape for t in out)
        return out


def calibration_sizes(size: int) -> list[int]:
    """Image sizes timed for plans at ``size``: down to 1/8 of it (the smallest packs), and itself."""
    sizes = {max(MIN_CALIBRATION_SIZE, (size // k) // 8 * 8) for k in (8, 4, 2)} | {size}
    return sorted(s for s in sizes if s <= size)


def _time_copies(device: torch.device, dtype: torch.dtype, sync) -> tuple[list[tuple[int, float]], float]:
    """(bytes, seconds) of the copies a plan adds (a tile written into a band, a border pad, a gather of
    two bands), and the seconds of one view (narrow)."""
    points, itemsize = [], torch.empty((), dtype=dtype).element_size()
    for nbytes in COPY_BYTES:
        side = max(2, int(math.sqrt(nbytes / itemsize / 16)))
        part = torch.randn(1, 16, side, side, device=device).to(dtype)
        band = torch.empty(1, 16, side, side + 2, device=device, dtype=dtype)
        halves = (part[:, :, : side // 2], part[:, :, side // 2:])
        for call in (lambda: band.narrow(3, 1, side).copy_(part), lambda: F.pad(part, (1, 1, 1, 1)),
                     lambda: torch.cat(halves, dim=2)):
            points.append((part.numel() * itemsize, _best_of(call, sync)))
    x = torch.empty(1, 16, 64, 64, device=device, dtype=dtype)
    reps = 200
    view = _best_of(lambda: [x.narrow(2, 1, 8) for _ in range(reps)], lambda: None) / reps
    return points, view


def latencies_ms(fns, x, repeats: int, clock=time.perf_counter, round_faults: list | None = None) -> list[float]:
    """Best-of-``repeats`` latency of each fn, runs interleaved so load changes hit all alike. ``clock``:
    the wall clock, or ``time.process_time`` (with one torch thread: the run's CPU time, without the time
    a loaded machine kept the process waiting for a core). ``round_faults``: gets each timed round's minor
    page faults (every fn once)."""
    best, sync = [float("inf")] * len(fns), _sync_for(x.device)
    with torch.inference_mode():
        for fn in fns:
            fn(x)  # warm-up: plans, allocator, oneDNN kernels
        for _ in range(repeats):
            faults = minor_faults()
            for i, fn in enumerate(fns):
                sync()
                start = clock()
                fn(x)
                sync()
                best[i] = min(best[i], (clock() - start) * 1e3)
            if round_faults is not None:
                round_faults.append(minor_faults() - faults)
    return best


def latencies_and_faults(fns, x, repeats: int, clock=time.perf_counter) -> tuple[list[float], float]:
    """:func:`latencies_ms`, and the minor page faults per call in the steady state: the fewest of any timed
    round, per fn. glibc's default heap pays them in every round; a kept heap only while it grows to a new
    pattern of allocations (the first calls of a plan), which a count over all calls would blame on it."""
    rounds: list[int] = []
    best = latencies_ms(fns, x, repeats, clock, rounds)
    return best, min(rounds, default=0) / len(fns)


def measured_ratio(unsplit, split, x: torch.Tensor, repeats: int) -> tuple[float, float, float, float]:
    """(split / unsplit latency, unsplit ms, split ms, page faults per call) on ``x``: best of ``repeats``
    interleaved runs, timed by :func:`op_clock`'s clock (CPU time with one torch thread on a CPU, else the wall
    clock)."""
    clock = op_clock(x.device)
    (unsplit_ms, split_ms), faults = latencies_and_faults([unsplit, split], x, repeats, clock)
    return split_ms / unsplit_ms, unsplit_ms, split_ms, faults


def _interpreter_step_s(device: torch.device, dtype: torch.dtype) -> float:
    """The interpreter's Python overhead per step: a plan of tiny ops (8 ReLUs, 4x4 packs of a 16x16 image)
    interpreted and run as a recorded program, the difference per step (best of a few interleaved runs)."""
    from torch import nn

    from splitpack.core.execute.module import SplitPack

    model = nn.Sequential(*[nn.ReLU() for _ in range(8)]).eval().to(device=device, dtype=dtype)
    interpreted, program = (SplitPack(model, "7", (4, 4), compile=mode) for mode in (False, "program"))
    x = torch.randn(1, 4, 16, 16, device=device).to(dtype)
    interpreted_ms, program_ms = latencies_ms([interpreted, program], x, 20)
    steps = sum(len(pack.steps) for stage in interpreted.program(x.shape, x.dtype, x.device).stages
                for pass_ in stage.passes for pack in pass_.packs)
    return max(interpreted_ms - program_ms, 0.0) / 1e3 / steps


def calibrate(traced: TracedModel, size: int, dtype: torch.dtype | None = None, device: Any = None,
              store: TimingStore | None = None, progress: bool = False) -> "TimeModel":
    """Time ``traced``'s ops for plans at image size ``size`` on ``device`` (this process's torch threads),
    add them to the device's cache file and return the model. Sizes already calibrated are skipped."""
    dtype = dtype or traced.dtype
    device = torch.device(device or model_device(traced.gm))
    store = store or TimingStore(device_key(device, dtype))
    signatures = _signatures(traced)
    fingerprint = model_fingerprint(signatures.values())
    done = set(store.data["models"].get(fingerprint, []))
    todo = [s for s in calibration_sizes(size) if s not in done and (not done or s > max(done))]
    if done and size > max(done) and size not in todo:
        todo.append(size)
    sync = _sync_for(device)
    channels = traced.reference_shapes[traced.input_node][1]
    bar = _progress(len(todo) + 1, progress, f"calibrating {store.key}")
    with torch.inference_mode():
        if store.data["view_s"] is None:
            copies, view = _time_copies(device, dtype, sync)
            store.data["copy"], store.data["view_s"] = [list(p) for p in copies], view
        if store.data["interpreter_step_s"] is None:
            store.data["interpreter_step_s"] = _interpreter_step_s(device, dtype)
        bar.update(1)
        for s in todo:
            x = torch.randn(1, channels, s, s, device=device).to(dtype)
            try:
                timings = _median_times(traced, x, sync)
            except RuntimeError:  # too small for the model (a fixed pooling window, ...): the other sizes do
                if s == max(todo):
                    raise
                bar.update(1)
                continue
            for node, (work, seconds) in timings.items():
                store.add_points(signatures[node], [(work, seconds)])
            store.data["models"].setdefault(fingerprint, []).append(s)
            bar.update(1)
    bar.close()
    store.save()
    return TimeModel.from_store(store)


def _median_times(traced: TracedModel, x: torch.Tensor, sync) -> dict[fx.Node, tuple[int, float]]:
    """Per timed op: (work, median seconds over :data:`RUNS` runs of the model on ``x``, after a warm-up)."""
    start = time.perf_counter()
    _TimingInterpreter(traced, sync).run(x)  # warm-up: allocator, kernels
    runs = RUNS if time.perf_counter() - start < LONG_RUN_S else LONG_RUNS
    timers, clock = [], op_clock(x.device)
    for _ in range(runs):
        timers.append(_TimingInterpreter(traced, sync, clock))
        timers[-1].run(x)
    shapes = timers[0].shapes
    return {n: (node_work(n, shapes), statistics.median(t.seconds[n] for t in timers)) for n in timers[0].seconds}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="size", disable=not enabled)


def _signatures(traced: TracedModel) -> dict[fx.Node, str]:
    return {n: node_signature(n, traced.gm, traced.reference_shapes) for n in timed_nodes(traced)}


def time_model_for(traced: TracedModel, size: int, dtype: torch.dtype | None = None, device: Any = None,
                   progress: bool = False) -> "TimeModel":
    """The device's time model for ``traced`` at image size ``size``: from the cache, calibrating what is
    missing (first use on this device, thread count and dtype, or a larger size than calibrated)."""
    dtype = dtype or traced.dtype
    device = torch.device(device or model_device(traced.gm))
    store = TimingStore(device_key(device, dtype))
    fingerprint = model_fingerprint(_signatures(traced).values())
    measured = None not in (store.data["view_s"], store.data["interpreter_step_s"])
    if store.calibrated_size(fingerprint) >= size and measured:
        return TimeModel.from_store(store)
    return calibrate(traced, size, dtype, device, store, progress)


# --------------------------------------------------------------------------- prediction

@dataclass
class TimeModel:
    """Per-signature fits and copy costs of one device key (see the module docstring)."""

    key: str
    ops: dict[str, PiecewiseFit | LinearFit]
    copy: LinearFit
    view_s: float
    interpreter_step_s: float = INTERPRETER_STEP_S

    @classmethod
    def from_store(cls, store: TimingStore) -> "TimeModel":
        data = store.data
        return cls(store.key, {sig: fit_piecewise(map(tuple, pts)) for sig, pts in data["ops"].items()},
                   fit_linear(map(tuple, data["copy"])), float(data["view_s"]),
                   INTERPRETER_STEP_S if data["interpreter_step_s"] is None else float(data["interpreter_step_s"]))

    def op_seconds(self, signature: str, work: float) -> float:
        fit = self.ops.get(signature)
        if fit is None:
            raise KeyError(f"no timing for op {signature.split('|')[0]!r} on {self.key}: calibrate the model first")
        return fit(work)

    def predictor(self, traced: TracedModel, dtype: torch.dtype | None = None) -> "Predictor":
        return Predictor(self, traced, dtype)


@dataclass
class PlanTime:
    """Predicted seconds of a plan and of the unsplit model, one batch."""

    seconds: float
    unsplit_seconds: float
    mode: str

    @property
    def ratio(self) -> float:
        return self.seconds / self.unsplit_seconds if self.unsplit_seconds else 1.0


class Predictor:
    """A time model applied to one traced model."""

    def __init__(self, model: TimeModel, traced: TracedModel, dtype: torch.dtype | None = None):
        self.model, self.traced = model, traced
        self.itemsize = torch.empty((), dtype=dtype or traced.dtype).element_size()
        self.signatures = _signatures(traced)

    def _op(self, node: fx.Node, work: float) -> float:
        return self.model.op_seconds(self.signatures[node], work)

    def op_times(self, shapes: dict[fx.Node, Shape], batch: int = 1, mode: str = PROGRAM) -> "OpTimes":
        """What the planner's search needs: per op its seconds at full size and its fixed part, the overhead
        of a step (an input view; the interpreter's Python) and of a pack (read view, write copy)."""
        from splitpack.core.cost.fast_estimate import OpTimes

        model = self.model
        fixed = {n: model.ops[sig].fixed for n, sig in self.signatures.items() if sig in model.ops}
        full, split = {}, {}
        for n in self.signatures:
            work = node_work(n, shapes) * batch
            full[n] = self._op(n, work)
            # the variable cost of all the work at the rate of a 4x4 grid's tile (smaller tiles cost less per
            # element on a CPU: the search prices packs at that rate)
            split[n] = fixed[n] + (self._op(n, work / TYPICAL_PACKS) - fixed[n]) * TYPICAL_PACKS
        per_step = model.view_s + (model.interpreter_step_s if mode == INTERPRETED else 0.0)
        return OpTimes(full, fixed, split, per_step, model.view_s + model.copy.fixed, model.copy.slope)

    def unsplit_seconds(self, shapes: dict[fx.Node, Shape], batch: int = 1) -> float:
        """The unsplit model's ops at full size (``shapes``: batch-1 shapes of the input size)."""
        return sum(self._op(n, node_work(n, shapes) * batch) for n in self.signatures)

    def program_seconds(self, program: Program, shapes: dict[fx.Node, Shape], last: fx.Node, batch: int = 1,
                        mode: str = PROGRAM) -> float:
        """A plan's program (``last``: its last checkpoint node, or a cut's nodes), then the unsplit rest of the
        network."""
        rest = self.traced.rest(last)
        return sum(self.stage_seconds(program, shapes, batch, mode)) + \
            sum(self._op(n, node_work(n, shapes) * batch) for n in rest if n in self.signatures)

    def stage_seconds(self, program: Program, shapes: dict[fx.Node, Shape], batch: int = 1,
                      mode: str = PROGRAM) -> list[float]:
        """Each stage's predicted seconds (a stage's time does not depend on how the others run)."""
        if mode not in MODES:
            raise ValueError(f"mode: one of {MODES}, got {mode!r}")
        step_overhead = self.model.interpreter_step_s if mode == INTERPRETED else 0.0
        seconds, source_bands = [], {}
        for stage in program.stages:
            seconds.append(self._stage_seconds(stage, shapes, batch, step_overhead, source_bands))
            source_bands = stage.bands
        return seconds

    def plan_time(self, program: Program, shapes, last: fx.Node, batch: int = 1, mode: str = PROGRAM) -> PlanTime:
        return PlanTime(self.program_seconds(program, shapes, last, batch, mode), self.unsplit_seconds(shapes, batch),
                        mode)

    # ------------------------------------------------------------------ one stage
    def _stage_seconds(self, stage: StageProgram, shapes, batch: int, step_overhead: float, source_bands) -> float:
        globals_ = list(stage.before) + [n for p in stage.passes for n in p.after + p.reductions]
        total = sum(self._op(n, node_work(n, shapes) * batch) for n in globals_ if n in self.signatures)
        for pass_ in stage.passes:
            for group in pass_.groups:  # batched packs: one op per step over all of them
                pack, packs = pass_.packs[group[0]], len(group)
                for src, region in pack.reads.items():  # none: the pack above read every row this pack uses
                    total += self._read_seconds(stage, src, region, batch * packs, source_bands.get(src),
                                                pack.copy_read or packs > 1)
                for step in pack.steps:
                    total += self._step_seconds(stage, step, shapes, batch * packs) + step_overhead
                for target, region in pack.writes.items():
                    total += packs * self.model.copy(self._bytes(stage, target, region, batch))
        return total

    def _bytes(self, stage: StageProgram, node: fx.Node, region, batch: int) -> float:
        """Bytes of ``node``'s value over ``region`` (full-size coordinates)."""
        h, w = spatial_dims(stage.shapes[node], stage.layouts[node])
        (r0, r1), (c0, c1) = region
        return shape_numel(stage.shapes[node]) * batch * self.itemsize * (r1 - r0) * (c1 - c0) / max(1, h * w)

    def _read_seconds(self, stage: StageProgram, src: fx.Node, region, batch: int, source_bands,
                      copy_read: bool) -> float:
        """A pack's read of stage source ``src``: a view, a gather when it spans bands, a copy for in-place ops."""
        seconds = self.model.view_s
        copied = copy_read
        if source_bands:
            (r0, r1), _ = region
            copied |= sum(1 for lo, hi in source_bands if lo < r1 and hi > r0) > 1
        if copied:
            seconds += self.model.copy(self._bytes(stage, src, region, batch))
        return seconds

    def _step_seconds(self, stage: StageProgram, step: Step, shapes, batch: int) -> float:
        seconds = self._line_seconds(stage, step, batch)
        if not step.computes:
            return seconds
        for k, (src, narrows, pads) in enumerate(step.inputs):
            seconds += self.model.view_s * len(narrows)
            if pads is not None:
                window = step.rule.input_window(step.region, k)
                seconds += self.model.copy(self._bytes(stage, src, window, batch))
        # the fraction of the node's full-size work this step does
        area_of = step.inputs[0][0] if step.reduce else step.node
        h, w = spatial_dims(stage.shapes[area_of], stage.layouts[area_of])
        (r0, r1), (c0, c1) = step.region
        fraction = (r1 - r0) * (c1 - c0) / max(1, h * w)
        return seconds + self._op(step.node, node_work(step.node, shapes) * batch * fraction)

    def _line_seconds(self, stage: StageProgram, step: Step, batch: int) -> float:
        """Halo reuse: the copy joining the rows kept by the pack above to the rows computed, and the
        copy of the rows kept for the pack below."""
        seconds = 0.0
        if step.carry is not None and step.computes:
            seconds += self.model.copy(self._bytes(stage, step.node, step.held, batch))
        if step.keep is not None:
            seconds += self.model.copy(self._bytes(stage, step.node, step.keep, batch))
        return seconds
