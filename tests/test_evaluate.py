"""splitpack evaluate / seams on real pretrained weights and real images, kept tiny."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import splitpack
from splitpack import cli
from splitpack.experiments.evaluate import (Strategy, block_layers, data_transform, default_strategies, evaluate,
                                            labelled_images, load_images, parse_strategy)
from splitpack.measure.meter import peak_activation_bytes

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample"
MODEL = "tf_efficientnet_lite0"
IMAGES = ["n01440764_tench.JPEG", "n02102177_Welsh_springer_spaniel.JPEG", "n02690373_airliner.JPEG"]
EXACT_LOGIT_ATOL = 1e-4  # exact mode reorders float sums at most (measured ~4e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 real labelled images, one corrupt file and one truncated JPEG, with labels.tsv."""
    if not (SAMPLE / "labels.tsv").is_file():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in (SAMPLE / "labels.tsv").read_text().splitlines()[1:]}
    root = tmp_path_factory.mktemp("images")
    lines = ["file\tclass_index"]
    for name in IMAGES:
        shutil.copy(SAMPLE / name, root / name)
        lines.append(f"{name}\t{rows[name]}")
    (root / "corrupt.JPEG").write_bytes(b"this is not an image")
    (root / "truncated.JPEG").write_bytes((SAMPLE / IMAGES[0]).read_bytes()[:1500])
    lines += ["corrupt.JPEG\t0", "truncated.JPEG\t0"]
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def model():
    return splitpack.create_model(MODEL, pretrained=True)


def test_exact_mode_keeps_every_top1_on_real_images(model, folder):
    items = labelled_images(folder)
    strategies = [Strategy("unsplit"), Strategy("exact", "blocks.1.1", 2), Strategy("exact", "blocks.2.1", 3)]
    result = evaluate(model, items, strategies, batch_size=4, progress=False)
    assert result["n_images"] == 3 and result["n_skipped"] == 2
    unsplit, *exact = result["strategies"]
    for row in exact:
        assert row["agreement"] == 1.0 and row["disagreements"] == []
        assert row["top1"] == unsplit["top1"]
        assert row["max_logit_dev"] <= EXACT_LOGIT_ATOL
        assert 0 < row["peak_bytes"] < unsplit["peak_bytes"]


def test_resize_reduces_memory_measured_by_the_same_tracker(model, folder):
    items = labelled_images(folder)[:1]
    result = evaluate(model, items, [Strategy("unsplit"), Strategy("resize", scale=0.5)], progress=False)
    unsplit, resized = result["strategies"]
    assert resized["peak_bytes"] < 0.5 * unsplit["peak_bytes"]  # ~quarter of the pixels
    transform, _ = data_transform(model, None)
    x = next(load_images(items, transform))[2].unsqueeze(0)
    assert resized["peak_bytes"] == peak_activation_bytes(Strategy("resize", scale=0.5).build(model, 224), x)
    assert unsplit["peak_bytes"] == peak_activation_bytes(model, x)


def test_seed_mode_with_one_pack_equals_unsplit(model, folder):
    transform, _ = data_transform(model, None)
    x = torch.stack([t for _, _, t in load_images(labelled_images(folder), transform) if t is not None])
    with torch.inference_mode():
        expected = model(x)
        for layer in ("bn1", "blocks.5.0"):
            got = splitpack.wrap(model, layer, grid=(1, 1), mode="seed")(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_evaluate_command_writes_every_strategy_and_a_plot(folder, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "eval.json", tmp_path / "eval.png", tmp_path / "eval.md"
    rc = cli.main([
        "evaluate", "--model", MODEL, "--pretrained", "--data", str(folder), "--quiet", "--size", "128",
        "--exact-layers", "blocks.1.1", "--exact-grids", "2", "--seed-layers", "blocks.3.0", "--grids", "2",
        "--scales", "0.5", "--batch-size", "8", "--out", str(out_json), "--png", str(out_png), "--markdown", str(out_md),
    ])
    assert rc == 0
    report = json.loads(out_json.read_text())
    expected = ["unsplit", "exact:blocks.1.1:2", "seed:blocks.3.0:2", "resize:0.5"]
    (run,) = report["runs"]
    assert run["input_size"] == 128 and run["n_images"] == 3 and run["n_skipped"] == 2
    assert [row["label"] for row in run["strategies"]] == expected
    assert all(0 <= row["top1"] <= 1 and row["peak_bytes"] > 0 for row in run["strategies"])
    assert out_png.read_bytes()[:4] == b"\x89PNG" and out_png.stat().st_size > 10_000
    assert "seed:blocks.3.0:2" in out_md.read_text()
    assert "skipped 2 unreadable" in capsys.readouterr().err

    # two input sizes (native and 2x in RESULTS.md) are two panels; redraw from the JSON
    report["runs"].append({**run, "input_size": 256})
    out_json.write_text(json.dumps(report))
    assert cli.main(["evaluate", "--from-json", str(out_json), "--png", str(tmp_path / "two.png")]) == 0
    assert (tmp_path / "two.png").stat().st_size > out_png.stat().st_size


@pytest.fixture(scope="module")
def made_images(tmp_path_factory) -> Path:
    """Two small random RGB images with labels.tsv, made here (no data set needed)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("made")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "labels.tsv").write_text("file\tclass_index\n" + "".join(f"img{i}.png\t{i}\n" for i in range(2)))
    return root


def test_evaluate_runs_its_default_strategy_set(made_images, tmp_path):
    """No --strategies, --seed-layers or --exact-layers: the default set (seed at every block-level merge
    layer seed mode takes, exact at 4 layers exact mode takes, including the global pooling) all runs."""
    out = tmp_path / "defaults.json"
    rc = cli.main(["evaluate", "--model", "test_efficientnet", "--data", str(made_images), "--limit", "2",
                   "--batch-size", "2", "--threads", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    (run,) = json.loads(out.read_text())["runs"]
    model = splitpack.create_model("test_efficientnet")
    expected = [s.label for s in default_strategies(model)]
    assert [row["label"] for row in run["strategies"]] == expected and run["n_images"] == 2
    seed_layers = {row["merge_layer"] for row in run["strategies"] if row["kind"] == "seed"}
    assert seed_layers == set(block_layers(model, "seed")) and "global_pool" not in seed_layers
    assert "exact:global_pool:2" in expected  # exact mode's own last checkpoint stays in the set
    assert all(row["peak_bytes"] > 0 for row in run["strategies"])


def test_bad_arguments_are_clear_errors(folder, capsys):
    assert cli.main(["evaluate", "--model", MODEL, "--data", str(folder), "--strategies", "seed:nope:2"]) == 2
    assert "unknown merge layer 'nope'" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", MODEL, "--data", str(folder / "missing")]) == 2
    with pytest.raises(ValueError, match="bad strategy"):
        parse_strategy("resize:1.5")


def test_labels_from_synset_folders(tmp_path):
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "a.jpg").write_bytes(b"")
    (tmp_path / "not_a_synset").mkdir()
    assert labelled_images(tmp_path) == [(tmp_path / "n01440764" / "a.jpg", 0)]


def test_seams_command(folder, tmp_path):
    png, out = tmp_path / "seams.png", tmp_path / "seams.json"
    rc = cli.main(["seams", "--model", MODEL, "--pretrained", "--image", str(folder / IMAGES[0]), "--size", "128",
                   "--merge-layer", "blocks.1.1", "--layers", "blocks.1.1,blocks.4.0", "--png", str(png),
                   "--out", str(out)])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    assert report["layers"]["blocks.1.1"]["exact_rel_error"] < 1e-5
    assert report["layers"]["blocks.1.1"]["seed_rel_error"] > 1e-2  # the seams
    assert report["logits"]["exact"]["same_top1"]


def test_seam_report_when_seed_changes_the_map_size():
    # seed packs whose side is not a multiple of the stride so far merge into a larger map
    from splitpack.experiments.seams import seam_report

    ref = {"logits": torch.zeros(1, 5), "maps": {"a": torch.ones(1, 2, 33, 33)}}
    seed = {"logits": torch.ones(1, 5), "maps": {"a": torch.ones(1, 2, 34, 34)}}
    report = seam_report({"unsplit": ref, "seed": seed, "exact": ref}, ["a"])
    assert report["layers"]["a"]["seed_rel_error"] is None and report["layers"]["a"]["seed_shape"] == [1, 2, 34, 34]
    assert report["layers"]["a"]["exact_rel_error"] == 0.0
    assert json.dumps(report)  # strict JSON, no NaN
