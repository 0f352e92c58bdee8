"""The one byte tracker: bytes of tensor storage alive op by op while code runs, real or fake tensors.

The exact peak's reference run (splitpack.core.cost.exact_peak), the allocation profile it replays,
and the CPU meter of every measurement (splitpack.measure.meter) all count with it.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (fake and meta storages all have data pointer 0)."""
    return StorageWeakRef(t.untyped_storage()).cdata


class ByteTracker(TorchDispatchMode):
    """Bytes of op-created storages alive op by op, for real or fake tensors.

    A storage counts from the op that creates it until no tensor uses it; an output that shares
    storage with an input it did not create (a view of a parameter or of the input) is not counted.
    ``window_peak`` is the peak since :meth:`open_window`.
    """

    def __init__(self, fake_mode: FakeTensorMode | None = None):
        """``fake_mode``: the fake-tensor mode the code runs in, which holds real inputs (parameters) as
        fake copies: a view of one is a view of that copy's storage. Without it, fake and meta
        tensors are shape inference (they allocate nothing) and only real tensors count."""
        super().__init__()
        self.fake_mode = fake_mode
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0
        self.window_peak = 0

    def open_window(self) -> None:
        self.window_peak = self.current

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, input_keys: set[int]) -> None:
        key = storage_key(t)
        entry = self.live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            if key in input_keys or not nbytes:
                return
            entry = self.live[key] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.window_peak = max(self.window_peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _counted(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.device.type != "meta" and not value.is_sparse \
            and (self.fake_mode is not None or not isinstance(value, FakeTensor))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if self._counted(a)]
        input_keys = {storage_key(a) for a in inputs}
        if self.fake_mode is not None:
            input_keys |= {storage_key(self.fake_mode.from_tensor(a)) for a in inputs if not isinstance(a, FakeTensor)}
        for t in tree_flatten(out)[0]:
            if self._counted(t):
                self._track(t, input_keys)
        return out
