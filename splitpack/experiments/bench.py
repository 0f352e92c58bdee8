"""Measure split-pack against the unsplit model: peak activation memory, error and latency."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import torch

from splitpack.core.cost.time_model import latencies_ms
from splitpack.core.engine import wrap
from splitpack.measure.heap import set_heap
from splitpack.measure.meter import peak_activation_bytes
from splitpack.models import create_model


def planner_measurements(choice) -> dict[str, Any]:
    """A benchmark row's record of what the planner timed while choosing (``measure_latency``; none: empty)."""
    if not choice.measured:
        return {}
    return {"planner_measured_ratio": choice.measured_latency_ratio,
            "planner_measured": [m.to_dict() for m in choice.measured]}


def in_fresh_processes(fn: Callable[..., Any], cases: Iterable[Any], *args, heap: str = "kept") -> Iterator[Any]:
    """``fn(case, *args)`` for each case, one after the other, each in a new process (spawned: no state of
    this one): a model timed after other models were planned and run in the same process came out up to
    1.25x slower for its split plan (mixnet_s @512: 1.39x after four models, 1.12x alone). ``fn`` and
    ``args`` must pickle (a module-level function). ``heap``: the C heap's mode in each process
    (splitpack.measure.heap: "kept", the default, times the models without the page faults of glibc's
    adaptive thresholds)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1,
                             initializer=set_heap, initargs=(heap,)) as pool:
        for case in cases:
            yield pool.submit(fn, case, *args).result()


def peak_meter_for(compile_mode: str, device: str):
    """(meter, its name): the op tracker, or -- for code torch.compile generated on the CPU, whose buffers
    it cannot see -- the CPU allocator's events (both sides of a comparison use the same one)."""
    if compile_mode == "inductor" and torch.device(device).type == "cpu":
        from splitpack.measure.allocations import peak_allocated_bytes

        return peak_allocated_bytes, "cpu-allocator"
    return peak_activation_bytes, "activation-tracker"


def bench(model_name: str, size: int, merge_layer: str, grid, mode: str = "exact", batch_size: int = 1,
          repeats: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32, model=None,
          compile="off") -> dict:
    """One comparison, baseline and split measured in this process on the same input; with the plan's
    cost report (convolution MACs split vs unsplit, passes and size of every checkpoint). ``compile``:
    how the split model runs (splitpack.core.compile.recording); its recording/compilation happens in the first,
    untimed call and is reported."""
    model = model if model is not None else create_model(model_name)
    model = model.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
    split = wrap(model, merge_layer, grid, mode, compile=compile)
    with torch.inference_mode():
        ref = model(x)
        out = split(x)
    meter, meter_name = peak_meter_for(split.compile_mode, device)
    baseline_peak = meter(model, x)
    split_peak = meter(split, x)
    baseline_ms, split_ms = latencies_ms([model, split], x, repeats)
    cost = split.cost(x.shape, dtype) if mode == "exact" else None
    return {
        "model": model_name,
        "size": size,
        "batch_size": batch_size,
        "merge_layer": split.plan.merge_layer_text,
        "grid": split.plan.grid_text,
        "mode": mode,
        "device": str(x.device),
        "dtype": str(dtype).replace("torch.", ""),
        "baseline_peak_bytes": baseline_peak,
        "split_peak_bytes": split_peak,
        "memory_ratio": baseline_peak / split_peak,
        "max_abs_error": (out.float() - ref.float()).abs().max().item(),
        "output_scale": ref.float().abs().max().item(),
        "baseline_ms": baseline_ms,
        "split_ms": split_ms,
        "latency_ratio": split_ms / baseline_ms,
        "macs_unsplit": cost["macs_unsplit"] if cost else None,
        "macs_split": cost["macs_split"] if cost else None,
        "macs_ratio": cost["macs_ratio"] if cost else None,
        "stages": cost["stages"] if cost else None,  # checkpoint, grid, passes, checkpoint_bytes
        "compile": split.compile_mode,
        "compiled": split.compiled.report() if split.compiled is not None else None,
        "peak_measured_by": meter_name,
    }
