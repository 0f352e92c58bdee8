"""Nearest and bilinear interpolation, by explicit source indices (as ATen computes them)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitpack.core.capture.rules.base import NCHW, NoRule, Rule, arg, pair, register_function, register_module, require_nchw


class Resize(Rule):
    """Nearest / bilinear interpolation by explicit source indices (as ATen computes them)."""

    def __init__(self, node, x, mode, align_corners, scale_factor, in_hw, out_hw, dtype=torch.float32):
        super().__init__(node, [x], NCHW)
        if mode not in ("nearest", "bilinear"):
            raise NoRule(f"interpolation mode {mode!r} (nearest and bilinear are split)")
        sf = pair(scale_factor) if scale_factor is not None and not isinstance(scale_factor, float) else (
            (scale_factor, scale_factor) if scale_factor is not None else (None, None))
        self.mode = mode
        # ATen: nearest indices in float; bilinear weights in the op's accumulate type (double for double)
        real_type = np.float64 if dtype == torch.float64 else np.float32
        self.index = [self._source(mode, align_corners, sf[i], in_hw[i], out_hw[i], real_type) for i in range(2)]

    @staticmethod
    def _source(mode, align_corners, scale, n_in, n_out, real_type):
        o = np.arange(n_out)
        if mode == "nearest":
            if n_out == n_in:
                return o, o, np.zeros(n_out, np.float32)
            f = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
            src = np.minimum(np.floor(o.astype(np.float32) * f).astype(np.int64), n_in - 1)
            return src, src, np.zeros(n_out, np.float32)
        if align_corners:
            f = real_type((n_in - 1) / (n_out - 1)) if n_out > 1 else real_type(0)
            real = f * o.astype(real_type)
        else:
            f = real_type(1.0 / scale) if scale else real_type(n_in) / real_type(n_out)
            real = np.maximum(f * (o.astype(real_type) + real_type(0.5)) - real_type(0.5), real_type(0))
        i0 = real.astype(np.int64)
        lam = np.clip(real - i0, 0, 1).astype(real_type)
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
        (i0h, i1h, lh), (i0w, i1w, lw) = [self._local(d, out[d], window[d][0]) for d in range(2)]
        rows, cols = torch.as_tensor(i0h, device=t.device), torch.as_tensor(i0w, device=t.device)
        if self.mode == "nearest":  # one gather: the output is the only allocation, as in the unsplit op
            return t[..., rows[:, None], cols[None, :]]
        # bilinear, one axis at a time: a + (b - a) * lambda, in place (see temporary_pixels)
        for axis, (i0, i1, lam) in ((-2, (rows, i1h, lh)), (-1, (cols, i1w, lw))):
            a, b = t.index_select(axis, i0), t.index_select(axis, torch.as_tensor(i1, device=t.device))
            shape = [1] * t.dim()
            shape[axis] = -1
            t = a.add_(b.sub_(a).mul_(torch.as_tensor(lam, device=t.device, dtype=t.dtype).view(shape)))
            del a, b
        return t

    def _local(self, d: int, span: tuple[int, int], start: int):
        """Source indices (into the cut window starting at ``start``) and weights of outputs ``span`` on axis d."""
        i0, i1, lam = (a[span[0]:span[1]] for a in self.index[d])
        return i0 - start, i1 - start, lam

    def temporary_pixels(self, out):
        if self.mode == "nearest":
            return 0
        (h0, h1), (w0, w1) = out
        win = self.input_window(out, 0)[1]
        rows, cols, width = h1 - h0, w1 - w0, win[1] - win[0]
        # rows pass: two (rows x width) gathers; columns pass: its input and two (rows x cols) gathers
        return max(2 * rows * width, rows * width + 2 * rows * cols) - rows * cols


def _hw(ctx, node):
    return tuple(ctx.shapes[node][-2:])


@register_module(nn.Upsample)
def _upsample(node, ctx, xs, layout, m) -> Resize:
    require_nchw(layout, "upsampling")
    scale = m.scale_factor if not m.recompute_scale_factor else None
    return Resize(node, xs[0], m.mode, m.align_corners, scale, _hw(ctx, xs[0]), _hw(ctx, node), ctx.dtype)


@register_function(F.interpolate)
def _interpolate(node, ctx, xs, layout) -> Resize:
    require_nchw(layout, "interpolation")
    scale = None if arg(node, 5, "recompute_scale_factor", None) else arg(node, 2, "scale_factor", None)
    return Resize(node, xs[0], arg(node, 3, "mode", "nearest"), arg(node, 4, "align_corners", None), scale,
                  _hw(ctx, xs[0]), _hw(ctx, node), ctx.dtype)
