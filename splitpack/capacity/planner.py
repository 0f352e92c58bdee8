"""Plan replicas per GPU, unsplit and with split-pack: measure candidates, rank them, recommend one.

Each configuration (unsplit, or a plan: merge layers x grids x mode) is measured in this
process and turned into a per-replica footprint (:mod:`splitpack.capacity.footprint`,
where the formula lives); replicas = floor((gpu_memory - headroom) / replica_bytes).
Without explicit merge layers the split candidates are the staged plans the planner
(:mod:`splitpack.core.search.planner`) chooses within a few MACs caps (:data:`PLANNED_CAPS`):
the smallest predicted peak, so the most replicas, for each compute budget. Seed mode
(outputs change, the more the deeper the merge) is only measured at layers given
explicitly. The recommendation is the split candidate with the most replicas (then the
lowest measured latency ratio, exact before seed), or unsplit when none fits more.

With ``measure_replicas`` (GPU) each configuration also runs as its own process
(:mod:`splitpack.capacity.probe`) and NVML's per-process bytes replace the model.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from splitpack.models import ModelSpec, build_model
from splitpack.capacity.footprint import (ALLOCATOR_SLACK_SOURCE, CONTEXT_OVERHEAD_SOURCE, DEFAULT_ALLOCATOR_SLACK,
                                          DEFAULT_CONTEXT_OVERHEAD, LIBTORCH, PYTHON, Footprint, Measurement,
                                          footprint, measure, replicas_that_fit, shared_bytes)
from splitpack.capacity.pod import GpuPod
from splitpack.capacity.timeout import response_timeout
from splitpack.core.plan.spec import grid_text

FORMULAS = {
    PYTHON: "replicas = floor((gpu_memory_bytes - headroom_bytes) / replica_bytes)",
    LIBTORCH: "replicas = floor((gpu_memory_bytes - headroom_bytes - shared_bytes) / (replica_bytes - shared_bytes)), "
              "shared_bytes = context_overhead (+ weights with weight sharing): one process for all instances",
}
PLANNED_CAPS = (1.25, 1.1, 1.5, 2.0)  # MACs caps (split / unsplit) whose planned plans are measured, in this order


@dataclass
class PlanInputs:
    model: str  # the model's name in the plan (a timm name, or the user's class)
    size: int
    batch_size: int
    gpu_memory_bytes: int
    gpu_memory_source: str
    headroom_bytes: int
    merge_layers: list[str] | None = None
    grids: list[tuple[int, int]] = field(default_factory=lambda: [(2, 2)])
    modes: list[str] = field(default_factory=lambda: ["exact"])
    max_candidates: int = 3
    context_overhead_bytes: int = DEFAULT_CONTEXT_OVERHEAD
    context_overhead_source: str = CONTEXT_OVERHEAD_SOURCE
    allocator_slack: float = DEFAULT_ALLOCATOR_SLACK
    repeats: int = 3
    max_latency_ratio: float | None = None
    device: str = "cpu"
    measure_replicas: bool = False  # GPU: measure each configuration as a separate replica process (NVML)
    backend: str = PYTHON  # splitpack.capacity.footprint.BACKENDS: what one replica shares with the others
    weight_sharing: bool = False  # libtorch: the instances share one copy of the weights
    model_spec: ModelSpec | None = None  # how to build the model (default: the timm/torchvision name ``model``)
    model_flags: tuple[str, ...] = ()  # the model as `splitpack replica-probe` flags (default: --model NAME)
    pod: GpuPod = field(default_factory=GpuPod)  # what one GPU pod gives its workers: cores and host memory

    def replicas(self, replica_bytes: int, shared: int = 0) -> int:
        return replicas_that_fit(self.gpu_memory_bytes, self.headroom_bytes, replica_bytes, shared)

    def shared(self, fp: Footprint) -> int:
        return shared_bytes(fp, self.backend, self.weight_sharing)


@dataclass
class Candidate:
    merge_layer: str | None  # None = unsplit; a comma list for a staged plan
    grid: str | None  # one grid per stage
    mode: str | None
    footprint: Footprint
    replicas: int
    latency_s: float | None
    latency_ratio: float | None
    estimated_peak_bytes: int | None = None
    measured_by: str = "cpu-activation-tracker"
    # a real replica process measured by NVML (--measure-replicas on a GPU) replaces the model
    measured_replica_bytes: int | None = None

    @property
    def replica_bytes(self) -> int:
        return self.measured_replica_bytes if self.measured_replica_bytes is not None else self.footprint.total

    def key(self) -> dict[str, Any]:
        return {"merge_layer": self.merge_layer, "grid": self.grid, "mode": self.mode}

    def to_dict(self) -> dict[str, Any]:
        return self.key() | {"replica_bytes": self.replica_bytes, "replicas": self.replicas,
                             "latency_s": self.latency_s, "latency_ratio": self.latency_ratio,
                             "peak_activation_bytes": self.footprint.peak_activation_bytes,
                             "estimated_peak_bytes": self.estimated_peak_bytes, "measured_by": self.measured_by,
                             "measured_replica_bytes": self.measured_replica_bytes,
                             "footprint": self.footprint.to_dict()}


def rank_split(candidates: list[Candidate], max_latency_ratio: float | None = None) -> list[Candidate]:
    """Best first: most replicas, then lowest latency ratio, exact before seed, then smallest footprint."""
    ok = [c for c in candidates
          if max_latency_ratio is None or c.latency_ratio is None or c.latency_ratio <= max_latency_ratio]
    return sorted(ok, key=lambda c: (-c.replicas, c.latency_ratio if c.latency_ratio is not None else math.inf,
                                     c.mode != "exact", c.replica_bytes))


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _candidate(p: PlanInputs, key: tuple, m: Measurement, base_latency: float | None,
               estimate: int | None = None) -> Candidate:
    fp = footprint(m, p.context_overhead_bytes, p.allocator_slack)
    ratio = (m.latency_s / base_latency) if (m.latency_s is not None and base_latency) else None
    return Candidate(*key, fp, p.replicas(fp.total, p.shared(fp)), m.latency_s, ratio, estimate, m.measured_by)


def _split_keys(p: PlanInputs, model, x, mode: str, notes: list[str]) -> list[tuple[tuple, int | None]]:
    """((merge layer(s), grid(s), mode), predicted peak) of each split configuration to measure in ``mode``."""
    import splitpack

    if p.merge_layers:
        valid = list(splitpack.merge_layers(model, mode=mode)) if mode == "exact" else list(splitpack.merge_layers(model))
        notes += [f"{n}: not a valid merge layer for mode={mode}; skipped" for n in p.merge_layers if n not in valid]
        return [((n, grid_text(g), mode), None) for g in p.grids for n in p.merge_layers if n in valid]
    if mode != "exact":
        # memory alone would merge as late as possible, where the seams cost the most accuracy
        notes.append("seed mode changes outputs, and how much depends on the merge layer: measure the accuracy "
                     "of the layers you consider and pass them with --merge-layers; seed candidates skipped")
        return []
    return _planned_keys(p, model, x, notes)


def _planned_keys(p: PlanInputs, model, x, notes: list[str]) -> list[tuple[tuple, int | None]]:
    """The planner's plans (smallest predicted peak) within the first ``max_candidates`` MACs caps."""
    from splitpack.core.search.planner import Planner

    planner, keys = Planner(model), {}
    for cap in PLANNED_CAPS[:p.max_candidates]:
        try:
            choice = planner.choose(tuple(x.shape), max_overhead=cap)
        except ValueError as e:
            notes.append(f"planner, {cap:g}x MACs: {e}")
            continue
        key = (choice.plan.merge_layer_text, choice.plan.grid_text, "exact")
        keys.setdefault(key, choice.predicted_peak_bytes)
    return list(keys.items())


def _measure_split(p: PlanInputs, model, x, base: Measurement, notes: list[str], quiet: bool) -> list[Candidate]:
    """Every split candidate the inputs ask for (or the planner picks), measured."""
    import splitpack

    every = list(splitpack.merge_layers(model))
    unknown = [n for n in p.merge_layers or () if n not in every]
    if unknown:
        raise ValueError(f"unknown merge layer(s) {', '.join(map(repr, unknown))} for {p.model}; "
                         f"valid merge layers (execution order): {', '.join(every)}")
    candidates: list[Candidate] = []
    for mode in p.modes:
        for key, predicted in _split_keys(p, model, x, mode, notes):
            name, grid, _ = key
            _log(f"measuring split at {name} ({grid}, {mode})", quiet)
            try:
                m = measure(splitpack.wrap(model, merge_layer=name, grid=grid, mode=mode), x, p.repeats)
            except (splitpack.SplitError, ValueError, RuntimeError) as e:
                # one candidate the engine cannot run must not sink the whole plan
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                notes.append(f"{name} {grid} {mode}: cannot split ({first})")
                continue
            candidates.append(_candidate(p, key, m, base.latency_s, predicted))
    return candidates


def _recommend(unsplit: Candidate, best: Candidate | None) -> tuple[Candidate, str]:
    if best is not None and best.replicas > unsplit.replicas:
        reason = (f"{best.replicas} replicas instead of {unsplit.replicas} unsplit"
                  + (f" at {best.latency_ratio:.2f}x latency" if best.latency_ratio is not None else "")
                  + ("; seed mode: outputs differ from the unsplit model, check accuracy before deploying"
                     if best.mode == "seed" else ""))
        return best, reason
    return unsplit, ("no split-pack candidate fits more replicas than unsplit" if best is not None
                     else "no split-pack candidate could be measured")


def plan_capacity(p: PlanInputs, quiet: bool = False) -> dict[str, Any]:
    """Measure unsplit and split candidates for ``p`` and return the plan (the JSON document)."""
    import splitpack

    device = torch.device(p.device)
    model = (build_model(p.model_spec) if p.model_spec else splitpack.create_model(p.model)).to(device)
    x = torch.randn(p.batch_size, 3, p.size, p.size, device=device)
    notes: list[str] = []

    _log(f"measuring {p.model} @{p.size} batch {p.batch_size} unsplit on {device}", quiet)
    base = measure(model, x, p.repeats)
    unsplit = _candidate(p, (None, None, None), base, base.latency_s)
    candidates = _measure_split(p, model, x, base, notes, quiet)
    if p.measure_replicas:
        from splitpack.capacity.probe import measure_replica_process

        for c in [unsplit] + candidates:
            _log(f"probing a real replica: {c.key()}", quiet)
            measure_replica_process(c, p, notes)

    ranked = rank_split(candidates, p.max_latency_ratio)
    best = ranked[0] if ranked else None
    recommended, reason = _recommend(unsplit, best)
    notes = list(dict.fromkeys(notes))  # once per note, however many grids repeated it
    if device.type == "cpu":
        notes.append("activations and latency measured on the CPU: GPU replica counts are a plan, "
                     "to be checked with scripts/validate_capacity_gpu.py")
    return {
        "model": p.model, "size": p.size, "batch_size": p.batch_size, "device": str(device),
        "gpu_memory_bytes": p.gpu_memory_bytes, "gpu_memory_source": p.gpu_memory_source,
        "headroom_bytes": p.headroom_bytes, "usable_bytes": p.gpu_memory_bytes - p.headroom_bytes,
        "backend": p.backend, "weight_sharing": p.weight_sharing,
        "shared_bytes": p.shared(unsplit.footprint),  # the same for every candidate (same weights)
        "replica_bytes_unsplit": unsplit.replica_bytes,
        "replica_bytes_split": best.replica_bytes if best else None,
        "replicas_unsplit": unsplit.replicas,
        "replicas_split": best.replicas if best else None,
        "latency_ratio": best.latency_ratio if best else None,
        "best_split": best.key() if best else None,
        "recommended": recommended.key() | {"replicas": recommended.replicas,
                                            "replica_bytes": recommended.replica_bytes,
                                            "latency_ratio": recommended.latency_ratio, "reason": reason},
        "unsplit": unsplit.to_dict(),
        "candidates": [c.to_dict() for c in ranked] + [c.to_dict() for c in candidates if c not in ranked],
        "assumptions": {
            "context_overhead_bytes": p.context_overhead_bytes,
            "context_overhead_source": p.context_overhead_source,
            "allocator_slack": p.allocator_slack,
            "allocator_slack_source": ALLOCATOR_SLACK_SOURCE,
            "activations_measured_by": base.measured_by,
            "dtype": "float32",
            "latency_repeats": p.repeats,
            "max_latency_ratio": p.max_latency_ratio,
            "formula": FORMULAS[p.backend],
        },
        "notes": notes,
    } | p.pod.plan_keys(recommended.replicas) | response_timeout(
        recommended.latency_s, f"median of {p.repeats} call(s) of batch {p.batch_size} on {device}"
                               + (" (an upper bound for a GPU)" if device.type == "cpu" else ""))
