"""Ops where an output pixel reads only the same input pixel: activations, arithmetic, eval BatchNorm,
channel concat and split, axis permutes, and channel-last LayerNorm / Linear."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from splitpack.core.capture.rules.base import (Layout, NoRule, Pointwise, arg, register_function, register_method,
                                       register_module)

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    # timm activations written as modules
    "Swish", "HardSwish", "HardSigmoid", "GELUTanh", "QuickGELU", "Sigmoid", "Tanh", "HardMish", "Mish",
    "DropPath",
)
_POINTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.clamp, torch.clip, torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.pow, torch.maximum,
    torch.minimum, torch.where, torch.erf, torch.neg, torch.square, torch.reciprocal,
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.hardtanh, F.softplus, F.dropout, F.dropout2d,
    F.alpha_dropout,
)
_POINTWISE_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "exp", "abs", "sqrt",
    "rsqrt", "pow", "neg", "erf", "square", "reciprocal", "contiguous", "float", "half", "bfloat16",
    "double", "to", "type_as", "hardswish", "hardsigmoid", "silu", "expand_as",
)


def _as_is(node, ctx, xs, layout, call=None) -> Pointwise:
    return Pointwise(node, xs, layout, call if call is not None else node.target)


def _method_call(name: str):
    return lambda t, *a, **k: getattr(t, name)(*a, **k)


for _kind in _POINTWISE_MODULES:
    register_module(_kind)(lambda node, ctx, xs, layout, m: _as_is(node, ctx, xs, layout, m))
register_function(*_POINTWISE_FUNCTIONS)(_as_is)
for _name in _POINTWISE_METHODS:
    register_method(_name)(lambda node, ctx, xs, layout, _n=_name: _as_is(node, ctx, xs, layout, _method_call(_n)))


def _training_check(training: bool) -> None:
    if training:
        raise NoRule("BatchNorm in train mode uses batch statistics of the whole image; call model.eval()")


@register_module(nn.BatchNorm2d, "BatchNormAct2d", "FrozenBatchNorm2d", "FrozenBatchNormAct2d")
def _batch_norm(node, ctx, xs, layout, m) -> Pointwise:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        _training_check(m.training or not m.track_running_stats)
    return Pointwise(node, xs, layout, m)


@register_function(F.batch_norm)
def _functional_batch_norm(node, ctx, xs, layout) -> Pointwise:
    _training_check(arg(node, 5, "training", False))
    return Pointwise(node, xs, layout, node.target)


# --------------------------------------------------------------------------- channel concat / split

def _channel_dim(dim: int, ndim: int, layout: Layout, what: str) -> None:
    if (dim - ndim if dim >= 0 else dim) in layout:
        raise NoRule(f"{what} along a spatial axis")


def _ndim(shape) -> int:
    return len(shape[0]) if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size) else len(shape)


@register_function(torch.cat, torch.concat)
def _cat(node, ctx, xs, layout) -> Pointwise:
    _channel_dim(arg(node, 1, "dim", 0), _ndim(ctx.shapes[node]), layout, "concatenation")
    return Pointwise(node, xs, layout, node.target)


def _split_rule(node, ctx, xs, layout, call, dim) -> Pointwise:
    _channel_dim(dim, _ndim(ctx.shapes[xs[0]]), layout, "split")
    return Pointwise(node, xs, layout, call)


@register_function(torch.split, torch.chunk, torch.tensor_split)
def _split_function(node, ctx, xs, layout) -> Pointwise:
    return _split_rule(node, ctx, xs, layout, node.target, arg(node, 2, "dim", 0))


@register_method("split", "chunk", "tensor_split")
def _split_method(node, ctx, xs, layout) -> Pointwise:
    return _split_rule(node, ctx, xs, layout, _method_call(node.target), arg(node, 2, "dim", 0))


@register_method("unbind")
def _unbind(node, ctx, xs, layout) -> Pointwise:
    return _split_rule(node, ctx, xs, layout, _method_call("unbind"), arg(node, 1, "dim", 0))


@register_function(operator.getitem)
def _getitem(node, ctx, xs, layout) -> Pointwise:
    source, index = node.args[0], node.args[1]
    shape = ctx.shapes.get(source)
    if isinstance(shape, tuple) and shape and isinstance(shape[0], torch.Size):  # a part of a channel split
        if not isinstance(index, (int, slice)):
            raise NoRule("indexing a split with a computed index")
        return Pointwise(node, xs, layout, operator.getitem)
    if not isinstance(index, tuple):
        index = (index,)
    if shape is None or any(i is None for i in index):
        raise NoRule("indexing that adds axes")
    ndim = len(shape)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (ndim - len(index))
    for axis, entry in enumerate(index):
        if axis - ndim in layout and entry != slice(None):
            raise NoRule("indexing along a spatial axis")
    dropped = [axis - ndim for axis, entry in enumerate(index) if not isinstance(entry, slice)]
    return Pointwise(node, xs, reduced_layout(layout, tuple(dropped), ndim, False), operator.getitem)


# --------------------------------------------------------------------------- reductions over channels

def _dims(value, ndim: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    dims = (value,) if isinstance(value, int) else tuple(value)
    return tuple(d - ndim if d >= 0 else d for d in dims)


def reduced_layout(layout: Layout, dims: tuple[int, ...], ndim: int, keepdim: bool) -> Layout:
    """Layout after reducing ``dims`` (none of them spatial)."""
    if keepdim:
        return layout
    return tuple(a + sum(1 for d in dims if d > a) for a in layout)


def channel_reduction(node, ctx, xs, layout, dims, keepdim, call) -> Pointwise:
    """A reduction over non-spatial axes (CBAM's channel mean/max): each pixel on its own."""
    ndim = len(ctx.shapes[xs[0]])
    return Pointwise(node, xs, reduced_layout(layout, dims, ndim, keepdim), call)


# --------------------------------------------------------------------------- layout changes

def _permuted(layout: Layout, dims: list[int], ndim: int) -> Layout:
    dims = [d % ndim for d in dims]
    return tuple(dims.index(a % ndim) - ndim for a in layout)


@register_function(torch.permute)
def _permute_function(node, ctx, xs, layout) -> Pointwise:
    dims = list(arg(node, 1, "dims"))
    return Pointwise(node, xs, _permuted(layout, dims, len(ctx.shapes[node])), node.target)


@register_method("permute")
def _permute_method(node, ctx, xs, layout) -> Pointwise:
    dims = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    return Pointwise(node, xs, _permuted(layout, dims, len(ctx.shapes[node])), _method_call("permute"))


@register_method("transpose", "swapaxes")
def _transpose(node, ctx, xs, layout) -> Pointwise:
    ndim = len(ctx.shapes[node])
    a, b = (d % ndim for d in node.args[1:3])
    dims = list(range(ndim))
    dims[a], dims[b] = dims[b], dims[a]
    return Pointwise(node, xs, _permuted(layout, dims, ndim), _method_call(node.target))


def _last_dims(node, xs, layout, n_dims, call, what) -> Pointwise:
    if min(layout) >= -n_dims:
        raise NoRule(f"{what} over the spatial axes")
    return Pointwise(node, xs, layout, call)


def _normalized_dims(shape) -> int:
    return 1 if isinstance(shape, int) else len(shape)


@register_module(nn.LayerNorm)
def _layer_norm(node, ctx, xs, layout, m) -> Pointwise:
    return _last_dims(node, xs, layout, len(m.normalized_shape), m, "layer norm")


@register_function(F.layer_norm)
def _functional_layer_norm(node, ctx, xs, layout) -> Pointwise:
    return _last_dims(node, xs, layout, _normalized_dims(arg(node, 1, "normalized_shape")), node.target, "layer norm")


@register_module(nn.Linear)
def _linear(node, ctx, xs, layout, m) -> Pointwise:
    return _last_dims(node, xs, layout, 1, m, "linear layer")


@register_function(F.linear)
def _functional_linear(node, ctx, xs, layout) -> Pointwise:
    return _last_dims(node, xs, layout, 1, node.target, "linear layer")


def _stochastic_depth_rule(node, ctx, xs, layout) -> Pointwise:
    if arg(node, 3, "training", True):
        raise NoRule("stochastic depth in training mode drops whole images at random; call model.eval()")
    return Pointwise(node, xs, layout, node.target)


def _register_torchvision() -> None:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional for timm-only use
        return
    register_function(stochastic_depth)(_stochastic_depth_rule)


_register_torchvision()
