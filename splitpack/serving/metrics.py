"""Device-memory gauges of a serving replica, and how each server receives them.

:data:`METRICS` fixes the gauge names whatever the machine, so dashboards and
the TorchServe metrics config never change shape; :func:`device_memory_metrics`
gives their values for one replica (NVML on a GPU, host memory otherwise);
each backend pushes them through its server's custom-metrics API
(:mod:`splitpack.serving.torchserve.metrics`, :mod:`splitpack.serving.triton.metrics`; see docs/capacity.md).
"""
from __future__ import annotations

from typing import Any, Callable

from splitpack.measure.nvml import cuda_index, gpu_memory, host_memory, nvml_index, nvml_status, process_gpu_bytes

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


# merge_layer auto: one series per input size's chosen plan, labelled with the plan and the size (the
# label values avoid "," ":" "|", which TorchServe's metric log format uses as separators).
PLAN_METRICS: dict[str, tuple[str, str]] = {
    "splitpack_plan_info": (
        "Count", "1 for the staged plan merge_layer auto chose for an input size (labels plan, input_size)"),
    "splitpack_plan_predicted_peak_bytes": (
        "Bytes", "Predicted peak activation bytes per image of that plan (labels plan, input_size)"),
}


def plan_label(plan_text: str) -> str:
    """``layer2@4x4,global_pool@2x2`` -> ``layer2@4x4+global_pool@2x2`` (a metric label value)."""
    return plan_text.replace(",", "+")


def plan_series(plans: list[dict]) -> list[tuple[dict[str, str], dict[str, float]]]:
    """(labels, values) per resolved plan (``Predictor.plans()``), for :data:`PLAN_METRICS`."""
    return [({"plan": plan_label(p["plan"]), "input_size": p["input_size"]},
             {"splitpack_plan_info": 1.0, "splitpack_plan_predicted_peak_bytes": float(p["predicted_peak_bytes"])})
            for p in plans]


def device_memory_metrics(device: Any = None, peak_activation_bytes: int | None = None) -> dict[str, float]:
    """Values for every name in :data:`METRICS` for a replica running on ``device``.

    ``device``: the replica's torch device (``"cuda:0"``, ``torch.device``, int)
    or None/"cpu" for a CPU replica. With a CUDA device and a driver the numbers
    are that GPU's (NVML) and this process's share of it; otherwise host memory.
    ``peak_activation_bytes`` is the last batch's (:func:`splitpack.measure.meter.peak_meter`)
    (omitted from the result when not given, so a gauge keeps its last value).
    """
    cuda_idx = cuda_index(device)
    values: dict[str, float] = {}
    gpu = None
    if cuda_idx is not None and nvml_status()[0]:
        try:
            gpu = gpu_memory(nvml_index(cuda_idx))
        except Exception:  # never let reporting fail a request
            gpu = None
    if gpu is not None:
        mine = process_gpu_bytes(gpu)
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


def update_memory_gauges(update: Callable[[dict[str, float]], None], device: Any,
                         peak_activation_bytes: int | None) -> Exception | None:
    """Push this replica's gauges through a server adapter's ``update``; the error instead of raising
    (reporting must never fail a request: the caller logs it)."""
    try:
        update(device_memory_metrics(device, peak_activation_bytes))
        return None
    except Exception as err:  # noqa: BLE001
        return err


def update_plan_gauges(update: Callable[[list[dict]], None], plans: list[dict]) -> Exception | None:
    """Push the resolved plans (``Predictor.plans()``) through a server adapter's ``update``; the error
    instead of raising."""
    if not plans:
        return None
    try:
        update(plans)
        return None
    except Exception as err:  # noqa: BLE001
        return err
