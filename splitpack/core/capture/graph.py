"""Graph capture with torch.fx, node kinds, and the checkpoints where a network can be merged.

Every input-dependent node is one of three kinds, read off shape propagation at
two input sizes:

* **spatial**: a tensor whose size follows the image (computed region by region);
* **global**: a tensor of fixed size computed from the whole image, e.g. a
  squeeze-excitation statistic or the global pooling (computed once, after a
  pass over all packs has accumulated the reductions it needs);
* **meta**: a non-tensor value such as ``x.shape`` (computed from the full size).

A *checkpoint* (merge layer) is a module (by qualified name) whose output is the
only value the rest of the network needs from everything executed before it:
a spatial activation (a stage writes it pack by pack), or the network's global
pooling (a stage reduces into it pack by pack).

A *cut* is a checkpoint made of several module outputs (``"stage2.0.branches.0+stage2.0.branches.1"``):
spatial activations, possibly at different resolutions, that together are everything the rest of the
network needs (parallel branches, a block output and a skip). Where no single value is ever the only
live one (HRNet's multi-resolution stages) cuts are the only checkpoints; :func:`find_cuts` lists
the small ones that appear as the set of live values between two ops.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from splitpack.core.capture.nodes import Shape, describe_op, module_path  # noqa: F401  (the graph's names)
from splitpack.errors import SplitError

CUT_JOIN = "+"  # joins the module names of a cut: "stage2.0.branches.0+stage2.0.branches.1"
MAX_CUT_MEMBERS = 4  # find_cuts lists cuts of at most this many values
SIZE_PROBE = 64  # the second shape-propagation size is this much larger (a multiple of every usual stride)
# modules computed as one op by their split rule although fx could trace them: space-to-depth moves
# pixels into channels with view / permute / view, which read as global ops one by one; traced,
# weight-standardised convolutions would have every standardised kernel computed once up front
KEPT_WHOLE = ("SpaceToDepth", "StdConv2d", "ScaledStdConv2d")


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's own list of leaf modules and functions (as its fx feature extraction uses)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for torchvision-only use
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


class _ScopeTracer(fx.Tracer):
    """fx tracer that records each module call's output node.

    timm keeps some blocks out of fx (its leaf modules) for its own reasons, e.g. NormFreeBlock
    because an unused in-place ``mul_`` result would drop out of the graph. A leaf block that has
    no split rule would be refused as a whole, so it is traced into instead whenever fx can trace
    its forward: split-pack then judges the ops it is made of (in-place results are rejoined to
    the graph by :func:`_rejoin_in_place`).
    """

    def __init__(self):
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types
        self._traced_into: dict[int, bool] = {}
        self.module_calls: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__name__ in KEPT_WHOLE:
            return True
        if isinstance(m, self._leaf_types):
            return not self._trace_into(m)
        return super().is_leaf_module(m, qualname)

    def _trace_into(self, m: nn.Module) -> bool:
        from splitpack.core.capture.rules.base import has_module_rule  # the rules import this module

        if has_module_rule(m):
            return False
        if id(m) not in self._traced_into:
            try:
                _ScopeTracer().trace(m)
                self._traced_into[id(m)] = True
            except Exception:  # noqa: BLE001  (control flow on tensor values, ...: it stays one op)
                self._traced_into[id(m)] = False
        return self._traced_into[id(m)]

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.module_calls.setdefault(name, []).append(out.node if isinstance(out, fx.Proxy) else None)
        return out


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (shape propagation must run in it)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass
class TracedModel:
    """A model's fx graph, its node kinds and its checkpoints."""

    gm: fx.GraphModule
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    input_node: fx.Node
    checkpoints: dict[str, fx.Node]  # checkpoint name -> its output node, execution order
    input_dependent: set[fx.Node] = field(default_factory=set)
    spatial: set[fx.Node] = field(default_factory=set)
    reference_shapes: dict[fx.Node, Shape] = field(default_factory=dict)  # at the model's default size
    dtype: torch.dtype = torch.float32
    module_outputs: dict[str, fx.Node] = field(default_factory=dict)  # modules called once -> output node

    def is_global(self, node: fx.Node) -> bool:
        """A fixed-size value computed from the image (reductions and everything after them)."""
        return node in self.input_dependent and node not in self.spatial

    def ancestors(self, node: fx.Node | Iterable[fx.Node], source: fx.Node | Iterable[fx.Node] | None = None
                  ) -> list[fx.Node]:
        """Input-dependent nodes ``node`` needs (itself included), in execution order, not looking
        past ``source`` (a checkpoint whose value is given). Either may be a cut (several nodes)."""
        seen = set(as_cut(node))
        stop = set(as_cut(source)) if source is not None else set()
        stack = list(seen)
        while stack:
            current = stack.pop()
            if current in stop:
                continue
            for parent in current.all_input_nodes:
                if parent not in seen and parent in self.input_dependent:
                    seen.add(parent)
                    stack.append(parent)
        return sorted(seen, key=self.index.__getitem__)

    def checkpoint_name(self, node: fx.Node) -> str:
        return next(name for name, n in self.checkpoints.items() if n is node)

    def cut(self, name: str) -> tuple[fx.Node, ...]:
        """The nodes of checkpoint ``name``: one for a checkpoint, several for a cut ``"a+b"``.
        KeyError for an unknown single name; ValueError for a cut that is not one."""
        if CUT_JOIN not in name:
            return (self.checkpoints[name],)
        members = [m.strip() for m in name.split(CUT_JOIN)]
        unknown = [m for m in members if m not in self.module_outputs]
        if unknown:
            raise ValueError(f"cut {name!r}: {', '.join(map(repr, unknown))} is not the output of a module called "
                             "once")
        nodes = tuple(dict.fromkeys(self.module_outputs[m] for m in members))
        flat = [m for m, n in zip(members, nodes) if n not in self.spatial or len(self.reference_shapes[n]) != 4]
        if flat:
            raise ValueError(f"cut {name!r}: {', '.join(map(repr, flat))} is not a spatial (N x C x H x W) activation")
        outside = self.needed_outside(nodes)
        if outside:
            raise ValueError(f"cut {name!r} is not a checkpoint: the rest of the network also reads "
                             f"{', '.join(describe_value(n) for n in outside[:3])}, made before it")
        return tuple(sorted(nodes, key=self.index.__getitem__))

    def needed_outside(self, cut: Iterable[fx.Node]) -> list[fx.Node]:
        """Values made on the way to ``cut`` (not in it) that something outside that way still reads;
        empty for a cut of the graph."""
        cut = set(cut)
        inside = set(self.ancestors(cut))
        return [n for n in sorted(inside - cut, key=self.index.__getitem__)
                if any(u not in inside for u in n.users)]

    def rest(self, last: fx.Node | Iterable[fx.Node]) -> list[fx.Node]:
        """The nodes after checkpoint (or cut) ``last`` that the rest of the network runs, in execution
        order (placeholder and output included where they come after it)."""
        cut = as_cut(last)
        start = min(self.index[n] for n in cut)
        inside = set(self.ancestors(cut)) if len(cut) > 1 else set()
        return [n for n in self.nodes[start + 1:] if n not in inside]


def as_cut(value: fx.Node | Iterable[fx.Node]) -> tuple[fx.Node, ...]:
    """A node or a cut (several nodes) as a tuple of nodes."""
    return (value,) if isinstance(value, fx.Node) else tuple(value)


def describe_value(node: fx.Node) -> str:
    path = module_path(node)
    return f"{node.name} (module {path!r})" if path else node.name


# one trace per model: wrapping, listing merge layers and planning the same model again (the capacity planner
# measures several plans; a deep network takes seconds to trace) reuse it while the model's structure is unchanged
_TRACES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, TracedModel]]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    """What a trace depends on: the modules (identity, type, train/eval: forwards branch on it), the parameters'
    dtype and device, the reference input size. Weights do not matter; replacing a module or ``.to(dtype)`` does."""
    modules = tuple((name, id(m), type(m), m.training) for name, m in model.named_modules())
    return modules, model_dtype(model), model_device(model), reference_input_size(model)


def trace(model: nn.Module) -> TracedModel:
    """The model's :class:`TracedModel`, traced once per structure (see :func:`_structure`) and shared: callers
    read it and never change it."""
    structure = _structure(model)
    cached = _TRACES.get(model)
    if cached is not None and cached[0] == structure:
        return cached[1]
    traced = _trace(model)
    _TRACES[model] = (structure, traced)
    return traced


def _trace(model: nn.Module) -> TracedModel:
    tracer = _ScopeTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 -- fx fails in many ways (TraceError, TypeError on a Proxy, ...)
        raise SplitError(f"{type(model).__name__} cannot be captured with torch.fx, which split-pack needs "
                         f"({type(err).__name__}: {err}); make its forward traceable (no Python control flow on "
                         "tensor values), or run it unsplit (merge layer none)") from err
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    _rejoin_in_place(gm)
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"split-pack needs a model with one image input, got {len(placeholders)} inputs")
    input_node = placeholders[0]
    dependent = {input_node}
    for n in nodes:
        if any(p in dependent for p in n.all_input_nodes):
            dependent.add(n)
    dtype = model_dtype(model)
    c, h, w = reference_input_size(model)
    shapes = node_shapes(gm, (1, c, h, w), dtype)
    # a second size tells spatial values from fixed-size ones (after global pooling or a reduction)
    shapes_larger = node_shapes(gm, (1, c, h + SIZE_PROBE, w + SIZE_PROBE), dtype)
    spatial = {n for n in dependent if n in shapes and shapes[n] != shapes_larger.get(n)}
    traced = TracedModel(gm, nodes, index, input_node, {}, dependent, spatial, shapes, dtype)
    traced.checkpoints = _checkpoints(traced, tracer.module_calls)
    traced.module_outputs = {name: calls[0] for name, calls in tracer.module_calls.items()
                             if name and len(calls) == 1 and calls[0] is not None}
    return traced


def _rejoin_in_place(gm: fx.GraphModule) -> None:
    """``out.mul_(g)`` whose result is unused: fx keeps the op but later reads of ``out`` do not
    depend on it. An in-place op returns its input, so later reads are rewired to its result."""
    from splitpack.core.capture.rules.base import mutates_input  # the rules import this module

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = mutates_input(node, gm)
        if target is None:
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
    gm.recompile()


def reference_input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def shape_numel(shape: Shape) -> int:
    """Elements of a value of ``shape`` (a tuple of sizes: a tuple of channel splits, all counted)."""
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
        return sum(math.prod(s) for s in shape)
    return math.prod(shape)


def _shape_of(value) -> Shape | None:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.shape for v in value)
    return None


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, Shape] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        shape = _shape_of(out)
        if shape is not None:
            self.shapes[n] = shape
        return out


def node_shapes(gm: fx.GraphModule, input_shape, dtype=torch.float32, device=None) -> dict[fx.Node, Shape]:
    """Full-size output shape of every tensor-valued node, from a fake-tensor run (no real memory,
    no copy of the parameters). Tuple-valued nodes (``torch.split``) get a tuple of sizes."""
    if device is None:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    recorder = _ShapeRecorder(gm)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        recorder.run(torch.empty(input_shape, dtype=dtype, device=device))
    return recorder.shapes


def _reach(traced: TracedModel) -> list[int]:
    """reach[i]: the furthest node index that uses any input-dependent node at index <= i."""
    reach, furthest = [], -1
    for n in traced.nodes:
        if n in traced.input_dependent:
            furthest = max(furthest, max((traced.index[u] for u in n.users), default=-1))
        reach.append(furthest)
    return reach


def _checkpoints(traced: TracedModel, module_calls) -> dict[str, fx.Node]:
    """Modules (called once) whose output is the only value crossing into the rest: a 4-D spatial
    activation, or a global pooling (reductions inside the module, no parameters after them)."""
    reach, index = _reach(traced), traced.index
    candidates = []
    for name, calls in module_calls.items():
        if not name or len(calls) != 1 or calls[0] is None:
            continue
        out = calls[0]
        shape = traced.reference_shapes.get(out)
        if not isinstance(shape, torch.Size):
            continue
        if out in traced.spatial:
            if len(shape) != 4:
                continue
        elif not (traced.is_global(out) and _pooled_to_one(shape) and is_global_pooling(traced, out, name)):
            continue
        pos = index[out]
        if pos > 0 and reach[pos - 1] > pos:  # an earlier value is still needed after the cut
            continue
        candidates.append((pos, name.count("."), name, out))
    return {name: out for _, _, name, out in sorted(candidates, key=lambda c: (c[0], c[1]))}


def _pooled_to_one(shape: torch.Size) -> bool:
    """N x C, or N x C x 1 x 1: one value per channel (adaptive pooling to 7x7 is not global pooling)."""
    return len(shape) == 2 or (len(shape) == 4 and tuple(shape[-2:]) == (1, 1))


def _inside(node: fx.Node, module_name: str) -> bool:
    path = module_path(node)
    return path == module_name or path.startswith(module_name + ".")


def _uses_parameters(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    return any(p.op == "get_attr" for p in node.all_input_nodes)


def is_global_pooling(traced: TracedModel, out: fx.Node, module_name: str) -> bool:
    """``out`` (global) is made inside module ``module_name`` from reductions of spatial values,
    with nothing parametric after them: the module is a global pooling."""
    stack, seen, reductions = [out], {out}, 0
    while stack:
        node = stack.pop()
        if not _inside(node, module_name) or _uses_parameters(node, traced.gm):
            return False
        parents = [p for p in node.all_input_nodes if p in traced.input_dependent]
        if any(p in traced.spatial for p in parents):
            reductions += 1
            continue
        for p in parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return reductions > 0


def tail_graph(traced: TracedModel, checkpoint: fx.Node | tuple[fx.Node, ...]) -> fx.GraphModule:
    """The rest of the network after ``checkpoint`` (a node, or a cut's nodes), as a graph whose
    inputs are the checkpoint's values (one placeholder per node of a cut, in its order)."""
    cut = as_cut(checkpoint)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: tail.placeholder("merged" if k == 0 else f"merged_{k}")
                                   for k, n in enumerate(cut)}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # an input-independent value (parameter, constant) made before the cut
            env[n] = tail.node_copy(n, lookup)
        return env[n]

    for n in traced.rest(cut):
        if n.op == "placeholder":
            continue
        env[n] = tail.node_copy(n, lookup)
    return fx.GraphModule(traced.gm, tail, "SplitPackTail")


def find_cuts(traced: TracedModel, limit: int = MAX_CUT_MEMBERS) -> dict[str, tuple[fx.Node, ...]]:
    """Cuts of 2 to ``limit`` spatial module outputs: the values alive between two ops (the frontier
    after each node, in execution order) when every one of them is a module's output, named by
    each value's outermost module name. Execution order; single-value frontiers are checkpoints."""
    names: dict[fx.Node, str] = {}
    for name, node in traced.module_outputs.items():
        if node in traced.spatial and len(traced.reference_shapes.get(node, ())) == 4:
            if node not in names or name.count(".") < names[node].count("."):
                names[node] = name
    index = traced.index
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in traced.nodes if n in traced.input_dependent}
    live: set[fx.Node] = set()
    cuts: dict[str, tuple[fx.Node, ...]] = {}
    for i, node in enumerate(traced.nodes):
        if node in last_use:
            live.add(node)
        live = {v for v in live if last_use[v] > i}
        if not 2 <= len(live) <= limit or any(v not in names for v in live):
            continue
        cut = tuple(sorted(live, key=index.__getitem__))
        name = CUT_JOIN.join(names[v] for v in cut)
        if name not in cuts and not traced.needed_outside(cut):
            cuts[name] = cut
    return cuts


def head_graph(traced: TracedModel, checkpoint: fx.Node) -> fx.GraphModule:
    """The network from the image up to ``checkpoint`` (seed mode runs it on each pack)."""
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in traced.nodes[: traced.index[checkpoint] + 1]:
        env[n] = head.node_copy(n, env.__getitem__)
    head.output(env[checkpoint])
    return fx.GraphModule(traced.gm, head, "SplitPackHead")
