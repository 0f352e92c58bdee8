"""Rule kinds, the rule registry and ``make_rule``.

Each spatial value in a stage has a *layout*: the (negative) axes of its height
and width. A rule answers, for one op:

* ``input_window(out, i)``: which region of its i-th spatial input (in that
  input's full-size coordinates, *unclamped*: it may reach past the border,
  where the op's own padding lives) produces region ``out`` of its output;
* ``compute(values, out)``: produce exactly that output region from the input
  regions, after the executor has cut them out and padded the part of the
  window past the true border with ``pad_value``.

Interior pack edges therefore see real neighbouring pixels and only the true
border sees padding, which makes the result equal to the unsplit op.

A :class:`Reduce` rule turns a spatial value into a global one (mean, sum, max
over H and W): packs accumulate partial results over the tiles they own and the
executor finalises them once all packs of a pass have run.

Rules join the registry with a decorator, by module type (or type name, for
library types we do not import), function or tensor-method name::

    @register_module(nn.Conv2d)
    def _conv(node, ctx, xs, layout, module) -> Rule: ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from splitpack.core.capture.nodes import Shape, describe_op

Interval = tuple[int, int]  # [start, stop)
Region = tuple[Interval, Interval]  # (rows, cols)
Layout = tuple[int, int]  # negative axes of (height, width)
NCHW: Layout = (-2, -1)


class NoRule(Exception):
    """The op cannot be computed region by region (the reason is the message)."""


def spatial_dims(shape: Shape, layout: Layout) -> tuple[int, int]:
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):
        shape = shape[0]  # a tuple of channel splits: every part covers the same pixels
    return shape[layout[0]], shape[layout[1]]


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- rule kinds

@dataclass
class Rule:
    node: fx.Node
    spatial_inputs: list[fx.Node]
    layout: Layout = NCHW
    pad_value: float = 0.0
    # whether compute reads the output region's position (not only its size): packs at different
    # places then compute differently and cannot run as one batched call
    positional = True

    def input_window(self, out: Region, i: int) -> Region:
        return out

    def compute(self, values: dict[fx.Node, Any], out: Region) -> Any:
        raise NotImplementedError

    def native_padding(self, pads, in_hw: tuple[int, int], out: Region) -> tuple[int, int] | None:
        """(rows, cols) padding the op can apply itself instead of a padded copy of its input (``in_hw``: the
        input's extent inside the border; ``out``: the region computed), or None."""
        return None

    def temporary_pixels(self, out: Region) -> int | None:
        """Pixels (of the output's channels and batch) that :meth:`compute` keeps alive beyond its output at its
        peak, where it computes differently from the unsplit op; None: as the unsplit op (the peak replay then
        reads the op's temporaries off the unsplit model's allocation profile)."""
        return None


class Pointwise(Rule):
    """Output pixel (h, w) depends only on input pixel (h, w): run the op as it is."""

    positional = False

    def __init__(self, node, spatial_inputs, layout, call: Callable):
        super().__init__(node, spatial_inputs, layout)
        self.call = call

    def compute(self, values, out):
        args = fx.node.map_arg(self.node.args, values.__getitem__)
        kwargs = fx.node.map_arg(self.node.kwargs, values.__getitem__)
        return self.call(*args, **kwargs)


@dataclass
class Window1d:
    kernel: int
    stride: int
    dilation: int
    before: int  # padding before the first input element (may be negative: a crop)

    def needed(self, out: Interval) -> Interval:
        o0, o1 = out
        start = o0 * self.stride - self.before
        return start, (o1 - 1) * self.stride - self.before + self.dilation * (self.kernel - 1) + 1


class Window(Rule):
    """Sliding-window op (convolution, pooling, padding): its halo is (kernel - 1) * dilation."""

    def __init__(self, node, spatial_input, dims: tuple[Window1d, Window1d], pad_value: float, op: Callable,
                 pad_limit: tuple[int, int] | None = None, positional: bool = False, pads_first: bool = False):
        super().__init__(node, [spatial_input], NCHW, pad_value)
        self.dims = dims
        self.op = op
        self.positional = positional  # ``op`` reads the output region's position (a divisor map)
        self.pad_limit = pad_limit  # None: any symmetric padding is applied by the op itself
        # the unsplit module pads its whole input into a new tensor first (TF 'SAME': timm's Conv2dSame,
        # MaxPool2dSame, AvgPool2dSame); ``op`` reads a window the executor cut (and padded at the border)
        self.pads_first = pads_first

    def temporary_pixels(self, out: Region) -> int | None:
        """None (the unsplit op's temporaries), or none at all where those are the padded input."""
        return 0 if self.pads_first else None

    def input_window(self, out, i):
        return self.dims[0].needed(out[0]), self.dims[1].needed(out[1])

    def compute(self, values, out, padding=None):
        if padding is None:
            return self.op(values[self.spatial_inputs[0]], out, values)
        return self.op(values[self.spatial_inputs[0]], out, values, padding)

    def native_padding(self, pads, in_hw: tuple[int, int], out: Region) -> tuple[int, int] | None:
        """The op pads both sides of a dim alike: that is its leading pad, where the padding past the trailing
        border gives no output beyond ``out`` (the pad a region needs after the border is often less: a
        stride-2 window over an even extent never reads its last pad column; a strip in the middle of a
        column needs none above or below)."""
        left, right, top, bottom = pads
        native = (top, left)
        for dim, (lead, trail) in enumerate(((top, bottom), (left, right))):
            w, (o0, o1) = self.dims[dim], out[dim]
            if trail > lead or (self.pad_limit is not None and lead > self.pad_limit[dim]):
                return None
            if (in_hw[dim] + 2 * lead - w.dilation * (w.kernel - 1) - 1) // w.stride + 1 != o1 - o0:
                return None
        return native


def window_dims(kernel, stride, dilation, before) -> tuple[Window1d, Window1d]:
    k, s, d, b = pair(kernel), pair(stride), pair(dilation), pair(before)
    return Window1d(k[0], s[0], d[0], b[0]), Window1d(k[1], s[1], d[1], b[1])


REDUCTIONS = ("sum", "mean", "amax", "amin")


class Reduce(Rule):
    """A global reduction (sum, mean, max, min) over the spatial axes, accumulated tile by tile.

    Partial results are kept in float32 (float64 for float64 inputs), as ATen accumulates
    a half-precision mean, and cast to the op's dtype when finalised.
    """

    positional = False

    def __init__(self, node, x, layout, kind: str, keepdim: bool, out_dtype: torch.dtype | None = None):
        if kind not in REDUCTIONS:
            raise NoRule(f"reduction {kind!r} over the spatial axes (sum, mean, max and min are split)")
        super().__init__(node, [x], layout)
        self.kind = kind
        self.keepdim = keepdim
        self.out_dtype = out_dtype

    def partial(self, t: torch.Tensor) -> torch.Tensor:
        dims = tuple(self.layout)
        if self.kind in ("amax", "amin"):
            return getattr(t, self.kind)(dims, keepdim=self.keepdim)
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.sum(dims, keepdim=self.keepdim, dtype=acc if t.is_floating_point() else None)

    def combine(self, acc: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        if acc is None:
            return part
        if self.kind == "amax":
            return torch.maximum(acc, part, out=acc)
        if self.kind == "amin":
            return torch.minimum(acc, part, out=acc)
        return acc.add_(part)

    def finalize(self, acc: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "mean":
            acc = acc / count
        return acc.to(self.out_dtype or dtype)


class MetaQuery(Rule):
    """``x.shape``, ``x.size()``, ``x.dim()`` of a spatial value: answered from its full size."""


# --------------------------------------------------------------------------- context and registry

@dataclass
class OpContext:
    """What a rule may look at: the module, full-size shapes and layouts of inputs."""

    gm: fx.GraphModule
    shapes: dict[fx.Node, Shape]
    layouts: dict[fx.Node, Layout]
    spatial: set[fx.Node] = field(default_factory=set)
    dtype: torch.dtype = torch.float32  # the dtype the program runs in

    def is_spatial(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.spatial


RuleMaker = Callable[..., Rule]
_MODULES: dict[type | str, RuleMaker] = {}
_FUNCTIONS: dict[Callable, RuleMaker] = {}
_METHODS: dict[str, RuleMaker] = {}


def _registrar(table: dict, keys: tuple) -> Callable[[RuleMaker], RuleMaker]:
    """A decorator that files its rule maker in ``table`` under each of ``keys``."""
    def add(maker: RuleMaker) -> RuleMaker:
        for key in keys:
            table[key] = maker
        return maker
    return add


def register_module(*kinds: type | str):
    """Rule for modules of exactly these types (a type, or a type name for library types).

    Exact types, not subclasses: a subclass may change what forward computes (timm's
    StdConv2d standardises its weights), so it must register itself.
    """
    return _registrar(_MODULES, kinds)


def has_module_rule(module: nn.Module) -> bool:
    return type(module) in _MODULES or type(module).__name__ in _MODULES


def register_function(*functions: Callable):
    """Rule for calls of these functions (``torch.cat``, ``operator.add``, ``F.pad``, ...)."""
    return _registrar(_FUNCTIONS, functions)


def register_method(*names: str):
    """Rule for calls of these tensor methods, by name."""
    return _registrar(_METHODS, names)


_IN_PLACE_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "relu_", "sigmoid_", "tanh_"}


def mutates_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input an in-place op writes to (``x += y``, ``x.mul_(g)``, ``ReLU(inplace=True)``), or None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and str(node.target).endswith("_"):
        return first
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return first
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False) is True:
        return first
    return None


def spatial_args(node: fx.Node, ctx: OpContext) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n in ctx.spatial]


def require_nchw(layout: Layout, what: str) -> None:
    if layout != NCHW:
        raise NoRule(f"{what} on a tensor whose spatial axes are {layout}, not (H, W) last")


def make_rule(node: fx.Node, ctx: OpContext) -> Rule:
    """The rule for a spatial ``node``, a reduction (spatial in, global out) or a size query;
    raises NoRule with the reason when there is none."""
    xs = spatial_args(node, ctx)
    layouts = {ctx.layouts[x] for x in xs}
    if len(layouts) != 1:
        raise NoRule("inputs with different spatial layouts" if layouts else "a full-size value made without "
                     "reading the image region by region (e.g. torch.zeros(x.shape))")
    layout = layouts.pop()
    if node.op == "call_module":
        module = ctx.gm.get_submodule(node.target)
        maker = _MODULES.get(type(module)) or _MODULES.get(type(module).__name__)
        extra: tuple = (module,)
        missing = f"no split rule for module type {type(module).__name__}"
    elif node.op == "call_function":
        maker, extra = _FUNCTIONS.get(node.target), ()
        missing = f"no split rule for function {getattr(node.target, '__name__', node.target)}"
    elif node.op == "call_method":
        maker, extra = _METHODS.get(node.target), ()
        missing = f"no split rule for method Tensor.{node.target}"
    else:
        raise NoRule(f"graph node of kind {node.op}")
    if maker is None:
        name = describe_op(node, ctx.gm).removeprefix("Tensor.")
        raise NoRule(f"global op: each output reads the whole spatial extent ({name})"
                     if name in GLOBAL_HINT else missing)
    rule = maker(node, ctx, xs, layout, *extra)
    if node in ctx.spatial:
        ctx.layouts[node] = rule.layout
        if isinstance(rule, Pointwise):
            check_aligned(rule, ctx)
    return rule


# ops that read a whole feature map when applied to a spatial value
GLOBAL_HINT = {
    "flatten", "Flatten", "view", "reshape", "softmax", "Softmax", "GroupNorm", "group_norm", "InstanceNorm2d",
    "instance_norm", "std", "var", "norm", "max", "min", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "sum", "amax", "amin", "item", "tolist",
}


def _broadcast_constant(shape: torch.Size, out_shape: torch.Size, layout: Layout) -> bool:
    """A non-spatial operand (parameter, SE gate) is the same for every pixel of the output."""
    return all(len(shape) < -axis or shape[axis] == 1 for axis in layout) or len(shape) == 0


def check_aligned(rule: Pointwise, ctx: OpContext) -> None:
    """Spatial inputs cover the same pixels as the output; other tensor operands are constant over space."""
    node = rule.node
    out_hw = spatial_dims(ctx.shapes[node], rule.layout)
    for x in node.all_input_nodes:
        shape = ctx.shapes.get(x)
        if x in ctx.spatial:
            in_hw = spatial_dims(shape, ctx.layouts[x])
            if in_hw != out_hw:
                raise NoRule(f"input of spatial size {tuple(in_hw)} combined with output of size {tuple(out_hw)}")
        elif isinstance(shape, torch.Size) and isinstance(ctx.shapes[node], torch.Size) \
                and not _broadcast_constant(shape, ctx.shapes[node], rule.layout):
            raise NoRule(f"operand {x.name} of shape {tuple(shape)} varies over the spatial axes")
