"""Property: exact split-pack equals the unsplit network on randomly built CNNs.

Hypothesis draws a network from the op list of the engine's rules (convolutions with
every padding flavour, pooling, norms, activations, residual adds, channel concat,
upsampling), an odd input size, a grid (non-square included) and a merge layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import splitpack
from conftest import REL_TOL, randomize_norms, rel_error


class SamePad(nn.Module):
    """Asymmetric 'SAME' padding done with F.pad (as TF ports do), then a conv without padding."""

    def __init__(self, c_in, c_out, k, s):
        super().__init__()
        self.k, self.s = k, s
        self.conv = nn.Conv2d(c_in, c_out, k, s)

    def forward(self, x):
        total = self.k - self.s if self.k > self.s else 0
        return self.conv(F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)))


class Residual(nn.Module):
    def __init__(self, c, k, dilation):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding="same", dilation=dilation, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class Concat(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.b = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return torch.cat([self.a(x), F.gelu(self.b(x))], dim=1)


class Upsample(nn.Module):
    def __init__(self, mode, align_corners):
        super().__init__()
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=self.align_corners)


class ChannelsLastNorm(nn.Module):
    """ConvNeXt-style LayerNorm over channels through a permute."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _block(kind, c, draw) -> tuple[nn.Module, int]:
    """(module, output channels)."""
    if kind == "conv":
        k = draw(st.sampled_from([1, 2, 3, 5]))
        s = draw(st.sampled_from([1, 1, 2]))
        d = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
        p = draw(st.integers(0, (k - 1) * d))
        groups = c if draw(st.booleans()) else 1
        c_out = c if groups > 1 else draw(st.sampled_from([4, 6, 8]))
        return nn.Conv2d(c, c_out, k, s, p, d, groups=groups), c_out
    if kind == "same":
        c_out = draw(st.sampled_from([4, 8]))
        return SamePad(c, c_out, draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([1, 2]))), c_out
    if kind == "maxpool":
        k = draw(st.sampled_from([2, 3]))
        return nn.MaxPool2d(k, draw(st.sampled_from([1, 2])), draw(st.integers(0, k // 2)),
                            ceil_mode=draw(st.booleans())), c
    if kind == "avgpool":
        k = draw(st.sampled_from([2, 3]))
        return nn.AvgPool2d(k, draw(st.sampled_from([1, 2])), draw(st.integers(0, k // 2)),
                            ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans())), c
    if kind == "bn_act":
        act = draw(st.sampled_from([nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Identity]))
        return nn.Sequential(nn.BatchNorm2d(c), act()), c
    if kind == "residual":
        return Residual(c, draw(st.sampled_from([3, 5])), draw(st.sampled_from([1, 2]))), c
    if kind == "concat":
        return Concat(c, 4), 8
    if kind == "upsample":
        mode = draw(st.sampled_from(["nearest", "bilinear"]))
        return Upsample(mode, draw(st.booleans()) if mode == "bilinear" else None), c
    if kind == "layernorm":
        return ChannelsLastNorm(c), c
    raise AssertionError(kind)


class RandomCNN(nn.Module):
    def __init__(self, blocks, c):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


@st.composite
def networks(draw):
    kinds = draw(st.lists(st.sampled_from(
        ["conv", "conv", "same", "maxpool", "avgpool", "bn_act", "residual", "concat", "upsample", "layernorm"]),
        min_size=2, max_size=7))
    c, blocks = 3, []
    for kind in kinds:
        block, c = _block(kind, c, draw)
        blocks.append(block)
    return RandomCNN(blocks, c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=networks(), h=st.integers(17, 61).filter(lambda v: v % 2), w=st.integers(17, 61).filter(lambda v: v % 2),
       rows=st.integers(1, 5), cols=st.integers(1, 5), pick=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_exact_split_equals_unsplit(net, h, w, rows, cols, pick, seed):
    torch.manual_seed(seed)
    model = randomize_norms(net, seed)
    x = torch.randn(2, 3, h, w)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)  # the drawn network shrinks this input to nothing
    layers = splitpack.merge_layers(model, mode="exact")
    assert layers, "every network built from the supported ops has an exact merge layer"
    merge = layers[min(int(pick * len(layers)), len(layers) - 1)]
    wrapped = splitpack.wrap(model, merge, (rows, cols), mode="exact")
    try:
        out = wrapped(x)
    except splitpack.SplitError as err:
        assert "finer than the merged activation" in str(err) or "smaller than" in str(err)
        assume(False)
    assert rel_error(out, ref) <= REL_TOL, f"merge={merge} grid={rows}x{cols}\n{model}"
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * ref.abs().max()
    assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear])
