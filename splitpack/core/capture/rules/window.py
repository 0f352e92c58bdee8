"""Sliding-window ops: convolution, max/avg pooling, constant padding."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from splitpack.core.capture.rules.base import (NCHW, Interval, NoRule, Rule, Window, arg, pair, register_function,
                                       register_module, require_nchw, window_dims)


def same_total(size: int, k: int, s: int, d: int = 1) -> int:
    """TF 'SAME' total padding along one dim (timm's get_same_padding), from the input size."""
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def _in_hw(ctx, x) -> tuple[int, int]:
    return tuple(ctx.shapes[x][-2:])


def _out_hw(ctx, node) -> tuple[int, int]:
    return tuple(ctx.shapes[node][-2:])


# --------------------------------------------------------------------------- convolution

def _conv_padding(conv: nn.Conv2d, in_hw: tuple[int, int], tf_same: bool) -> tuple[int, int]:
    """Padding before the first input element per spatial dim, the way the unsplit conv applies it."""
    before = []
    for i in range(2):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if tf_same:  # timm Conv2dSame: TF 'SAME', from the input size
            before.append(same_total(in_hw[i], k, s, d) // 2)
        elif conv.padding == "same":
            before.append(d * (k - 1) // 2)
        elif conv.padding == "valid":
            before.append(0)
        else:
            before.append(conv.padding[i])
    return before[0], before[1]


def conv_rule(node, ctx, xs, layout, conv: nn.Conv2d, weight, tf_same: bool) -> Window:
    """``weight()``: the kernel as the module's forward computes it, at each call."""
    require_nchw(layout, "convolution")
    if conv.padding_mode != "zeros":
        raise NoRule(f"convolution with padding_mode={conv.padding_mode!r} (only zero padding is split)")
    before = _conv_padding(conv, _in_hw(ctx, xs[0]), tf_same)

    def op(t, out, values, padding=(0, 0)):
        return F.conv2d(t, weight(), conv.bias, conv.stride, padding, conv.dilation, conv.groups)

    return Window(node, xs[0], window_dims(conv.kernel_size, conv.stride, conv.dilation, before), 0.0, op,
                  pads_first=tf_same)


@register_module(nn.Conv2d, "Conv2dSame")
def _conv(node, ctx, xs, layout, conv: nn.Conv2d) -> Window:
    return conv_rule(node, ctx, xs, layout, conv, lambda: conv.weight, type(conv).__name__ == "Conv2dSame")


def standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """timm's (scaled) weight standardisation, the same ops as its forward (so the same bits)."""
    scale = getattr(conv, "gain", None)
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        weight=None if scale is None else (conv.gain * conv.scale).view(-1),
                        training=True, momentum=0., eps=conv.eps).reshape_as(conv.weight)


STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def fixed_temporary_bytes(module: nn.Module) -> int:
    """Bytes a module's call keeps alive inside it whatever the size of its input: a weight-standardised
    convolution's standardised kernel (computed in every call, per pack in a split run)."""
    if type(module).__name__ in STD_CONVS:
        return module.weight.numel() * module.weight.element_size()
    return 0


@register_module(*STD_CONVS)
def _std_conv(node, ctx, xs, layout, conv: nn.Conv2d) -> Window:
    """A convolution whose weights are standardised (NFNets): not a spatial op, so the region rule is
    the convolution's. The kernel is standardised in each call as the module does: precomputed, every
    standardised kernel of the network would be alive at once (as much memory as the parameters)."""
    return conv_rule(node, ctx, xs, layout, conv, lambda: standardized_weight(conv), getattr(conv, "same_pad", False))


@register_function(F.conv2d)
def _functional_conv(node, ctx, xs, layout) -> Window:
    require_nchw(layout, "convolution")
    if xs != [node.args[0]]:
        raise NoRule("convolution whose weights depend on the image")
    stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
    dilation, groups = arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1)
    weight_node, bias_node = node.args[1], arg(node, 2, "bias", None)
    weight_shape = ctx.shapes[weight_node] if isinstance(weight_node, fx.Node) else weight_node.shape
    k = tuple(weight_shape[-2:])
    if isinstance(padding, str):
        d = pair(dilation)
        padding = tuple((d[i] * (k[i] - 1)) // 2 for i in range(2)) if padding == "same" else (0, 0)

    def op(t, out, values, padding=(0, 0)):
        w = values[weight_node] if isinstance(weight_node, fx.Node) else weight_node
        b = values[bias_node] if isinstance(bias_node, fx.Node) else bias_node
        return F.conv2d(t, w, b, stride, padding, dilation, groups)

    return Window(node, xs[0], window_dims(k, stride, dilation, padding), 0.0, op)


# --------------------------------------------------------------------------- max pooling

def _half(kernel) -> tuple[int, int]:
    """The most padding ATen's pooling applies itself: half the kernel."""
    k = pair(kernel)
    return k[0] // 2, k[1] // 2


def _same_before(kernel, stride, dilation, in_hw) -> tuple[int, int]:
    k, s, d = pair(kernel), pair(stride), pair(dilation)
    return tuple(same_total(in_hw[i], k[i], s[i], d[i]) // 2 for i in range(2))


def max_pool_rule(node, x, kernel, stride, padding, dilation, return_indices=False, same_hw=None) -> Window:
    """ceil_mode needs nothing: the window of the last output is cut (and padded with -inf) by the executor."""
    if return_indices:
        raise NoRule("max pooling with return_indices")
    stride = stride or kernel
    if same_hw is not None:
        padding = _same_before(kernel, stride, dilation, same_hw)

    def op(t, out, values, padding=(0, 0)):
        return F.max_pool2d(t, kernel, stride, padding, dilation)

    return Window(node, x, window_dims(kernel, stride, dilation, padding), -math.inf, op, pad_limit=_half(kernel),
                  pads_first=same_hw is not None)


@register_module(nn.MaxPool2d, "MaxPool2dSame")
def _max_pool(node, ctx, xs, layout, m) -> Window:
    require_nchw(layout, "max pooling")
    same = _in_hw(ctx, xs[0]) if type(m).__name__ == "MaxPool2dSame" else None
    return max_pool_rule(node, xs[0], m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, same)


@register_function(F.max_pool2d)
def _functional_max_pool(node, ctx, xs, layout) -> Window:
    require_nchw(layout, "max pooling")
    return max_pool_rule(node, xs[0], arg(node, 1, "kernel_size"), arg(node, 2, "stride", None),
                         arg(node, 3, "padding", 0), arg(node, 4, "dilation", 1), arg(node, 6, "return_indices", False))


# --------------------------------------------------------------------------- average pooling

def _avg_counts(n_out: int, size: int, k: int, s: int, pad: int, include_pad: bool) -> np.ndarray:
    """ATen's avg_pool divisor along one dim (pad = native padding of the op)."""
    o = np.arange(n_out)
    start = o * s - pad
    end = np.minimum(start + k, size + pad)
    pool = end - start
    if include_pad:
        return pool
    return np.minimum(end, size) - np.maximum(start, 0)


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def avg_pool_rule(node, x, kernel, stride, padding, count_include_pad, divisor_override, in_hw, out_hw,
                  extra_before=(0, 0), extra_total=(0, 0), dtype: torch.dtype = torch.float32) -> Window:
    """Average pooling = window sum / ATen's divisor map (which depends on the position), divided in place
    by the map in the program's ``dtype`` (small integers: exact in it): the op allocates its output only,
    as the unsplit op does, which the peak replay counts.

    ``extra_*`` is explicit 'SAME' padding applied before the pool (timm's AvgPool2dSame):
    it counts as real input for the divisor.
    """
    stride = stride or kernel
    k, s, p = pair(kernel), pair(stride), pair(padding)
    before = (p[0] + extra_before[0], p[1] + extra_before[1])
    if divisor_override:
        rows = np.full(out_hw[0], float(divisor_override))
        cols = np.ones(out_hw[1])
    else:
        rows = _avg_counts(out_hw[0], in_hw[0] + extra_total[0], k[0], s[0], p[0], count_include_pad)
        cols = _avg_counts(out_hw[1], in_hw[1] + extra_total[1], k[1], s[1], p[1], count_include_pad)
    # built in numpy (no tensor allocated while a program is built inside a measured call); where numpy has
    # no such dtype (bfloat16) each call converts its slice
    divisor = torch.from_numpy(np.outer(rows, cols).astype(_NUMPY_DTYPES.get(dtype, np.float64)))

    def op(t, out, values, padding=(0, 0)):
        total = F.avg_pool2d(t, k, s, padding, False, True, divisor_override=1)
        (r0, r1), (c0, c1) = out
        return total.div_(divisor[r0:r1, c0:c1].to(device=total.device, dtype=total.dtype))

    return Window(node, x, window_dims(k, s, 1, before), 0.0, op, pad_limit=_half(k), positional=True,
                  pads_first=extra_total != (0, 0))


@register_module(nn.AvgPool2d, "AvgPool2dSame")
def _avg_pool(node, ctx, xs, layout, m) -> Window:
    require_nchw(layout, "average pooling")
    in_hw, out_hw = _in_hw(ctx, xs[0]), _out_hw(ctx, node)
    extra_before, extra_total = (0, 0), (0, 0)
    if type(m).__name__ == "AvgPool2dSame":
        k, s = pair(m.kernel_size), pair(m.stride)
        extra_total = tuple(same_total(in_hw[i], k[i], s[i]) for i in range(2))
        extra_before = tuple(t // 2 for t in extra_total)
    return avg_pool_rule(node, xs[0], m.kernel_size, m.stride, m.padding, m.count_include_pad,
                         m.divisor_override, in_hw, out_hw, extra_before, extra_total, ctx.dtype)


@register_function(F.avg_pool2d)
def _functional_avg_pool(node, ctx, xs, layout) -> Window:
    require_nchw(layout, "average pooling")
    return avg_pool_rule(node, xs[0], arg(node, 1, "kernel_size"), arg(node, 2, "stride", None),
                         arg(node, 3, "padding", 0), arg(node, 5, "count_include_pad", True),
                         arg(node, 6, "divisor_override", None), _in_hw(ctx, xs[0]), _out_hw(ctx, node),
                         dtype=ctx.dtype)


# --------------------------------------------------------------------------- constant padding

def pad_rule(node, x, pad, value, mode, in_hw) -> Rule:
    pad = list(pad)
    if len(pad) < 4 or any(pad[4:]):
        if len(pad) != 2:
            raise NoRule("padding of non-spatial dims")
        pad = pad + [0, 0]
    if mode in MirrorPad.MODES:
        return MirrorPad(node, x, (pad[2], pad[3]), (pad[0], pad[1]), mode, in_hw)
    if mode != "constant":
        raise NoRule(f"padding mode {mode!r} (constant, reflect and replicate padding are split)")
    value = 0.0 if value is None else float(value)

    def op(t, out, values):
        return t  # the executor already cut the window and padded past the border

    return Window(node, x, window_dims(1, 1, 1, (pad[2], pad[0])), value, op, pad_limit=(0, 0))


@register_module(nn.ZeroPad2d, nn.ConstantPad2d)
def _pad_module(node, ctx, xs, layout, m) -> Window:
    require_nchw(layout, "padding")
    return pad_rule(node, xs[0], m.padding, getattr(m, "value", 0.0), "constant", _in_hw(ctx, xs[0]))


@register_function(F.pad)
def _functional_pad(node, ctx, xs, layout) -> Window:
    require_nchw(layout, "padding")
    return pad_rule(node, xs[0], arg(node, 1, "pad"), arg(node, 3, "value", 0.0), arg(node, 2, "mode", "constant"),
                    _in_hw(ctx, xs[0]))


class MirrorPad(Rule):
    """Reflect / replicate padding: past the true border an output pixel copies an inner pixel
    (row -j reads row j, or row 0), so a pack at the border also reads those rows; interior
    packs read their window as it is. Anti-aliased downsampling (BlurPool) pads this way."""

    MODES = ("reflect", "replicate")

    def __init__(self, node, x, rows: tuple[int, int], cols: tuple[int, int], mode: str, in_hw: tuple[int, int]):
        super().__init__(node, [x], NCHW)
        self.pads, self.mode, self.in_hw = (rows, cols), mode, in_hw

    def _source(self, out: Interval, d: int) -> Interval:
        """Input rows (d=0) or columns the output interval reads, mirror sources included;
        past-border positions stay in the window, where the executor fills placeholders."""
        before, size = self.pads[d][0], self.in_hw[d]
        start, stop = out[0] - before, out[1] - before
        if start < 0:  # mirror of -j is j (reflect) or 0 (replicate)
            stop = max(stop, -start + 1 if self.mode == "reflect" else 1)
        if stop > size:  # mirror of size-1+j is size-1-j (reflect) or size-1 (replicate)
            start = min(start, 2 * size - stop - 1 if self.mode == "reflect" else size - 1)
        return start, stop

    def input_window(self, out, i):
        return self._source(out[0], 0), self._source(out[1], 1)

    def compute(self, values, out):
        t = values[self.spatial_inputs[0]]
        inner, pads, crop = [], [], []
        for d in (0, 1):
            start, stop = self._source(out[d], d)
            lo, hi = max(start, 0), min(stop, self.in_hw[d])
            inner.append(slice(lo - start, hi - start))
            before, after = max(0, -start), max(0, stop - self.in_hw[d])
            pads.append((before, after))
            first = out[d][0] - self.pads[d][0]  # input coordinate of the first output pixel
            crop.append(slice(first - (lo - before), first - (lo - before) + out[d][1] - out[d][0]))
        real = t[..., inner[0], inner[1]]
        mirrored = F.pad(real, (*pads[1], *pads[0]), mode=self.mode)
        return mirrored[..., crop[0], crop[1]]


# --------------------------------------------------------------------------- space to depth

def space_to_depth_rule(node, x, block: int, op) -> Window:
    """Each output pixel is one block x block patch of input pixels moved into channels:
    a window of that size and stride, without padding."""
    def run(t, out, values, padding=(0, 0)):
        return op(t)

    return Window(node, x, window_dims(block, block, 1, 0), 0.0, run, pad_limit=(0, 0))


@register_module(nn.PixelUnshuffle)
def _pixel_unshuffle(node, ctx, xs, layout, m) -> Window:
    require_nchw(layout, "pixel unshuffle")
    return space_to_depth_rule(node, xs[0], m.downscale_factor, m)


@register_function(F.pixel_unshuffle, torch.pixel_unshuffle)
def _functional_pixel_unshuffle(node, ctx, xs, layout) -> Window:
    require_nchw(layout, "pixel unshuffle")
    factor = arg(node, 1, "downscale_factor")
    return space_to_depth_rule(node, xs[0], factor, lambda t: F.pixel_unshuffle(t, factor))


@register_module("SpaceToDepth")
def _space_to_depth(node, ctx, xs, layout, m) -> Window:
    """timm's SpaceToDepth (TResNet's stem): a view / permute / view kept whole as one module."""
    require_nchw(layout, "space to depth")
    return space_to_depth_rule(node, xs[0], m.bs, m)
