"""One real replica, measured as an operator sees it: ``splitpack replica-probe`` (one JSON line per report).

The planner (``capacity --measure-replicas``) and scripts/validate_capacity_gpu.py
start probes as separate processes, each with its own CUDA context, and read
NVML's per-process memory from their reports. ``--hold`` keeps the replica
running inference (like a server under load) until its stdin closes, then
reports again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from splitpack.models import ModelSpec, build_model
from splitpack.capacity.footprint import _sync, measure
from splitpack.measure import nvml

OUT_OF_MEMORY_STATUS = 3


def probe_command(model: str | list[str], size: int, batch_size: int, merge_layer: str | None, grid: str | None,
                  mode: str | None, device: str, repeats: int = 1, hold: bool = False) -> list[str]:
    """Command line of one replica probe (``splitpack replica-probe ...``); ``model``: a name, or its flags."""
    model_flags = ["--model", model] if isinstance(model, str) else list(model)
    cmd = [sys.executable, "-m", "splitpack.cli", "replica-probe", *model_flags, "--size", str(size),
           "--batch-size", str(batch_size), "--device", device, "--repeats", str(repeats)]
    if merge_layer:
        cmd += ["--merge-layer", merge_layer, "--grid", grid or "2x2", "--mode", mode or "exact"]
    return cmd + (["--hold"] if hold else [])


def read_probe_line(line: str) -> dict[str, Any]:
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        return {"ok": False, "error": f"unreadable probe output: {line.strip()[:500]!r}"}
    return result if isinstance(result, dict) else {"ok": False, "error": f"unexpected probe output {result!r}"}


def measure_replica_process(c, p, notes: list[str]) -> None:
    """Run candidate ``c`` of plan inputs ``p`` as its own process on the GPU; NVML's number replaces the model."""
    cmd = probe_command(list(p.model_flags) or p.model, p.size, p.batch_size, c.merge_layer, c.grid, c.mode, p.device)
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
    c.replicas = p.replicas(c.replica_bytes)


def _gpu_view(dev: torch.device, used_before: int | None) -> dict[str, Any]:
    """NVML's view of this process and of its GPU (context included), plus torch's allocator peaks."""
    view: dict[str, Any] = {
        "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
        "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved(dev)),
        "torch_reserved_bytes": int(torch.cuda.memory_reserved(dev)),
    }
    if not nvml.nvml_status()[0]:
        return view
    index = nvml.nvml_index(dev.index or 0)
    gpu = nvml.gpu_memory(index)
    mine = nvml.process_gpu_bytes(gpu)
    view.update(nvml_index=index, gpu_name=gpu.name, gpu_total_bytes=gpu.total_bytes,
                gpu_used_bytes=gpu.used_bytes, nvml_process_bytes=mine,
                gpu_used_delta_bytes=(gpu.used_bytes - used_before) if used_before is not None else None)
    if mine is not None:
        view["context_overhead_bytes"] = mine - view["torch_reserved_bytes"]
    return view


def replica_probe(model: str | ModelSpec, size: int, batch_size: int, merge_layer: str | None, grid: str, mode: str,
                  device: str, repeats: int = 3) -> tuple[dict[str, Any], nn.Module, torch.Tensor]:
    """Load one replica on ``device``, run it at ``batch_size`` and measure it as an operator would see it.

    GPU: NVML's view of this process (context included), the device's used
    memory, and the allocator's peaks; CPU: RSS and the activation meter.
    Returns (measurements, module, input) so a caller can keep serving. ``model``: a timm/torchvision name
    or how to build the user's own.
    """
    import splitpack

    dev = torch.device(device)
    used_before = None
    if dev.type == "cuda" and nvml.nvml_status()[0]:
        used_before = nvml.gpu_memory(nvml.nvml_index(dev.index or 0)).used_bytes
    spec = model if isinstance(model, ModelSpec) else ModelSpec(name=model)
    model = build_model(spec).to(dev)
    module = splitpack.wrap(model, merge_layer=merge_layer, grid=grid, mode=mode) if merge_layer else model
    x = torch.randn(batch_size, 3, size, size, device=dev)
    m = measure(module, x, repeats)
    result: dict[str, Any] = {
        "pid": os.getpid(), "device": str(dev), "model": spec.title, "size": size, "batch_size": batch_size,
        "merge_layer": merge_layer, "grid": grid if merge_layer else None, "mode": mode if merge_layer else None,
        **asdict(m),
        "rss_bytes": nvml.host_memory().process_rss_bytes,
    }
    if dev.type == "cuda":
        result.update(_gpu_view(dev, used_before))
    return result, module, x


def _report(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def run_probe(model: str | ModelSpec, size: int, batch_size: int, merge_layer: str | None, grid: str, mode: str,
              device: str, repeats: int = 1, hold: bool = False) -> int:
    """Probe one replica and report it as JSON lines on stdout (one even when it fails at run time); the
    exit status. Settings that cannot work (an unknown model or merge layer) raise instead: user errors."""
    from splitpack.errors import SplitError

    try:
        result, module, x = replica_probe(model, size, batch_size, merge_layer, grid, mode, device, repeats)
    except (ValueError, SplitError, FileNotFoundError):
        raise
    except Exception as e:  # the parent reads one JSON line whatever happens at run time
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        _report({"pid": os.getpid(), "ok": False, "error": f"out of memory: {e}" if oom else f"{type(e).__name__}: {e}"})
        return OUT_OF_MEMORY_STATUS if oom else 1
    _report(result | {"ok": True})
    return _hold(module, x) if hold else 0


def _hold(module: nn.Module, x: torch.Tensor) -> int:
    """Keep the replica busy, like a server under load, until the parent closes stdin; report again."""
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
    _report(final)
    return 0 if error is None else OUT_OF_MEMORY_STATUS
