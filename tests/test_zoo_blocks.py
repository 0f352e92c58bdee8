"""Exact mode through blocks timm keeps out of fx (NormFree), weight-standardised convolutions,
space-to-depth, and reflect / replicate padding (anti-aliased downsampling), against the unsplit model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BlurPool2d, ScaledStdConv2d, SpaceToDepth
from timm.models.nfnet import NormFreeBlock
from torch import nn

import splitpack
from conftest import F64_TOL, rel_error


def _exact_in_float64(model: nn.Module, plan, grids, size) -> float:
    model = model.double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        out = splitpack.wrap(model, plan, grids, mode="exact")(x)
    return rel_error(out, ref)


class _NormFreeNet(nn.Module):
    """Pre-activation NormFree blocks with scaled weight-standardised convolutions; the second block
    has a skip-init gain, applied in place (``out.mul_(gain)``) with its result unused."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, stride=2, padding=1)
        self.block1 = NormFreeBlock(16, 32, stride=2, alpha=0.2, beta=1.1, act_layer=nn.ReLU)
        self.block2 = NormFreeBlock(32, 32, alpha=0.2, beta=0.9, skipinit=True, act_layer=nn.ReLU)
        with torch.no_grad():
            self.block2.skipinit_gain.fill_(0.7)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x)))).mean((2, 3))


def test_normfree_blocks_are_traced_into_not_refused():
    torch.manual_seed(0)
    model = _NormFreeNet()
    layers = splitpack.merge_layers(model)
    assert "block1" in layers and "block2" in layers and "block1.act1" in layers  # inside the block too
    assert _exact_in_float64(model, "block1,block2", "3x2,2x2", (61, 53)) <= F64_TOL
    assert _exact_in_float64(model, ["block1.act1", "head"], "2x3,3x2", (64, 64)) <= F64_TOL


def test_standardised_kernels_are_not_all_alive_at_once():
    """Split-pack standardises each kernel when its convolution runs, as the unsplit model does."""
    from splitpack.measure.meter import peak_activation_bytes

    convs = [ScaledStdConv2d(3 if i == 0 else 256, 256, 3, padding=1) for i in range(4)]  # 2.4 MB kernels
    model = nn.Sequential(*convs).eval()
    x = torch.randn(1, 3, 16, 16)  # 256 KB activations
    # halo recompute: no line buffers of halo reuse, whose rows (25 KB here) are memory of their own
    split = splitpack.wrap(model, "1", "2x2", halo="recompute")
    with torch.no_grad():
        assert rel_error(split(x), model(x)) <= 1e-5
    assert peak_activation_bytes(split, x) <= peak_activation_bytes(model, x)
    kernel = convs[1].weight.numel() * 4
    assert peak_activation_bytes(splitpack.wrap(model, "1", "2x2"), x) < peak_activation_bytes(model, x) + kernel


class _SpaceToDepthNet(nn.Module):
    """TResNet's stem (space-to-depth), anti-aliased downsampling, replicate padding, pixel unshuffle."""

    def __init__(self):
        super().__init__()
        self.s2d = SpaceToDepth()
        self.conv1 = nn.Conv2d(48, 16, 3, padding=1)
        self.blur = BlurPool2d(16, filt_size=3, stride=2)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.conv3 = nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x):
        x = self.blur(torch.relu(self.conv1(self.s2d(x))))
        x = self.conv2(F.pad(x, (1, 1, 1, 1), mode="replicate"))
        x = F.pixel_unshuffle(x, 2) + self.unshuffle(x)
        return self.conv3(x)


@pytest.mark.parametrize("plan,grids,size", [
    ("s2d", "3x3", (96, 80)),
    ("conv1,conv3", "3x2,2x3", (128, 96)),
    (["blur", "conv2"], "4x4,2x2", (160, 112)),
])
def test_space_to_depth_and_mirror_padding_are_exact(plan, grids, size):
    torch.manual_seed(1)
    assert "s2d" in splitpack.merge_layers(_SpaceToDepthNet())
    assert _exact_in_float64(_SpaceToDepthNet(), plan, grids, size) <= F64_TOL


class _MirrorPadNet(nn.Module):
    def __init__(self, pads, mode):
        super().__init__()
        self.pads, self.mode = pads, mode
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.b(F.pad(self.a(x), self.pads, mode=self.mode))


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("pads,grid,size", [((1, 1, 1, 1), "3x3", (40, 37)), ((2, 0, 3, 1), "4x3", (35, 41)),
                                            ((0, 3, 0, 2), "2x4", (33, 30)), ((3, 2, 3, 3), "8x8", (30, 29)),
                                            ((1, 1, 0, 4), "8x8", (29, 31))])
def test_reflect_and_replicate_padding_read_mirrored_pixels(mode, pads, grid, size):
    torch.manual_seed(2)
    assert _exact_in_float64(_MirrorPadNet(pads, mode), "b", grid, size) <= F64_TOL


def _tresnet_front(model: nn.Module) -> nn.Module:
    """tresnet_m up to its first anti-aliased block: space-to-depth stem, one block of layer1, layer2's first
    block (strided through BlurPool's reflect padding, squeeze-excitation), then the pooled features."""
    body = model.body
    body.layer1, body.layer2, body.layer3, body.layer4 = body.layer1[:1], body.layer2[:1], nn.Identity(), nn.Identity()
    model.reset_classifier(0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name,plan,grids,size", [
    ("nf_resnet50", "stages.1,head.global_pool", "3x3,2x2", 128),
    ("tresnet_m", "body.layer1,head.global_pool", "3x3,2x2", 96),
])
def test_zoo_models_that_were_refused(models, name, plan, grids, size):
    """The real timm models: NormFree blocks (nf_resnet50), space-to-depth and BlurPool (tresnet_m's front)."""
    model = _tresnet_front(models(name)) if name == "tresnet_m" else models(name)
    try:
        assert _exact_in_float64(model, plan, grids, (size, size)) <= F64_TOL
    finally:
        model.float()


def test_replay_counts_each_standardised_kernel():
    """The cost model's replay counts the kernel a weight-standardised convolution computes in every call
    (per pack), whatever the pack's size: its peak is the measuring tracker's."""
    from splitpack.core.cost.plan_cost import plan_cost
    from splitpack.core.plan.spec import parse_plan
    from splitpack.measure.meter import peak_activation_bytes

    torch.manual_seed(3)
    model = nn.Sequential(*[ScaledStdConv2d(3 if i == 0 else 128, 128, 3, padding=1) for i in range(4)]).eval()
    x = torch.randn(1, 3, 24, 24)  # 0.6 MB kernels, 0.3 MB activations
    for plan in [parse_plan("1", "2x2"), parse_plan("0,2", "3x2,2x1")]:
        split = splitpack.SplitPack(model, plan)
        split.program(x.shape)
        assert plan_cost(split._traced, plan, x.shape).peak_bytes == peak_activation_bytes(split, x), str(plan)


def test_planner_names_the_op_when_nothing_can_be_planned():
    from splitpack.core.search.planner import Planner

    model = nn.Sequential(nn.GroupNorm(1, 3), nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)).eval()  # blocked at once
    with pytest.raises(splitpack.SplitError, match=r"nothing to plan.*op GroupNorm at module '0' \(.*\) cannot be "
                                                   r"split: global op"):
        Planner(model)
