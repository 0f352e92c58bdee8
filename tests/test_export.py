"""`splitpack export`: artifacts that load with plain torch in a process where splitpack cannot be imported
(a fresh interpreter without site processing, so the editable install's path hook is not there, started in
an empty directory), giving the unsplit model's outputs; the Triton libtorch model directory."""
from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import splitpack
from conftest import REL_TOL, rel_error
from splitpack import cli
from splitpack.serving.triton.repo import read_model_config

SIZE = 64
LOADER = r"""
import importlib.util, json, sys
sys.path[:0] = json.loads(sys.argv[1])  # torch's site folders, without running their .pth files
assert importlib.util.find_spec("splitpack") is None, "splitpack is importable here"
assert importlib.util.find_spec("timm") is not None  # (present, but the artifact must not need it)
import torch
fmt, artifact, inputs, outputs = sys.argv[2:6]
model = torch.jit.load(artifact) if fmt == "torchscript" else torch.export.load(artifact).module()
with torch.inference_mode():
    out = [model(x) for x in torch.load(inputs, weights_only=True)]
assert "splitpack" not in sys.modules and "timm" not in sys.modules, sorted(sys.modules)
torch.save(out, outputs)
"""


def load_elsewhere(fmt: str, artifact: Path, inputs: list[torch.Tensor], workdir: Path) -> list[torch.Tensor]:
    """Run ``artifact`` on ``inputs`` in a fresh ``python -I -S`` process started in an empty directory."""
    workdir.mkdir()
    torch.save(inputs, workdir / "inputs.pt")
    paths = [p for p in site.getsitepackages() if (Path(p) / "torch").is_dir()]
    done = subprocess.run([sys.executable, "-I", "-S", "-c", LOADER, json.dumps(paths), fmt, str(artifact),
                           str(workdir / "inputs.pt"), str(workdir / "outputs.pt")], cwd=workdir,
                          capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(workdir / "outputs.pt", weights_only=True)


CASES = [
    # timm's test models: the same blocks as their big siblings, a few channels (quick to script and export)
    ("torchscript", "test_resnet", "layer1,layer3,global_pool", "3x2,2x2,2x1", "model.pt"),
    ("exported-program", "test_resnet", "layer2,global_pool", "2x2,2x1", "model.pt2"),
    ("torchscript", "test_efficientnet", "blocks.2,global_pool", "2x2,2x2", "model.pt"),  # SE: three passes
]


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("fmt,name,merge,grid,file", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_artifact_loads_without_splitpack_and_equals_the_unsplit_model(tmp_path, monkeypatch, fmt, name, merge,
                                                                       grid, file):
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    model = splitpack.create_model(name).eval()
    torch.save(model.state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "--model", name, "--size", str(SIZE), "--merge-layer", merge, "--grid", grid,
                     "--format", fmt, "--weights", str(weights), "--out", file]) == 0
    inputs = [torch.randn(3, 3, SIZE, SIZE), torch.randn(1, 3, SIZE, SIZE)]  # any batch size
    outputs = load_elsewhere(fmt, tmp_path / file, inputs, tmp_path / "elsewhere")
    with torch.inference_mode():
        for x, out in zip(inputs, outputs):
            assert out.shape == (x.shape[0], 1000) and rel_error(out, model(x)) <= REL_TOL


def test_triton_libtorch_model_directory(tmp_path, monkeypatch, capsys):
    """Written for Triton's pytorch_libtorch backend (not run here: the bundled Triton has only the python
    backend): its config.pbtxt parses as Triton's ModelConfig, its model.pt loads without splitpack."""
    model = splitpack.create_model("test_resnet").eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "--model", "test_resnet", "--size", str(SIZE), "--merge-layer", "layer2,global_pool",
                     "--grid", "2x2,2x1", "--format", "triton-libtorch", "--out", "repo", "--batch-size", "4",
                     "--replicas", "3", "--instance-kind", "gpu", "--weight-sharing", "--weights", "weights.pt"]) == 0
    model_dir = tmp_path / "repo" / "test_resnet_libtorch"
    assert sorted(p.relative_to(tmp_path / "repo").as_posix() for p in model_dir.rglob("*")) == \
        ["test_resnet_libtorch/1", "test_resnet_libtorch/1/model.pt", "test_resnet_libtorch/config.pbtxt"]
    config = read_model_config(model_dir / "config.pbtxt")
    assert (config.platform, config.max_batch_size) == ("pytorch_libtorch", 4)
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT__0", [3, SIZE, SIZE])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUTPUT__0", [1000])]
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (3, 1)  # KIND_GPU
    assert config.parameters["ENABLE_WEIGHT_SHARING"].string_value == "true"
    assert "--batch-size 4" in (model_dir / "config.pbtxt").read_text().splitlines()[0]
    x = torch.randn(2, 3, SIZE, SIZE)
    (out,) = load_elsewhere("torchscript", model_dir / "1" / "model.pt", [x], tmp_path / "elsewhere")
    with torch.inference_mode():
        assert rel_error(out, model(x)) <= REL_TOL
    assert "checked: artifact vs interpreter" in capsys.readouterr().err
