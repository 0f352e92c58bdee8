"""Serving your own model: a model file and class, a timm model with a new head, training checkpoints, labels.

Fast tests: the library (splitpack.models.spec) and the CLI's errors (exit 2, the reason, nothing written).
Slow tests: `splitpack archive` and `splitpack triton-repo` of a CNN class written here (squeeze-excitation,
a custom activation, 7 classes), served by the real TorchServe and the real Triton on 127.0.0.1, and of
timm's test_resnet with 5 classes from a DDP-style checkpoint, served by TorchServe: the answers carry the
labels file's names and the unsplit model's probabilities.
"""
from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import splitpack
from conftest import REL_TOL, classify_on_triton, rel_error
from splitpack import cli
from splitpack.models import ModelError, ModelSpec, build_model, model_labels, read_labels
from splitpack.models.spec import load_weights, read_weights
from splitpack.serving.config import ServingConfig
from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Swishy(nn.Module):
        """A custom activation: x * sigmoid(1.5 x)."""

        def forward(self, x):
            return x * torch.sigmoid(1.5 * x)


    class SqueezeExcite(nn.Module):
        def __init__(self, channels, reduced):
            super().__init__()
            self.reduce = nn.Conv2d(channels, reduced, 1)
            self.expand = nn.Conv2d(reduced, channels, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


    class TinySENet(nn.Module):
        def __init__(self, num_classes=7, width=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), Swishy())
            self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                       Swishy(), SqueezeExcite(2 * width, 4))
            self.down = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), Swishy())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = self.down(self.block(self.stem(x)))
            return self.head(torch.flatten(self.pool(x), 1))


    def tiny_se_net(width=8):
        """A factory function works like a class."""
        return TinySENet(width=width)


    class DataDependent(nn.Module):
        """Python control flow on the image's values: torch.fx cannot trace it."""

        def __init__(self, num_classes=7):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            x = self.conv(x)
            if x.mean() > 0:
                x = x * 2
            return self.head(x.mean((2, 3)))


    class GroupNormNet(nn.Module):
        """GroupNorm reads the whole image: exact mode cannot split before it."""

        def __init__(self, num_classes=7):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(self.conv(self.norm(self.stem(x))).mean((2, 3)))
''')
CLASS = "TinySENet"
LABELS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"]
TINY = json.dumps({"input_size": [3, 64, 64]})  # tiny images keep the server tests fast
TIMM_MODEL, TIMM_CLASSES = "test_resnet", 5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model file, its seeded weights (a plain state dict), a labels file; timm's test_resnet with 5
    classes as a DDP checkpoint (``state_dict`` of ``module.`` keys) and its index_to_name.json."""
    root = tmp_path_factory.mktemp("own_model")
    model_file = root / "my_model.py"
    model_file.write_text(MODEL_SOURCE)
    torch.manual_seed(0)
    model = build_model(ModelSpec(model_file=model_file, model_class=CLASS))
    _randomize_norms(model)
    torch.save(model.state_dict(), root / "weights.pt")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    resnet = _randomize_norms(splitpack.create_model(TIMM_MODEL, num_classes=TIMM_CLASSES))
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}},
               root / "resnet_ckpt.pth")
    (root / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(TIMM_CLASSES)}))
    return {"model_file": model_file, "weights": root / "weights.pt", "labels": root / "labels.txt",
            "resnet_ckpt": root / "resnet_ckpt.pth", "resnet_labels": root / "index_to_name.json", "root": root}


def _randomize_norms(model):
    from conftest import randomize_norms

    return randomize_norms(model)


def own(files, *extra: str) -> list[str]:
    return ["--model-file", str(files["model_file"]), "--model-class", CLASS, *extra]


# --- the library ------------------------------------------------------------------------------------

def test_a_class_and_a_factory_build_the_same_model_with_its_weights(files):
    by_class = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS, weights=files["weights"]))
    by_factory = build_model(ModelSpec(model_file=files["model_file"], model_class="tiny_se_net",
                                       weights=files["weights"]))
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        assert torch.equal(by_class(x), by_factory(x))
        assert by_class(x).shape == (2, 7)
    assert not by_class.training


def test_checkpoint_layouts_load_into_the_model(files, tmp_path):
    """timm/Lightning checkpoints: state_dict, model, EMA keys; DDP's module. and a LightningModule's prefix."""
    spec = ModelSpec(model_file=files["model_file"], model_class=CLASS)
    reference = torch.load(files["weights"], weights_only=True)
    layouts = {
        "plain": reference,
        "timm": {"state_dict": {f"module.{k}": v for k, v in reference.items()}, "epoch": 3, "arch": "x"},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in reference.items()}, "global_step": 7},
        "model": {"model": reference, "optimizer": {"lr": 0.1}},
        "ema only": {"model_ema": {f"module.{k}": v for k, v in reference.items()}},
    }
    for name, content in layouts.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        loaded = build_model(ModelSpec(model_file=spec.model_file, model_class=CLASS, weights=path)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.items()), name


def test_state_dict_is_preferred_over_its_ema(files, tmp_path):
    reference = torch.load(files["weights"], weights_only=True)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    torch.save({"state_dict_ema": ema, "state_dict": reference}, tmp_path / "both.pt")
    state = read_weights(tmp_path / "both.pt")
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_a_pickled_module_needs_allow_pickle(files, tmp_path):
    model = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS, weights=files["weights"]))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ModelError, match="--allow-pickle"):
        read_weights(tmp_path / "whole.pt")
    state = read_weights(tmp_path / "whole.pt", allow_pickle=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_weights_that_do_not_fit_name_keys_and_shapes(files):
    state = torch.load(files["weights"], weights_only=True)
    wider = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS, model_kwargs={"width": 4}))
    with pytest.raises(ModelError) as err:
        load_weights(wider, state, "weights.pt")
    assert "mismatched shapes" in str(err.value) and "stem.0.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3)" \
        in str(err.value)
    partial = {k: v for k, v in state.items() if not k.startswith("head.")} | {"extra.bias": torch.zeros(1)}
    model = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS))
    with pytest.raises(ModelError, match=r"2 missing keys \(head.bias, head.weight\); 1 unexpected keys \(extra.bias\)"):
        load_weights(model, partial)


def test_labels_files_in_both_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("cat\ndog\r\nbird\n\n")
    (tmp_path / "index_to_name.json").write_text(json.dumps({"1": ["n02", "dog"], "0": ["n01", "cat"], "2": "bird"}))
    (tmp_path / "list.json").write_text(json.dumps(["cat", "dog", "bird"]))
    for name in ("lines.txt", "index_to_name.json", "list.json"):
        assert read_labels(tmp_path / name) == ["cat", "dog", "bird"], name
    (tmp_path / "gap.json").write_text(json.dumps({"0": "cat", "2": "bird"}))
    with pytest.raises(ModelError, match="missing 1"):
        read_labels(tmp_path / "gap.json")
    (tmp_path / "hole.txt").write_text("cat\n\nbird\n")
    with pytest.raises(ModelError, match="line.* 2 are empty"):
        read_labels(tmp_path / "hole.txt")


def test_labels_must_match_the_head(files):
    model = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS))
    assert model_labels(model, 7, files["labels"]) == LABELS
    with pytest.raises(ModelError, match="has 7 labels but the model's head has 5 classes"):
        model_labels(model, 5, files["labels"])


def test_a_timm_model_with_a_new_head_from_a_ddp_checkpoint(files):
    model = build_model(ModelSpec(name=TIMM_MODEL, num_classes=TIMM_CLASSES, weights=files["resnet_ckpt"]))
    assert model.num_classes == TIMM_CLASSES
    expected = torch.load(files["resnet_ckpt"], weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["fc.weight"], expected["module.fc.weight"])
    with pytest.raises(ModelError, match=r"fc.weight: file \(5, \d+\) vs model \(1000, \d+\)"):
        build_model(ModelSpec(name=TIMM_MODEL, weights=files["resnet_ckpt"]))


def test_predictor_answers_with_the_files_labels(files):
    config = ServingConfig(model_file=files["model_file"].name, model_class=CLASS, labels="labels.txt", topk=7,
                           data_config=TINY, merge_layer="block")
    predictor = Predictor(config, weights=str(files["weights"]), base_dir=files["root"])
    [probabilities] = predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])
    top = predictor.top_k(probabilities)
    assert sorted(p["label"] for p in top) == sorted(LABELS)
    assert all(p["label"] == LABELS[p["index"]] for p in top)


# --- the CLI's errors: exit 2 with the reason, nothing written -------------------------------------------

def _fails(capsys, out: Path, args: list[str], *reasons: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for reason in reasons:
        assert reason in err, err
    assert not out.exists() or not any(out.iterdir()), f"{out} was written"


@pytest.mark.parametrize("case, extra, reasons", [
    ("import error", ["--model-class", CLASS], ["cannot be imported", "No module named 'no_such_package'"]),
    ("wrong class", ["--model-class", "Nope"], ["has no class or function 'Nope'", "TinySENet", "tiny_se_net"]),
    ("bad kwargs", ["--model-class", CLASS, "--model-kwargs", '{"depth": 3}'],
     ["cannot build TinySENet", "unexpected keyword argument 'depth'"]),
    ("class without its file", ["--model-class", CLASS], ["--model-file and --model-class go together"]),
])
def test_a_class_that_cannot_be_built(files, tmp_path, capsys, case, extra, reasons):
    model_file = files["model_file"]
    if case == "import error":
        model_file = tmp_path / "broken.py"
        model_file.write_text("import no_such_package\n" + MODEL_SOURCE)
    flags = extra if case == "class without its file" else ["--model-file", str(model_file), *extra]
    out = tmp_path / "repo"
    _fails(capsys, out, ["triton-repo", *flags, "--out", str(out)], *reasons)


def test_weights_that_do_not_fit(files, tmp_path, capsys):
    out = tmp_path / "repo"
    _fails(capsys, out, ["triton-repo", *own(files, "--num-classes", "5"), "--weights", str(files["weights"]),
                         "--out", str(out)],
           "do not fit the model", "mismatched shapes", "head.weight: file (7, 16) vs model (5, 16)")
    _fails(capsys, out, ["triton-repo", "--model", TIMM_MODEL, "--weights", str(files["weights"]), "--out", str(out)],
           "92 missing keys (bn1.bias", "22 unexpected keys (block.0.bias")


def test_a_pickled_model_without_allow_pickle(files, tmp_path, capsys):
    model = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS, weights=files["weights"]))
    torch.save(model, tmp_path / "whole.pt")
    out = tmp_path / "store"
    _fails(capsys, out, ["archive", *own(files), "--weights", str(tmp_path / "whole.pt"), "--out", str(out)],
           "not a plain state dict", "--allow-pickle")


def test_labels_whose_count_differs_from_the_head(files, tmp_path, capsys):
    out = tmp_path / "store"
    _fails(capsys, out, ["archive", *own(files), "--weights", str(files["weights"]), "--labels",
                         str(files["resnet_labels"]), "--out", str(out), "--no-check"],
           "has 5 labels but the model's head has 7 classes")


def test_a_model_fx_cannot_trace(files, tmp_path, capsys):
    out = tmp_path / "repo"
    _fails(capsys, out, ["triton-repo", "--model-file", str(files["model_file"]), "--model-class", "DataDependent",
                         "--merge-layer", "conv", "--data-config", TINY, "--out", str(out)],
           "DataDependent cannot be captured with torch.fx", "control flow")


def test_an_op_exact_mode_cannot_split(files, tmp_path, capsys):
    out = tmp_path / "repo"
    _fails(capsys, out, ["triton-repo", "--model-file", str(files["model_file"]), "--model-class", "GroupNormNet",
                         "--merge-layer", "conv", "--data-config", TINY, "--out", str(out)],
           "op GroupNorm at module 'norm'", "the latest merge layer before it that exact mode supports is 'stem'")


@pytest.mark.parametrize("command", ["bench", "plan", "profile"])
def test_every_model_command_takes_your_own_model(files, capsys, command):
    extra = {"bench": ["--merge-layer", "block", "--repeats", "1"], "plan": ["--no-measure"], "profile": []}[command]
    args = [command, *own(files), "--weights", str(files["weights"]), "--labels", str(files["labels"]),
            "--size", "48", "--json", *extra]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == CLASS


def test_capacity_plans_your_own_model_and_writes_a_self_contained_deployment(files, tmp_path, capsys):
    args = ["capacity", *own(files), "--weights", str(files["weights"]), "--labels", str(files["labels"]),
            "--size", "48", "--gpu-memory", "8GiB", "--merge-layers", "block", "--repeats", "0", "--quiet", "--json",
            "--write-triton", str(tmp_path / "repo")]
    assert cli.main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == CLASS
    version = Path(plan["triton_model_dir"]) / "1"
    assert {"user_model.py", "labels.txt", "model.pt"} <= {f.name for f in version.iterdir()}


def test_export_and_a_pickled_model_with_allow_pickle(files, tmp_path, capsys):
    model = build_model(ModelSpec(model_file=files["model_file"], model_class=CLASS, weights=files["weights"]))
    torch.save(model, tmp_path / "whole.pt")
    out = tmp_path / "tiny.pt"
    args = ["export", *own(files), "--weights", str(tmp_path / "whole.pt"), "--allow-pickle", "--size", "48",
            "--merge-layer", "block", "--format", "torchscript", "--out", str(out)]
    assert cli.main(args) == 0
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        assert rel_error(torch.jit.load(out)(x), model(x)) <= REL_TOL


# --- the real servers ----------------------------------------------------------------------------------

def _expected(config: ServingConfig, weights: Path, base_dir: Path) -> torch.Tensor:
    """The unsplit model's probabilities for the sample image, in this process."""
    unsplit = ServingConfig(**{**config.to_mapping(), "merge_layer": "none"})
    predictor = Predictor(unsplit, weights=str(weights), base_dir=base_dir)
    return predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])[0]


SERVED = {  # name -> (CLI flags, labels, the config the unsplit reference runs)
    "own_se": (lambda f: [*own(f), "--weights", str(f["weights"]), "--labels", str(f["labels"]),
                          "--merge-layer", "block", "--grid", "2x2", "--topk", "7", "--data-config", TINY],
               LABELS,
               lambda f: ServingConfig(model_file=f["model_file"].name, model_class=CLASS, data_config=TINY)),
    "own_resnet": (lambda f: ["--model", TIMM_MODEL, "--num-classes", str(TIMM_CLASSES), "--weights",
                              str(f["resnet_ckpt"]), "--labels", str(f["resnet_labels"]), "--merge-layer", "layer2",
                              "--grid", "2x2", "--data-config", TINY],
                   [f"class_{i}" for i in range(TIMM_CLASSES)],
                   lambda f: ServingConfig(TIMM_MODEL, num_classes=TIMM_CLASSES, data_config=TINY)),
}


def _check_answer(name: str, files, answer: list[dict], probabilities=None) -> None:
    """Every class answered, labelled from the file, with the unsplit model's probabilities (the answer's,
    or the full-precision ``probabilities`` where the server sends them too)."""
    _, labels, reference = SERVED[name]
    weights = files["weights"] if name == "own_se" else files["resnet_ckpt"]
    expected = _expected(reference(files), weights, files["root"])
    got = torch.zeros_like(expected)
    for row in answer:
        assert row["label"] == labels[row["index"]]
        got[row["index"]] = row["probability"]
    assert len(answer) == len(labels)
    if probabilities is not None:
        got = torch.tensor(list(probabilities), dtype=torch.float32)
    assert rel_error(got, expected) <= REL_TOL, (got, expected)


@pytest.mark.slow
def test_torchserve_serves_your_own_models(files, tmp_path):
    import requests

    from splitpack.serving.net import free_ports
    from splitpack.serving.torchserve.server import Ports, TorchServe

    store = tmp_path / "store"
    for name, (flags, _, _) in SERVED.items():
        assert cli.main(["archive", *flags(files), "--name", name, "--out", str(store)]) == 0
    ts = TorchServe(run_dir=tmp_path / "run", model_store=store, ports=Ports(*free_ports(5)))
    try:
        ts.start(timeout_s=240)
        for name in SERVED:
            response = requests.post(f"{ts.inference_url}/predictions/{name}", data=SAMPLE_IMAGE.read_bytes(),
                                     headers={"Content-Type": "application/octet-stream", **ts.headers("inference")},
                                     timeout=120)
            assert response.status_code == 200, response.text
            _check_answer(name, files, response.json()["predictions"])
    finally:
        ts.stop()


@pytest.mark.slow
def test_triton_serves_your_own_models(files, tmp_path):
    repo, name = tmp_path / "repo", "own_se"  # the timm model's packaging is the same: TorchServe serves it
    assert cli.main(["triton-repo", *SERVED[name][0](files), "--name", name, "--out", str(repo)]) == 0
    assert {"user_model.py", "labels.txt", "model.pt"} <= {f.name for f in (repo / name / "1").iterdir()}
    prediction = classify_on_triton(repo, name, SAMPLE_IMAGE.read_bytes(), tmp_path / "run")
    assert prediction.error is None, prediction.error
    _check_answer(name, files, prediction.top_k, prediction.probabilities)
