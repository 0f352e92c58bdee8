"""Peak bytes allocated from the CPU allocator during a call, from the profiler's memory events.

:mod:`splitpack.measure.meter`'s CPU tracker sees every aten op through a
``TorchDispatchMode``; code that torch.compile generates allocates its buffers
without dispatching, so the tracker cannot see them. The profiler can: with
``profile_memory=True`` it records every allocation and free of the CPU
allocator (``[memory]`` events with signed byte counts), whoever asked for it.
They are read from the profiler's raw results (``kineto_results.events()``):
the ``FunctionEvent`` list folds each allocation into the op that made it and
keeps only the unattributed ones (mostly frees) as ``[memory]`` events, which
sums to nothing useful.
The running sum of those events, at its maximum, is the peak: bytes allocated
during the call and not yet freed, so tensors that existed before the call
(parameters, the input) are not counted, as with the tracker.

It counts allocator blocks rather than tensor storages, and so also sees
temporary buffers inside kernels that go through the allocator; compare
numbers from the same meter only. CPU only (CUDA has the allocator's own
counters, :class:`splitpack.measure.meter.CudaAllocatorMeter`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_EVENT = "[memory]"


def _peak(events) -> int:
    """The running sum of the allocator's signed byte counts, in time order, at its maximum."""
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == MEMORY_EVENT)
    current = peak = 0
    for _, delta in changes:
        current += delta
        peak = max(peak, current)
    return peak


def peak_allocated_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak CPU-allocator bytes held during ``fn(*args, **kwargs)`` (under ``torch.inference_mode``),
    beyond what was allocated before the call."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
        del out
    return _peak(prof.profiler.kineto_results.events())
