"""Plan replicas per GPU, unsplit and with split-pack, and write the config that deploys the plan.

Per-replica footprint (one server replica = one process: a TorchServe worker or
a Triton python-backend instance, each with its own CUDA context)::

    replica_bytes = context_overhead + weights + persistent + io + peak_activations * (1 + allocator_slack)

* context_overhead: CUDA context + cuDNN/cuBLAS handles of one process. Not
  measurable without a GPU; default :data:`DEFAULT_CONTEXT_OVERHEAD` (see its
  source below), ``--context-overhead`` overrides it; on a GPU the probe
  measures the whole replica with NVML instead.
* weights: parameters + buffers (fp32) of the served module.
* persistent: what a split-pack replica keeps between requests (its per-input-size
  plan tables), measured as the bytes still alive after the first call.
* io: the input batch and the output logits (on the device during the call; the
  activation tracker leaves inputs out by design).
* peak_activations: :func:`splitpack.memory.peak_activation_bytes` after a warm-up
  call (CPU: the activation tracker; CUDA: the caching allocator).
* allocator_slack: the caching allocator's rounding and fragmentation on top of
  the peak (reserved vs allocated); default 10%, ``--allocator-slack``.

replicas = floor((gpu_memory - headroom) / replica_bytes). Candidates are merge
layers x grids x modes. Without ``--merge-layers``, exact-mode layers are ranked
by an estimate from the unsplit per-layer profile and the ``--max-candidates``
earliest near the best are measured; seed mode (outputs change, the more the
deeper the merge) is only measured at layers given explicitly. The
recommendation is the split candidate with the most replicas (then the lowest
measured latency ratio, exact before seed), or unsplit when none fits more.

``python -m splitpack.capacity.planner probe ...`` runs one real replica and prints its
measurements as JSON (used with ``--device cuda`` and by
scripts/validate_capacity_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from splitpack.measure.profile import grid_text, parse_grid

GiB = 1024**3
MiB = 1024**2

# CUDA context of a PyTorch process with lazy module loading (the default since
# PyTorch 1.13 / CUDA 11.7): 287 MB measured in pytorch/pytorch#86509 (vs 667 MB
# eager), "around 400MB" per pytorch/pytorch#109888; cuDNN and cuBLAS handles and
# the conv kernels they load on the first convolution come on top. 512 MiB is
# that range rounded up; measure it on the target GPU (scripts/validate_capacity_gpu.py
# prints context = NVML process bytes - torch reserved) and pass --context-overhead.
DEFAULT_CONTEXT_OVERHEAD = 512 * MiB
CONTEXT_OVERHEAD_SOURCE = ("default 512 MiB: CUDA context with lazy loading 287-400 MB "
                           "(pytorch/pytorch#86509, #109888) + cuDNN/cuBLAS handles; override with --context-overhead")
DEFAULT_ALLOCATOR_SLACK = 0.10
ALLOCATOR_SLACK_SOURCE = ("default 10% of peak activations: caching-allocator block rounding and fragmentation "
                          "(reserved vs allocated); calibrate with scripts/validate_capacity_gpu.py")

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(text: str | int | float) -> int:
    """"80GiB", "80GB" (decimal), "81920MiB", "512M" (binary), "1e9" or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 80GiB, 80GB, 512MiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_headroom(text: str, gpu_bytes: int) -> int:
    """"10%" of the GPU, or an absolute size ("4GiB")."""
    text = str(text).strip()
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0 <= pct < 100:
            raise ValueError(f"headroom must be in [0, 100)%, got {text}")
        return int(gpu_bytes * pct / 100)
    value = parse_bytes(text)
    if value >= gpu_bytes:
        raise ValueError(f"headroom {text} leaves nothing of the GPU's {gpu_bytes / GiB:.1f} GiB")
    return value


def parse_fraction(text: str | float) -> float:
    text = str(text).strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if value < 0:
        raise ValueError(f"expected a non-negative fraction or percentage, got {text}")
    return value


def replicas_that_fit(gpu_bytes: int, headroom_bytes: int, replica_bytes: int) -> int:
    return max(0, (gpu_bytes - headroom_bytes) // replica_bytes) if replica_bytes > 0 else 0


def module_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --- measurement of one configuration ---------------------------------------------------

@dataclass
class Measurement:
    """What one configuration needs, measured in this process."""

    peak_activation_bytes: int
    persistent_bytes: int
    weights_bytes: int
    io_bytes: int
    latency_s: float | None
    measured_by: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """First call (split-pack builds its per-size plan here); returns (output, bytes it leaves alive)."""
    from splitpack.measure.meter import ActivationTracker

    if x.device.type == "cuda":
        _sync(x.device)
        before = torch.cuda.memory_allocated(x.device)
        with torch.inference_mode():
            out = module(x)
        _sync(x.device)
        return out, torch.cuda.memory_allocated(x.device) - before - out.untyped_storage().nbytes()
    tracker = ActivationTracker()
    with warnings.catch_warnings():
        # the engine propagates shapes with FakeTensors on the first call; the
        # tracker sees them go by and torch warns about their data pointers
        warnings.filterwarnings("ignore", message=".*FakeTensor.*")
        with torch.inference_mode(), tracker:
            out = module(x)
            kept = tracker.current - out.untyped_storage().nbytes()
    return out, max(0, kept)


def median_latency(module: nn.Module, x: torch.Tensor, repeats: int) -> float | None:
    if repeats <= 0:
        return None
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(x.device)
            t0 = time.perf_counter()
            module(x)
            _sync(x.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(module: nn.Module, x: torch.Tensor, repeats: int = 3) -> Measurement:
    """Peak activations of a warm call, then the median time of ``repeats`` calls.

    A split-pack module is called once first: that call builds its per-size
    plan, whose tables it keeps (``persistent``). A plain model keeps nothing.
    """
    import splitpack
    from splitpack.measure.devices import measured_call

    persistent = 0
    if isinstance(module, splitpack.SplitPack):
        out, persistent = _warm_up(module, x)
        del out
    out, peak = measured_call(module, x)
    io = x.untyped_storage().nbytes() + out.untyped_storage().nbytes()
    del out
    return Measurement(
        peak_activation_bytes=int(peak), persistent_bytes=int(persistent), weights_bytes=module_bytes(module),
        io_bytes=int(io), latency_s=median_latency(module, x, repeats),
        measured_by="cuda-allocator" if x.device.type == "cuda" else "cpu-activation-tracker",
    )


# --- footprint and plan -----------------------------------------------------------------

@dataclass
class Footprint:
    context_overhead_bytes: int
    weights_bytes: int
    persistent_bytes: int
    io_bytes: int
    peak_activation_bytes: int
    allocator_slack_bytes: int

    @property
    def total(self) -> int:
        return (self.context_overhead_bytes + self.weights_bytes + self.persistent_bytes + self.io_bytes
                + self.peak_activation_bytes + self.allocator_slack_bytes)

    def to_dict(self) -> dict[str, int]:
        return asdict(self) | {"replica_bytes": self.total}


def footprint(m: Measurement, context_overhead: int, allocator_slack: float) -> Footprint:
    return Footprint(context_overhead_bytes=int(context_overhead), weights_bytes=m.weights_bytes,
                     persistent_bytes=m.persistent_bytes, io_bytes=m.io_bytes,
                     peak_activation_bytes=m.peak_activation_bytes,
                     allocator_slack_bytes=int(math.ceil(m.peak_activation_bytes * allocator_slack)))


@dataclass
class Candidate:
    merge_layer: str | None  # None = unsplit
    grid: str | None
    mode: str | None
    footprint: Footprint
    replicas: int
    latency_s: float | None
    latency_ratio: float | None
    estimated_peak_bytes: int | None = None
    measured_by: str = "cpu-activation-tracker"
    # a real replica process measured by NVML (--measure-replicas on a GPU) replaces the model
    measured_replica_bytes: int | None = None

    @property
    def replica_bytes(self) -> int:
        return self.measured_replica_bytes if self.measured_replica_bytes is not None else self.footprint.total

    def key(self) -> dict[str, Any]:
        return {"merge_layer": self.merge_layer, "grid": self.grid, "mode": self.mode}

    def to_dict(self) -> dict[str, Any]:
        d = self.key() | {"replica_bytes": self.replica_bytes, "replicas": self.replicas,
                          "latency_s": self.latency_s, "latency_ratio": self.latency_ratio,
                          "peak_activation_bytes": self.footprint.peak_activation_bytes,
                          "estimated_peak_bytes": self.estimated_peak_bytes, "measured_by": self.measured_by,
                          "measured_replica_bytes": self.measured_replica_bytes,
                          "footprint": self.footprint.to_dict()}
        return d


def rank_split(candidates: list[Candidate], max_latency_ratio: float | None = None) -> list[Candidate]:
    """Best first: most replicas, then lowest latency ratio, exact before seed, then smallest footprint."""
    ok = [c for c in candidates
          if max_latency_ratio is None or c.latency_ratio is None or c.latency_ratio <= max_latency_ratio]
    return sorted(ok, key=lambda c: (-c.replicas, c.latency_ratio if c.latency_ratio is not None else math.inf,
                                     c.mode != "exact", c.replica_bytes))


def layer_geometry(model: nn.Module, x: torch.Tensor,
                   names: Sequence[str]) -> tuple[dict[str, float], dict[str, str], dict[str, tuple[int, ...]]]:
    """(receptive-field radius in input pixels, alias, output shape) per named layer, from one batch-1 forward.

    Radius: an upper bound of the halo an exact pack carries at that layer:
    every window op (conv, pool) met so far in execution order adds
    (kernel extent - 1) / 2 times its input's stride relative to the image;
    parallel branches are counted as if chained.
    Alias: names whose output is the very tensor of the layer before them,
    not modified in place (a block and its last activation), are one merge
    point; all but its outermost name map to that name.
    """
    image_h = x.shape[-2]
    radius = 0.0
    radii: dict[str, float] = {}
    aliases: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    last: list = [None, None]  # (name, output) of the previous named layer
    wanted = set(names)

    def on_leaf(module, inputs, _output):
        nonlocal radius
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
            return
        k = getattr(module, "kernel_size", None)
        if k is None:
            return
        k = k if isinstance(k, int) else k[0]
        d = getattr(module, "dilation", 1)
        d = d if isinstance(d, int) else d[0]
        radius += (d * (k - 1)) / 2 * (image_h / inputs[0].shape[-2])

    def on_named(name):
        def hook(_m, inputs, output):  # returns None: a forward hook's return value replaces the output
            radii.setdefault(name, radius)
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))
            in_place = any(i is output for i in inputs)  # e.g. ReLU(inplace): a new value in the same tensor
            if last[1] is not None and output is last[1] and not in_place:
                aliases[name] = aliases.get(last[0], last[0])
            last[0], last[1] = name, output
        return hook

    handles = []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(on_leaf))
    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_hook(on_named(name)))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
        last[1] = None
    # name each merge point by its outermost module ("layer1" rather than "layer1.1.act2")
    groups: dict[str, list[str]] = {}
    for name, first in aliases.items():
        groups.setdefault(first, [first]).append(name)
    aliases = {}
    for members in groups.values():
        canonical = min(members, key=lambda n: (n.count("."), members.index(n)))
        aliases.update({n: canonical for n in members if n != canonical})
    return radii, aliases, shapes


def estimate_split_peaks(profile, names: Sequence[str], grid: tuple[int, int], mode: str,
                         radii: dict[str, float] | None = None, size: int | None = None,
                         merged_bytes: dict[str, int] | None = None) -> dict[str, int]:
    """Cheap split peak estimate per merge layer from the unsplit profile at candidate granularity.

    head: the unsplit peak up to the layer scaled to one pack (exact mode: the
    pack plus its halo, from :func:`receptive_radii`), plus the merged
    activation kept for the whole image; tail: the unsplit peak after the layer.
    Used only to choose which candidates to measure.
    """
    rows, cols = grid
    points = profile.layers
    index: dict[str, int] = {}
    for i, p in enumerate(points):
        index.setdefault(p.label, i)
    estimates = {}
    for name in names:
        if name not in index:
            continue
        i = index[name]
        share = 1.0 / (rows * cols)
        if mode == "exact" and radii is not None and size:
            r = radii.get(name, 0.0)
            share = min(1.0, 1 / rows + 2 * r / size) * min(1.0, 1 / cols + 2 * r / size)
        head = max(p.peak_bytes for p in points[: i + 1])
        tail = max((p.peak_bytes for p in points[i + 1:]), default=0)
        # the merged activation: the layer's output for the whole image (after_bytes
        # over-counts a container's input, which its caller still holds)
        merged = merged_bytes.get(name, points[i].after_bytes) if merged_bytes else points[i].after_bytes
        estimates[name] = int(max(head * share + merged, tail))
    return estimates


ESTIMATE_TOLERANCE = 0.10


def pick_candidates(estimates: dict[str, int], order: Sequence[str], k: int,
                    tolerance: float = ESTIMATE_TOLERANCE) -> list[str]:
    """The ``k`` earliest merge layers whose estimate is within ``tolerance`` of the best one.

    Earliest, because a later merge runs more of the network per pack: more halo
    to recompute in exact mode, and in seed mode more layers that see the pack
    seams (accuracy drops as the merge moves deeper). Fewer than ``k`` near the
    best: the rest by estimate.
    """
    if not estimates:
        return []
    best = min(estimates.values())
    near = sorted((n for n in estimates if estimates[n] <= best * (1 + tolerance)), key=order.index)
    rest = sorted((n for n in estimates if n not in near), key=lambda n: (estimates[n], order.index(n)))
    return (near + rest)[:k]


@dataclass
class PlanInputs:
    model: str
    size: int
    batch: int
    gpu_memory_bytes: int
    gpu_memory_source: str
    headroom_bytes: int
    merge_layers: list[str] | None = None
    grids: list[tuple[int, int]] = field(default_factory=lambda: [(2, 2)])
    modes: list[str] = field(default_factory=lambda: ["exact"])
    max_candidates: int = 3
    context_overhead_bytes: int = DEFAULT_CONTEXT_OVERHEAD
    context_overhead_source: str = CONTEXT_OVERHEAD_SOURCE
    allocator_slack: float = DEFAULT_ALLOCATOR_SLACK
    repeats: int = 3
    max_latency_ratio: float | None = None
    device: str = "cpu"
    measure_replicas: bool = False  # GPU: measure each configuration as a separate replica process (NVML)


def probe_command(model: str, size: int, batch: int, merge_layer: str | None, grid: str | None, mode: str | None,
                  device: str, repeats: int = 1, hold: bool = False) -> list[str]:
    """Command line of one replica probe (``python -m splitpack.capacity.planner probe``)."""
    cmd = [sys.executable, "-m", "splitpack.capacity.planner", "probe", "--model", model, "--size", str(size),
           "--batch", str(batch), "--device", device, "--repeats", str(repeats)]
    if merge_layer:
        cmd += ["--merge-layer", merge_layer, "--grid", grid or "2x2", "--mode", mode or "exact"]
    return cmd + (["--hold"] if hold else [])


def read_probe_line(line: str) -> dict[str, Any]:
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        return {"ok": False, "error": f"unreadable probe output: {line.strip()[:500]!r}"}
    return result if isinstance(result, dict) else {"ok": False, "error": f"unexpected probe output {result!r}"}


def measure_replica_process(c: "Candidate", p: "PlanInputs", notes: list[str]) -> None:
    """Run ``c`` as its own process on the GPU and take NVML's number for its whole footprint."""
    import subprocess

    cmd = probe_command(p.model, p.size, p.batch, c.merge_layer, c.grid, c.mode, p.device)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    result = read_probe_line(lines[-1]) if lines else {"ok": False, "error": done.stderr[-2000:]}
    if not result.get("ok"):
        notes.append(f"replica probe {c.key()} failed: {result.get('error')}")
        return
    measured = result.get("nvml_process_bytes") or result.get("gpu_used_delta_bytes")
    if measured is None:
        notes.append(f"replica probe {c.key()}: NVML could not attribute memory to the process; modelled footprint kept")
        return
    c.measured_replica_bytes = int(measured)
    c.measured_by = "nvml-process" if result.get("nvml_process_bytes") else "nvml-device-delta"
    c.replicas = replicas_that_fit(p.gpu_memory_bytes, p.headroom_bytes, c.replica_bytes)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def plan_capacity(p: PlanInputs, quiet: bool = False) -> dict[str, Any]:
    """Measure unsplit and split candidates for ``p`` and return the plan (the JSON document)."""
    import splitpack

    device = torch.device(p.device)
    model = splitpack.create_model(p.model).to(device)
    x = torch.randn(p.batch, 3, p.size, p.size, device=device)
    usable = p.gpu_memory_bytes - p.headroom_bytes
    notes: list[str] = []

    def make(merge_layer, grid, mode, m: Measurement, base_latency, estimate=None) -> Candidate:
        fp = footprint(m, p.context_overhead_bytes, p.allocator_slack)
        ratio = (m.latency_s / base_latency) if (m.latency_s is not None and base_latency) else None
        return Candidate(merge_layer, grid, mode, fp, replicas_that_fit(p.gpu_memory_bytes, p.headroom_bytes, fp.total),
                         m.latency_s, ratio, estimate, m.measured_by)

    _log(f"measuring {p.model} @{p.size} batch {p.batch} unsplit on {device}", quiet)
    base = measure(model, x, p.repeats)
    unsplit = make(None, None, None, base, base.latency_s)
    if unsplit.latency_ratio is not None:
        unsplit.latency_ratio = 1.0

    every = list(splitpack.merge_layers(model))
    candidates: list[Candidate] = []
    profile = radii = aliases = shapes = None
    for mode in p.modes:
        if mode != "exact" and not p.merge_layers:
            # memory alone would merge as late as possible, where the seams cost the most accuracy
            notes.append("seed mode changes outputs, and how much depends on the merge layer: measure the accuracy "
                         "of the layers you consider and pass them with --merge-layers; seed candidates skipped")
            continue
        valid = list(splitpack.merge_layers(model, mode=mode)) if mode == "exact" else every
        for grid in p.grids:
            if p.merge_layers:
                chosen = [n for n in p.merge_layers if n in valid]
                for n in p.merge_layers:
                    if n not in valid:
                        notes.append(f"{n}: not a valid merge layer for mode={mode}; skipped")
                estimates = {}
            else:
                if profile is None:
                    from splitpack.measure.profile import profile_unsplit

                    profile = profile_unsplit(model, x, layers=every)
                    radii, aliases, shapes = layer_geometry(model, x, every)
                # one name per merge point, and only maps the grid can cut (not pooled 1x1 vectors)
                distinct = [n for n in valid if n not in aliases and len(shapes.get(n, ())) == 4
                            and shapes[n][-2] >= grid[0] and shapes[n][-1] >= grid[1]]
                merged = {n: math.prod(shapes[n]) * x.element_size() * p.batch for n in distinct}
                estimates = estimate_split_peaks(profile, distinct, grid, mode, radii, p.size, merged)
                chosen = pick_candidates(estimates, valid, p.max_candidates)
            for name in chosen:
                _log(f"measuring split at {name} ({grid_text(grid)}, {mode})", quiet)
                try:
                    wrapped = splitpack.wrap(model, merge_layer=name, grid=grid, mode=mode)
                    m = measure(wrapped, x, p.repeats)
                except (splitpack.SplitError, ValueError, RuntimeError) as e:
                    # one candidate the engine cannot run must not sink the whole plan
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    notes.append(f"{name} {grid_text(grid)} {mode}: cannot split ({first})")
                    continue
                candidates.append(make(name, grid_text(grid), mode, m, base.latency_s, estimates.get(name)))

    if p.measure_replicas:
        for c in [unsplit] + candidates:
            _log(f"probing a real replica: {c.key()}", quiet)
            measure_replica_process(c, p, notes)

    ranked = rank_split(candidates, p.max_latency_ratio)
    best = ranked[0] if ranked else None
    if best is not None and best.replicas > unsplit.replicas:
        recommended = best
        reason = (f"{best.replicas} replicas instead of {unsplit.replicas} unsplit"
                  + (f" at {best.latency_ratio:.2f}x latency" if best.latency_ratio is not None else "")
                  + ("; seed mode: outputs differ from the unsplit model, check accuracy before deploying"
                     if best.mode == "seed" else ""))
    else:
        recommended = unsplit
        reason = ("no split-pack candidate fits more replicas than unsplit" if best is not None
                  else "no split-pack candidate could be measured")
    notes = list(dict.fromkeys(notes))  # once per note, however many grids repeated it
    plan = {
        "model": p.model, "size": p.size, "batch": p.batch, "device": str(device),
        "gpu_memory_bytes": p.gpu_memory_bytes, "gpu_memory_source": p.gpu_memory_source,
        "headroom_bytes": p.headroom_bytes, "usable_bytes": usable,
        "replica_bytes_unsplit": unsplit.replica_bytes,
        "replica_bytes_split": best.replica_bytes if best else None,
        "replicas_unsplit": unsplit.replicas,
        "replicas_split": best.replicas if best else None,
        "latency_ratio": best.latency_ratio if best else None,
        "best_split": best.key() if best else None,
        "recommended": recommended.key() | {"replicas": recommended.replicas,
                                            "replica_bytes": recommended.replica_bytes,
                                            "latency_ratio": recommended.latency_ratio, "reason": reason},
        "unsplit": unsplit.to_dict(),
        "candidates": [c.to_dict() for c in ranked] + [c.to_dict() for c in candidates if c not in ranked],
        "assumptions": {
            "context_overhead_bytes": p.context_overhead_bytes,
            "context_overhead_source": p.context_overhead_source,
            "allocator_slack": p.allocator_slack,
            "allocator_slack_source": ALLOCATOR_SLACK_SOURCE,
            "activations_measured_by": base.measured_by,
            "dtype": "float32",
            "latency_repeats": p.repeats,
            "max_latency_ratio": p.max_latency_ratio,
            "formula": "replicas = floor((gpu_memory_bytes - headroom_bytes) / replica_bytes)",
        },
        "notes": notes,
    }
    if device.type == "cpu":
        plan["notes"].append("activations and latency measured on the CPU: GPU replica counts are a plan, "
                             "to be checked with scripts/validate_capacity_gpu.py")
    return plan


# --- configs for the servers ------------------------------------------------------------

def _serving_mapping(plan: dict) -> dict:
    from splitpack.serving.predictor import ServingConfig

    rec = plan["recommended"]
    return ServingConfig(plan["model"], merge_layer=rec["merge_layer"], grid=rec["grid"] or "2x2",
                         mode=rec["mode"] or "exact").to_mapping()


def write_triton(plan: dict, repo: str | Path, kind: str = "gpu", name: str | None = None,
                 pretrained: bool = False, weights: str | None = None) -> Path:
    """A Triton model directory for the recommendation: instance_group count = replicas."""
    from splitpack.serving.triton.repo import TritonModelSpec, generate_model_dir

    rec = plan["recommended"]
    spec = TritonModelSpec(model=plan["model"], merge_layer=rec["merge_layer"], grid=rec["grid"] or "2x2",
                           mode=rec["mode"] or "exact", name=name, pretrained=pretrained,
                           weights=Path(weights) if weights else None, instances=max(1, rec["replicas"]),
                           kind=kind, max_batch_size=plan["batch"])
    return generate_model_dir(spec, Path(repo))


def torchserve_model_config(plan: dict, kind: str = "gpu") -> dict:
    """model-config.yaml content: min/maxWorkers = replicas, batchSize = the planned batch."""
    from splitpack.serving.torchserve.archive import model_config_yaml

    config = model_config_yaml(_serving_mapping(plan), batch_size=plan["batch"],
                               workers=max(1, plan["recommended"]["replicas"]))
    if kind == "gpu":
        config["deviceType"] = "gpu"
    return config


def write_torchserve(plan: dict, path: str | Path, kind: str = "gpu", pretrained: bool = False,
                     weights: str | None = None) -> Path:
    """``*.mar``: a full archive via ``splitpack archive``; anything else: the model-config.yaml
    to give torch-model-archiver ``--config-file``."""
    import yaml

    path = Path(path)
    rec = plan["recommended"]
    if path.suffix == ".mar":
        from splitpack.serving.torchserve.archive import build_archive

        return build_archive(plan["model"], pretrained=pretrained, weights=weights, merge_layer=rec["merge_layer"],
                             grid=rec["grid"] or "2x2", mode=rec["mode"] or "exact", batch_size=plan["batch"],
                             workers=max(1, rec["replicas"]), name=path.stem, export_path=path.parent or ".",
                             force=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(torchserve_model_config(plan, kind), sort_keys=False))
    return path


# --- plot -------------------------------------------------------------------------------

def plot_plan(plan: dict, path: str) -> None:
    """Left: footprint per configuration, stacked; right: replicas per GPU vs latency ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [plan["unsplit"]] + plan["candidates"]
    names = ["unsplit"] + [f"{c['merge_layer']}\n{c['grid']} {c['mode']}" for c in plan["candidates"]]
    parts = [("context_overhead_bytes", "context"), ("weights_bytes", "weights"), ("persistent_bytes", "plan tables"),
             ("io_bytes", "input+output"), ("peak_activation_bytes", "peak activations"),
             ("allocator_slack_bytes", "allocator slack")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10.0, 2.2 * len(rows) + 5), 5.0),
                                  gridspec_kw={"width_ratios": [max(2, len(rows)), 2]})
    bottom = [0.0] * len(rows)
    for key, label in parts:
        vals = [r["footprint"][key] / GiB for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['replicas']} / GPU", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("per-replica footprint (GiB)")
    ax.set_title(f"{plan['model']} @{plan['size']} batch {plan['batch']}, "
                 f"{plan['usable_bytes'] / GiB:.1f} GiB usable")
    ax.legend(fontsize=7)
    for i, r in enumerate(rows):
        ratio = r["latency_ratio"] if r["latency_ratio"] is not None else float("nan")
        ax2.scatter([ratio], [r["replicas"]], color="black" if i == 0 else f"C{i % 10}")
        ax2.annotate(names[i].replace("\n", " "), (ratio, r["replicas"]), fontsize=6, xytext=(3, 3),
                     textcoords="offset points")
    ax2.set_xlabel("latency vs unsplit (measured on " + plan["device"] + ")")
    ax2.set_ylabel("replicas per GPU")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- GPU memory detection -----------------------------------------------------------------

def detect_gpu_memory(index: int = 0) -> tuple[int, str]:
    """(total bytes, description) of GPU ``index`` via NVML; raises NvmlUnavailable without a driver."""
    from splitpack.measure.devices import gpu_memory

    gpu = gpu_memory(index)
    return gpu.total_bytes, f"nvml: GPU {index} {gpu.name} ({gpu.total_bytes / GiB:.1f} GiB total)"


# --- CLI ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm name, or tv:NAME for torchvision")
    parser.add_argument("--size", type=int, required=True, help="input height = width")
    parser.add_argument("--batch", type=int, required=True, help="batch size each replica runs")
    parser.add_argument("--gpu-memory", help="GPU memory to plan for (80GiB, 80GB, ...); default: NVML total of --gpu-index")
    parser.add_argument("--gpu-index", type=int, default=0)
    parser.add_argument("--headroom", default="10%", help="kept free: a percentage of the GPU or a size (default 10%%)")
    parser.add_argument("--merge-layers", nargs="*", help="merge layers to measure (default: the best estimates)")
    parser.add_argument("--grids", nargs="*", default=["2x2"], help="grids to measure (default 2x2)")
    parser.add_argument("--modes", nargs="*", default=["exact"], choices=["exact", "seed"],
                        help="modes to measure (default exact; seed changes outputs)")
    parser.add_argument("--max-candidates", type=int, default=3,
                        help="without --merge-layers: how many estimated-best merge layers to measure per grid/mode")
    parser.add_argument("--context-overhead", default=None,
                        help=f"per-process CUDA context etc. (default {DEFAULT_CONTEXT_OVERHEAD // MiB} MiB)")
    parser.add_argument("--allocator-slack", default=f"{int(DEFAULT_ALLOCATOR_SLACK * 100)}%",
                        help="extra fraction of peak activations for the caching allocator (default 10%%)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (0: no latency)")
    parser.add_argument("--max-latency-ratio", type=float, help="ignore split candidates slower than this")
    parser.add_argument("--device", default="cpu", help="where to measure activations and latency (cpu, cuda[:N])")
    parser.add_argument("--measure-replicas", action="store_true",
                        help="with --device cuda: run each configuration as a real replica process and plan "
                             "with NVML's per-process memory instead of the modelled footprint")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--png", help="write a plot of the plan here")
    parser.add_argument("--write-triton", metavar="DIR", help="write a Triton model directory for the recommendation")
    parser.add_argument("--write-torchserve", metavar="FILE",
                        help="write model-config.yaml (or a whole archive if FILE ends in .mar)")
    parser.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu",
                        help="instance kind in the written configs (default gpu)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="ship splitpack's offline weights in written configs")
    weights.add_argument("--weights", help="state dict to ship in written configs")


def _inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    if args.gpu_memory:
        gpu_bytes, source = parse_bytes(args.gpu_memory), f"--gpu-memory {args.gpu_memory}"
    else:
        from splitpack.measure.devices import NvmlUnavailable

        try:
            gpu_bytes, source = detect_gpu_memory(args.gpu_index)
        except NvmlUnavailable as e:
            raise ValueError(f"cannot detect the GPU's memory ({e}); pass --gpu-memory, e.g. 80GiB") from None
    context = DEFAULT_CONTEXT_OVERHEAD
    context_source = CONTEXT_OVERHEAD_SOURCE
    if args.context_overhead is not None:
        context, context_source = parse_bytes(args.context_overhead), f"--context-overhead {args.context_overhead}"
    if args.batch < 1 or args.size < 1:
        raise ValueError("--size and --batch must be >= 1")
    if args.measure_replicas and not str(args.device).startswith("cuda"):
        raise ValueError("--measure-replicas needs --device cuda (it measures replica processes with NVML)")
    return PlanInputs(
        model=args.model, size=args.size, batch=args.batch, gpu_memory_bytes=gpu_bytes, gpu_memory_source=source,
        headroom_bytes=parse_headroom(args.headroom, gpu_bytes), merge_layers=args.merge_layers or None,
        grids=[parse_grid(g) for g in args.grids], modes=list(dict.fromkeys(args.modes)),
        max_candidates=args.max_candidates, context_overhead_bytes=context, context_overhead_source=context_source,
        allocator_slack=parse_fraction(args.allocator_slack), repeats=args.repeats,
        max_latency_ratio=args.max_latency_ratio, device=args.device, measure_replicas=args.measure_replicas,
    )


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_plan(plan: dict) -> str:
    lines = [f"{plan['model']} @{plan['size']} batch {plan['batch']}: GPU {_size(plan['gpu_memory_bytes'])} "
             f"({plan['gpu_memory_source']}), headroom {_size(plan['headroom_bytes'])}, "
             f"usable {_size(plan['usable_bytes'])}",
             f"{'configuration':<36} {'per replica':>12} {'activations':>12} {'replicas':>9} {'latency':>8}"]
    for r in [plan["unsplit"]] + plan["candidates"]:
        name = "unsplit" if r["merge_layer"] is None else f"{r['merge_layer']} {r['grid']} {r['mode']}"
        ratio = f"{r['latency_ratio']:.2f}x" if r["latency_ratio"] is not None else "-"
        lines.append(f"{name:<36} {_size(r['replica_bytes']):>12} {_size(r['peak_activation_bytes']):>12} "
                     f"{r['replicas']:>9} {ratio:>8}")
    rec = plan["recommended"]
    what = "unsplit" if rec["merge_layer"] is None else f"merge at {rec['merge_layer']}, {rec['grid']}, {rec['mode']}"
    lines.append(f"recommended: {what}: {rec['replicas']} replicas per GPU ({rec['reason']})")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import splitpack

    try:
        inputs = _inputs_from_args(args)
        plan = plan_capacity(inputs, quiet=args.quiet)
    except (ValueError, splitpack.SplitError) as e:
        print(f"splitpack capacity: {e}", file=sys.stderr)
        return 2
    try:
        if args.png:
            plot_plan(plan, args.png)
            plan["png"] = args.png
        if args.write_triton:
            plan["triton_model_dir"] = str(write_triton(plan, args.write_triton, kind=args.instance_kind,
                                                        pretrained=args.pretrained, weights=args.weights))
        if args.write_torchserve:
            plan["torchserve_config"] = str(write_torchserve(plan, args.write_torchserve, kind=args.instance_kind,
                                                             pretrained=args.pretrained, weights=args.weights))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"splitpack capacity: writing outputs failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


# --- one real replica (python -m splitpack.capacity.planner probe ...) -----------------------------

def replica_probe(model_name: str, size: int, batch: int, merge_layer: str | None, grid: str, mode: str,
                  device: str, repeats: int = 3) -> tuple[dict[str, Any], nn.Module, torch.Tensor]:
    """Load one replica on ``device``, run it at ``batch`` and measure it as an operator would see it.

    GPU: NVML's view of this process (context included), the device's used
    memory, and the allocator's peaks; CPU: RSS and the activation tracker.
    Returns (measurements, module, input) so a caller can keep serving.
    """
    import splitpack
    from splitpack.measure import devices

    dev = torch.device(device)
    gpu_before = None
    if dev.type == "cuda":
        index = devices.nvml_index(dev.index or 0) if devices.nvml_status()[0] else None
        gpu_before = devices.gpu_memory(index).used_bytes if index is not None else None
    model = splitpack.create_model(model_name).to(dev)
    module = splitpack.wrap(model, merge_layer=merge_layer, grid=parse_grid(grid), mode=mode) if merge_layer else model
    x = torch.randn(batch, 3, size, size, device=dev)
    m = measure(module, x, repeats)
    result: dict[str, Any] = {
        "pid": os.getpid(), "device": str(dev), "model": model_name, "size": size, "batch": batch,
        "merge_layer": merge_layer, "grid": grid if merge_layer else None, "mode": mode if merge_layer else None,
        **asdict(m),
        "rss_bytes": devices.host_memory().process_rss_bytes,
    }
    if dev.type == "cuda":
        result["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        result["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
        result["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(dev))
        if devices.nvml_status()[0]:
            index = devices.nvml_index(dev.index or 0)
            gpu = devices.gpu_memory(index)
            mine = next((p.used_bytes for p in gpu.processes if p.pid == os.getpid()), None)
            result.update(nvml_index=index, gpu_name=gpu.name, gpu_total_bytes=gpu.total_bytes,
                          gpu_used_bytes=gpu.used_bytes, nvml_process_bytes=mine,
                          gpu_used_delta_bytes=(gpu.used_bytes - gpu_before) if gpu_before is not None else None)
            if mine is not None:
                result["context_overhead_bytes"] = mine - result["torch_reserved_bytes"]
    return result, module, x


def _probe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitpack.capacity.planner probe",
                                     description="run one replica and print its memory as JSON")
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--merge-layer", default="")
    parser.add_argument("--grid", default="2x2")
    parser.add_argument("--mode", default="exact")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hold", action="store_true",
                        help="after the first report keep running inference until stdin closes, then report again")
    args = parser.parse_args(argv)
    try:
        result, module, x = replica_probe(args.model, args.size, args.batch, args.merge_layer or None, args.grid,
                                          args.mode, args.device, args.repeats)
    except torch.cuda.OutOfMemoryError as e:
        print(json.dumps({"pid": os.getpid(), "ok": False, "error": f"out of memory: {e}"}), flush=True)
        return 3
    except Exception as e:  # the parent reads one JSON line whatever happens
        print(json.dumps({"pid": os.getpid(), "ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    result["ok"] = True
    print(json.dumps(result), flush=True)
    if not args.hold:
        return 0
    # keep the replica busy, like a server under load, until the parent closes stdin
    released = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), released.set()), daemon=True).start()
    calls, error = 0, None
    try:
        with torch.inference_mode():
            while not released.is_set():
                module(x)
                _sync(x.device)
                calls += 1
    except torch.cuda.OutOfMemoryError as e:
        error = f"out of memory: {e}"
    final: dict[str, Any] = {"pid": os.getpid(), "ok": error is None, "error": error, "calls": calls, "final": True}
    if x.device.type == "cuda":
        final["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(x.device))
    print(json.dumps(final), flush=True)
    return 0 if error is None else 3


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        sys.exit(_probe_main(sys.argv[2:]))
    print("usage: python -m splitpack.capacity.planner probe --model M --size S --batch N [...]", file=sys.stderr)
    sys.exit(2)
