"""What a split-pack plan says, and the one parser of its text forms.

A plan is a sequence of *stages*, each ending at a checkpoint (a merge layer:
a module name) with its own grid of packs. Stage 1 runs packs of the image up
to checkpoint 1; stage 2 runs packs of that merged activation up to checkpoint
2; whatever follows the last checkpoint runs once. A single merge layer is a
one-stage plan.

Text forms, accepted everywhere (Python API, CLI, model-config.yaml, config.pbtxt):

* merge layer: ``"layer2"``, ``"layer2,global_pool"`` or a list of names;
  ``""``/``"none"``/None = unsplit; ``"auto"`` = let the planner choose.
  A checkpoint may be a *cut*: module outputs joined with ``+`` that together are everything the
  rest of the network needs, e.g. HRNet's parallel branches
  ``"stage2.0.branches.0+stage2.0.branches.1"`` (``"stem,stage2.0.branches.0+stage2.0.branches.1"``
  is a two-stage plan; ``str(plan)`` writes such a stage ``"a+b@4x4"``). Each value of a cut is written band by
  band with the stage's grid laid over its own extent.
* grid: ``2``, ``"2"``, ``"2x3"``, ``(2, 3)`` for one grid; ``"4x4,2x2"`` or
  ``[4, 2]`` / ``["4x4", (2, 3)]`` for one grid per stage. One grid for a
  multi-stage plan applies to every stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Grid = tuple[int, int]
AUTO = "auto"
CUT_JOIN = "+"  # joins the module names of a cut checkpoint
UNSPLIT_WORDS = ("", "none", "null", "unsplit")


def parse_grid(value: Any) -> Grid:
    """One grid: ``2``, ``"2"``, ``"2x3"``, ``(2, 3)``, ``[2, 3]`` -> ``(rows, cols)``; ValueError otherwise."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.lower().replace("*", "x").split("x")]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (tuple, list)) and len(value) in (1, 2):
        parts = list(value)
    else:
        raise ValueError(f"grid: expected 'RxC' (e.g. '2x2'), N or a pair of integers, got {value!r}")
    if len(parts) == 1:
        parts = parts * 2
    try:
        if len(parts) != 2 or any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
        rows, cols = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"grid: expected 'RxC' with positive integers (e.g. '2x2'), got {value!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"grid: must be at least 1x1, got {value!r}")
    return rows, cols


def grid_text(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


@dataclass(frozen=True)
class Stage:
    checkpoint: str  # module name, or names joined by "+" (a cut): the stage runs packs up to and including it
    grid: Grid

    @property
    def members(self) -> tuple[str, ...]:
        """The module names of the checkpoint (several for a cut)."""
        return tuple(self.checkpoint.split(CUT_JOIN))

    def __str__(self) -> str:
        return f"{self.checkpoint}@{grid_text(self.grid)}"


@dataclass(frozen=True)
class Plan:
    """A staged split-pack plan: small, hashable, inspectable (``str(plan)`` = ``"layer2@4x4,global_pool@2x2"``)."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        names = [s.checkpoint for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"merge_layer: a checkpoint appears twice in {', '.join(names)}")

    @property
    def checkpoints(self) -> list[str]:
        return [s.checkpoint for s in self.stages]

    @property
    def grids(self) -> list[Grid]:
        return [s.grid for s in self.stages]

    @property
    def merge_layer_text(self) -> str:
        return ",".join(self.checkpoints)

    @property
    def grid_text(self) -> str:
        return ",".join(grid_text(g) for g in self.grids)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.stages)

    def to_dict(self) -> dict:
        return {"stages": [{"checkpoint": s.checkpoint, "grid": grid_text(s.grid)} for s in self.stages]}


@dataclass(frozen=True)
class AutoPlan:
    """``merge_layer: auto``: the planner picks the plan per input size (within the budget or overhead cap)."""

    memory_budget: int | None = None  # bytes of peak activation memory, or None
    max_overhead: float | None = None  # MACs ratio cap (split / unsplit), or None for the planner default
    max_latency: float | None = None  # predicted latency ratio cap (split / unsplit on this device), or None
    measure_latency: bool = False  # with max_latency: candidate plans timed on the device, the measured ratio kept

    def __str__(self) -> str:
        return AUTO


def _checkpoint_name(text: str) -> str:
    """A checkpoint's name with the spaces around a cut's ``+`` removed; ValueError for an empty member."""
    members = [m.strip() for m in text.split(CUT_JOIN)]
    if len(members) > 1 and not all(members):
        raise ValueError(f"merge_layer: empty module name in the cut {text.strip()!r} (names joined by '+')")
    return CUT_JOIN.join(members)


def _names(merge_layer: Any) -> list[str]:
    if isinstance(merge_layer, str):
        return [_checkpoint_name(n) for n in merge_layer.split(",")]
    if isinstance(merge_layer, Sequence) and all(isinstance(n, str) for n in merge_layer):
        return [_checkpoint_name(n) for n in merge_layer]
    raise ValueError(f"merge_layer: expected a module name, a comma list or a list of names, got {merge_layer!r}")


def _grids(grid: Any, stages: int) -> list[Grid]:
    if isinstance(grid, str) and "," in grid:
        items: list[Any] = [g for g in grid.split(",")]
    elif isinstance(grid, (list, tuple)) and stages > 1 and len(grid) == stages:
        items = list(grid)
    elif isinstance(grid, list) and grid and all(isinstance(g, (str, list, tuple)) for g in grid):
        items = list(grid)
    else:
        return [parse_grid(grid)] * stages
    if len(items) == 1:
        return [parse_grid(items[0])] * stages
    if len(items) != stages:
        raise ValueError(f"grid: {len(items)} grids given for a plan of {stages} stage(s); give one grid, "
                         f"or one per merge layer")
    return [parse_grid(g) for g in items]


def parse_plan(merge_layer: Any, grid: Any = (2, 2), *, memory_budget: int | None = None,
               max_overhead: float | None = None, max_latency: float | None = None,
               measure_latency: bool = False) -> Plan | AutoPlan | None:
    """The plan a (merge_layer, grid) setting describes: a Plan, an AutoPlan, or None (unsplit).

    Checks the syntax only; whether the checkpoints exist in a model is the engine's question.
    """
    if isinstance(merge_layer, (Plan, AutoPlan)):
        return merge_layer
    if merge_layer is None or (isinstance(merge_layer, str) and merge_layer.strip().lower() in UNSPLIT_WORDS):
        return None
    if isinstance(merge_layer, str) and merge_layer.strip().lower() == AUTO:
        return AutoPlan(memory_budget, max_overhead, max_latency, measure_latency)
    names = _names(merge_layer)
    if any(not n for n in names):
        raise ValueError(f"merge_layer: empty name in {merge_layer!r}")
    if AUTO in (n.lower() for n in names):
        raise ValueError("merge_layer: 'auto' cannot be combined with named merge layers")
    grids = _grids(grid, len(names))
    return Plan(tuple(Stage(n, g) for n, g in zip(names, grids)))
