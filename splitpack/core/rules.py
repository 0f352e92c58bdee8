"""Per-op input-region rules for exact split-pack execution.

Each spatial value in the head of the network has a *layout*: the (negative)
axes of its height and width. For an op, a rule answers two questions:

* ``input_window(out, i)``: which region of its i-th spatial input (in that
  input's full-size coordinates, *unclamped*: it may reach past the border,
  where the op's own padding lives) is needed to produce region ``out`` of
  its output;
* ``compute(...)``: produce exactly that output region from the input
  regions, after the executor has cut them out and padded the part of the
  window that lies past the true image border with ``pad_value``.

Interior pack edges therefore see real neighbouring pixels and only the image
border sees padding, which makes the result equal to the unsplit op.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from splitpack.core.graph import describe_op

Interval = tuple[int, int]  # [start, stop)
Region = tuple[Interval, Interval]  # (rows, cols)
Layout = tuple[int, int]  # negative axes of (height, width)
NCHW: Layout = (-2, -1)


class NoRule(Exception):
    """The op cannot be computed region by region (the reason is the message)."""


# --------------------------------------------------------------------------- helpers

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _spatial_dims(shape: torch.Size, layout: Layout) -> tuple[int, int]:
    return shape[layout[0]], shape[layout[1]]


# --------------------------------------------------------------------------- rule base

@dataclass
class Rule:
    node: fx.Node
    spatial_inputs: list[fx.Node]
    layout: Layout = NCHW
    pad_value: float = 0.0

    def input_window(self, out: Region, i: int) -> Region:
        return out

    def compute(self, values: dict[fx.Node, Any], out: Region) -> torch.Tensor:
        raise NotImplementedError


class Pointwise(Rule):
    """Output pixel (h, w) depends only on input pixel (h, w): run the op as it is."""

    def __init__(self, node, spatial_inputs, layout, call: Callable):
        super().__init__(node, spatial_inputs, layout)
        self.call = call

    def check_aligned(self, shapes: dict[fx.Node, torch.Size], in_layout: Layout) -> None:
        """Every spatial input must cover the same pixels as the output (no spatial broadcast)."""
        out_hw = _spatial_dims(shapes[self.node], self.layout)
        for x in self.spatial_inputs:
            in_hw = _spatial_dims(shapes[x], in_layout)
            if in_hw != out_hw:
                raise NoRule(f"input of spatial size {tuple(in_hw)} combined with output of size {tuple(out_hw)}")

    def compute(self, values, out):
        args = fx.node.map_arg(self.node.args, values.__getitem__)
        kwargs = fx.node.map_arg(self.node.kwargs, values.__getitem__)
        return self.call(*args, **kwargs)


@dataclass
class _Window1d:
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

    def __init__(self, node, spatial_input, dims: tuple[_Window1d, _Window1d], pad_value: float, op: Callable):
        super().__init__(node, [spatial_input], NCHW, pad_value)
        self.dims = dims
        self.op = op

    def input_window(self, out, i):
        return self.dims[0].needed(out[0]), self.dims[1].needed(out[1])

    def compute(self, values, out):
        return self.op(values[self.spatial_inputs[0]], out, values)


# --------------------------------------------------------------------------- op tables

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.clamp, torch.clip, torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.pow, torch.maximum,
    torch.minimum, torch.where, torch.erf, torch.neg, torch.square, torch.reciprocal,
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.hardtanh, F.softplus, F.dropout, F.dropout2d,
    F.alpha_dropout,
}
_POINTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "exp", "abs", "sqrt",
    "rsqrt", "pow", "neg", "erf", "square", "reciprocal", "contiguous", "float", "half", "bfloat16",
    "to", "type_as", "hardswish", "hardsigmoid", "silu",
}
_GLOBAL_HINT = {
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "flatten", "Flatten", "view", "reshape", "softmax", "Softmax",
    "GroupNorm", "group_norm", "InstanceNorm2d", "instance_norm", "size", "getattr", "SelectAdaptivePool2d",
}


def _training_check(node: fx.Node, training: bool) -> None:
    if training:
        raise NoRule("BatchNorm in train mode uses batch statistics of the whole image; call model.eval()")


# --------------------------------------------------------------------------- window ops

def _same_total(size: int, k: int, s: int, d: int = 1) -> int:
    """TF 'SAME' total padding along one dim (timm's get_same_padding), from the input size."""
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def _conv_padding(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) padding per spatial dim, the way the unsplit conv applies it."""
    pads = []
    for i in range(2):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if type(conv).__name__ == "Conv2dSame":  # timm: TF 'SAME', from the input size
            total = _same_total(in_hw[i], k, s, d)
            pads.append((total // 2, total - total // 2))
        elif conv.padding == "same":
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        elif conv.padding == "valid":
            pads.append((0, 0))
        else:
            pads.append((conv.padding[i], conv.padding[i]))
    return pads[0], pads[1]


def _window_dims(kernel, stride, dilation, before) -> tuple[_Window1d, _Window1d]:
    k, s, d, b = _pair(kernel), _pair(stride), _pair(dilation), _pair(before)
    return _Window1d(k[0], s[0], d[0], b[0]), _Window1d(k[1], s[1], d[1], b[1])


def _conv_rule(node, x, conv: nn.Conv2d, in_hw) -> Window:
    if conv.padding_mode != "zeros":
        raise NoRule(f"convolution with padding_mode={conv.padding_mode!r} (only zero padding is split)")
    (ph, _), (pw, _) = _conv_padding(conv, in_hw)

    def op(t, out, values):
        return F.conv2d(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    return Window(node, x, _window_dims(conv.kernel_size, conv.stride, conv.dilation, (ph, pw)), 0.0, op)


def _max_pool_rule(node, x, kernel, stride, padding, dilation, ceil_mode, return_indices=False, same_hw=None):
    if return_indices:
        raise NoRule("max pooling with return_indices")
    stride = stride or kernel
    if same_hw is not None:
        padding = _same_before(kernel, stride, dilation, same_hw)

    def op(t, out, values):
        return F.max_pool2d(t, kernel, stride, 0, dilation)

    return Window(node, x, _window_dims(kernel, stride, dilation, padding), -math.inf, op)


def _same_before(kernel, stride, dilation, in_hw) -> tuple[int, int]:
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
    return tuple(_same_total(in_hw[i], k[i], s[i], d[i]) // 2 for i in range(2))


def _avg_counts(n_out: int, size: int, k: int, s: int, pad: int, include_pad: bool) -> np.ndarray:
    """ATen's avg_pool divisor along one dim (pad = native padding of the op)."""
    o = np.arange(n_out)
    start = o * s - pad
    end = np.minimum(start + k, size + pad)
    pool = end - start
    if include_pad:
        return pool
    return np.minimum(end, size) - np.maximum(start, 0)


def _avg_pool_rule(node, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override,
                   in_hw, out_hw, extra_before=(0, 0), extra_total=(0, 0)):
    """Average pooling = window sum / ATen's divisor map (which depends on the position).

    ``extra_*`` is explicit 'SAME' padding applied before the pool (timm's AvgPool2dSame):
    it counts as real input for the divisor.
    """
    stride = stride or kernel
    k, s, p = _pair(kernel), _pair(stride), _pair(padding)
    before = (p[0] + extra_before[0], p[1] + extra_before[1])
    if divisor_override:
        rows = np.full(out_hw[0], float(divisor_override))
        cols = np.ones(out_hw[1])
    else:
        rows = _avg_counts(out_hw[0], in_hw[0] + extra_total[0], k[0], s[0], p[0], count_include_pad)
        cols = _avg_counts(out_hw[1], in_hw[1] + extra_total[1], k[1], s[1], p[1], count_include_pad)
    divisor = torch.from_numpy(np.outer(rows, cols).astype(np.float64))

    def op(t, out, values):
        total = F.avg_pool2d(t, k, s, 0, False, True, divisor_override=1)
        (r0, r1), (c0, c1) = out
        return total / divisor[r0:r1, c0:c1].to(device=total.device, dtype=total.dtype)

    return Window(node, x, _window_dims(k, s, 1, before), 0.0, op)


def _pad_rule(node, x, pad, value, mode):
    if mode != "constant":
        raise NoRule(f"padding mode {mode!r} (only constant padding is split)")
    pad = list(pad)
    if len(pad) < 4 or any(pad[4:]):
        if len(pad) != 2:
            raise NoRule("padding of non-spatial dims")
        pad = pad + [0, 0]
    w_before, h_before = pad[0], pad[2]
    value = 0.0 if value is None else float(value)

    def op(t, out, values):
        return t  # the executor already cut the window and padded past the border

    return Window(node, x, _window_dims(1, 1, 1, (h_before, w_before)), value, op)


# --------------------------------------------------------------------------- resize

class Resize(Rule):
    """Nearest / bilinear interpolation by explicit source indices (as ATen computes them)."""

    def __init__(self, node, x, mode, align_corners, scale_factor, in_hw, out_hw):
        super().__init__(node, [x], NCHW)
        if mode not in ("nearest", "bilinear"):
            raise NoRule(f"interpolation mode {mode!r} (nearest and bilinear are split)")
        sf = _pair(scale_factor) if scale_factor is not None and not isinstance(scale_factor, float) else (
            (scale_factor, scale_factor) if scale_factor is not None else (None, None))
        self.mode = mode
        self.index = [self._source(mode, align_corners, sf[i], in_hw[i], out_hw[i]) for i in range(2)]

    @staticmethod
    def _source(mode, align_corners, scale, n_in, n_out):
        o = np.arange(n_out)
        if mode == "nearest":
            if n_out == n_in:
                return o, o, np.zeros(n_out, np.float32)
            f = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
            src = np.minimum(np.floor(o.astype(np.float32) * f).astype(np.int64), n_in - 1)
            return src, src, np.zeros(n_out, np.float32)
        if align_corners:
            f = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
            real = f * o.astype(np.float32)
        else:
            f = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
            real = np.maximum(f * (o.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
        i0 = real.astype(np.int64)
        lam = np.clip(real - i0, 0, 1).astype(np.float32)
        i1 = i0 + (i0 < n_in - 1)
        return i0, i1, lam

    def input_window(self, out, i):
        windows = []
        for d, (o0, o1) in enumerate(out):
            i0, i1, _ = self.index[d]
            windows.append((int(i0[o0:o1].min()), int(i1[o0:o1].max()) + 1))
        return windows[0], windows[1]

    def compute(self, values, out):
        t = values[self.spatial_inputs[0]]
        window = self.input_window(out, 0)  # the executor cut exactly this (it lies inside the input)
        for d, axis in enumerate((-2, -1)):
            i0, i1, lam = (a[out[d][0]:out[d][1]] for a in self.index[d])
            start = window[d][0]
            a = t.index_select(axis, torch.as_tensor(i0 - start, device=t.device))
            if self.mode == "nearest":
                t = a
                continue
            b = t.index_select(axis, torch.as_tensor(i1 - start, device=t.device))
            shape = [1] * t.dim()
            shape[axis] = -1
            w = torch.as_tensor(lam, device=t.device, dtype=t.dtype).view(shape)
            t = a + (b - a) * w
        return t


# --------------------------------------------------------------------------- classification

@dataclass
class OpContext:
    """What a rule may look at: the module, full-size shapes and layouts of inputs."""

    gm: fx.GraphModule
    shapes: dict[fx.Node, torch.Size]
    layouts: dict[fx.Node, Layout]
    spatial: set[fx.Node] = field(default_factory=set)


def _spatial_args(node: fx.Node, ctx: OpContext) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n in ctx.spatial]


def _op_name(node: fx.Node, ctx: OpContext) -> str:
    return describe_op(node, ctx.gm).removeprefix("Tensor.")


def make_rule(node: fx.Node, ctx: OpContext) -> Rule:
    """The rule for ``node``; raises NoRule with the reason when there is none."""
    xs = _spatial_args(node, ctx)
    name = _op_name(node, ctx)
    if name in _GLOBAL_HINT:
        raise NoRule("global op: each output reads the whole spatial extent")
    layouts = {ctx.layouts[x] for x in xs}
    if len(layouts) != 1:
        raise NoRule("inputs with different spatial layouts")
    layout = layouts.pop()
    out_shape = ctx.shapes.get(node)
    if out_shape is None:
        raise NoRule("the op does not return a tensor")
    if node.op == "call_module":
        rule = _module_rule(node, ctx, xs, layout, ctx.gm.get_submodule(node.target))
    elif node.op == "call_function":
        rule = _function_rule(node, ctx, xs, layout)
    elif node.op == "call_method":
        rule = _method_rule(node, ctx, xs, layout)
    else:
        raise NoRule(f"graph node of kind {node.op}")
    if isinstance(rule, Pointwise):
        rule.check_aligned(ctx.shapes, layout)
    return rule


def _require_nchw(layout: Layout, what: str) -> None:
    if layout != NCHW:
        raise NoRule(f"{what} on a tensor whose spatial axes are {layout}, not (H, W) last")


def _in_out_hw(node, x, ctx):
    return tuple(ctx.shapes[x][-2:]), tuple(ctx.shapes[node][-2:])


def _module_rule(node, ctx, xs, layout, m: nn.Module) -> Rule:
    kind = type(m)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        _training_check(node, m.training)
        if kind.__name__ not in ("BatchNorm2d", "BatchNormAct2d"):
            raise NoRule(f"{kind.__name__} (no split rule)")
        return Pointwise(node, xs, layout, m)
    if kind in _POINTWISE_MODULES:
        return Pointwise(node, xs, layout, m)
    if kind is nn.Conv2d or kind.__name__ == "Conv2dSame":
        _require_nchw(layout, "convolution")
        return _conv_rule(node, xs[0], m, _in_out_hw(node, xs[0], ctx)[0])
    if kind is nn.MaxPool2d or kind.__name__ == "MaxPool2dSame":
        _require_nchw(layout, "max pooling")
        same = _in_out_hw(node, xs[0], ctx)[0] if kind.__name__ == "MaxPool2dSame" else None
        return _max_pool_rule(node, xs[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                              m.return_indices, same)
    if kind is nn.AvgPool2d or kind.__name__ == "AvgPool2dSame":
        _require_nchw(layout, "average pooling")
        in_hw, out_hw = _in_out_hw(node, xs[0], ctx)
        extra_before, extra_total = (0, 0), (0, 0)
        if kind.__name__ == "AvgPool2dSame":
            k, s = _pair(m.kernel_size), _pair(m.stride)
            extra_total = tuple(_same_total(in_hw[i], k[i], s[i]) for i in range(2))
            extra_before = tuple(t // 2 for t in extra_total)
        return _avg_pool_rule(node, xs[0], m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                              m.divisor_override, in_hw, out_hw, extra_before, extra_total)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        _require_nchw(layout, "padding")
        return _pad_rule(node, xs[0], m.padding, getattr(m, "value", 0.0), "constant")
    if kind is nn.Upsample:
        _require_nchw(layout, "upsampling")
        in_hw, out_hw = _in_out_hw(node, xs[0], ctx)
        return Resize(node, xs[0], m.mode, m.align_corners, m.scale_factor if not m.recompute_scale_factor else None,
                      in_hw, out_hw)
    if kind is nn.LayerNorm:
        return _last_dims_rule(node, xs, layout, len(m.normalized_shape), m, "layer norm")
    if kind is nn.Linear:
        return _last_dims_rule(node, xs, layout, 1, m, "linear layer")
    raise NoRule(f"no split rule for module type {kind.__name__}")


def _last_dims_rule(node, xs, layout, n_dims, call, what) -> Rule:
    if min(layout) >= -n_dims:
        raise NoRule(f"{what} over the spatial axes")
    return Pointwise(node, xs, layout, call)


def _function_rule(node, ctx, xs, layout) -> Rule:
    fn = node.target
    if fn is F.batch_norm:
        _training_check(node, _arg(node, 5, "training", False))
        return Pointwise(node, xs, layout, fn)
    if fn in _POINTWISE_FUNCTIONS:
        return Pointwise(node, xs, layout, fn)
    if fn is torch.cat or fn is torch.concat:
        dim = _arg(node, 1, "dim", 0)
        ndim = len(ctx.shapes[node])
        if (dim - ndim if dim >= 0 else dim) in layout:
            raise NoRule("concatenation along a spatial axis")
        return Pointwise(node, xs, layout, fn)
    if fn is F.layer_norm:
        return _last_dims_rule(node, xs, layout, len(_pair_list(_arg(node, 1, "normalized_shape"))), fn, "layer norm")
    if fn is F.linear:
        return _last_dims_rule(node, xs, layout, 1, fn, "linear layer")
    if fn is operator.getitem:
        return _getitem_rule(node, ctx, xs, layout)
    if fn is torch.permute:
        return _permute_rule(node, ctx, xs, layout, _arg(node, 1, "dims"))
    if fn is F.pad:
        _require_nchw(layout, "padding")
        return _pad_rule(node, xs[0], _arg(node, 1, "pad"), _arg(node, 3, "value", 0.0),
                         _arg(node, 2, "mode", "constant"))
    if fn is F.interpolate:
        _require_nchw(layout, "interpolation")
        in_hw, out_hw = _in_out_hw(node, xs[0], ctx)
        recompute = _arg(node, 5, "recompute_scale_factor", None)
        scale = None if recompute else _arg(node, 2, "scale_factor", None)
        return Resize(node, xs[0], _arg(node, 3, "mode", "nearest"), _arg(node, 4, "align_corners", None), scale,
                      in_hw, out_hw)
    if fn is F.conv2d:
        _require_nchw(layout, "convolution")
        if xs != [node.args[0]]:
            raise NoRule("convolution whose weights depend on the image")
        return _functional_conv_rule(node, ctx, xs[0])
    if fn is F.max_pool2d:
        _require_nchw(layout, "max pooling")
        k = _arg(node, 1, "kernel_size")
        return _max_pool_rule(node, xs[0], k, _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
                              _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False),
                              _arg(node, 6, "return_indices", False))
    if fn is F.avg_pool2d:
        _require_nchw(layout, "average pooling")
        in_hw, out_hw = _in_out_hw(node, xs[0], ctx)
        return _avg_pool_rule(node, xs[0], _arg(node, 1, "kernel_size"), _arg(node, 2, "stride", None),
                              _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False),
                              _arg(node, 5, "count_include_pad", True), _arg(node, 6, "divisor_override", None),
                              in_hw, out_hw)
    raise NoRule(f"no split rule for function {getattr(fn, '__name__', fn)}")


def _pair_list(v):
    return [v] if isinstance(v, int) else list(v)


def _functional_conv_rule(node, ctx, x) -> Window:
    stride = _arg(node, 3, "stride", 1)
    padding = _arg(node, 4, "padding", 0)
    dilation = _arg(node, 5, "dilation", 1)
    groups = _arg(node, 6, "groups", 1)
    weight_shape = ctx.shapes[node.args[1]] if isinstance(node.args[1], fx.Node) else node.args[1].shape
    k = tuple(weight_shape[-2:])
    if isinstance(padding, str):
        d = _pair(dilation)
        padding = tuple((d[i] * (k[i] - 1)) // 2 for i in range(2)) if padding == "same" else (0, 0)
    weight_node, bias_node = node.args[1], _arg(node, 2, "bias", None)

    def op(t, out, values):
        w = values[weight_node] if isinstance(weight_node, fx.Node) else weight_node
        b = values[bias_node] if isinstance(bias_node, fx.Node) else bias_node
        return F.conv2d(t, w, b, stride, 0, dilation, groups)

    return Window(node, x, _window_dims(k, stride, dilation, padding), 0.0, op)


def _getitem_rule(node, ctx, xs, layout) -> Rule:
    index = node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    ndim = len(ctx.shapes[node.args[0]]) if node.args[0] in ctx.shapes else None
    if ndim is None or any(i is None for i in index):
        raise NoRule("indexing that adds axes")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    for axis, entry in enumerate(index):
        if axis - ndim in layout and entry != slice(None):
            raise NoRule("indexing along a spatial axis")
    return Pointwise(node, xs, layout, operator.getitem)


def _permute_rule(node, ctx, xs, layout, dims) -> Rule:
    if isinstance(dims, int) or dims is None:
        dims = node.args[1:]
    ndim = len(ctx.shapes[node])
    dims = [d % ndim for d in dims]
    ctx.layouts[node] = tuple(dims.index(a % ndim) - ndim for a in layout)
    call = node.target if node.op == "call_function" else (lambda t, *a: t.permute(*a))
    return Pointwise(node, xs, ctx.layouts[node], call)


def _method_rule(node, ctx, xs, layout) -> Rule:
    name = node.target
    if name in _POINTWISE_METHODS:
        return Pointwise(node, xs, layout, lambda t, *a, **k: getattr(t, name)(*a, **k))
    if name == "permute":
        return _permute_rule(node, ctx, xs, layout, list(node.args[1:]) if not isinstance(node.args[1], (list, tuple))
                             else node.args[1])
    if name in ("transpose", "swapaxes"):
        ndim = len(ctx.shapes[node])
        a, b = (d % ndim for d in node.args[1:3])
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
        ctx.layouts[node] = tuple(dims.index(x % ndim) - ndim for x in layout)
        return Pointwise(node, xs, ctx.layouts[node], lambda t, *args: t.transpose(*args))
    raise NoRule(f"no split rule for method Tensor.{name}")
