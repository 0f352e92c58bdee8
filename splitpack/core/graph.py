"""Graph capture with torch.fx and the cut points where a network can be merged.

A *merge layer* is a module (by qualified name) whose output is the only value
the rest of the network needs from everything executed before it: the packs
run the network up to and including that module, and the rest runs once on the
merged activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's own list of leaf modules and functions (as its fx feature extraction uses)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for torchvision-only use
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


class _ScopeTracer(fx.Tracer):
    """fx tracer that records each module call's output node."""

    def __init__(self):
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types
        self.module_calls: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        self.module_calls.setdefault(name, []).append(out.node if isinstance(out, fx.Proxy) else None)
        return out


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that executed ``node``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def describe_op(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


@dataclass
class TracedModel:
    """A model's fx graph with its merge-layer candidates."""

    gm: fx.GraphModule
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    input_node: fx.Node
    merge_nodes: dict[str, fx.Node]  # valid merge-layer name -> its output node, execution order
    input_dependent: set[fx.Node] = field(default_factory=set)
    reference_shapes: dict[fx.Node, torch.Size] = field(default_factory=dict)  # at the model's default size

    def ancestors(self, node: fx.Node) -> list[fx.Node]:
        """Input-dependent nodes ``node`` needs (itself included), in execution order."""
        seen, stack = {node}, [node]
        while stack:
            for parent in stack.pop().all_input_nodes:
                if parent not in seen and parent in self.input_dependent:
                    seen.add(parent)
                    stack.append(parent)
        return sorted(seen, key=self.index.__getitem__)


def trace(model: nn.Module) -> TracedModel:
    tracer = _ScopeTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
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
    c, h, w = reference_input_size(model)
    shapes = node_shapes(gm, (1, c, h, w))
    # a second size tells spatial activations from ones whose size is fixed (after global/adaptive pooling)
    shapes_larger = node_shapes(gm, (1, c, h + 32, w + 32))
    traced = TracedModel(gm, nodes, index, input_node, {}, dependent, shapes)
    traced.merge_nodes = _cut_points(traced, tracer.module_calls, shapes, shapes_larger)
    return traced


def reference_input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def node_shapes(gm: fx.GraphModule, input_shape, dtype=torch.float32, device=None) -> dict[fx.Node, torch.Size]:
    """Full-size output shape of every tensor-valued node, from a fake-tensor run (no real memory)."""
    if device is None:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad():
        with fake_mode:
            x = torch.empty(input_shape, dtype=dtype, device=device)
        ShapeProp(gm, fake_mode=fake_mode).propagate(x)
    shapes = {}
    for n in gm.graph.nodes:
        meta = n.meta.pop("tensor_meta", None)
        if meta is not None and hasattr(meta, "shape"):
            shapes[n] = meta.shape
    return shapes


def _cut_points(traced: TracedModel, module_calls, shapes, shapes_larger) -> dict[str, fx.Node]:
    """Modules (called once) whose 4-D, image-sized output is the only value crossing into the rest."""
    nodes, index = traced.nodes, traced.index
    # reach[i]: the furthest node that uses any input-dependent node at index <= i
    reach, furthest = [], -1
    for n in nodes:
        if n in traced.input_dependent:
            furthest = max(furthest, max((index[u] for u in n.users), default=-1))
        reach.append(furthest)
    candidates = []
    for name, calls in module_calls.items():
        if not name or len(calls) != 1 or calls[0] is None:
            continue
        out = calls[0]
        shape = shapes.get(out)
        if out not in traced.input_dependent or shape is None or len(shape) != 4:
            continue
        if shapes_larger.get(out, shape)[-2:] == shape[-2:]:  # pooled to a fixed size: nothing to tile
            continue
        pos = index[out]
        if pos > 0 and reach[pos - 1] > pos:  # an earlier value is still needed after the cut
            continue
        candidates.append((pos, name.count("."), name, out))
    return {name: out for _, _, name, out in sorted(candidates, key=lambda c: (c[0], c[1]))}


def split_graph(traced: TracedModel, merge_node: fx.Node) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Head graph (input -> merge activation) and tail graph (merge activation -> output)."""
    pos = traced.index[merge_node]
    gm = traced.gm

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in traced.nodes[: pos + 1]:
        env[n] = head.node_copy(n, env.__getitem__)
    head.output(env[merge_node])

    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {merge_node: tail.placeholder("merged")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in tenv:  # an input-independent value (parameter, constant) made before the cut
            tenv[n] = tail.node_copy(n, lookup)
        return tenv[n]

    for n in traced.nodes[pos + 1:]:
        if n.op == "placeholder":
            continue
        tenv[n] = tail.node_copy(n, lookup)
    return fx.GraphModule(gm, head, "SplitPackHead"), fx.GraphModule(gm, tail, "SplitPackTail")


