"""Per-layer memory profile (the poster's Fig. 3) on the CPU activation tracker."""
from __future__ import annotations

import json

import pytest
import torch

import splitpack
from conftest import load_script
from splitpack import cli
from splitpack.measure import profile
from splitpack.measure.meter import peak_activation_bytes


@pytest.fixture(scope="module")
def resnet18():
    return splitpack.create_model("resnet18"), torch.randn(1, 3, 224, 224)


def test_resnet18_peaks_at_bn1_where_the_tracker_measures_its_maximum(resnet18):
    """The poster: "ResNet18 peaks at bn1". Agreed: conv1's output and bn1's output
    (64 x 112 x 112 fp32 each) are alive together while bn1 runs."""
    model, x = resnet18
    prof = profile.profile_unsplit(model, x)
    assert prof.peak_layer == "bn1"
    # an independent run without hooks peaks at the same bytes: hooks do not change memory
    assert prof.peak_bytes == peak_activation_bytes(model, x)
    stem = 64 * 112 * 112 * 4
    bn1 = next(p for p in prof.layers if p.label == "bn1")
    assert bn1.peak_bytes == bn1.after_bytes == 2 * stem == prof.peak_bytes
    # every other layer stays below: the maximum is unique to bn1
    assert all(p.peak_bytes < prof.peak_bytes for p in prof.layers if p.label != "bn1")
    labels = [p.label for p in prof.layers]
    assert labels[:4] == ["conv1", "bn1", "act1", "maxpool"] and labels[-1] == "output"
    assert not any("drop_block" in label or label.endswith(".aa") for label in labels)  # Identity placeholders


def test_torchvision_resnet18_agrees(resnet18):
    _, x = resnet18
    prof = profile.profile_unsplit(splitpack.create_model("tv:resnet18"), x)
    assert prof.peak_layer == "bn1"


def test_split_profile_marks_each_pack_in_the_head_and_lowers_the_peak(resnet18):
    model, x = resnet18
    unsplit = profile.profile_unsplit(model, x)
    split = profile.profile_split(model, x, "maxpool", grid=(2, 2), mode="exact")
    assert split.peak_bytes < unsplit.peak_bytes
    head = [p for p in split.layers if p.pack is not None]
    assert sorted({p.pack for p in head}) == [0, 1, 2, 3]
    assert [p.label for p in head if p.pack == 0] == ["conv1", "bn1", "act1", "maxpool"]
    assert all(p.pack is None for p in split.layers[len(head):])
    # the profile's peak is the one a hook-free tracker measures on the warm wrapped model
    wrapped = splitpack.wrap(model, merge_layer="maxpool", grid=(2, 2), mode="exact")
    with torch.inference_mode():
        wrapped(x)
    assert split.peak_bytes == peak_activation_bytes(wrapped, x)


def test_cli_json_and_png(tmp_path, capsys):
    png = tmp_path / "profile.png"
    assert cli.main(["profile", "--model", "resnet18", "--size", "96", "--batch-size", "2",
                     "--merge-layers", "maxpool", "layer1", "--json", "--png", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unsplit_peak_layer"] == "bn1" and result["batch_size"] == 2
    assert [s["merge_layer"] for s in result["split"]] == ["maxpool", "layer1"]
    for s, prof in zip(result["split"], result["profiles"][1:]):
        assert s["peak_bytes"] == max(p["peak_bytes"] for p in prof["layers"])
        assert s["peak_reduction"] == pytest.approx(1 - s["peak_bytes"] / result["unsplit_peak_bytes"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_merge_layer_is_a_clear_error(capsys):
    assert cli.main(["profile", "--model", "resnet18", "--size", "64", "--merge-layers", "nope", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitpack profile: error: ") and "nope" in err and "layer1" in err  # names the valid layers


def test_profile_ops_script_counts_every_pack_convolution(capsys):
    """scripts/profile_ops.py (BENCHMARKS.md's op-by-op profile): each convolution weight is called once per
    use in the unsplit model and once per pack in the program; 20 convolutions in resnet18."""
    script = load_script("profile_ops")
    threads = torch.get_num_threads()
    try:
        assert script.main(["--model", "resnet18", "--size", "64", "--plan", "layer2@4x1,global_pool.pool@2x1",
                            "--threads", "1", "--repeats", "1", "--profiles", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "resnet18 @64" in out and "| aten::convolution |" in out
    table = out[out.index("| convolution weight |"):].splitlines()[2:]
    calls = [(int(u.split("/")[0]), int(s.split("/")[0])) for _, u, s, _ in (row.split("|")[1:-1] for row in table)]
    assert sum(u for u, _ in calls) == 20  # resnet18: stem, 16 3x3 in its blocks, 3 downsampling 1x1
    assert all(s >= u for u, s in calls) and sum(s for _, s in calls) > 20
