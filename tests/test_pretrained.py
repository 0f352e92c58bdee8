"""The packaged EfficientNet-Lite weights land on the right timm modules.

Proof on real images: timm + :func:`splitpack.pretrained.load_pretrained` gives the
same logits (within LOGIT_ATOL; measured bit-identical on CPU) and the same top-1 as
the packages' own reference implementation (``efficientnet-lite-pytorch``), and a
plausible ImageNet accuracy.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import splitpack
from splitpack.models.pretrained import (
    SUPPORTED,
    TF_LITE_MEAN,
    TF_LITE_STD,
    load_pretrained,
    map_state_dict,
    native_size,
    pretrained_weights_path,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample"
N_IMAGES = 50
LOGIT_ATOL = 1e-4  # same ops in the same order: differences are float reordering at most


def _sample_rows(n: int) -> list[dict]:
    if not (SAMPLE / "labels.tsv").is_file():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    with open(SAMPLE / "labels.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    step = len(rows) // n  # spread over the classes, not the first 50 (fish and birds)
    return rows[::step][:n]


def _reference(name: str) -> torch.nn.Module:
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    ref_name = name.replace("tf_", "").replace("_", "-")  # efficientnet-lite0
    return lite.EfficientNet.from_pretrained(ref_name, weights_path=str(pretrained_weights_path(name))).eval()


@pytest.mark.parametrize("name", SUPPORTED)
def test_matches_reference_on_real_images(name):
    torch.manual_seed(0)
    model = splitpack.create_model(name, pretrained=True)
    reference = _reference(name)
    transform = create_transform(**resolve_data_config(model=model))
    rows = _sample_rows(N_IMAGES)
    x = torch.stack([transform(Image.open(SAMPLE / r["file"]).convert("RGB")) for r in rows])
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    with torch.inference_mode():
        ours, theirs = model(x), reference(x)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert (ours - theirs).abs().max().item() <= LOGIT_ATOL
    top1 = (ours.argmax(1) == labels).float().mean().item()
    assert top1 > 0.6, f"{name}: top-1 {top1:.2f} on {N_IMAGES} sample images"


@pytest.mark.parametrize("name", SUPPORTED)
def test_data_config_matches_the_weights(name):
    model = splitpack.create_model(name, pretrained=True)
    cfg = resolve_data_config(model=model)
    size = native_size(name)
    assert cfg["input_size"] == (3, size, size)
    assert cfg["mean"] == TF_LITE_MEAN and cfg["std"] == TF_LITE_STD  # TF lite: (x - 127) / 128
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == pytest.approx(size / (size + 32), abs=1e-3)
    assert pretrained_weights_path(name).suffix == ".pth"


def test_unsupported_name_lists_supported_ones():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2"):
        splitpack.create_model("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="supported"):
        pretrained_weights_path("efficientnet_lite0")  # not the TF-padding variant


def test_mapping_is_strict():
    state = torch.load(pretrained_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    wrong_head = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    with pytest.raises(RuntimeError, match="classifier.weight"):
        map_state_dict(state, wrong_head)
    wrong_depth = timm.create_model("tf_efficientnet_lite1")  # more blocks than lite0's file
    with pytest.raises(RuntimeError, match="missing"):
        map_state_dict(state, wrong_depth)
    state["_blocks.0._nonsense.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="_nonsense"):
        map_state_dict(state, timm.create_model("tf_efficientnet_lite0"))


def test_refuses_model_with_other_batchnorm_eps():
    model = timm.create_model("tf_efficientnet_lite0", bn_eps=1e-5)
    with pytest.raises(ValueError, match="eps"):
        load_pretrained(model, "tf_efficientnet_lite0")
