"""Property: exact split-pack equals the unsplit network on randomly built CNNs.

Hypothesis draws a network from the op list of the engine's rules (convolutions with
every padding flavour, pooling, norms, activations, residual adds, channel concat and
split, upsampling, squeeze-excitation, ECA and CBAM gates, a global pooling), an odd
input size, and a random staged plan: an increasing subset of the exact checkpoints,
each stage with its own grid (non-square and full-width strips included), packs reusing the rows their
upper neighbour computed (halo reuse, the default) or recomputing them (one mode, or one per stage),
one by one or the same-shaped packs of a grid row batched into one call.

The same for networks whose checkpoints are cuts (several live values): HRNet-like parallel branches at
two or three resolutions exchanging through up- and down-sampling fuse layers, and long skip connections
around random blocks; their plans mix single checkpoints and cuts (splitpack.core.capture.graph.find_cuts).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import splitpack
from conftest import F64_TOL, randomize_norms, rel_error


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


class SqueezeExcite(nn.Module):
    """timm / torchvision style: mean -> conv -> act -> conv -> gate -> multiply."""

    def __init__(self, c, gate, adaptive):
        super().__init__()
        self.reduce = nn.Conv2d(c, max(c // 2, 1), 1)
        self.expand = nn.Conv2d(max(c // 2, 1), c, 1)
        self.gate = gate
        self.pool = nn.AdaptiveAvgPool2d(1) if adaptive else None

    def forward(self, x):
        s = self.pool(x) if self.pool is not None else x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(torch.relu(self.reduce(s))))


class Eca(nn.Module):
    """timm EcaModule: a 1-d conv over the pooled channels, shaped with x.shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.view(x.shape[0], -1, 1, 1).sigmoid().expand_as(x)


class Cbam(nn.Module):
    """CBAM: a channel gate from avg and max pooling, then a spatial gate from channel mean/max."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        x = x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)) + self.fc(x.amax((2, 3), keepdim=True)))
        s = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


class SplitMerge(nn.Module):
    """CSP / Res2Net style: split the channels, convolve a part, concatenate."""

    def __init__(self, c):
        super().__init__()
        self.first = c // 2
        self.conv = nn.Conv2d(c - self.first, c - self.first, 3, padding=1)

    def forward(self, x):
        a, b = torch.split(x, [self.first, x.shape[1] - self.first], dim=1)
        return torch.cat([a, F.relu(self.conv(b))], dim=1)


class GlobalPool(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.kind == "max":
            return x.amax((2, 3))
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))  # timm's avgmax


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
    if kind == "se":
        return SqueezeExcite(c, draw(st.sampled_from([nn.Sigmoid(), nn.Hardsigmoid()])), draw(st.booleans())), c
    if kind == "eca":
        return Eca(), c
    if kind == "cbam":
        return Cbam(c), c
    if kind == "split" and c >= 2:
        return SplitMerge(c), c
    if kind == "split":
        return nn.Identity(), c
    raise AssertionError(kind)


class RandomCNN(nn.Module):
    def __init__(self, blocks, c, pool):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalPool(pool)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.pool(self.blocks(x)))


KINDS = ["conv", "conv", "same", "maxpool", "avgpool", "bn_act", "residual", "concat", "upsample", "layernorm",
         "se", "eca", "cbam", "split"]


@st.composite
def networks(draw):
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=2, max_size=7))
    c, blocks = 3, []
    for kind in kinds:
        block, c = _block(kind, c, draw)
        blocks.append(block)
    return RandomCNN(blocks, c, draw(st.sampled_from(["avg", "max", "avgmax"])))


@st.composite
def staged_plans(draw, layers: list[str]):
    """An increasing subset of the checkpoints (the pooling only last), one grid per stage."""
    picks = sorted(set(draw(st.lists(st.integers(0, len(layers) - 1), min_size=1, max_size=3))))
    names = [layers[i] for i in picks]
    grids = [(draw(st.integers(1, 5)), draw(st.sampled_from([1, 1, 2, 3, 4, 5]))) for _ in names]  # strips often
    return names, grids


def _assert_plan_equals_unsplit(model, x, ref, names, grids, compile_, data) -> None:
    """The plan (halo reuse or recompute, for all stages or per stage; packs one by one or batched: drawn)
    equals the unsplit output within the float64 bound; a grid finer than a feature map is no example."""
    halo = data.draw(st.sampled_from(["reuse", "reuse", "recompute"]) |
                     st.lists(st.sampled_from(["reuse", "recompute"]), min_size=len(names), max_size=len(names)))
    batch_packs = data.draw(st.sampled_from([False, True, 2]))
    wrapped = splitpack.wrap(model, names, grids, mode="exact", compile=compile_, halo=halo, batch_packs=batch_packs)
    try:
        out = wrapped(x)
    except splitpack.SplitError as err:
        assert "finer than" in str(err) or "smaller than" in str(err)
        assume(False)
    assert rel_error(out, ref) <= F64_TOL, f"plan={wrapped.plan} halo={halo} batch_packs={batch_packs}\n{model}"


@pytest.mark.parametrize("compile_", [False, "program"], ids=["interpreter", "program"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=networks(), h=st.integers(17, 61).filter(lambda v: v % 2), w=st.integers(17, 61).filter(lambda v: v % 2),
       data=st.data(), seed=st.integers(0, 2**16))
def test_exact_split_equals_unsplit(compile_, net, h, w, data, seed):
    """In float64: a wrong halo, border or gate shows at 1e-3 or more, rounding at 1e-15. Run by the
    interpreter (the reference) and by the straight-line program recorded from it (splitpack.core.compile.recording)."""
    torch.manual_seed(seed)
    model = randomize_norms(net, seed).double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)  # the drawn network shrinks this input to nothing
    layers = splitpack.merge_layers(model, mode="exact")
    assert layers == splitpack.merge_layers(model), "every checkpoint of these networks splits exactly"
    assert layers[-1] == "pool"
    names, grids = data.draw(staged_plans(layers))
    _assert_plan_equals_unsplit(model, x, ref, names, grids, compile_, data)


# --------------------------------------------------------------------------- checkpoints that are cuts

class Fuse(nn.Module):
    """HRNet's exchange: output branch i sums every branch j resampled to its resolution (1x1 conv and
    upsampling from a lower resolution, strided 3x3 convs from a higher one)."""

    def __init__(self, channels: list[int], mode: str):
        super().__init__()
        self.mode = mode
        self.paths = nn.ModuleList()
        for i, c_out in enumerate(channels):
            row = nn.ModuleList()
            for j, c_in in enumerate(channels):
                if j > i:
                    row.append(nn.Conv2d(c_in, c_out, 1))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    row.append(nn.Sequential(*[nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, 2, 1)
                                               for k in range(i - j)]))
            self.paths.append(row)

    def forward(self, xs):
        out = []
        for i, row in enumerate(self.paths):
            y = None
            for j, path in enumerate(row):
                v = path(xs[j])
                if j > i:
                    v = F.interpolate(v, size=xs[i].shape[-2:], mode=self.mode)
                y = v if y is None else y + v
            out.append(torch.relu(y))
        return out


class MultiResolution(nn.Module):
    """HRNet-like: a stem, one transition to ``len(channels)`` branches at strides 1, 2, 4, stages of
    per-branch convolutions and a fuse, then every branch upsampled, concatenated and pooled."""

    def __init__(self, channels: list[int], stages: int, depth: int, mode: str):
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1), nn.BatchNorm2d(channels[0]), nn.ReLU())
        self.transition = nn.ModuleList([nn.Conv2d(channels[0], c, 3, 2 ** k, 1) for k, c in enumerate(channels)])
        self.branches = nn.ModuleList([nn.ModuleList([
            nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                                                              nn.ReLU())]) for c in channels]) for _ in range(stages)])
        self.fuses = nn.ModuleList([Fuse(channels, mode) for _ in range(stages)])
        self.pool = GlobalPool("avg")
        self.head = nn.Linear(sum(channels), 5)

    def forward(self, x):
        x = self.stem(x)
        xs = [t(x) for t in self.transition]
        for branches, fuse in zip(self.branches, self.fuses):
            xs = fuse([b(v) for b, v in zip(branches, xs)])
        size = xs[0].shape[-2:]
        merged = torch.cat([xs[0]] + [F.interpolate(v, size=size, mode=self.mode) for v in xs[1:]], dim=1)
        return self.head(self.pool(merged))


class LongSkip(nn.Module):
    """Random blocks with a skip around them: the block outputs and the skip's input are alive together."""

    def __init__(self, blocks, c_in, c_out):
        super().__init__()
        self.stem = nn.Conv2d(3, c_in, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.skip = nn.Conv2d(c_in, c_out, 1)
        self.pool = GlobalPool("avg")
        self.head = nn.Linear(c_out, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.blocks(x)
        return self.head(self.pool(y + F.interpolate(self.skip(x), size=y.shape[-2:])))


SKIPPED_KINDS = ["conv", "same", "maxpool", "bn_act", "residual", "concat", "upsample", "se"]


@st.composite
def cut_networks(draw):
    if draw(st.booleans()):
        channels = draw(st.lists(st.sampled_from([2, 3, 4]), min_size=2, max_size=3))
        return MultiResolution(channels, draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                               draw(st.sampled_from(["nearest", "bilinear"])))
    c_in = c = 4
    blocks = []
    for kind in draw(st.lists(st.sampled_from(SKIPPED_KINDS), min_size=1, max_size=4)):
        block, c = _block(kind, c, draw)
        blocks.append(block)
    return LongSkip(blocks, c_in, c)


@pytest.mark.parametrize("compile_", [False, "program"], ids=["interpreter", "program"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(net=cut_networks(), h=st.integers(17, 45).filter(lambda v: v % 2), w=st.integers(17, 45).filter(lambda v: v % 2),
       data=st.data(), seed=st.integers(0, 2**16))
def test_exact_split_at_cuts_equals_unsplit(compile_, net, h, w, data, seed):
    """Plans through cuts (several live values at their own resolutions, each written band by band), in
    float64, equal the unsplit network."""
    torch.manual_seed(seed)
    model = randomize_norms(net, seed).double().eval()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)
    layers = splitpack.merge_layers(model, mode="exact", cuts=True)
    assert any("+" in name for name in layers), "these networks have cuts"
    cut = data.draw(st.sampled_from([name for name in layers if "+" in name]))
    others = data.draw(st.lists(st.sampled_from(layers), max_size=2))
    names = sorted(set(others) | {cut}, key=layers.index)
    if "pool" in names:
        names = names[:names.index("pool") + 1]
    grids = [(data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1, 1, 2, 3]))) for _ in names]
    _assert_plan_equals_unsplit(model, x, ref, names, grids, compile_, data)
