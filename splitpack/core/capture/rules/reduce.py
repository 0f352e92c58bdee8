"""Reductions: over the spatial axes (global pooling, squeeze-excitation statistics) they are
accumulated pack by pack; over channels (CBAM's spatial attention) each pixel stands alone.
Also size queries of spatial values (``x.shape``), answered from the full size."""
from __future__ import annotations

import builtins

import torch
import torch.nn.functional as F
from torch import nn

from splitpack.core.capture.rules.base import NoRule, MetaQuery, Reduce, arg, register_function, register_method, \
    register_module
from splitpack.core.capture.rules.pointwise import _dims, _method_call, channel_reduction

_KINDS = {"mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin"}


def _reduction(node, ctx, xs, layout, kind: str, dims, keepdim: bool, call, dtype=None):
    ndim = len(ctx.shapes[xs[0]])
    dims = _dims(dims, ndim)
    if dims is None:
        raise NoRule(f"{kind} over every axis (channels and space together)")
    spatial = set(layout)
    if set(dims) == spatial:
        return Reduce(node, xs[0], layout, kind, bool(keepdim), dtype)
    if not spatial & set(dims):
        return channel_reduction(node, ctx, xs, layout, dims, keepdim, call)
    raise NoRule(f"{kind} over axes {dims} mixes spatial and other axes")


def _reduction_maker(kind: str, method: bool):
    def maker(node, ctx, xs, layout):
        if len(node.all_input_nodes) != 1 or node.args[0] is not xs[0]:
            raise NoRule(f"{kind} with tensor arguments")
        call = _method_call(kind) if method else node.target
        return _reduction(node, ctx, xs, layout, kind, arg(node, 1, "dim", None), arg(node, 2, "keepdim", False),
                          call, node.kwargs.get("dtype"))
    return maker


for _kind in _KINDS:
    register_method(_kind)(_reduction_maker(_kind, True))
    register_function(getattr(torch, _kind))(_reduction_maker(_kind, False))


def _adaptive_to_one(node, ctx, xs, layout, kind: str, output_size):
    if output_size not in (1, (1, 1), [1, 1]):
        raise NoRule(f"adaptive pooling to {output_size} (global pooling to 1x1 is split)")
    if layout != (-2, -1):
        raise NoRule("adaptive pooling of a tensor whose spatial axes are not last")
    return Reduce(node, xs[0], layout, kind, keepdim=True)


@register_module(nn.AdaptiveAvgPool2d)
def _adaptive_avg_module(node, ctx, xs, layout, m):
    return _adaptive_to_one(node, ctx, xs, layout, "mean", m.output_size)


@register_module(nn.AdaptiveMaxPool2d)
def _adaptive_max_module(node, ctx, xs, layout, m):
    if m.return_indices:
        raise NoRule("adaptive max pooling with return_indices")
    return _adaptive_to_one(node, ctx, xs, layout, "amax", m.output_size)


@register_function(F.adaptive_avg_pool2d)
def _adaptive_avg(node, ctx, xs, layout):
    return _adaptive_to_one(node, ctx, xs, layout, "mean", arg(node, 1, "output_size"))


@register_function(F.adaptive_max_pool2d)
def _adaptive_max(node, ctx, xs, layout):
    if arg(node, 2, "return_indices", False):
        raise NoRule("adaptive max pooling with return_indices")
    return _adaptive_to_one(node, ctx, xs, layout, "amax", arg(node, 1, "output_size"))


# --------------------------------------------------------------------------- size queries

_SIZE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}


@register_function(builtins.getattr)
def _getattr(node, ctx, xs, layout):
    if node.args[1] not in _SIZE_ATTRIBUTES:
        raise NoRule(f"attribute {node.args[1]!r} of a feature map")
    return MetaQuery(node, xs, layout)


@register_method("size", "dim")
def _size(node, ctx, xs, layout):
    return MetaQuery(node, xs, layout)
