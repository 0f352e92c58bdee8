"""Checkpoints that are cuts: several live values (``"a+b"``) that together are all the rest of the network needs.

* a named check on timm's HRNet (parallel branches at several resolutions, where no single value is ever
  the only live one after the stem): a plan through cuts of its branches equals the unsplit model in float64;
* the replay predicts the peak of a run through cuts byte for byte (the real executor on fake tensors and the
  measuring tracker agree), including a cut of a value and one made from it (the value is written as a
  tile of the larger region later steps read);
* the cuts found (the live values between two ops) and the errors for a set of values that is not a cut.
"""
from __future__ import annotations

import pytest
import timm
import torch

import splitpack
from splitpack.core.capture.graph import find_cuts, trace
from splitpack.core.cost.exact_peak import fake_run_peak
from splitpack.core.cost.plan_cost import plan_cost
from splitpack.core.plan.spec import parse_plan
from splitpack.measure.meter import peak_activation_bytes
from test_engine_property import Concat, LongSkip, MultiResolution  # the property test's networks

from conftest import F64_TOL, randomize_norms, rel_error

pytestmark = pytest.mark.usefixtures("one_thread")

BRANCHES = "stage2.0.branches.0+stage2.0.branches.1"
BRANCHES3 = "stage3.0.branches.0+stage3.0.branches.1+stage3.0.branches.2"


def test_hrnet_split_at_its_branches_equals_unsplit():
    model = randomize_norms(timm.create_model("hrnet_w18_small")).eval().double()
    traced = trace(model)
    cuts = find_cuts(traced)
    assert BRANCHES in cuts and BRANCHES3 in cuts
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    split = splitpack.wrap(model, f"act2,{BRANCHES},{BRANCHES3},global_pool", "4x4,2x2,2x1,1x2")
    assert rel_error(split(x), ref) <= F64_TOL
    predicted = plan_cost(split._traced, split.plan, x.shape, torch.float64).peak_bytes
    assert predicted == peak_activation_bytes(split, x)


def _multi_resolution() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(MultiResolution([4, 6, 3], stages=2, depth=1, mode="nearest")).eval()


@pytest.mark.parametrize("plan, grids", [
    ("branches.0.0+branches.0.1+branches.0.2", "3x2"),
    ("stem,branches.0.0+branches.0.1+branches.0.2,branches.1.0+branches.1.1+branches.1.2", "4x4,3x1,2x2"),
    ("transition.0+transition.1+transition.2,pool", "5x1,2x3"),
])
def test_replay_predicts_the_peak_through_cuts(plan, grids):
    """Batch 2: the replay, the executor on fake tensors and the measuring tracker give the same peak."""
    model = _multi_resolution()
    split = splitpack.SplitPack(model, parse_plan(plan, grids))
    shape = (2, 3, 45, 39)
    x = torch.randn(shape)
    split.program(shape)
    predicted = plan_cost(split._traced, split.plan, shape).peak_bytes
    assert predicted == fake_run_peak(split, shape) == peak_activation_bytes(split, x)
    with torch.no_grad():
        assert rel_error(split(x), model(x)) <= 1e-5


def test_cut_of_a_value_and_its_successor_writes_the_tile():
    """``stem+blocks.0.a``: stem is written and also read (with a halo) by blocks.0.a in the same pack."""
    torch.manual_seed(1)
    model = LongSkip([Concat(4, 4)], 4, 8).eval().double()
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64)
    split = splitpack.wrap(model, "stem+blocks.0.a", "3x2")
    with torch.no_grad():
        assert rel_error(split(x), model(x)) <= F64_TOL
    shape = tuple(x.shape)
    assert plan_cost(split._traced, split.plan, shape, torch.float64).peak_bytes == \
        fake_run_peak(split, shape, torch.float64)


def test_cuts_found_are_the_live_values_and_bad_cuts_are_refused():
    model = _multi_resolution()
    cuts = find_cuts(trace(model))
    assert "transition.0+transition.1+transition.2" in cuts
    assert "branches.0.0+branches.0.1+branches.0.2" in cuts
    assert all(len(nodes) >= 2 for nodes in cuts.values())
    with pytest.raises(ValueError, match="not a checkpoint: the rest of the network also reads"):
        splitpack.wrap(model, "transition.0+transition.1")  # transition.2 still reads the stem
    with pytest.raises(ValueError, match="'nope' is not the output of a module"):
        splitpack.wrap(model, "transition.0+nope")
    with pytest.raises(ValueError, match="execution order"):
        splitpack.wrap(model, "branches.0.0+branches.0.1+branches.0.2,stem")
    with pytest.raises(ValueError, match="seed mode takes one spatial merge layer"):
        splitpack.wrap(model, "transition.0+transition.1+transition.2", mode="seed")


# --------------------------------------------------------------------------- the planner

def _no_cuts(monkeypatch):
    import splitpack.core.search.planner as planner_module

    monkeypatch.setattr(planner_module, "planned_cuts", lambda traced, blocked: [])


def test_search_macs_through_cuts_are_the_programs_macs():
    """The search seeds a cut's values together (one pack computes their shared ancestors once): its MACs
    for random paths through cuts add up to what the program executes."""
    import random

    from splitpack.core.search.planner import Planner, _SizeContext
    from test_planner import _random_paths

    planner = Planner(_multi_resolution())
    assert any(c.members for c in planner.checkpoints)
    # 128: the smallest branch is 16x16, so every tile has two pixels or more (with one-pixel tiles of a
    # strided value the search's halo reuse differs from the schedule's by a fraction of a percent)
    context = _SizeContext(planner, (1, 3, 128, 128), torch.float32)
    paths = [p for p in _random_paths(context.estimator, 40, random.Random(0))
             if any(planner.checkpoints[o.end - 1].members for o, _, _ in p.steps)]
    assert len(paths) >= 5
    for path in paths:
        _, ratio = context.estimate(path)
        assert ratio == pytest.approx(context.exact(context.plan_of(path)).macs_ratio, rel=1e-3), \
            str(context.plan_of(path))


def test_planner_splits_hrnet_through_its_branches(monkeypatch):
    """Without cuts the planner can only split HRNet up to its stem and from its final layer; through the
    cuts of its branches the predicted (= measured) peak is far lower, within the same MACs cap, and the
    auto plan still equals the unsplit model."""
    from splitpack.core.search.planner import Planner

    model = randomize_norms(timm.create_model("hrnet_w18_small")).eval()
    shape = (1, 3, 128, 128)
    choice = Planner(model).choose(shape)
    assert "+" in str(choice.plan) and choice.predicted_macs_ratio <= 1.25
    split = splitpack.SplitPack(model, choice.plan)
    x = torch.randn(shape)
    assert choice.predicted_peak_bytes == peak_activation_bytes(split, x)
    with torch.no_grad():
        assert rel_error(split(x), model(x)) <= 1e-4
    _no_cuts(monkeypatch)
    single = Planner(model).choose(shape)
    assert choice.predicted_peak_bytes < 0.5 * single.predicted_peak_bytes, (str(choice.plan), str(single.plan))
