"""Keep freed memory in the C heap while timing, so that a timing measures the model, not the page faults.

glibc's malloc serves a block above its mmap threshold (128 KiB, raised as large blocks are freed, 32 MiB
at most) with a fresh ``mmap`` and gives freed memory at the heap's top back to the OS: a model whose
activations are large touches fresh pages, and pays a page fault for each, on every call. Measured on this
project's 2-core box (AMD EPYC, 2 torch threads): the unsplit ResNet-50 @1024 took 2.08 s with 670k minor
faults per call, 1.13 s with none; MobileNetV2 @224 17 -> 12.6 ms. Split plans allocate small packs that
stay in the heap, so the default allocator makes them look faster against the unsplit model than they are.
Benchmarks therefore time with both thresholds fixed high (:func:`keep_freed_memory`, what
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do from the environment, and what jemalloc or
tcmalloc give a server); the process then keeps its high-water mark of heap (ResNet-50 @1024 unsplit: +8%
max RSS).
"""
from __future__ import annotations

import ctypes
import ctypes.util

from splitpack.core.cost.faults import minor_faults

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes: no block is mmapped alone, no heap top trimmed
HEAP_MODES = ("kept", "default")
HEAP_HELP = ("kept: glibc keeps freed memory for reuse (no page faults per call, for either model); default: "
             "glibc's adaptive thresholds (splitpack.measure.heap)")  # the benchmarks' --heap
__all__ = ["HEAP_HELP", "HEAP_MODES", "faults_per_allocation", "keep_freed_memory", "minor_faults", "set_heap"]


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at :data:`KEEP_BYTES` for this process (no longer adapted as blocks
    are freed): large tensors come from the heap and freed ones are reused, not returned to the OS. Returns
    whether both took effect (False with another C library, where nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) & bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def set_heap(mode: str) -> bool:
    """Apply a benchmark's ``--heap`` mode: "kept" (:func:`keep_freed_memory`) or "default" (glibc's adaptive
    thresholds, as a server runs unless told otherwise). Returns whether the heap is kept."""
    if mode not in HEAP_MODES:
        raise ValueError(f"heap mode must be one of {HEAP_MODES}, got {mode!r}")
    return keep_freed_memory() if mode == "kept" else False


def faults_per_allocation(nbytes: int, calls: int = 6) -> int:
    """The fewest minor page faults of ``calls`` allocations of a ``nbytes`` tensor, each written whole and
    freed: about ``nbytes / page size`` where the heap gives every large block back (glibc's default above
    its mmap threshold), 0 where it keeps them (:func:`keep_freed_memory`; it settles after a call or two,
    once a freed block is the heap's own)."""
    import torch

    counts = []
    for _ in range(calls):
        start = minor_faults()
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        counts.append(minor_faults() - start)
    return min(counts)
