"""The activation tracker, and split-pack's memory saving measured with it (ratios, not times)."""
from __future__ import annotations

import pytest
import torch

import splitpack
from splitpack.measure.meter import ActivationTracker, peak_activation_bytes


def test_tracker_counts_new_storage_once_and_frees_it():
    x = torch.randn(1000)  # 4000 bytes, existed before the call: not counted

    def fn(t):
        a = t * 2  # +4000
        b = a[:500]  # a view: no new memory
        c = b + 1  # +2000
        del a, b  # a's storage dies with its last view
        return c * 3  # +2000 while c is alive

    assert peak_activation_bytes(fn, x) == 4000 + 2000
    assert peak_activation_bytes(lambda t: t[10:20], x) == 0  # views of the input are not activations


def test_tracker_excludes_parameters_and_counts_inplace_once():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 16, 16)
    out_bytes = 8 * 16 * 16 * 4
    assert peak_activation_bytes(lambda t: torch.relu_(conv(t)), x) == out_bytes


def test_marks_record_live_bytes():
    tracker = ActivationTracker()
    with torch.inference_mode(), tracker:
        a = torch.ones(256)
        tracker.mark("a")
        del a
        tracker.mark("freed")
    assert tracker.marks == [("a", 1024), ("freed", 0)]


def test_exact_split_needs_less_peak_memory():
    model = splitpack.create_model("resnet18")
    x = torch.randn(1, 3, 320, 320)
    unsplit = peak_activation_bytes(model, x)
    split = splitpack.wrap(model, "layer2", 4)
    split(x)  # plans are built on the first call
    ratio = unsplit / peak_activation_bytes(split, x)
    assert ratio > 2.0, ratio  # stem/layer1 peak (poster: bn1) now lives one pack at a time


def test_mobilenetv2_exact_split_is_over_3x_lower():
    """MCUNetV2-class saving on MobileNetV2 @224 (4x4 packs merged after blocks.2)."""
    model = splitpack.create_model("mobilenetv2_100")
    x = torch.randn(1, 3, 224, 224)
    split = splitpack.wrap(model, "blocks.2", 4)
    split(x)
    merged_bytes = 32 * 28 * 28 * 4  # blocks.2 output of mobilenetv2 at 224
    assert peak_activation_bytes(split, x) < peak_activation_bytes(model, x) / 3
    assert peak_activation_bytes(split, x) > merged_bytes


class _Resize(torch.nn.Module):
    def __init__(self, mode: str, scale: int):
        super().__init__()
        self.stem, self.pool = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1)
        self.mode, self.scale = mode, scale

    def forward(self, x):
        x = self.stem(x)
        y = torch.nn.functional.interpolate(x, size=(x.shape[-2] * self.scale, x.shape[-1] * self.scale),
                                            mode=self.mode)
        return self.pool(y).flatten(1)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("plan,grid", [("stem,pool", "1x1,1x1"), ("pool", "1x1"), ("pool", "2x2"), ("pool", "3x2")])
def test_predicted_peak_counts_the_split_interpolations_temporaries(mode, scale, plan, grid):
    """The split rule gathers source rows and columns itself (the unsplit op's kernel allocates nothing but its
    output): the replay counts what the rule's computation keeps alive, to the byte."""
    from splitpack.core.cost.exact_peak import fake_run_peak
    from splitpack.core.cost.plan_cost import plan_cost

    model, shape = _Resize(mode, scale).eval(), (2, 3, 23, 19)
    split = splitpack.wrap(model, plan, grid)
    split.program(shape)  # built before the runs below: they measure the inference, not the planning
    x = torch.randn(shape)
    predicted = plan_cost(split._traced, split.plan, shape).peak_bytes
    assert predicted == fake_run_peak(split, shape) == peak_activation_bytes(split, x)
    with torch.inference_mode():
        assert torch.allclose(split(x), model(x), rtol=0, atol=1e-6)
