"""Split-pack execution: run the head one pack at a time, merge, run the tail once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from splitpack.errors import SplitError
from splitpack.core.graph import TracedModel, describe_op, module_path, node_shapes, split_graph, trace
from splitpack.core.rules import NCHW, NoRule, OpContext, Region, Rule, make_rule

MODES = ("exact", "seed")
PLAN_CACHE_SIZE = 8  # image sizes whose plans are kept (native-resolution serving sees many)


def parse_grid(grid) -> tuple[int, int]:
    """``2``, ``(2, 3)``, ``"2x3"`` or ``"2"`` -> (rows, cols)."""
    if isinstance(grid, str):
        parts = grid.lower().replace(",", "x").split("x")
        grid = tuple(int(p) for p in parts) if len(parts) == 2 else int(parts[0])
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    return rows, cols


def bounds(size: int, parts: int) -> list[int]:
    """Split ``size`` into ``parts`` near-equal intervals; returns the boundaries."""
    return [size * i // parts for i in range(parts + 1)]


# --------------------------------------------------------------------------- exact plan

@dataclass
class ExactPlan:
    """Rules for every input-dependent node the merge activation needs, for one input size."""

    nodes: list[fx.Node]  # execution order, ends with the merge node
    rules: dict[fx.Node, Rule]
    shapes: dict[fx.Node, torch.Size]
    layouts: dict[fx.Node, tuple[int, int]]
    consts: list[fx.Node]  # input-independent nodes the head needs (parameters, constants)
    users: dict[fx.Node, int]  # how many plan nodes read each node


def _unsplittable(traced: TracedModel, node: fx.Node, reason: str, merge_layer: str) -> SplitError:
    path = module_path(node) or "<model>"
    before = [n for n, out in traced.merge_nodes.items() if traced.index[out] < traced.index[node]]
    latest = exact_capable_before(traced, before)
    hint = f"the latest merge layer before it that exact mode supports is {latest!r}" if latest else \
        "no merge layer before it is supported in exact mode"
    return SplitError(
        f"exact split-pack cannot merge at {merge_layer!r}: op {describe_op(node, traced.gm)} "
        f"at module {path!r} ({node.name}) cannot be split: {reason}; {hint}; seed mode runs it per pack"
    )


def build_plan(traced: TracedModel, merge_node: fx.Node, shapes: dict[fx.Node, torch.Size]) -> ExactPlan:
    """Raises NoRule (with ``.node`` set) at the first op that cannot be split."""
    nodes = traced.ancestors(merge_node)
    ctx = OpContext(traced.gm, shapes, {traced.input_node: NCHW}, set(nodes))
    rules = {}
    for node in nodes[1:]:
        try:
            rule = make_rule(node, ctx)
        except NoRule as err:
            err.node = node
            raise
        rules[node] = rule
        ctx.layouts[node] = rule.layout
    plan_set = set(nodes)
    consts, seen = [], set()

    def add_const(n: fx.Node):
        if n in seen or n in plan_set:
            return
        seen.add(n)
        for p in n.all_input_nodes:
            add_const(p)
        consts.append(n)

    users: dict[fx.Node, int] = {}
    for node in nodes[1:]:
        for p in node.all_input_nodes:
            users[p] = users.get(p, 0) + 1
            add_const(p)
    return ExactPlan(nodes, rules, shapes, ctx.layouts, consts, users)


def splits_exactly(traced: TracedModel, name: str) -> bool:
    """Whether exact mode can split the head of merge layer ``name`` (at the model's default size)."""
    try:
        build_plan(traced, traced.merge_nodes[name], traced.reference_shapes)
        return True
    except NoRule:
        return False


def exact_capable_before(traced: TracedModel, names: list[str]) -> str | None:
    """The last of ``names`` (execution order) whose head exact mode can split."""
    return next((name for name in reversed(names) if splits_exactly(traced, name)), None)


def _union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return (min(a[0][0], b[0][0]), max(a[0][1], b[0][1])), (min(a[1][0], b[1][0]), max(a[1][1], b[1][1]))


def _clamp(window: Region, hw: tuple[int, int]) -> Region:
    return tuple((max(lo, 0), min(hi, size)) for (lo, hi), size in zip(window, hw))


def _hw(shape: torch.Size, layout) -> tuple[int, int]:
    return shape[layout[0]], shape[layout[1]]


def _cut(t: torch.Tensor, have: Region, want: Region, layout) -> torch.Tensor:
    """View of ``want`` (full-size coordinates) inside ``t``, which holds region ``have``."""
    for d, axis in enumerate(layout):
        start = want[d][0] - have[d][0]
        length = want[d][1] - want[d][0]
        if start != 0 or length != t.shape[axis]:
            t = t.narrow(axis, start, length)
    return t


class _Overlay(dict):
    """The cut-out inputs of one op, falling back to the environment for everything else."""

    def __init__(self, env):
        super().__init__()
        self.env = env

    def __missing__(self, key):
        return self.env[key]


@dataclass
class _Step:
    """One op of one pack, with its input cuts worked out in advance."""

    node: fx.Node
    rule: Rule
    region: Region
    inputs: list[tuple[fx.Node, list[tuple[int, int, int]], tuple[int, int, int, int] | None]]  # src, narrows, pads
    frees: list[fx.Node]  # values no later op of the pack reads


class _Pack:
    """Executes the plan for one output region of the merge activation."""

    def __init__(self, plan: ExactPlan, region: Region):
        self.plan = plan
        need: dict[fx.Node, Region] = {plan.nodes[-1]: region}
        for node in reversed(plan.nodes[1:]):
            rule = plan.rules[node]
            for i, x in enumerate(rule.spatial_inputs):
                window = _clamp(rule.input_window(need[node], i), _hw(plan.shapes[x], plan.layouts[x]))
                need[x] = _union(need.get(x), window)
        input_node = plan.nodes[0]
        have = dict(need)
        have[input_node] = tuple((0, size) for size in _hw(plan.shapes[input_node], NCHW))
        self.need = need
        self.steps = []
        remaining = dict(plan.users)
        for node in plan.nodes[1:]:
            rule = plan.rules[node]
            inputs = []
            for i, src in enumerate(rule.spatial_inputs):
                window = rule.input_window(need[node], i)
                clamped = _clamp(window, _hw(plan.shapes[src], plan.layouts[src]))
                inputs.append((src, _narrows(have[src], clamped, plan.layouts[src]), _border_pads(window, clamped)))
            frees = []
            for p in node.all_input_nodes:
                if p in remaining:
                    remaining[p] -= 1
                    if remaining[p] == 0 and p not in plan.consts:
                        frees.append(p)
            self.steps.append(_Step(node, rule, need[node], inputs, frees))

    def run(self, x: torch.Tensor, consts: dict[fx.Node, object], on_node: Callable | None) -> torch.Tensor:
        env: dict[fx.Node, object] = dict(consts)
        env[self.plan.nodes[0]] = x
        for step in self.steps:
            values = _Overlay(env)
            for src, narrows, pads in step.inputs:
                t = env[src]
                for axis, start, length in narrows:
                    t = t.narrow(axis, start, length)
                values[src] = t if pads is None else F.pad(t, pads, value=step.rule.pad_value)
            env[step.node] = step.rule.compute(values, step.region)
            del values
            if on_node is not None:
                on_node(step.node)
            for p in step.frees:
                del env[p]
        return env[self.plan.nodes[-1]]


def _narrows(have: Region, want: Region, layout) -> list[tuple[int, int, int]]:
    """``narrow`` calls that cut ``want`` (full-size coordinates) out of a tensor holding ``have``."""
    cuts = []
    for d, axis in enumerate(layout):
        if want[d] != have[d]:
            cuts.append((axis, want[d][0] - have[d][0], want[d][1] - want[d][0]))
    return cuts


def _border_pads(window: Region, clamped: Region) -> tuple[int, int, int, int] | None:
    """F.pad amounts for the part of ``window`` past the image border (NCHW), or None."""
    (h0, h1), (w0, w1) = window
    (c_h0, c_h1), (c_w0, c_w1) = clamped
    pads = (c_w0 - w0, w1 - c_w1, c_h0 - h0, h1 - c_h1)
    return pads if any(pads) else None


# --------------------------------------------------------------------------- the wrapper

class _NotifyingInterpreter(fx.Interpreter):
    def __init__(self, gm, on_node):
        super().__init__(gm, garbage_collect_values=True)
        self.on_node = on_node

    def run_node(self, n):
        out = super().run_node(n)
        if self.on_node is not None:
            self.on_node(n)
        return out


class SplitPack(nn.Module):
    """``model`` run with split-pack inference; see :func:`wrap`."""

    def __init__(self, model: nn.Module, merge_layer: str, grid=(2, 2), mode: str = "exact"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.merge_layer = merge_layer
        self.grid = parse_grid(grid)
        self.mode = mode
        self.on_layer: Callable[[str], None] | None = None  # called with a layer name after it runs (profiling)
        traced = trace(model)
        if merge_layer not in traced.merge_nodes:
            raise ValueError(
                f"unknown merge layer {merge_layer!r} for {type(model).__name__}; valid merge layers "
                f"(execution order): {', '.join(traced.merge_nodes)}"
            )
        self._traced = traced
        self._merge_node = traced.merge_nodes[merge_layer]
        # by node name: the head and tail graphs are copies whose nodes keep the original names
        self._layer_names: dict[str, list[str]] = {}
        for name, node in traced.merge_nodes.items():
            self._layer_names.setdefault(node.name, []).append(name)
        head, tail = split_graph(traced, self._merge_node)
        # kept out of the module tree: they share the model's parameters
        self.__dict__["_head"], self.__dict__["_tail"] = head, tail
        self._plans: dict[tuple, ExactPlan] = {}
        self._packs: dict[tuple, list[tuple[Region, _Pack]]] = {}
        self._seed_layouts: dict[tuple, tuple[list[int], list[int]]] = {}
        if mode == "exact":
            self._check_exact(traced.reference_shapes)

    def extra_repr(self) -> str:
        return f"merge_layer={self.merge_layer!r}, grid={self.grid[0]}x{self.grid[1]}, mode={self.mode!r}"

    def _check_exact(self, shapes) -> None:
        try:
            build_plan(self._traced, self._merge_node, shapes)
        except NoRule as err:
            raise _unsplittable(self._traced, err.node, str(err), self.merge_layer) from None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor):
        if self.model.training:
            raise SplitError("split-pack is for inference: call model.eval() (BatchNorm and dropout must not train)")
        if x.dim() != 4:
            raise ValueError(f"split-pack expects an N x C x H x W image batch, got shape {tuple(x.shape)}")
        if x.shape[-2] < self.grid[0] or x.shape[-1] < self.grid[1]:
            raise SplitError(f"image of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than the "
                             f"{self.grid[0]}x{self.grid[1]} grid")
        with torch.no_grad():
            # the list is the merged activation's only owner, so the tail can free it after its last use
            box = [self._run_exact(x) if self.mode == "exact" else self._run_seed(x)]
            return self._run_tail(box)

    def _notify(self, node: fx.Node) -> None:
        """Tell ``on_layer`` about every merge-layer candidate whose output ``node`` is."""
        if self.on_layer is not None and node.op != "placeholder":
            for name in self._layer_names.get(node.name, ()):
                self.on_layer(name)

    def _run_tail(self, box: list) -> object:
        on_node = self._notify if self.on_layer is not None else None
        placeholder = next(n for n in self._tail.graph.nodes if n.op == "placeholder")
        return _NotifyingInterpreter(self._tail, on_node).run(initial_env={placeholder: box.pop()})

    @staticmethod
    def _size_key(x: torch.Tensor) -> tuple:
        """Plans depend on the image size, dtype and device, not on the batch size."""
        return (tuple(x.shape[1:]), x.dtype, x.device)

    def _plan(self, x: torch.Tensor) -> ExactPlan:
        key = self._size_key(x)
        plan = self._plans.pop(key, None)
        if plan is None:
            shapes = node_shapes(self._traced.gm, (1, *x.shape[1:]), x.dtype, x.device)
            try:
                plan = build_plan(self._traced, self._merge_node, shapes)
            except NoRule as err:
                raise _unsplittable(self._traced, err.node, str(err), self.merge_layer) from None
            while len(self._plans) >= PLAN_CACHE_SIZE:  # drop the least recently used size
                dropped = next(iter(self._plans))
                del self._plans[dropped]
                self._packs.pop(dropped, None)
        self._plans[key] = plan  # (re)insert as most recently used
        return plan

    def _packs_for(self, plan: ExactPlan, key) -> list[tuple[Region, _Pack]]:
        packs = self._packs.get(key)
        if packs is None:
            layout = plan.layouts[self._merge_node]
            mh, mw = _hw(plan.shapes[self._merge_node], layout)
            rows, cols = self.grid
            if rows > mh or cols > mw:
                raise SplitError(
                    f"grid {rows}x{cols} is finer than the merged activation at {self.merge_layer!r} "
                    f"({mh}x{mw}): every pack needs at least one output pixel"
                )
            hb, wb = bounds(mh, rows), bounds(mw, cols)
            regions = [((hb[r], hb[r + 1]), (wb[c], wb[c + 1])) for r in range(rows) for c in range(cols)]
            packs = self._packs[key] = [(reg, _Pack(plan, reg)) for reg in regions]
        return packs

    def _consts(self, plan: ExactPlan) -> dict[fx.Node, object]:
        consts: dict[fx.Node, object] = {}
        interp = fx.Interpreter(self._traced.gm)
        for n in plan.consts:
            interp.env = consts
            consts[n] = interp.run_node(n)
        return consts

    def _run_exact(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan(x)
        key = self._size_key(x)
        consts = self._consts(plan)
        layout = plan.layouts[self._merge_node]
        merged = None
        on_node = self._notify if self.on_layer is not None else None
        for region, pack in self._packs_for(plan, key):
            out = pack.run(x, consts, on_node)
            if merged is None:
                merged = _empty_like_layout(out, plan.shapes[self._merge_node], x.shape[0])
            _cut(merged, ((0, merged.shape[layout[0]]), (0, merged.shape[layout[1]])), region, layout).copy_(out)
            del out
        return merged

    def _run_seed(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        hb, wb = bounds(x.shape[-2], rows), bounds(x.shape[-1], cols)
        merged, row_starts, col_starts = None, None, None
        for r in range(rows):
            for c in range(cols):
                pack = x[..., hb[r]:hb[r + 1], wb[c]:wb[c + 1]]
                try:
                    out = self._run_head(pack)
                except RuntimeError as err:
                    raise SplitError(
                        f"a {pack.shape[-2]}x{pack.shape[-1]} pack is too small for the layers up to "
                        f"{self.merge_layer!r}: {err}"
                    ) from None
                if merged is None:
                    row_starts, col_starts, merged = self._seed_canvas(x, out)
                merged[..., row_starts[r]:row_starts[r + 1], col_starts[c]:col_starts[c + 1]].copy_(out)
                del out
        return merged

    def _run_head(self, pack: torch.Tensor) -> torch.Tensor:
        if self.on_layer is None:
            return self._head(pack)
        return _NotifyingInterpreter(self._head, self._notify).run(pack)

    def _seed_canvas(self, x, first_out):
        """Each pack's output size (packs differ by a pixel when the grid does not divide the image)."""
        key = self._size_key(x)
        if key not in self._seed_layouts:
            rows, cols = self.grid
            hb, wb = bounds(x.shape[-2], rows), bounds(x.shape[-1], cols)
            out_node = next(n for n in self._head.graph.nodes if n.op == "output").args[0]

            def out_hw(h, w):
                shape = node_shapes(self._head, (1, x.shape[1], h, w), x.dtype, x.device)[out_node]
                return shape[-2], shape[-1]

            heights = [out_hw(hb[r + 1] - hb[r], wb[1] - wb[0])[0] for r in range(rows)]
            widths = [out_hw(hb[1] - hb[0], wb[c + 1] - wb[c])[1] for c in range(cols)]
            if len(self._seed_layouts) >= PLAN_CACHE_SIZE:
                self._seed_layouts.clear()
            self._seed_layouts[key] = ([sum(heights[:r]) for r in range(rows + 1)],
                                       [sum(widths[:c]) for c in range(cols + 1)])
        row_starts, col_starts = self._seed_layouts[key]
        shape = (*first_out.shape[:-2], row_starts[-1], col_starts[-1])
        return row_starts, col_starts, _empty_like_layout(first_out, shape, first_out.shape[0])


def _empty_like_layout(sample: torch.Tensor, shape, batch: int) -> torch.Tensor:
    shape = (batch, *tuple(shape)[1:])
    channels_last = sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last) \
        and not sample.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=sample.dtype, device=sample.device, memory_format=fmt)


# --------------------------------------------------------------------------- public API

def wrap(model: nn.Module, merge_layer: str, grid=(2, 2), mode: str = "exact") -> SplitPack:
    """Run ``model`` with split-pack inference.

    The input image is split into ``grid`` packs (an int or (rows, cols)); the
    network up to and including the module ``merge_layer`` runs one pack at a
    time, the pack activations are written into one merged activation, and the
    rest of the network runs once. ``mode="exact"`` gives each pack the halo its
    receptive field needs, so ``wrap(model, ...)(x)`` equals ``model(x)``;
    ``mode="seed"`` runs each pack on its own (the poster's method; seams).
    """
    return SplitPack(model, merge_layer, grid, mode)


def merge_layers(model: nn.Module, mode: str | None = None) -> list[str]:
    """Valid merge-layer names in execution order (``mode="exact"``: only those exact mode can split)."""
    traced = trace(model)
    names = list(traced.merge_nodes)
    if mode in (None, "seed"):
        return names
    if mode != "exact":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return [name for name in names if splits_exactly(traced, name)]
