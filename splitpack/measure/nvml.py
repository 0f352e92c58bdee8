"""GPU memory through NVML (the ``pynvml`` module of ``nvidia-ml-py``), host memory through psutil.

Everything here reads memory; nothing allocates on the GPU. NVML is the same
source ``nvidia-smi`` uses, so numbers here match what an operator sees there.
On a machine without an NVIDIA driver NVML cannot load: :func:`nvml_status`
says why and :func:`query_devices` falls back to host memory instead of raising.

torch numbers CUDA devices after ``CUDA_VISIBLE_DEVICES``, NVML numbers all of
them: :func:`nvml_index` maps one to the other.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil


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


def process_gpu_bytes(gpu: GpuMemory, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to ``pid`` (default: this process) in a :func:`gpu_memory` report.

    None when NVML does not list the pid: inside a container NVML reports host
    pids, which differ from ``os.getpid()``.
    """
    pid = os.getpid() if pid is None else pid
    return next((p.used_bytes for p in gpu.processes if p.pid == pid), None)


def cuda_index(device: Any) -> int | None:
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
