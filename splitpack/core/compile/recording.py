"""Plan compilation: each input size's program, run once by the interpreter, recorded into a straight-line program.

The interpreter (:mod:`splitpack.core.execute.executor`) decides at run time, op by op,
what to cut, pad, compute, accumulate, write into a band and free; for one input
size all of it is fixed. :func:`record` runs the interpreter (and the rest of the
network after the last checkpoint) and keeps what it did (:mod:`splitpack.core.compile.tape`):
an fx ``GraphModule`` of aten calls in exactly the interpreter's order -- the
demand-driven interleaving of stages and passes, band allocation, the ``copy_``
of each pack's tile into its band, partial reductions, globals, the tail. Its
generated Python drops every value right after its last use; the interpreter
frees at the same points or later (it releases a band after the pack that read
it last, the program right after that read), so the program's peak memory is
at most the interpreter's.

Height, width, dtype, device and memory format are fixed in a program, the batch
size is not: one program serves every batch of an input size, like the plan it
comes from. :class:`CompiledPlans` caches programs per size and can run them
through ``torch.compile`` (:data:`MODES`); CUDA graphs are in
:mod:`splitpack.core.compile.cudagraphs`.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx

from splitpack.core.compile.modes import INDUCTOR, MODES, OFF, PROGRAM, compile_mode  # noqa: F401 (re-exported)
from splitpack.core.compile.tape import memory_format, record_batch_free

if TYPE_CHECKING:
    from splitpack.core.execute.module import SplitPack

DEFAULT_MAX_BATCH = 8  # the largest CUDA-graph batch bucket when the caller does not know its largest batch


def size_key(x: torch.Tensor) -> tuple:
    """What a recorded program is specific to: everything about the input but its batch size."""
    return tuple(x.shape[1:]), x.dtype, x.device, memory_format(x) == torch.channels_last


def record(split: "SplitPack", x: torch.Tensor) -> fx.GraphModule:
    """The straight-line program of ``split`` (exact mode) for inputs of ``x``'s size, any batch size:
    the interpreter's run, plan and rest of the network, recorded op by op (:mod:`splitpack.core.compile.tape`).
    ``x`` is only looked at; the recording runs on zeros."""
    if split.mode != "exact":
        raise ValueError("compiled programs are recorded from exact mode's plan; seed mode is interpreted")
    split.program(x.shape, x.dtype, x.device)  # built outside the recording (shape propagation is not replayed)
    with torch.no_grad():
        return record_batch_free(split.interpret, x)


@dataclass
class CompiledPlan:
    """One input size's program, and what it cost to make."""

    graph: fx.GraphModule  # the recorded straight-line program
    run: Callable[[torch.Tensor], Any]  # graph, or graph through torch.compile
    record_s: float
    first_call_s: dict[int, float] = field(default_factory=dict)  # batch -> seconds of its first call

    @property
    def ops(self) -> int:
        return sum(1 for n in self.graph.graph.nodes if n.op == "call_function")


class CompiledPlans:
    """A SplitPack's compiled programs, one per input size (LRU, like its plans)."""

    def __init__(self, split: "SplitPack", mode: str, capacity: int = 8, compile_options: dict | None = None):
        if compile_mode(mode) == OFF:
            raise ValueError("CompiledPlans needs compile mode 'program' or 'inductor'")
        self.split, self.mode, self.capacity = split, compile_mode(mode), capacity
        self.compile_options = dict(compile_options or {})
        self._plans: OrderedDict[tuple, CompiledPlan] = OrderedDict()

    def __call__(self, x: torch.Tensor) -> Any:
        plan = self.plan(x)
        if x.shape[0] in plan.first_call_s:
            return plan.run(x)
        start = time.perf_counter()
        out = plan.run(x)
        plan.first_call_s[x.shape[0]] = time.perf_counter() - start  # torch.compile compiles here
        return out

    def plan(self, x: torch.Tensor) -> CompiledPlan:
        key = size_key(x)
        plan = self._plans.pop(key, None)
        if plan is None:
            start = time.perf_counter()
            graph = record(self.split, x)
            plan = CompiledPlan(graph, self._runner(graph), time.perf_counter() - start)
            while len(self._plans) >= self.capacity:
                self._plans.popitem(last=False)
        self._plans[key] = plan
        return plan

    def _runner(self, graph: fx.GraphModule) -> Callable:
        if self.mode == PROGRAM:
            return graph
        return torch.compile(graph, **self.compile_options)

    def report(self) -> list[dict]:
        """Per cached size: recording seconds, op count, first-call seconds per batch (compilation included)."""
        return [{"size": list(key[0]), "dtype": str(key[1]).removeprefix("torch."), "device": str(key[2]),
                 "channels_last": key[3], "mode": self.mode, "ops": plan.ops, "record_s": plan.record_s,
                 "first_call_s": dict(plan.first_call_s)} for key, plan in self._plans.items()]
