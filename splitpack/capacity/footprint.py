"""What one server replica needs, measured in this process: the footprint formula, written once.

One server replica = one process (a TorchServe worker or a Triton python-backend
instance, each with its own CUDA context)::

    replica_bytes = context_overhead + weights + persistent + io + peak_activations * (1 + allocator_slack)

* context_overhead: CUDA context + cuDNN/cuBLAS handles of one process. Not
  measurable without a GPU; default :data:`DEFAULT_CONTEXT_OVERHEAD` (see its
  source below); on a GPU the replica probe measures the whole replica with NVML.
* weights: parameters + buffers of the served module.
* persistent: what a split-pack replica keeps between requests (its per-input-size
  plan tables), measured as the bytes still alive after the first call.
* io: the input batch and the output logits (on the device during the call; the
  activation meter leaves inputs out by design).
* peak_activations: :func:`splitpack.measure.meter.measured_call` after a warm-up call.
* allocator_slack: the caching allocator's rounding and fragmentation on top of
  the peak (reserved vs allocated); default 10%.

replicas = floor((gpu_memory - headroom) / replica_bytes).

That is the ``python`` backend (:data:`BACKENDS`): TorchServe workers and Triton
python-backend instances are processes. In Triton's ``libtorch`` backend
(``pytorch_libtorch``, a model exported with ``splitpack export``) every instance
of a model runs in Triton's one process with one CUDA context, and with
``ENABLE_WEIGHT_SHARING`` the instances on a device share one copy of the
weights; what is paid once per GPU (:func:`shared_bytes`) comes off the top::

    shared   = context_overhead (+ weights, with weight sharing)
    replicas = floor((gpu_memory - headroom - shared) / (replica_bytes - shared))
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from splitpack.measure.meter import measured_call, peak_meter
from splitpack.measure.units import GiB, MiB, parse_bytes

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
        raise ValueError(f"headroom {text} leaves nothing of the {gpu_bytes / GiB:.1f} GiB planned for")
    return value


def parse_fraction(text: str | float) -> float:
    text = str(text).strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if value < 0:
        raise ValueError(f"expected a non-negative fraction or percentage, got {text}")
    return value


PYTHON, LIBTORCH = "python", "libtorch"
BACKENDS = (PYTHON, LIBTORCH)  # one process per replica; Triton's pytorch_libtorch: one process for all instances
BACKEND_HELP = {
    PYTHON: "one process and CUDA context per replica (TorchServe workers, Triton python backend)",
    LIBTORCH: "Triton pytorch_libtorch: all instances in one process with one CUDA context (splitpack export)",
}


def replicas_that_fit(gpu_bytes: int, headroom_bytes: int, replica_bytes: int, shared: int = 0) -> int:
    """How many replicas of ``replica_bytes`` fit, when ``shared`` of them is paid once for all."""
    per_replica = replica_bytes - shared
    usable = gpu_bytes - headroom_bytes - shared
    return max(0, usable // per_replica) if per_replica > 0 and usable > 0 else 0


def shared_bytes(fp: "Footprint", backend: str, weight_sharing: bool = False) -> int:
    """The part of one replica's footprint paid once per GPU, not once per replica, under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if weight_sharing and backend != LIBTORCH:
        raise ValueError("weight sharing (ENABLE_WEIGHT_SHARING) is a setting of the libtorch backend; "
                         "python-backend replicas are processes with their own weights")
    if backend == PYTHON:
        return 0
    return fp.context_overhead_bytes + (fp.weights_bytes if weight_sharing else 0)


def module_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


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
    with warnings.catch_warnings():
        # the engine propagates shapes with FakeTensors on the first call; the
        # CPU meter sees them go by and torch warns about their data pointers
        warnings.filterwarnings("ignore", message=".*FakeTensor.*")
        with torch.inference_mode(), peak_meter(x.device) as meter:
            out = module(x)
            _sync(x.device)
            kept = meter.current - out.untyped_storage().nbytes()
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


@dataclass
class Footprint:
    """The terms of ``replica_bytes`` (the module docstring's formula); :data:`FOOTPRINT_PARTS` names them."""

    context_overhead_bytes: int
    weights_bytes: int
    persistent_bytes: int
    io_bytes: int
    peak_activation_bytes: int
    allocator_slack_bytes: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def to_dict(self) -> dict[str, int]:
        return asdict(self) | {"replica_bytes": self.total}


def footprint(m: Measurement, context_overhead: int, allocator_slack: float) -> Footprint:
    return Footprint(context_overhead_bytes=int(context_overhead), weights_bytes=m.weights_bytes,
                     persistent_bytes=m.persistent_bytes, io_bytes=m.io_bytes,
                     peak_activation_bytes=m.peak_activation_bytes,
                     allocator_slack_bytes=int(math.ceil(m.peak_activation_bytes * allocator_slack)))


# (field, label in plots): the terms of the footprint formula, in the order they stack
FOOTPRINT_PARTS = (("context_overhead_bytes", "context"), ("weights_bytes", "weights"),
                   ("persistent_bytes", "plan tables"), ("io_bytes", "input+output"),
                   ("peak_activation_bytes", "peak activations"), ("allocator_slack_bytes", "allocator slack"))
