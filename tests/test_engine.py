"""Exact and seed split-pack on named timm / torchvision models, staged plans, and the errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import splitpack
from conftest import F64_TOL, exactness_bound, rel_error
from splitpack.core.plan.schedule import bounds
from splitpack.measure.meter import peak_activation_bytes

CASES = [
    # model, plan (merge layer(s)), grid(s), input size
    ("resnet18", "layer2", (2, 2), (160, 144)),
    ("resnet18", "maxpool", (3, 2), (101, 87)),
    ("resnet50", "maxpool,layer3.0,global_pool", "3x3,2x2,2x1", (128, 112)),
    ("mobilenetv2_100", "blocks.1.0.bn2", (2, 3), (97, 111)),
    ("efficientnet_b0", "blocks.4", (2, 3), (96, 96)),  # after eight SE blocks
    ("efficientnet_b0", "blocks.1.1,blocks.4.0,global_pool", "3x3,2x2,2x2", (112, 112)),
    ("mobilenetv3_large_100", "blocks.4,global_pool", "3x2,2x2", (96, 96)),
    ("regnety_004", "s2,s3,head.global_pool", "3x3,2x2,2x2", (96, 96)),
    ("tv:mobilenet_v3_small", "features.6,avgpool", "2x2,2x2", (96, 96)),  # torchvision SqueezeExcitation
    ("convnext_nano", "stages.1,head.global_pool", "2x2,2x2", (96, 96)),
    ("cspresnet50", "stages.1,stages.3,head.global_pool", "3x3,2x2,1x2", (96, 96)),  # channel splits
    ("tf_efficientnet_lite0", "blocks.2", (3, 3), (117, 113)),  # TF 'SAME' padding (Conv2dSame)
    ("tv:vgg11", "features.10", (3, 3), (96, 96)),
    ("tv:densenet121", "features.transition2", (2, 2), (96, 96)),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name,merge,grid,size", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_exact_equals_unsplit(models, name, merge, grid, size, dtype):
    """Shape propagation and programs run in the model's dtype (fp16/bf16 models with biased convs)."""
    model = models(name)
    batch = 2 if dtype in (torch.float32, torch.float64) else 1  # CPU half precision is slow
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    try:
        with torch.no_grad():
            ref64 = model.to(torch.float64)(x)
            model.to(dtype)
            ref = model(x.to(dtype))
        out = splitpack.wrap(model, merge, grid, mode="exact")(x.to(dtype))
    finally:
        model.to(torch.float32)
    assert out.shape == ref.shape and out.dtype == dtype
    bound = F64_TOL if dtype == torch.float64 else exactness_bound(ref, ref64)
    assert rel_error(out, ref) <= bound


@pytest.mark.parametrize("name,merge", [("resnet18", "layer2"), ("mobilenetv2_100", "blocks.3"),
                                        ("tv:vgg11", "features.10")])
def test_seed_differs_for_interior_merge_and_equals_for_grid_1(models, name, merge):
    model = models(name)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        ref = model(x)
    seed = splitpack.wrap(model, merge, 2, mode="seed")(x)
    assert rel_error(seed, ref) > 1e-3  # the missing halo shows
    assert rel_error(splitpack.wrap(model, merge, 1, mode="seed")(x), ref) <= 1e-5
    assert rel_error(splitpack.wrap(model, merge, 1, mode="exact")(x), ref) <= 1e-5


@pytest.mark.parametrize("grid,hw", [((3, 2), (227, 234)), ((1, 5), (201, 199))])
def test_seed_merges_uneven_packs_where_they_belong(models, grid, hw):
    """Packs that differ by a pixel: each pack's output lands at its own offset of the merged activation."""
    model = models("resnet18")
    wrapped = splitpack.wrap(model, "layer2", grid, mode="seed")
    x = torch.randn(1, 3, *hw)
    hb, wb = (bounds(n, parts) for n, parts in zip(hw, grid))
    with torch.no_grad():
        rows = [torch.cat([wrapped._head(x[..., hb[r]:hb[r + 1], wb[c]:wb[c + 1]]) for c in range(grid[1])], -1)
                for r in range(grid[0])]
        assert torch.equal(wrapped(x), wrapped._tail(torch.cat(rows, -2)))


def test_seed_runs_global_ops_per_pack(models):
    model = models("efficientnet_b0")  # SE blocks before blocks.2
    out = splitpack.wrap(model, "blocks.2", 2, mode="seed")(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_merge_layers_lists_execution_order(models):
    names = splitpack.merge_layers(models("resnet18"))
    assert names.index("conv1") < names.index("layer1") < names.index("layer2") < names.index("layer4")
    assert names.index("layer4") < names.index("global_pool")
    assert "layer1.0.conv1" not in names  # the block's shortcut still needs the block input
    assert "fc" not in names  # logits are not a checkpoint


def test_exact_merge_layers_reach_through_se_to_the_global_pooling(models):
    model = models("efficientnet_b0")
    exact = splitpack.merge_layers(model, mode="exact")
    assert exact == splitpack.merge_layers(model)  # every checkpoint, SE blocks included
    assert "blocks.3.0" in exact and exact[-1] == "global_pool"
    assert "global_pool" not in splitpack.merge_layers(model, mode="seed")


def test_global_pooling_checkpoints(models):
    assert "avgpool" not in splitpack.merge_layers(models("tv:vgg11"))  # AdaptiveAvgPool2d(7): not global
    assert "avgpool" in splitpack.merge_layers(models("tv:mobilenet_v3_small"), mode="exact")
    assert "head.global_pool" in splitpack.merge_layers(models("convnext_nano"), mode="exact")
    assert "head" not in splitpack.merge_layers(models("convnext_nano"))  # norm and fc after the pooling


def test_batch_and_channels_last(models):
    model = models("resnet18").to(memory_format=torch.channels_last)
    try:
        x = torch.randn(3, 3, 128, 112).to(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = model(x)
        out = splitpack.wrap(model, "layer1,layer3,global_pool", "2x2,2x2,1x1")(x)
        assert rel_error(out, ref) <= 1e-5
    finally:
        model.to(memory_format=torch.contiguous_format)


def test_wrapped_is_a_module_sharing_parameters(models):
    model = models("resnet18")
    wrapped = splitpack.wrap(model, ["layer1", "global_pool"], [4, 2])
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert "plan='layer1@4x4,global_pool@2x2'" in repr(wrapped)
    assert wrapped.merge_layer == "layer1,global_pool" and wrapped.grid == [(4, 4), (2, 2)]
    assert splitpack.wrap(model, "layer1", "2x3").grid == (2, 3)


# ------------------------------------------------------------------ memory and cost

class _Strips(nn.Module):
    """Two wide checkpoints and a global pooling: what a staged plan keeps alive is easy to see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.b(self.a(x))).flatten(1)


def test_stages_run_interleaved_band_by_band():
    """The next stage pulls rows as it needs them and frees the rows it has read, so neither
    checkpoint ever exists in full."""
    model = _Strips().eval()
    x = torch.randn(1, 3, 256, 256)
    split = splitpack.wrap(model, "a,b,pool", "8x1,8x1,8x1")
    checkpoint = split.cost(x.shape)["stages"][0]["checkpoint_bytes"]  # a and b: 32 x 256 x 256 floats
    with torch.no_grad():
        assert rel_error(split(x), model(x)) <= 1e-5
    assert peak_activation_bytes(split, x) < checkpoint  # both alive in full would be 2x


def test_staged_resnet50_saves_more_than_one_stage(models):
    model = models("resnet50")
    x = torch.randn(1, 3, 384, 384)
    one_stage = peak_activation_bytes(splitpack.wrap(model, "layer2", 3), x)
    staged = peak_activation_bytes(splitpack.wrap(model, "maxpool,layer3.0,layer4.0,global_pool",
                                                  "4x4,8x8,4x4,2x2"), x)
    assert staged < 0.6 * one_stage


def test_cost_report_counts_halo_recompute_and_second_passes(models):
    shape = (2, 3, 128, 128)
    plain = splitpack.wrap(models("resnet18"), "layer2", 1).cost(shape)
    assert plain["macs_split"] == plain["macs_unsplit"] and plain["stages"][0]["passes"] == 1  # no halo, one pass
    model = models("efficientnet_b0")
    one_pack = splitpack.wrap(model, "blocks.1.0", 1).cost(shape)
    assert one_pack["stages"][0]["passes"] == 3  # two SE gates (blocks.0.0, blocks.1.0) before the checkpoint
    assert one_pack["macs_split"] == one_pack["macs_unsplit"]  # one pack keeps its values from pass to pass
    packs = splitpack.wrap(model, "blocks.1.0", 2).cost(shape)
    assert packs["macs_split"] > 1.1 * packs["macs_unsplit"]  # packs recompute the passes before each gate
    cost = splitpack.wrap(model, "blocks.1.0,global_pool", "2x2,2x2").cost(shape)
    assert cost["macs_split"] > packs["macs_split"]  # the second stage's halos and passes
    assert [s["checkpoint"] for s in cost["stages"]] == ["blocks.1.0", "global_pool"]
    assert cost["stages"][0]["checkpoint_bytes"] == 2 * 24 * 32 * 32 * 4  # blocks.1.0: 24 ch at stride 4
    assert cost["stages"][1]["checkpoint_bytes"] == 2 * 1280 * 4


# ------------------------------------------------------------------ errors

def test_unknown_merge_layer_lists_valid_names(models):
    with pytest.raises(ValueError, match="valid merge layers.*layer1.*layer2"):
        splitpack.wrap(models("resnet18"), "layer9")
    with pytest.raises(ValueError, match="unknown merge layer 'layer9'"):
        splitpack.wrap(models("resnet18"), "layer1,layer9")


def test_plan_order_and_global_pooling_position(models):
    with pytest.raises(ValueError, match="execution order"):
        splitpack.wrap(models("resnet18"), "layer3,layer1")
    with pytest.raises(ValueError, match="can only be the last"):
        splitpack.wrap(models("resnet18"), "global_pool.pool,global_pool")
    with pytest.raises(ValueError, match="seed mode takes one spatial merge layer"):
        splitpack.wrap(models("resnet18"), "layer1,layer2", mode="seed")
    with pytest.raises(ValueError, match="2 grids given for a plan of 3"):
        splitpack.wrap(models("resnet18"), "layer1,layer2,layer3", "2x2,3x3")


class _GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.body(self.norm(self.stem(x)))


def test_unsplittable_op_names_op_path_and_latest_valid():
    model = _GroupNormNet().eval()
    assert splitpack.merge_layers(model, mode="exact") == ["stem"]
    with pytest.raises(splitpack.SplitError) as err:
        splitpack.wrap(model, "body", mode="exact")
    msg = str(err.value)
    assert "GroupNorm" in msg and "'norm'" in msg and "latest merge layer before it that exact mode supports is 'stem'" \
        in msg
    splitpack.wrap(model, "body", 2, mode="seed")  # seed mode runs it per pack


def test_grid_finer_than_a_feature_map(models):
    wrapped = splitpack.wrap(models("resnet18"), "layer4", 4)
    with pytest.raises(splitpack.SplitError, match="finer than checkpoint 'layer4'"):
        wrapped(torch.randn(1, 3, 64, 64))  # layer4 is 2x2 here


def test_image_smaller_than_a_pack_needs(models):
    wrapped = splitpack.wrap(models("tv:vgg11"), "features.10", 3, mode="seed")
    with pytest.raises(splitpack.SplitError, match="too small"):
        wrapped(torch.randn(1, 3, 6, 6))  # 2x2-pixel packs cannot go through two 2x2 max pools
    with pytest.raises(splitpack.SplitError, match="smaller than the 3x3 grid"):
        wrapped(torch.randn(1, 3, 2, 2))


def test_train_mode_is_refused(models):
    model = models("resnet18")
    wrapped = splitpack.wrap(model, "layer1")
    model.train()
    try:
        with pytest.raises(splitpack.SplitError, match="eval"):
            wrapped(torch.randn(1, 3, 64, 64))
        with pytest.raises(splitpack.SplitError, match="train mode"):
            splitpack.wrap(model, "layer1")
    finally:
        model.eval()


def test_bad_mode_and_grid():
    model = splitpack.create_model("resnet18")
    with pytest.raises(ValueError, match="mode"):
        splitpack.wrap(model, "layer1", mode="fast")
    with pytest.raises(ValueError, match="grid"):
        splitpack.wrap(model, "layer1", grid=0)
    with pytest.raises(ValueError, match="merge_layer is required"):
        splitpack.wrap(model, "")


class _InPlaceAfterCheckpoint(nn.Module):
    """A stage that starts with a non-idempotent in-place op on its source (and on the image)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = x.mul_(2.0)  # in place on the image
        y = self.a(x)
        y += 1.0
        return self.b(y).mean((2, 3))


def test_in_place_ops_on_a_stage_source_apply_once():
    model = _InPlaceAfterCheckpoint().eval()
    x = torch.randn(1, 3, 33, 31)
    with torch.no_grad():
        ref = model(x.clone())
    split = splitpack.wrap(model, "a,b", "3x3,2x2")
    image = x.clone()
    assert rel_error(split(image), ref) <= 1e-5
    assert torch.equal(image, x)  # packs read a copy: never applied once per pack to shared pixels


def test_a_model_is_traced_once_per_structure():
    """Wrapping or planning the same model again reuses its trace; a change a trace depends on retraces."""
    from splitpack.core.capture.graph import trace

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(4, 4, 3, padding=1)).eval()
    first = trace(model)
    assert trace(model) is first
    assert splitpack.wrap(model, "0", grid=2)._traced is first
    model.train()  # forwards may branch on training
    assert trace(model) is not first
    model.eval()
    model[2] = nn.Conv2d(4, 4, 5, padding=2)  # a replaced module: another halo
    replaced = trace(model)
    assert replaced is not first and trace(model) is replaced
    x = torch.randn(1, 3, 20, 20)
    assert torch.allclose(splitpack.wrap(model, "1", grid=2)(x), model(x), atol=1e-6)
    model.double()
    assert trace(model).dtype == torch.float64
