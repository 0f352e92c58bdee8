"""``SplitPack``: the ``nn.Module`` that runs a staged plan -- interpreted (the executor), compiled, or seed mode --
and reports its cost."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from splitpack.core.compile.recording import DEFAULT_MAX_BATCH, compile_mode
from splitpack.core.compile.runner import compiled_runner
from splitpack.core.cost.counts import checkpoint_bytes
from splitpack.core.cost.plan_cost import PlanCost
from splitpack.core.execute.executor import Executor, empty_like_layout, run_consts
from splitpack.core.capture.graph import TracedModel, head_graph, node_shapes, tail_graph, trace
from splitpack.core.plan.spec import AutoPlan, Plan, grid_text, parse_plan
from splitpack.core.plan.schedule import Program, Unsplittable, batch_limit, bounds, build_program, stage_halos, \
    stage_graphs, unsplittable_nodes
from splitpack.errors import SplitError

MODES = ("exact", "seed")
PLAN_CACHE_SIZE = 8  # image sizes whose programs are kept (native-resolution serving sees many)


def _unsplittable(traced: TracedModel, err: Unsplittable, checkpoint: str) -> SplitError:
    node = err.node
    blocked = unsplittable_nodes(traced)
    before = [name for name, cp in traced.checkpoints.items()
              if traced.index[cp] < traced.index[node] and cp not in blocked]
    hint = f"the latest merge layer before it that exact mode supports is {before[-1]!r}" if before else \
        "no merge layer before it is supported in exact mode"
    return SplitError(f"exact split-pack cannot merge at {checkpoint!r}: {err.describe(traced.gm)}; {hint}; "
                      "seed mode runs it per pack")


def _cuts(traced: TracedModel, plan: Plan, model_name: str) -> list[tuple[fx.Node, ...]]:
    """The nodes of each stage's checkpoint (one, or a cut's); ValueError naming the valid ones."""
    cuts = []
    for stage in plan.stages:
        try:
            cuts.append(traced.cut(stage.checkpoint))
        except KeyError:
            raise ValueError(f"unknown merge layer {stage.checkpoint!r} for {model_name}; valid merge layers "
                             f"(execution order): {', '.join(traced.checkpoints)}; or a cut of module outputs "
                             "joined by '+'") from None
    return cuts


def _check_plan(traced: TracedModel, plan: Plan, mode: str, model_name: str) -> None:
    cuts = _cuts(traced, plan, model_name)
    positions = [max(traced.index[n] for n in cut) for cut in cuts]
    if positions != sorted(positions):
        raise ValueError(f"merge layers must be in execution order: {plan.merge_layer_text}")
    for stage, cut in zip(plan.stages[:-1], cuts):
        if cut[0] not in traced.spatial:
            raise ValueError(f"merge layer {stage.checkpoint!r} is a global pooling: it can only be the last one")
    if mode == "seed":
        if len(plan.stages) != 1 or len(cuts[0]) != 1 or cuts[0][0] not in traced.spatial:
            raise ValueError("seed mode takes one spatial merge layer (staged plans, cuts and global pooling are "
                             "exact mode's)")
        return
    blocked = unsplittable_nodes(traced)
    for stage, cut in zip(plan.stages, cuts):
        node = next((n for n in cut if n in blocked), None)
        if node is not None:
            raise _unsplittable(traced, blocked[node], stage.checkpoint)


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

    def __init__(self, model: nn.Module, merge_layer, grid=(2, 2), mode: str = "exact", *, compile=False,
                 cuda_graphs: bool = False, max_batch: int = DEFAULT_MAX_BATCH, traced: TracedModel | None = None,
                 halo="reuse", batch_packs: bool | int = False):
        """``traced``: the model's trace, when the caller has it already (the planner does)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.batch_packs = batch_packs
        batch_limit(batch_packs)  # checked here, not at the first call
        self.compile_mode = compile_mode(compile)
        plan = parse_plan(merge_layer, grid)
        if plan is None:
            raise ValueError("merge_layer is required: a checkpoint name, a list of them, or 'auto'")
        if isinstance(plan, AutoPlan):
            raise ValueError("merge_layer='auto' plans per input size: use splitpack.wrap(model, 'auto')")
        self.model = model
        self.plan: Plan = plan
        self.halo = stage_halos(halo, len(plan.stages))  # one mode per stage
        self.mode = mode
        self.on_layer: Callable[[str], None] | None = None  # called with a layer name after it runs (profiling)
        traced = self._traced = traced if traced is not None else trace(model)
        _check_plan(traced, plan, mode, type(model).__name__)
        self._stages = stage_graphs(traced, plan)
        last = self._stages[-1].targets
        # by node name: the graphs run here are copies whose nodes keep the original names
        self._layer_names: dict[str, list[str]] = {}
        for name, node in traced.checkpoints.items():
            self._layer_names.setdefault(node.name, []).append(name)
        # kept out of the module tree: they share the model's parameters
        self.__dict__["_tail"] = tail_graph(traced, last)
        self.__dict__["_head"] = head_graph(traced, last[0]) if mode == "seed" else None
        self._programs: dict[tuple, Program] = {}
        self._seed_layouts: dict[tuple, tuple[list[int], list[int]]] = {}
        # per-size straight-line programs (splitpack.core.compile.recording), None = interpret the plan
        self.__dict__["compiled"] = compiled_runner(self, self.compile_mode, cuda_graphs, max_batch)

    @property
    def merge_layer(self) -> str:
        return self.plan.merge_layer_text

    @property
    def grid(self):
        """The grid (rows, cols) of a one-stage plan; a list of grids for a staged plan."""
        return self.plan.grids[0] if len(self.plan.stages) == 1 else self.plan.grids

    def extra_repr(self) -> str:
        return f"plan={str(self.plan)!r}, mode={self.mode!r}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor):
        if self.model.training:
            raise SplitError("split-pack is for inference: call model.eval() (BatchNorm and dropout must not train)")
        if x.dim() != 4:
            raise ValueError(f"split-pack expects an N x C x H x W image batch, got shape {tuple(x.shape)}")
        rows, cols = self.plan.grids[0]
        if x.shape[-2] < rows or x.shape[-1] < cols:
            raise SplitError(f"image of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than the {rows}x{cols} grid")
        with torch.no_grad():
            if self.compiled is not None and self.on_layer is None:
                return self.compiled(x)
            return self.interpret(x)

    def interpret(self, x: torch.Tensor):
        """The reference path: the plan interpreted op by op, then the rest of the network (no checks).
        Compiled programs are recordings of it."""
        # the list is the merged activation's only owner, so the tail can free it after its last use
        box = [self._run_exact(x) if self.mode == "exact" else self._run_seed(x)]
        return self._run_tail(box)

    def _notify(self, node: fx.Node) -> None:
        """Tell ``on_layer`` about every merge-layer candidate whose output ``node`` is."""
        if self.on_layer is not None and node.op != "placeholder":
            for name in self._layer_names.get(node.name, ()):
                self.on_layer(name)

    def _run_tail(self, box: list) -> Any:
        on_node = self._notify if self.on_layer is not None else None
        placeholders = [n for n in self._tail.graph.nodes if n.op == "placeholder"]
        merged = box.pop()  # one value, or a cut's values (a tuple in the cut's order)
        env = dict(zip(placeholders, merged if len(placeholders) > 1 else (merged,)))
        del merged
        return _NotifyingInterpreter(self._tail, on_node).run(initial_env=env)

    @staticmethod
    def _size_key(shape, dtype, device) -> tuple:
        """Programs depend on the image size, dtype and device, not on the batch size."""
        return tuple(shape[1:]), dtype, torch.device(device)

    def program(self, shape, dtype=None, device=None) -> Program:
        """The program for inputs of ``shape`` (N, C, H, W; N is ignored), cached per size."""
        dtype = dtype or self._traced.dtype
        device = device or next((p.device for p in self.model.parameters()), torch.device("cpu"))
        key = self._size_key(shape, dtype, device)
        program = self._programs.pop(key, None)
        if program is None:
            shapes = node_shapes(self._traced.gm, (1, *shape[1:]), dtype, device)
            try:
                program = build_program(self._traced, self._stages, shapes, dtype, self.halo, self.batch_packs)
            except Unsplittable as err:
                raise _unsplittable(self._traced, err, self.merge_layer) from None
            except ValueError as err:  # a grid finer than a feature map at this size
                raise SplitError(f"image of {shape[-2]}x{shape[-1]} pixels: {err}") from None
            while len(self._programs) >= PLAN_CACHE_SIZE:  # drop the least recently used size
                del self._programs[next(iter(self._programs))]
        self._programs[key] = program  # (re)insert as most recently used
        return program

    def _run_exact(self, x: torch.Tensor) -> torch.Tensor:
        program = self.program(x.shape, x.dtype, x.device)
        consts = run_consts(self._traced.gm, program.consts)
        on_node = self._notify if self.on_layer is not None else None
        return Executor(self._traced.gm, program, on_node).run(x, consts)

    # ------------------------------------------------------------------ cost report

    def cost(self, shape, dtype=None) -> dict:
        """What the plan costs for inputs of ``shape`` (N, C, H, W), without running it: convolution
        MACs split vs unsplit (halo recompute and second passes included) and each checkpoint's size."""
        dtype = dtype or self._traced.dtype
        program = self.program(shape, dtype)
        last = self._stages[-1].targets
        cost = PlanCost.of_program(self._traced, program, program.stages[0].shapes, last, shape[0])
        sizes = checkpoint_bytes(program, shape[0], dtype)
        return {
            "plan": str(self.plan),
            "stages": [{"checkpoint": s.graph.checkpoint, "grid": grid_text(s.graph.grid),
                        "passes": len(s.passes), "checkpoint_bytes": size}
                       for s, size in zip(program.stages, sizes)],
            "macs_unsplit": cost.unsplit_macs,
            "macs_split": cost.macs,
            "macs_ratio": cost.macs_ratio,
        }

    # ------------------------------------------------------------------ seed mode (the poster's method)

    def _run_seed(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.plan.grids[0]
        hb, wb = bounds(x.shape[-2], rows), bounds(x.shape[-1], cols)
        merged, row_starts, col_starts = None, None, None
        for r in range(rows):
            for c in range(cols):
                pack = x[..., hb[r]:hb[r + 1], wb[c]:wb[c + 1]]
                try:
                    out = self._run_head(pack)
                except RuntimeError as err:
                    raise SplitError(f"a {pack.shape[-2]}x{pack.shape[-1]} pack is too small for the layers up to "
                                     f"{self.merge_layer!r}: {err}") from None
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
        key = self._size_key(x.shape, x.dtype, x.device)
        if key not in self._seed_layouts:
            rows, cols = self.plan.grids[0]
            hb, wb = bounds(x.shape[-2], rows), bounds(x.shape[-1], cols)
            out_node = next(n for n in self._head.graph.nodes if n.op == "output").args[0]

            in_h = [hb[r + 1] - hb[r] for r in range(rows)]
            in_w = [wb[c + 1] - wb[c] for c in range(cols)]
            # an output's height follows its input's height and its width the width: one shape propagation
            # per distinct (height, width) pair, pairing row i with column i (packs differ by a pixel at most)
            pairs = {(in_h[min(i, rows - 1)], in_w[min(i, cols - 1)]) for i in range(max(rows, cols))}
            out = {hw: node_shapes(self._head, (1, x.shape[1], *hw), x.dtype, x.device)[out_node][-2:]
                   for hw in pairs}
            heights = [next(o[0] for (h, _), o in out.items() if h == ih) for ih in in_h]
            widths = [next(o[1] for (_, w), o in out.items() if w == iw) for iw in in_w]
            if len(self._seed_layouts) >= PLAN_CACHE_SIZE:
                self._seed_layouts.clear()
            self._seed_layouts[key] = ([sum(heights[:r]) for r in range(rows + 1)],
                                       [sum(widths[:c]) for c in range(cols + 1)])
        row_starts, col_starts = self._seed_layouts[key]
        shape = (first_out.shape[0], *first_out.shape[1:-2], row_starts[-1], col_starts[-1])
        return row_starts, col_starts, empty_like_layout(first_out, shape)
