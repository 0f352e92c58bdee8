"""Halo reuse (line buffers): packs take the rows their upper neighbour in the same grid column computed.

* full-width strips (grids Rx1) compute every row once: the plan's MACs are the unsplit model's, and the
  outputs equal the unsplit model's in float64, with reuse as with recompute;
* grids with several columns recompute only the horizontal halo: fewer MACs than recompute, more than unsplit;
* the replay's peak (line buffers included) is the measuring tracker's, byte for byte;
* the recorded program gives the interpreter's outputs bit for bit;
* the fast estimate's MACs are the program's for strip plans too.
"""
from __future__ import annotations

import copy

import pytest
import torch

import splitpack
from conftest import F64_TOL, rel_error
from splitpack.core.cost.plan_cost import plan_cost
from splitpack.core.plan.spec import parse_plan
from splitpack.measure.meter import peak_activation_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def _carries(program) -> int:
    return sum(step.carry is not None for stage in program.stages for pass_ in stage.passes
               for pack in pass_.packs for step in pack.steps)


@pytest.mark.parametrize("name, merge, grid", [("resnet18", "layer3", "5x1"),
                                               ("mobilenetv2_100", "blocks.2,blocks.4", "4x1,3x1")])
def test_strips_compute_every_row_once_and_stay_exact(models, name, merge, grid):
    model = copy.deepcopy(models(name)).double()
    x = torch.randn(1, 3, 97, 83, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        reuse, recompute = splitpack.wrap(model, merge, grid), splitpack.wrap(model, merge, grid, halo="recompute")
        assert rel_error(reuse(x), ref) <= F64_TOL and rel_error(recompute(x), ref) <= F64_TOL
    assert _carries(reuse.program(x.shape)) > 0 and _carries(recompute.program(x.shape)) == 0
    assert reuse.cost(x.shape)["macs_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert recompute.cost(x.shape)["macs_ratio"] > 1.2


def test_grids_recompute_only_the_horizontal_halo(models):
    model = models("resnet18")
    shape = (1, 3, 96, 96)
    ratios = {halo: splitpack.wrap(model, "layer2", "3x3", halo=halo).cost(shape)["macs_ratio"]
              for halo in ("reuse", "recompute")}
    strips = splitpack.wrap(model, "layer2", "3x1").cost(shape)["macs_ratio"]
    assert strips == pytest.approx(1.0, abs=1e-9)
    assert 1.0 < ratios["reuse"] < ratios["recompute"]


@pytest.mark.parametrize("merge, grid", [("layer2", "6x1"), ("layer1,layer3", "4x3,3x1"), ("layer2", "3x2")])
def test_predicted_peak_counts_the_line_buffers(models, merge, grid):
    """Predicted == measured, and the buffers are really there: reuse keeps rows the recompute plan does not."""
    model = models("resnet18")
    x = torch.randn(1, 3, 128, 112)
    plan = parse_plan(merge, grid)
    for halo in ("reuse", "recompute"):
        split = splitpack.SplitPack(model, plan, halo=halo)
        split.program(x.shape)
        assert plan_cost(split._traced, plan, x.shape, halo=halo).peak_bytes == peak_activation_bytes(split, x), halo


def test_program_gives_the_interpreters_outputs_bit_for_bit(models):
    model = models("mobilenetv2_100")
    x = torch.randn(2, 3, 90, 77)
    interpreted = splitpack.wrap(model, "blocks.1,blocks.3,global_pool", "5x1,3x2,2x1")
    compiled = splitpack.wrap(model, "blocks.1,blocks.3,global_pool", "5x1,3x2,2x1", compile="program")
    with torch.no_grad():
        assert torch.equal(compiled(x), interpreted(x))
        assert torch.equal(compiled(x[:1]), interpreted(x[:1]))


def test_halo_mode_is_checked(models):
    with pytest.raises(ValueError, match="halo must be one of"):
        splitpack.wrap(models("resnet18"), "layer2", "2x1", halo="share")


def test_rows_of_pure_border_padding_are_computed_with_the_rest():
    """A strip whose new rows of an F.pad output are all padding reads no input pixel there: those rows are
    computed with the rows above (found by the property test: 'SAME' padding before a CBAM gate)."""
    from test_engine_property import Cbam, RandomCNN, SamePad
    from torch import nn

    torch.manual_seed(0)
    blocks = [SamePad(3, 4, 2, 1), nn.MaxPool2d(2, 1), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
              SamePad(4, 4, 2, 1), Cbam(4)]
    model = RandomCNN(blocks, 4, "avg").eval().double()
    x = torch.randn(2, 3, 17, 17, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        for merge in (["blocks.2", "blocks"], ["blocks.0", "blocks"]):
            assert rel_error(splitpack.wrap(model, merge, [(1, 1), (4, 1)])(x), ref) <= F64_TOL, merge


@pytest.mark.parametrize("grid", [(4, 1), (3, 3), (5, 2)])
def test_windows_pad_natively_where_the_missing_padding_gives_no_output(grid):
    """A stride-2 window over an even extent never reads its trailing pad, and a strip inside a column
    needs none above or below: those steps let the op pad (no padded copy of the input); one-sided
    padding the op cannot apply (a strip's top/bottom edge at stride 1) keeps the copy. Exact in float64,
    and the predicted peak is the tracker's."""
    from torch import nn

    from splitpack.core.capture.graph import trace
    from splitpack.core.cost.exact_peak import allocation_profile
    from splitpack.core.plan.schedule import build_program, stage_graphs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1),
                          nn.ReLU(), nn.AvgPool2d(3, 2, 1, count_include_pad=False)).eval()
    plan = parse_plan("5", grid)
    shape = (1, 3, 64, 64)
    traced = trace(model)
    _, shapes = allocation_profile(traced, shape)
    program = build_program(traced, stage_graphs(traced, plan), shapes, torch.float32)
    steps = [st for stage in program.stages for p in stage.passes for pack in p.packs for st in pack.steps
             if st.computes and st.node.target in ("0", "2", "3", "5")]
    native = [st for st in steps if st.padding is not None and any(st.padding)]
    copied = [st for st in steps if any(pads is not None for _, _, pads in st.inputs)]
    assert native
    assert all(st.node.target == "3" for st in copied)  # stride 2 over even extents: never a copy; only the
    # 3x3 stride-1 conv at a strip's top or bottom edge
    x = torch.randn(shape, dtype=torch.float64)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        assert rel_error(splitpack.SplitPack(exact, plan)(x), exact(x)) <= F64_TOL
    assert peak_activation_bytes(splitpack.SplitPack(model, plan), x.float()) == \
        plan_cost(traced, plan, shape).peak_bytes


class SplitSame(torch.nn.Module):
    """A CSP-style channel split whose second half feeds a 3x3 conv (a joined tuple under halo reuse), then
    timm's TF-'SAME' stride-2 conv and max pooling (whose unsplit modules pad their whole input first)."""

    def __init__(self):
        super().__init__()
        from timm.layers import create_conv2d, create_pool2d

        self.stem = torch.nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = torch.nn.Conv2d(4, 4, 3, 1, 1)
        self.same = create_conv2d(8, 8, 3, stride=2, padding="same")
        self.pool = create_pool2d("max", 3, stride=2, padding="same")

    def forward(self, x):
        a, b = self.stem(x).split(4, dim=1)
        return self.pool(self.same(torch.cat([a, torch.relu(self.conv(b))], dim=1)))


@pytest.mark.parametrize("grid", [(4, 1), (3, 2)])
def test_predicted_peak_counts_channel_splits_and_same_padding_as_they_run(grid):
    """Two things the replay once counted wrong (tf_efficientnet_lite0 +16%, cspdarknet53 +9% over the
    tracker): a joined channel split is a storage per part, freed part by part; a TF-'SAME' module's
    temporaries (its padded input) do not exist in a pack, whose window the executor cut and padded."""
    from splitpack.core.capture.graph import trace

    torch.manual_seed(0)
    model = SplitSame().eval()
    assert type(model.same).__name__ == "Conv2dSame" and type(model.pool).__name__ == "MaxPool2dSame"
    traced, shape = trace(model), (1, 3, 64, 64)
    plan = parse_plan("pool", grid)
    x = torch.randn(shape)
    for halo in ("reuse", "recompute"):
        split = splitpack.SplitPack(model, plan, halo=halo, traced=traced)
        split.program(x.shape)
        assert plan_cost(traced, plan, shape, halo=halo).peak_bytes == peak_activation_bytes(split, x), halo
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        assert rel_error(splitpack.SplitPack(exact, plan)(x.double()), exact(x.double())) <= F64_TOL


# --------------------------------------------------------------------------- batched packs

def _largest_batch(program) -> int:
    return max(len(group) for stage in program.stages for pass_ in stage.passes for group in pass_.groups)


@pytest.mark.parametrize("halo", ["reuse", "recompute"])
def test_batched_packs_stay_exact_and_run_as_one_call(models, halo):
    """Inner columns of a grid with the same shape run as one batched call; outputs equal the unsplit
    model's in float64 (squeeze-excitation gates and reductions over a batch of packs included)."""
    model = copy.deepcopy(models("efficientnet_b0")).double()
    x = torch.randn(2, 3, 120, 150, dtype=torch.float64)
    merge, grid = "blocks.2,blocks.4", "4x5,3x4"
    with torch.no_grad():
        ref = model(x)
        batched = splitpack.wrap(model, merge, grid, halo=halo, batch_packs=True)
        assert rel_error(batched(x), ref) <= F64_TOL
    assert _largest_batch(batched.program(x.shape, x.dtype)) == 3
    assert _largest_batch(splitpack.wrap(model, merge, grid, halo=halo, batch_packs=2).program(x.shape, x.dtype)) == 2
    assert _largest_batch(splitpack.wrap(model, merge, grid, halo=halo).program(x.shape, x.dtype)) == 1


@pytest.mark.parametrize("halo", ["reuse", "recompute"])
def test_predicted_peak_counts_the_batched_packs(models, halo):
    """The packs of a batch are alive together: the replay predicts the tracker's peak byte for byte,
    and it is above the one-by-one plan's."""
    model = models("efficientnet_b0")
    x = torch.randn(1, 3, 120, 150)
    plan = parse_plan("blocks.2,blocks.4", "4x5,3x4")
    peaks = {}
    for batch_packs in (False, True):
        split = splitpack.SplitPack(model, plan, halo=halo, batch_packs=batch_packs)
        split.program(x.shape)
        peaks[batch_packs] = peak_activation_bytes(split, x)
        assert plan_cost(split._traced, plan, x.shape, halo=halo, batch_packs=batch_packs).peak_bytes == peaks[batch_packs]
    assert peaks[True] > peaks[False]


def test_batched_program_gives_the_interpreters_outputs_bit_for_bit(models):
    model = models("efficientnet_b0")
    x = torch.randn(2, 3, 120, 150)
    kwargs = dict(merge_layer="blocks.2,blocks.4", grid="4x5,3x4", batch_packs=True)
    interpreted, compiled = splitpack.wrap(model, **kwargs), splitpack.wrap(model, **kwargs, compile="program")
    with torch.no_grad():
        assert torch.equal(compiled(x), interpreted(x))
        assert torch.equal(compiled(x[:1]), interpreted(x[:1]))


def test_batch_packs_is_checked(models):
    with pytest.raises(ValueError, match="batch_packs must be"):
        splitpack.wrap(models("resnet18"), "layer2", "2x3", batch_packs=-1)
    with pytest.raises(ValueError, match="halo and batch_packs are for a given plan"):
        splitpack.wrap(models("resnet18"), "auto", batch_packs=True)
