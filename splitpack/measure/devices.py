"""Show GPU memory (total/used/free, per process) through NVML, or host memory without a driver.

Everything here reads memory; nothing allocates on the GPU. NVML (the
``pynvml`` module of the ``nvidia-ml-py`` package) is the same source
``nvidia-smi`` uses, so numbers here match what an operator sees there. On a
machine without an NVIDIA driver NVML cannot load: the report says so in one
line and falls back to host memory (psutil) instead of raising.

The servers use three pieces:

* :func:`device_memory_metrics` -> ``{metric name: value}`` for one replica,
  fixed names (:data:`METRICS`) whatever the machine, so dashboards and the
  TorchServe metrics config never change shape;
* :func:`measured_call` -> ``(result, peak activation bytes)`` of one batch
  (CUDA caching allocator on a GPU, :class:`splitpack.memory.ActivationTracker`
  on the CPU), or the same as a ``with PeakActivation(device) as peak:`` block;
* :func:`report_to_torchserve` / :class:`TritonMemoryMetrics` push the values
  through each server's custom-metrics API (see docs/capacity.md).

GPU code paths are written against the NVML and torch.cuda APIs but were not
run on a GPU when written (no driver on the development machine).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil

GiB = 1024**3
MiB = 1024**2

# Metric name -> (unit, help text). Names follow Prometheus conventions (Triton
# exports them verbatim; TorchServe in prometheus mode does too).
METRICS: dict[str, tuple[str, str]] = {
    "splitpack_device_memory_total_bytes": (
        "Bytes", "Total memory of the replica's GPU (NVML); host RAM when no NVIDIA driver"),
    "splitpack_device_memory_used_bytes": (
        "Bytes", "Used memory of the replica's GPU, all processes (NVML); host RAM in use when no driver"),
    "splitpack_device_memory_free_bytes": (
        "Bytes", "Free memory of the replica's GPU (NVML); host RAM available when no driver"),
    "splitpack_process_device_memory_bytes": (
        "Bytes", "This replica process's GPU memory (NVML per-process); its RSS when no driver"),
    "splitpack_allocator_reserved_bytes": (
        "Bytes", "Bytes held by PyTorch's CUDA caching allocator in this process (0 on CPU)"),
    "splitpack_peak_activation_bytes": (
        "Bytes", "Peak activation bytes of the last request batch (CUDA allocator or CPU tracker)"),
    "splitpack_device_is_gpu": (
        "Count", "1 when the device_memory metrics are a GPU's (NVML), 0 when they are host memory"),
}


class NvmlUnavailable(RuntimeError):
    """NVML could not be loaded or initialised (no NVIDIA driver, no GPU, no permission)."""


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_bytes: int | None  # None where the driver does not report it


@dataclass
class GpuMemory:
    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class HostMemory:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    process_rss_bytes: int


@dataclass
class DeviceReport:
    nvml_available: bool
    fallback_reason: str | None
    driver_version: str | None
    gpus: list[GpuMemory]
    host: HostMemory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    """The initialised ``pynvml`` module; raises :class:`NvmlUnavailable` (cached) if it cannot load."""
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py not installed
        raise NvmlUnavailable(f"pynvml not installed ({e}); install nvidia-ml-py") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(f"NVML unavailable: {e} (no NVIDIA driver on this machine?)") from None
    return pynvml


def nvml_status() -> tuple[bool, str | None]:
    """(True, None) when NVML works here, else (False, reason)."""
    try:
        _nvml()
        return True, None
    except NvmlUnavailable as e:
        return False, str(e)


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"  # another container's pid, or gone already


def gpu_memory(index: int) -> GpuMemory:
    """Memory of GPU ``index`` (NVML numbering, as in nvidia-smi) with its compute processes."""
    nvml = _nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    processes = []
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        running = []  # e.g. MIG without permissions: device totals still valid
    for p in running:
        used = p.usedGpuMemory
        processes.append(GpuProcess(pid=int(p.pid), name=_process_name(int(p.pid)),
                                    used_bytes=None if used is None else int(used)))
    return GpuMemory(index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                     uuid=_text(nvml.nvmlDeviceGetUUID(handle)), total_bytes=int(mem.total),
                     used_bytes=int(mem.used), free_bytes=int(mem.free), processes=processes)


def host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(total_bytes=int(vm.total), used_bytes=int(vm.total - vm.available),
                      available_bytes=int(vm.available),
                      process_rss_bytes=int(psutil.Process().memory_info().rss))


def query_devices() -> DeviceReport:
    """All GPUs NVML sees (empty list and a reason without a driver) plus host memory."""
    ok, reason = nvml_status()
    gpus: list[GpuMemory] = []
    driver = None
    if ok:
        nvml = _nvml()
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = [gpu_memory(i) for i in range(nvml.nvmlDeviceGetCount())]
        if not gpus:
            reason = "NVML loaded but reports no GPU"
    return DeviceReport(nvml_available=ok, fallback_reason=reason, driver_version=driver,
                        gpus=gpus, host=host_memory())


def _visible_to_nvml(idx: int) -> int:
    """NVML index of CUDA device ``idx`` from CUDA_VISIBLE_DEVICES alone (no CUDA initialisation)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if idx >= len(visible):
        return idx  # unset: CUDA and NVML agree on a single-GPU machine (see docs for CUDA_DEVICE_ORDER)
    entry = visible[idx]
    if entry.isdigit():
        return int(entry)
    nvml = _nvml()
    try:
        return int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(entry)))
    except nvml.NVMLError:
        return idx  # MIG or partial UUIDs: best effort


def nvml_index(device: Any = None) -> int:
    """NVML index of a torch CUDA device (int, "cuda:1", torch.device; None = current).

    torch numbers devices after CUDA_VISIBLE_DEVICES, NVML numbers all of them.
    Once CUDA is initialised in this process, match by UUID (both report it);
    before, read CUDA_VISIBLE_DEVICES, so that asking does not create a CUDA
    context (which would itself use GPU memory).
    """
    import torch

    if device is None:
        idx = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    elif isinstance(device, int):
        idx = device
    else:
        idx = torch.device(device).index or 0
    if not torch.cuda.is_initialized():
        return _visible_to_nvml(idx)
    nvml = _nvml()
    uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
    if uuid is not None:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            return int(nvml.nvmlDeviceGetIndex(handle))
        except nvml.NVMLError:
            pass  # MIG or an odd UUID format: fall back to the visible-devices mapping
    return _visible_to_nvml(idx)


def process_gpu_bytes(index: int, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to ``pid`` (default: this process) on GPU ``index``.

    None when NVML does not list the pid: inside a container NVML reports host
    pids, which differ from ``os.getpid()``.
    """
    pid = os.getpid() if pid is None else pid
    for p in gpu_memory(index).processes:
        if p.pid == pid:
            return p.used_bytes
    return None


def _cuda_index(device: Any) -> int | None:
    """torch CUDA device index of ``device`` or None when it is not a CUDA device."""
    if device is None:
        return None
    import torch

    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()


def device_memory_metrics(device: Any = None, peak_activation_bytes: int | None = None) -> dict[str, float]:
    """Values for every name in :data:`METRICS` for a replica running on ``device``.

    ``device``: the replica's torch device (``"cuda:0"``, ``torch.device``, int)
    or None/"cpu" for a CPU replica. With a CUDA device and a driver the numbers
    are that GPU's (NVML) and this process's share of it; otherwise host memory.
    ``peak_activation_bytes`` is the last batch's, from :func:`measured_call`
    (omitted from the result when not given, so a gauge keeps its last value).
    """
    cuda_idx = _cuda_index(device)
    values: dict[str, float] = {}
    gpu = None
    if cuda_idx is not None and nvml_status()[0]:
        try:
            gpu = gpu_memory(nvml_index(cuda_idx))
        except Exception:  # never let reporting fail a request
            gpu = None
    if gpu is not None:
        mine = next((p.used_bytes for p in gpu.processes if p.pid == os.getpid()), None)
        import torch

        reserved = torch.cuda.memory_reserved(cuda_idx)
        values.update({
            "splitpack_device_memory_total_bytes": gpu.total_bytes,
            "splitpack_device_memory_used_bytes": gpu.used_bytes,
            "splitpack_device_memory_free_bytes": gpu.free_bytes,
            # pid not visible (container): the allocator's share is a lower bound
            "splitpack_process_device_memory_bytes": mine if mine is not None else reserved,
            "splitpack_allocator_reserved_bytes": reserved,
            "splitpack_device_is_gpu": 1,
        })
    else:
        host = host_memory()
        reserved = 0
        if cuda_idx is not None:  # CUDA without NVML (rare: driver without libnvidia-ml)
            import torch

            reserved = torch.cuda.memory_reserved(cuda_idx)
        values.update({
            "splitpack_device_memory_total_bytes": host.total_bytes,
            "splitpack_device_memory_used_bytes": host.used_bytes,
            "splitpack_device_memory_free_bytes": host.available_bytes,
            "splitpack_process_device_memory_bytes": host.process_rss_bytes,
            "splitpack_allocator_reserved_bytes": reserved,
            "splitpack_device_is_gpu": 0,
        })
    if peak_activation_bytes is not None:
        values["splitpack_peak_activation_bytes"] = peak_activation_bytes
    return {k: float(v) for k, v in values.items()}


def _first_cuda_device(args: tuple, kwargs: dict) -> Any:
    import torch
    from torch.utils._pytree import tree_flatten

    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def measured_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), peak activation bytes)`` under ``torch.inference_mode``.

    CUDA inputs: the caching allocator's peak above what was allocated before
    the call (cheap; resets this process's peak counter). CPU inputs: the
    :class:`~splitpack.memory.ActivationTracker` (exact per aten op, but each op
    pays a Python dispatch, see docs/capacity.md for the cost).
    """
    import torch

    device = _first_cuda_device(args, kwargs)
    if device is None:
        from splitpack.measure.meter import tracked_call

        return tracked_call(fn, *args, **kwargs)
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - before)


class PeakActivation:
    """``with PeakActivation(device) as peak: ...`` then ``peak.bytes``: the block's peak activation bytes.

    Like :func:`measured_call` for code that moves its inputs to the device
    itself. CUDA: the caching allocator's peak above what was allocated on
    entry; CPU: the activation tracker (storages created inside the block,
    the batch included). ``enabled=False`` measures nothing (``bytes`` stays
    None), e.g. to skip the tracker's per-op cost on CPU replicas.
    """

    def __init__(self, device: Any = None, enabled: bool = True):
        import torch

        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.enabled = enabled
        self.bytes: int | None = None
        self._tracker = None
        self._before = 0

    def __enter__(self) -> "PeakActivation":
        if not self.enabled:
            return self
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            from splitpack.measure.meter import ActivationTracker

            self._tracker = ActivationTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if not self.enabled:
            return False
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._before)
        else:
            self._tracker.__exit__(*exc)
            self.bytes = int(self._tracker.peak)
        return False


# --- server adapters -------------------------------------------------------------

def report_to_torchserve(metrics_cache: Any, values: dict[str, float], model_name: str) -> None:
    """Emit ``values`` as TorchServe gauges (``context.metrics`` of a handler).

    Dimensions are fixed (ModelName, Level=Model) so every emission matches the
    declaration in :func:`torchserve_metrics_yaml`.
    """
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for name, value in values.items():
        dims = [Dimension("ModelName", model_name), Dimension("Level", "Model")]
        metrics_cache.add_metric(name, value, METRICS[name][0], dimensions=dims,
                                 metric_type=MetricTypes.GAUGE)


def torchserve_metrics_yaml() -> str:
    """TorchServe's default metrics config with the splitpack gauges declared.

    Prometheus mode only exports model metrics declared in the config (unless
    ``model_metrics_auto_detect=true``): point ``metrics_config`` in
    config.properties at a file with this text.
    """
    import importlib.resources

    import yaml

    base = yaml.safe_load(importlib.resources.files("ts").joinpath("configs/metrics.yaml").read_text())
    gauges = base.setdefault("model_metrics", {}).setdefault("gauge", [])
    known = {g["name"] for g in gauges}
    for name, (unit, _) in METRICS.items():
        if name not in known:
            gauges.append({"name": name, "unit": unit, "dimensions": ["ModelName", "Level"]})
    return yaml.safe_dump(base, sort_keys=False)


class TritonMemoryMetrics:
    """Triton python-backend gauges for :data:`METRICS`, created once per model instance.

    ``pb_utils`` is the ``triton_python_backend_utils`` module (only importable
    inside the stub, hence passed in). Families are kept alive here: Triton
    requires a family to outlive its metrics.
    """

    def __init__(self, pb_utils: Any, labels: dict[str, str]):
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=pb_utils.MetricFamily.GAUGE)
            for name, (_, help_text) in METRICS.items()
        }
        self._metrics = {name: fam.Metric(labels=labels) for name, fam in self._families.items()}

    def update(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._metrics[name].set(float(value))


# --- CLI ---------------------------------------------------------------------------

def _fmt(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_report(report: DeviceReport) -> str:
    lines = []
    if report.nvml_available and report.gpus:
        lines.append(f"NVIDIA driver {report.driver_version}, {len(report.gpus)} GPU(s)")
        for g in report.gpus:
            lines.append(f"GPU {g.index}  {g.name}  total {_fmt(g.total_bytes)}  used {_fmt(g.used_bytes)}"
                         f"  free {_fmt(g.free_bytes)}")
            for p in g.processes:
                lines.append(f"    pid {p.pid:<8} {p.name:<24} {_fmt(p.used_bytes)}")
            if not g.processes:
                lines.append("    no compute processes")
    else:
        lines.append(f"No GPU memory to report: {report.fallback_reason}. Showing host memory instead.")
    h = report.host
    lines.append(f"host: total {_fmt(h.total_bytes)}  used {_fmt(h.used_bytes)}  "
                 f"available {_fmt(h.available_bytes)}  (this process RSS {_fmt(h.process_rss_bytes)})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = query_devices()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
