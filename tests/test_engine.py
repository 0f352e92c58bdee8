"""Exact and seed split-pack on named timm / torchvision models, and the errors."""
from __future__ import annotations

import pytest
import torch

import splitpack
from conftest import REL_TOL, randomize_norms, rel_error

NAMED = [
    # model, merge layer, grid, input size
    ("resnet18", "layer2", (2, 2), (224, 224)),
    ("resnet18", "maxpool", (3, 2), (201, 173)),
    ("resnet50", "layer1", (4, 4), (256, 256)),
    ("mobilenetv2_100", "blocks.3", (4, 4), (224, 224)),
    ("mobilenetv2_100", "blocks.1.0.bn2", (2, 3), (161, 199)),
    ("efficientnet_b0", "blocks.0.0.bn1", (2, 2), (240, 240)),  # the last layer before the first SE
    ("convnext_nano", "stages.1", (2, 2), (224, 224)),
    ("tf_efficientnet_lite0", "blocks.2", (3, 3), (231, 225)),  # TF 'SAME' padding (Conv2dSame)
    ("tv:vgg11", "features.10", (3, 3), (224, 224)),
    ("tv:densenet121", "features.transition2", (2, 2), (224, 224)),
]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomize_norms(splitpack.create_model(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name,merge,grid,size", NAMED, ids=[f"{c[0]}-{c[1]}" for c in NAMED])
def test_exact_equals_unsplit(models, name, merge, grid, size):
    model = models(name)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
    out = splitpack.wrap(model, merge, grid, mode="exact")(x)
    assert out.shape == ref.shape
    assert rel_error(out, ref) <= REL_TOL
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name,merge", [("resnet18", "layer2"), ("mobilenetv2_100", "blocks.3"),
                                        ("tv:vgg11", "features.10")])
def test_seed_differs_for_interior_merge_and_equals_for_grid_1(models, name, merge):
    model = models(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    seed = splitpack.wrap(model, merge, 2, mode="seed")(x)
    assert rel_error(seed, ref) > 1e-3  # the missing halo shows
    assert rel_error(splitpack.wrap(model, merge, 1, mode="seed")(x), ref) <= REL_TOL
    assert rel_error(splitpack.wrap(model, merge, 1, mode="exact")(x), ref) <= REL_TOL


def test_seed_runs_global_ops_per_pack(models):
    model = models("efficientnet_b0")  # SE blocks before blocks.2
    x = torch.randn(1, 3, 224, 224)
    out = splitpack.wrap(model, "blocks.2", 2, mode="seed")(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_merge_layers_lists_execution_order(models):
    names = splitpack.merge_layers(models("resnet18"))
    assert names.index("conv1") < names.index("layer1") < names.index("layer2") < names.index("layer4")
    assert "layer1.0.conv1" not in names  # the block's shortcut still needs the block input


def test_exact_merge_layers_stop_at_first_se(models):
    model = models("efficientnet_b0")
    exact = splitpack.merge_layers(model, mode="exact")
    assert exact[-1] == "blocks.0.0.aa"
    assert set(exact) < set(splitpack.merge_layers(model))


@pytest.mark.parametrize("batch,dtype,channels_last", [(3, torch.float32, True), (2, torch.bfloat16, False),
                                                        (1, torch.float16, False)])
def test_batch_dtype_and_memory_format(models, batch, dtype, channels_last):
    model = models("resnet18")
    x = torch.randn(batch, 3, 160, 144)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = model.to(dtype=dtype, memory_format=fmt)
    try:
        x = x.to(dtype=dtype, memory_format=fmt)
        with torch.no_grad():
            ref = m(x)
        out = splitpack.wrap(m, "layer2", 2)(x)
        tol = REL_TOL if dtype == torch.float32 else 2e-2  # half precision: 8-10 bit mantissa
        assert out.dtype == dtype and rel_error(out, ref) <= tol
    finally:
        model.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def test_wrapped_is_a_module_sharing_parameters(models):
    model = models("resnet18")
    wrapped = splitpack.wrap(model, "layer1", 2)
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert "merge_layer='layer1'" in repr(wrapped)


# ------------------------------------------------------------------ errors

def test_unknown_merge_layer_lists_valid_names(models):
    with pytest.raises(ValueError, match="valid merge layers.*layer1.*layer2"):
        splitpack.wrap(models("resnet18"), "layer9")


def test_global_op_before_merge_layer_names_op_path_and_latest_valid(models):
    with pytest.raises(splitpack.SplitError) as err:
        splitpack.wrap(models("efficientnet_b0"), "blocks.2", mode="exact")
    msg = str(err.value)
    assert "blocks.0.0.se" in msg and "mean" in msg and "'blocks.0.0.aa'" in msg


def test_grid_finer_than_merged_activation(models):
    wrapped = splitpack.wrap(models("resnet18"), "layer4", 4)
    with pytest.raises(splitpack.SplitError, match="finer than the merged activation"):
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


def test_pooled_outputs_are_not_merge_layers(models):
    assert not any("global_pool" in n for n in splitpack.merge_layers(models("resnet18")))
    assert "avgpool" not in splitpack.merge_layers(models("tv:vgg11"))  # AdaptiveAvgPool2d(7): fixed size
