"""``merge_layer: auto``: a model run with the staged plan the planner picks for each input size.

The plan for a size is resolved on the first call at that size (a server's warm-up call resolves
the model's own input size at load), logged, kept (up to :data:`PLAN_CACHE_SIZE` sizes) and
reported to ``on_plan`` listeners (the servers' metrics). ``memory_budget`` is the peak
activation memory allowed for one image: peaks grow in proportion to the batch, so the plan is
the same for every batch size.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from splitpack.core.execute.module import PLAN_CACHE_SIZE, SplitPack
from splitpack.core.compile.recording import DEFAULT_MAX_BATCH, OFF, compile_mode
from splitpack.core.plan.spec import AutoPlan
from splitpack.core.cost.time_model import INTERPRETED, PROGRAM
from splitpack.core.search.planner import MEASURED_PLANS, PlanChoice, Planner, check_max_latency, check_measure
from splitpack.errors import SplitError

log = logging.getLogger("splitpack")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class AutoSplitPack(nn.Module):
    """``model`` with split-pack inference, the plan chosen per input size (see the module docstring)."""

    def __init__(self, model: nn.Module, auto: AutoPlan, mode: str = "exact", *, compile=False,
                 cuda_graphs: bool = False, max_batch: int = DEFAULT_MAX_BATCH):
        """``compile``, ``cuda_graphs``: how each size's SplitPack runs its plan (see :func:`splitpack.wrap`)."""
        super().__init__()
        if mode != "exact":
            raise ValueError("merge_layer='auto' plans exact mode (seed mode changes outputs: choose its merge "
                             "layer after measuring accuracy)")
        check_max_latency(auto.max_latency)
        check_measure(auto.measure_latency, auto.max_latency, auto.memory_budget)  # at wrap, not at the first call
        self.model = model
        self.auto = auto
        self.mode = mode
        self.compile, self.cuda_graphs, self.max_batch = compile, cuda_graphs, max_batch
        self.__dict__["_planner"] = Planner(model)  # traces once; every size's SplitPack shares the trace
        self._packs: OrderedDict[tuple, SplitPack] = OrderedDict()
        self.choices: OrderedDict[tuple, PlanChoice] = OrderedDict()  # per (C, H, W, dtype, device), latest last
        self.on_plan: list[Callable[[PlanChoice], None]] = []

    @property
    def plan(self) -> AutoPlan:
        return self.auto

    def extra_repr(self) -> str:
        return (f"plan='auto', memory_budget={self.auto.memory_budget}, max_overhead={self.auto.max_overhead}, "
                f"max_latency={self.auto.max_latency}, measure_latency={self.auto.measure_latency}")

    def for_input(self, shape, dtype: torch.dtype | None = None, device=None) -> SplitPack:
        """The SplitPack that runs inputs of ``shape`` (N, C, H, W): planned on first use, then cached."""
        dtype = dtype or self._planner.dtype
        device = torch.device(device or next((p.device for p in self.model.parameters()), "cpu"))
        key = (tuple(int(s) for s in shape[1:]), dtype, device)
        pack = self._packs.pop(key, None)
        if pack is None:
            pack = self._resolve(key)
            while len(self._packs) >= PLAN_CACHE_SIZE:
                del self._packs[next(iter(self._packs))]
        self._packs[key] = pack
        return pack

    def _resolve(self, key: tuple) -> SplitPack:
        size, dtype, _ = key
        latency_mode = INTERPRETED if compile_mode(self.compile) == OFF else PROGRAM
        choice = self._planner.choose((1, *size), self.auto.memory_budget, self.auto.max_overhead, dtype=dtype,
                                      max_latency=self.auto.max_latency, latency_mode=latency_mode,
                                      measure=MEASURED_PLANS if self.auto.measure_latency else 0)
        latency = "" if choice.predicted_latency_ratio is None else f", {choice.predicted_latency_ratio:.3f}x latency"
        if choice.measured_latency_ratio is not None:
            latency += f" ({choice.measured_latency_ratio:.3f}x measured)"
        log.info("merge_layer=auto: input %s %s -> plan %s (predicted peak %s per image, %.3fx MACs%s; %s; "
                 "planned in %.1f s)", "x".join(map(str, size)), str(dtype).removeprefix("torch."), choice.plan,
                 _mib(choice.predicted_peak_bytes), choice.predicted_macs_ratio, latency, choice.objective,
                 choice.seconds)
        pack = SplitPack(self.model, choice.plan, mode=self.mode, compile=self.compile, cuda_graphs=self.cuda_graphs,
                         max_batch=self.max_batch, traced=self._planner.traced, **choice.execution_kwargs)
        self.choices[key] = choice
        while len(self.choices) > PLAN_CACHE_SIZE:
            del self.choices[next(iter(self.choices))]
        for listener in self.on_plan:
            listener(choice)
        return pack

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"split-pack expects an N x C x H x W image batch, got shape {tuple(x.shape)}")
        if self.model.training:
            raise SplitError("split-pack is for inference: call model.eval() (BatchNorm and dropout must not train)")
        return self.for_input(x.shape, x.dtype, x.device)(x)
