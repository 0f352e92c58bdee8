"""The CLI convention, for every sub-command: a user error exits 2 with ``splitpack CMD: error: ...``
on stderr, no traceback, and leaves no file behind (splitpack/cli/__init__.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitpack import cli

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet18"  # random weights: quick to build, merge layers conv1 ... layer4

# (sub-command argv, what the message must say); every case runs in an empty working directory and
# writes (or would write) only below it.
BAD = {
    "bench-unknown-merge-layer": (["bench", "--model", MODEL, "--size", "64", "--merge-layer", "nope"],
                                  "unknown merge layer 'nope'"),
    "bench-grid-0x2": (["bench", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--grid", "0x2"],
                       "grid: must be at least 1x1"),
    "bench-compile-seed": (["bench", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--mode", "seed",
                            "--compile", "program"], "compile and cuda_graphs need mode='exact'"),
    "bench-bad-size": (["bench", "--model", MODEL, "--size", "0", "--merge-layer", "layer1"], "must be >= 1"),
    "archive-unknown-merge-layer": (["archive", "--model", MODEL, "--merge-layer", "nope", "--out", "store"],
                                    "unknown merge layer 'nope'"),
    "archive-grid-0x2": (["archive", "--model", MODEL, "--grid", "0x2", "--out", "store"], "grid: must be at least"),
    "archive-grids-for-stages": (["archive", "--model", MODEL, "--merge-layer", "layer1", "--grid", "2x2,3x3",
                                  "--out", "store"], "2 grids given for a plan of 1 stage"),
    "archive-missing-weights": (["archive", "--model", MODEL, "--weights", "missing.pt", "--out", "store"],
                                "missing.pt does not exist"),
    "archive-missing-config": (["archive", "--config", "missing.yaml", "--out", "store"], "missing.yaml"),
    "archive-no-model": (["archive", "--out", "store"], "no model: give --model NAME"),
    "triton-repo-unknown-merge-layer": (["triton-repo", "--model", MODEL, "--merge-layer", "nope", "--out", "repo"],
                                        "unknown merge layer 'nope'"),
    "triton-repo-grid-0x2": (["triton-repo", "--model", MODEL, "--grid", "0x2", "--out", "repo"], "grid: must be"),
    "triton-repo-missing-weights": (["triton-repo", "--model", MODEL, "--weights", "missing.pt", "--out", "repo"],
                                    "missing.pt does not exist"),
    "triton-repo-bad-kind": (["triton-repo", "--model", MODEL, "--instance-kind", "tpu", "--out", "repo"],
                             "instance_kind"),
    "serve-torchserve-missing-store": (["serve", "torchserve", "start", "--model-store", "missing"],
                                       "model store missing does not exist"),
    "serve-triton-missing-repo": (["serve", "triton", "start", "--repo", "missing"],
                                  "model repository missing does not exist"),
    "serve-bad-port": (["serve", "triton", "start", "--grpc-port", "http"], "invalid int value"),
    "client-missing-image": (["client", "triton", "missing.jpg"], "missing.jpg"),
    "devices-unknown-flag": (["devices", "--gpu", "0"], "unrecognized arguments"),
    "profile-unknown-merge-layer": (["profile", "--model", MODEL, "--size", "64", "--merge-layers", "nope",
                                     "--png", "profile.png"], "unknown merge layer 'nope'"),
    "profile-grid-0x2": (["profile", "--model", MODEL, "--size", "64", "--grid", "0x2"], "grid: must be"),
    "capacity-unknown-merge-layer": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB",
                                      "--merge-layers", "nope", "--png", "plan.png", "--write-triton", "repo"],
                                     "unknown merge layer(s) 'nope'"),
    "capacity-grid-0x2": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB", "--grids", "0x2"],
                          "grid: must be"),
    "capacity-bad-memory": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "80 parsecs"],
                            "not a memory size"),
    "capacity-planned-flag": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB",
                               "--replicas", "3"], "unrecognized arguments: --replicas"),
    "replica-probe-unknown-merge-layer": (["replica-probe", "--model", MODEL, "--size", "64", "--merge-layer", "nope"],
                                          "unknown merge layer 'nope'"),
    "evaluate-missing-data": (["evaluate", "--model", MODEL, "--data", "missing", "--out", "report.json"],
                              "missing"),
    "evaluate-no-model": (["evaluate", "--data", "missing"], "--model and --data are required"),
    "evaluate-bad-strategy": (["evaluate", "--model", MODEL, "--data", "x", "--strategies", "fold:3"],
                              "bad strategy"),
    "seams-missing-image": (["seams", "--model", MODEL, "--image", "missing.jpg", "--png", "seams.png",
                             "--out", "seams.json"], "missing.jpg"),
    "seams-grid-2x3": (["seams", "--model", MODEL, "--image", "x.jpg", "--png", "s.png", "--grid", "2x3"],
                       "square grids only"),
    "demo-missing-image": (["demo", "--image", "missing.jpg", "--model-store", "store"], "missing.jpg"),
    "demo-grid-0x2": (["demo", "--grid", "0x2", "--model-store", "store"], "grid: must be"),
    "export-unknown-merge-layer": (["export", "--model", MODEL, "--size", "64", "--merge-layer", "nope", "--format",
                                    "torchscript", "--out", "model.pt"], "unknown merge layer 'nope'"),
    "export-grid-0x2": (["export", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--grid", "0x2",
                         "--format", "torchscript", "--out", "model.pt"], "grid: must be at least 1x1"),
    "export-bad-format": (["export", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--format", "onnx",
                           "--out", "model.onnx"], "invalid choice: 'onnx'"),
    "export-pt2-name": (["export", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--format",
                         "exported-program", "--out", "model.pt"], "an exported program is a .pt2 archive"),
    "export-triton-flag": (["export", "--model", MODEL, "--size", "64", "--merge-layer", "layer1", "--format",
                            "torchscript", "--replicas", "2", "--out", "model.pt"],
                           "--replicas applies to --format triton-libtorch only"),
    "export-grid-finer-than-map": (["export", "--model", MODEL, "--size", "32", "--merge-layer", "layer4", "--grid",
                                    "4x4", "--format", "torchscript", "--out", "model.pt"], "finer than"),
    "capacity-sharing-python": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB",
                                 "--weight-sharing"], "--weight-sharing is a setting of --backend libtorch"),
    "capacity-libtorch-write": (["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB", "--backend",
                                 "libtorch", "--write-triton", "repo"], "splitpack export --format triton-libtorch"),
    "plan-bad-budget": (["plan", "--model", MODEL, "--size", "64", "--budget", "2 parsecs"], "not a memory size"),
    "plan-overhead-below-1": (["plan", "--model", MODEL, "--size", "64", "--max-overhead", "0.9"],
                              "a MACs ratio >= 1"),
    "plan-out-not-png": (["plan", "--model", MODEL, "--size", "64", "--out", "front.txt"], "a .png file"),
    "plan-impossible-budget": (["plan", "--model", MODEL, "--size", "64", "--budget", "1KiB", "--out", "front.png"],
                               "is below the smallest peak activation memory achievable"),
    "plan-latency-0": (["plan", "--model", MODEL, "--size", "64", "--max-latency", "0"], "must be a ratio > 0"),
    "plan-latency-word": (["plan", "--model", MODEL, "--size", "64", "--max-latency", "fast"],
                          "expected a latency ratio such as 1.1"),
    "plan-measure-without-latency": (["plan", "--model", MODEL, "--size", "64", "--measure-latency"],
                                     "--measure-latency measures candidates for --max-latency alone"),
    "calibrate-bad-size": (["calibrate", "--model", MODEL, "--size", "0"], "must be >= 1"),
    "calibrate-bad-threads": (["calibrate", "--model", MODEL, "--threads", "many"], "argument --threads"),
    "unknown-command": (["serv"], "invalid choice"),
}


def test_every_sub_command_is_covered():
    covered = {argv[0] for argv, _ in BAD.values()}
    assert set(cli.COMMANDS) <= covered, f"add bad-argument cases for {set(cli.COMMANDS) - covered}"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_sub_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: splitpack" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(BAD))
def test_user_error_exits_2_with_the_prefix_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    argv, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    command = "splitpack" if argv[0] not in cli.COMMANDS else " ".join(["splitpack", *argv[:2]]) \
        if argv[0] in ("serve", "client") else f"splitpack {argv[0]}"
    assert code == 2, err
    assert f"{command}: error: " in err and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed command left files behind"


def test_the_console_command_shows_no_traceback(tmp_path):
    """The real process: exit status 2, the message on stderr, nothing on stdout, no file written."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "splitpack.cli", "triton-repo", "--model", MODEL, "--merge-layer",
                           "nope", "--out", "repo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith("splitpack triton-repo: error: unknown merge layer 'nope'")
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())


def test_a_failed_regeneration_keeps_the_previous_model_directory(tmp_path, monkeypatch, capsys):
    """All or nothing: triton-repo replaces a model directory only once the new one is complete."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["triton-repo", "--model", MODEL, "--merge-layer", "layer1", "--out", "repo",
                     "--no-check"]) == 0
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "repo").rglob("*"))
    config = (tmp_path / "repo" / MODEL / "config.pbtxt").read_text()
    assert cli.main(["triton-repo", "--model", MODEL, "--merge-layer", "nope", "--out", "repo"]) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "repo").rglob("*")) == before
    assert (tmp_path / "repo" / MODEL / "config.pbtxt").read_text() == config
    assert "warning: resnet18: neither --pretrained nor --weights given" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:resnet18.*RANDOM weights")
def test_capacity_writes_all_its_outputs_or_none(tmp_path, monkeypatch, capsys):
    """--write-triton is complete when --write-torchserve fails: nothing of either (nor --png) is left."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    code = cli.main(["capacity", "--model", MODEL, "--size", "64", "--gpu-memory", "8GiB", "--merge-layers", "layer1",
                     "--repeats", "0", "--quiet", "--write-triton", "repo", "--png", "plan.png",
                     "--write-torchserve", "blocker/model-config.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "splitpack capacity: error: " in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("server", ["torchserve", "triton"])
def test_managing_a_server_does_not_import_torch(server, tmp_path):
    """`splitpack serve SERVER stop|status` only read run files and signal processes: without torch they answer
    in a fraction of a second (an operator's status check; every stop of a planned deployment)."""
    code = ("import sys; from splitpack import cli; "
            f"codes = [cli.main(['serve', {server!r}, action, '--run-dir', {str(tmp_path)!r}]) "
            "for action in ('status', 'stop')]; "
            "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    # status exits 3 when nothing runs (as LSB init scripts do), stop 0; torch was never imported
    assert done.stdout.strip().splitlines()[-1] == "[3, 0] False", done.stdout + done.stderr
