"""splitpack installs as a package: the built wheel works without the checkout, and the core needs none of
the server extras.

The wheel goes into a fresh virtual environment that sees this environment's installed packages (torch,
TorchServe, ...) through a path entry, not its site folder, so this checkout's editable install is not
active there; commands run from an empty directory with PYTHONPATH unset.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet18"
SERVER_PACKAGES = ("ts", "model_archiver", "tritonclient", "pytriton", "grpc", "requests", "matplotlib")


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the sources (the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "splitpack", src / "splitpack", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
                str(src)], src, dict(os.environ))
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("splitpack-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed, seeing the dependencies installed here."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       venv, dict(os.environ)).stdout.strip())
    (purelib / "_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                "--no-index", "--quiet", str(wheel)], venv, dict(os.environ))
    assert done.returncode == 0, done.stderr
    return venv


def clean_env(venv: Path, server_tools: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    path = [str(venv / "bin")] + ([str(Path(sys.executable).parent)] if server_tools else []) + ["/usr/bin", "/bin"]
    return env | {"PATH": os.pathsep.join(path)}


def test_wheel_ships_the_handler_and_assets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("splitpack/serving/torchserve/handler.py", "splitpack/assets/chelsea.jpg",
                   "splitpack/cli/__init__.py", "splitpack/core/plan/spec.py",
                   "splitpack/serving/kserve/crd/serving.kserve.io_inferenceservices.yaml.gz"):
        assert member in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert {r.split(">")[0].split("<")[0].split("=")[0] for r in core} >= {"torch", "torchvision", "timm"}
    assert not any(name in r for r in core for name in ("torchserve", "tritonclient", "pytriton", "matplotlib"))
    assert all(any(op in r for op in (">", "<")) for r in core if r.split(">")[0] in ("torch", "torchvision", "timm"))
    for extra in ("torchserve", "triton", "all", "dev"):
        assert f"Provides-Extra: {extra}" in metadata


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_installed_wheel_archives_and_writes_a_triton_model_from_an_empty_directory(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(venv)
    python, splitpack = str(venv / "bin" / "python"), str(venv / "bin" / "splitpack")
    where = run([python, "-c", "import splitpack, json; print(json.dumps(splitpack.__file__))"], work, env)
    assert where.returncode == 0, where.stderr
    assert Path(json.loads(where.stdout)).is_relative_to(venv), "the checkout, not the wheel, was imported"

    done = run([splitpack, "archive", "--model", MODEL, "--merge-layer", "layer1", "--out", "store"], work, env)
    assert done.returncode == 0, done.stderr
    assert (work / "store" / f"{MODEL}.mar").is_file()
    with zipfile.ZipFile(work / "store" / f"{MODEL}.mar") as mar:
        assert "splitpack_handler.py" in mar.namelist()
    done = run([splitpack, "triton-repo", "--model", MODEL, "--merge-layer", "layer1", "--out", "repo"], work, env)
    assert done.returncode == 0, done.stderr
    assert (work / "repo" / MODEL / "config.pbtxt").is_file() and (work / "repo" / MODEL / "1" / "model.py").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["repo", "store"]

    # without TorchServe's tools on the path: a clear error naming the extra, nothing written
    done = run([splitpack, "archive", "--model", MODEL, "--out", "other"], work, clean_env(venv, server_tools=False))
    assert done.returncode == 2 and "pip install 'splitpack[torchserve]'" in done.stderr, done.stderr
    assert not (work / "other").exists()


BLOCK_SERVERS = f"""
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_PACKAGES!r}:
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Missing())
"""


def test_the_core_works_without_any_server_package(tmp_path):
    """Import splitpack, split a model, measure it; a server command names the extra it needs."""
    code = BLOCK_SERVERS + f"""
import torch, splitpack
from splitpack.measure.meter import peak_activation_bytes
model = splitpack.create_model({MODEL!r})
split = splitpack.wrap(model, merge_layer="layer1", grid=(2, 2))
x = torch.randn(1, 3, 64, 64)
assert torch.allclose(split(x), model(x), atol=1e-4)
assert 0 < peak_activation_bytes(split, x) < peak_activation_bytes(model, x)
from splitpack.cli import main
sys.exit(main(["triton-repo", "--model", {MODEL!r}, "--out", "repo"]))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    done = run([sys.executable, "-c", code], tmp_path, env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "splitpack triton-repo: error:" in done.stderr and "pip install 'splitpack[triton]'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "repo").exists()
