"""The one peak-memory meter: peak activation bytes of a block of code, on the CPU or a CUDA device.

``with peak_meter(device) as meter: ...`` then ``meter.peak``. Every measurement
in splitpack (bench, profile, capacity, both servers' gauges) goes through it.

* CPU (:class:`ActivationTracker`): every aten op is seen through a
  ``TorchDispatchMode``; each new tensor storage is counted while any tensor
  that uses it is alive, so the peak is the largest number of activation bytes
  alive at once. Exact, but each op pays a Python dispatch (servers only meter
  CUDA replicas for that reason).
* CUDA (:class:`CudaAllocatorMeter`): the caching allocator's own peak counter,
  relative to what was allocated on entry. Cheap; resets this process's peak
  statistics.

Storages that existed before the block (parameters, buffers, the input) are not
counted: an op output that shares storage with one of its untracked inputs is a
view of pre-existing memory.

Both meters keep per-layer *windows* for profiles: :meth:`mark` records
``(label, bytes alive now, peak since the previous mark)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from splitpack.core.cost.bytes import ByteTracker


class ActivationTracker(ByteTracker):
    """CPU meter: the core's byte tracker (splitpack.core.cost.bytes) on real tensors, whose ``peak``
    is the maximum seen, with per-layer windows.

    ``marks`` holds (label, live bytes) and ``windows`` (label, live bytes, peak
    since the previous mark) pairs recorded by :meth:`mark`, for per-layer profiles.
    """

    def __init__(self):
        super().__init__()
        self.marks: list[tuple[str, int]] = []
        self.windows: list[tuple[str, int, int]] = []
        self._window_open = False  # no op since the last mark yet

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._window_open:
            # a window starts at the layer's first op, after the caller dropped
            # what the previous layer no longer needs
            self.open_window()
            self._window_open = True
        return super().__torch_dispatch__(func, types, args, kwargs)

    def mark(self, label: str) -> None:
        window_peak = self.window_peak if self._window_open else -1
        self.marks.append((label, self.current))
        self.windows.append((label, self.current, max(window_peak, self.current)))
        self._window_open = False


class CudaAllocatorMeter:
    """CUDA meter with :class:`ActivationTracker`'s interface, from the caching allocator's counters.

    Bytes are relative to what was allocated on entry (weights and input excluded,
    like the CPU tracker).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.marks: list[tuple[str, int]] = []
        self.windows: list[tuple[str, int, int]] = []
        self._base = 0

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) - self._base

    def __enter__(self) -> "CudaAllocatorMeter":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> bool:
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, self._window())
        return False

    def _window(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device) - self._base)

    def mark(self, label: str) -> None:
        torch.cuda.synchronize(self.device)
        current, window = self.current, self._window()
        self.peak = max(self.peak, window)
        self.marks.append((label, current))
        self.windows.append((label, current, window))
        torch.cuda.reset_peak_memory_stats(self.device)


class NoMeter:
    """A meter that measures nothing (``peak`` stays None): ``peak_meter(..., enabled=False)``."""

    peak = None
    current = 0

    def __enter__(self) -> "NoMeter":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def mark(self, label: str) -> None:
        pass


Meter = ActivationTracker | CudaAllocatorMeter | NoMeter


def peak_meter(device: Any = None, enabled: bool = True) -> Meter:
    """The meter for ``device`` (a torch device, ``"cuda:1"``, None = CPU): use it as a context manager."""
    if not enabled:
        return NoMeter()
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return CudaAllocatorMeter(torch.device("cuda", index))
    return ActivationTracker()


def tensor_device(*args: Any, **kwargs: Any) -> torch.device:
    """The CUDA device of the first CUDA tensor among the arguments, else the CPU."""
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return torch.device("cpu")


def measured_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), peak activation bytes)`` under ``torch.inference_mode``.

    The meter follows the arguments' device (CUDA allocator or CPU tracker).
    """
    with torch.inference_mode(), peak_meter(tensor_device(*args, **kwargs)) as meter:
        result = fn(*args, **kwargs)
    return result, int(meter.peak)


def peak_activation_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes of tensor storage alive at the peak during ``fn(*args, **kwargs)``.

    Tensors that existed before the call (parameters, buffers, inputs) are excluded.
    """
    return measured_call(fn, *args, **kwargs)[1]
