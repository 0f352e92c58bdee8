"""Peak activation memory of a call.

On CPU every aten op is seen through a ``TorchDispatchMode``: each new tensor
storage is counted while any tensor that uses it is alive, so the peak is the
largest number of activation bytes alive at once. On CUDA the caching
allocator's own peak counter is used.

Storages that existed before the call (parameters, buffers, the input) are not
counted: an op output that shares storage with one of its untracked inputs is a
view of pre-existing memory.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class _Live:
    nbytes: int
    refs: int = 0


@dataclass
class ActivationTracker(TorchDispatchMode):
    """Tracks live activation bytes op by op; ``peak`` is the maximum seen.

    ``marks`` holds (label, live_bytes) pairs recorded by :meth:`mark`, used for
    per-layer profiles.
    """

    live: dict[int, _Live] = field(default_factory=dict)
    preexisting: set[int] = field(default_factory=set)
    current: int = 0
    peak: int = 0
    marks: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs == 0:
            self.current -= entry.nbytes
            del self.live[key]

    def _track(self, t: torch.Tensor, input_keys: set[int]) -> None:
        if t.device.type == "meta" or isinstance(t, FakeTensor) or not t.untyped_storage().nbytes():
            return  # shape inference (fake tensors) allocates nothing
        key = _storage_key(t)
        if key in self.preexisting:
            return
        entry = self.live.get(key)
        if entry is None:
            if key in input_keys:  # a view of memory that existed before the call
                self.preexisting.add(key)
                return
            entry = self.live[key] = _Live(t.untyped_storage().nbytes())
            self.current += entry.nbytes
            self.peak = max(self.peak, self.current)
        entry.refs += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, _ = tree_flatten((args, kwargs))
        input_keys = {_storage_key(a) for a in inputs
                      if isinstance(a, torch.Tensor) and a.device.type != "meta" and not isinstance(a, FakeTensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, input_keys)
        return out

    def mark(self, label: str) -> None:
        self.marks.append((label, self.current))


def _cuda_device(args: tuple) -> torch.device | None:
    for a in tree_flatten(args)[0]:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def peak_activation_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes of tensor storage alive at the peak during ``fn(*args, **kwargs)``.

    Tensors that existed before the call (parameters, buffers, inputs) are
    excluded. Runs under ``torch.inference_mode``. CPU: tracked per aten op.
    CUDA: the allocator's peak above what was allocated before the call.
    """
    device = _cuda_device((args, kwargs))
    with torch.inference_mode():
        if device is not None:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            result = fn(*args, **kwargs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del result
            return peak
        tracker = ActivationTracker()
        with tracker:
            result = fn(*args, **kwargs)
        del result
        return tracker.peak


def tracked_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``fn(*args)`` on CPU with its peak activation bytes; the result is returned too."""
    tracker = ActivationTracker()
    with torch.inference_mode(), tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak
