"""What a plan costs for one batch, predicted without running it at full size: the exact peak
(splitpack.core.cost.exact_peak) and the exact MACs and ops of its program (splitpack.core.cost.counts).
The planner, the cost report (``SplitPack.cost``) and the benchmarks all read it from here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from splitpack.core.capture.graph import Shape, TracedModel
from splitpack.core.cost.counts import program_macs, program_ops, unsplit_macs
from splitpack.core.cost.exact_peak import AllocationProfile, allocation_profile, replay_peak
from splitpack.core.plan.schedule import Program, build_program, stage_graphs


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs for one batch, predicted without running it at full size."""

    peak_bytes: int | None  # peak activation bytes (the replay); None where only the counts were asked for
    macs: int  # convolution and linear MACs, halo recompute and extra passes included
    unsplit_macs: int
    ops: int  # ops executed (every step of every pack and pass, global values, the rest of the network)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.unsplit_macs if self.unsplit_macs else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"predicted_peak_bytes": self.peak_bytes, "macs": self.macs, "unsplit_macs": self.unsplit_macs,
                "macs_ratio": self.macs_ratio, "ops": self.ops}

    @classmethod
    def of_program(cls, traced: TracedModel, program: Program, shapes: dict[fx.Node, Shape],
                   last: fx.Node | tuple[fx.Node, ...], batch: int, peak_bytes: int | None = None) -> "PlanCost":
        """The counts of ``program`` (its last checkpoint ``last``: a node or a cut's nodes) for a batch of ``batch``."""
        rest = traced.rest(last)
        return cls(peak_bytes, program_macs(traced, program, shapes, rest) * batch,
                   unsplit_macs(traced, shapes) * batch, program_ops(program, rest))


def plan_cost(traced: TracedModel, plan, shape, dtype: torch.dtype | None = None,
              profile: tuple[AllocationProfile, dict] | None = None, program: Program | None = None,
              halo: str = "reuse", batch_packs: bool | int = False) -> PlanCost:
    """The cost of ``plan`` (a splitpack.core.plan.spec.Plan) for inputs of ``shape`` (N, C, H, W).
    ``profile``: :func:`allocation_profile`'s result for this size, ``program``: the plan's program at
    this size and dtype, when the caller has them; ``halo``, ``batch_packs``: as
    :func:`splitpack.core.plan.schedule.build_program` takes them (for the program built here)."""
    dtype = dtype or traced.dtype
    allocations, shapes = profile or allocation_profile(traced, shape, dtype)
    program = program or build_program(traced, stage_graphs(traced, plan), shapes, dtype, halo, batch_packs)
    last = traced.cut(plan.stages[-1].checkpoint)
    return PlanCost.of_program(traced, program, shapes, last, shape[0],
                               replay_peak(traced, program, allocations, shape[0], shapes, last))
