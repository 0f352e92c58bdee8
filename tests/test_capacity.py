"""Capacity planner: self-consistent plans, configs for both servers, the GPU validation script's dry run."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitpack import cli
from splitpack.capacity import footprint, report
from splitpack.serving.torchserve import deploy as torchserve_deploy
from splitpack.serving.triton import deploy as triton_deploy
from splitpack.measure import units

ROOT = Path(__file__).resolve().parent.parent
VALIDATE = ROOT / "scripts" / "validate_capacity_gpu.py"
FOOTPRINT_PARTS = ("context_overhead_bytes", "weights_bytes", "persistent_bytes", "io_bytes",
                   "peak_activation_bytes", "allocator_slack_bytes")


def plan_cli(*argv: str) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["capacity", *argv, "--json"])
    return code, (json.loads(out.getvalue()) if code == 0 else None), err.getvalue()


def assert_self_consistent(plan: dict) -> None:
    gpu, headroom, shared = plan["gpu_memory_bytes"], plan["headroom_bytes"], plan["shared_bytes"]
    assert plan["usable_bytes"] == gpu - headroom
    assert shared == (0 if plan["backend"] == "python" else plan["unsplit"]["footprint"]["context_overhead_bytes"]
                      + plan["weight_sharing"] * plan["unsplit"]["footprint"]["weights_bytes"])
    for row in [plan["unsplit"]] + plan["candidates"]:
        fp = row["footprint"]
        assert fp["replica_bytes"] == sum(fp[k] for k in FOOTPRINT_PARTS)
        assert row["replica_bytes"] == fp["replica_bytes"]  # no NVML measurement on the CPU
        assert row["replicas"] == math.floor((gpu - headroom - shared) / (row["replica_bytes"] - shared))
        assert fp["allocator_slack_bytes"] == math.ceil(fp["peak_activation_bytes"] * plan["assumptions"]["allocator_slack"])
    assert plan["replica_bytes_unsplit"] == plan["unsplit"]["replica_bytes"]
    assert plan["replicas_unsplit"] == plan["unsplit"]["replicas"]
    rec = plan["recommended"]
    if rec["merge_layer"] is None:
        assert rec["replicas"] == plan["replicas_unsplit"]
        assert plan["replicas_split"] is None or plan["replicas_split"] <= plan["replicas_unsplit"]
    else:
        assert rec["replicas"] == plan["replicas_split"] > plan["replicas_unsplit"]
        assert {k: rec[k] for k in ("merge_layer", "grid", "mode")} == plan["best_split"]


@pytest.mark.parametrize("text, value", [("80GiB", 80 * 1024**3), ("80GB", 80 * 10**9), ("512MiB", 512 * 1024**2),
                                         ("512M", 512 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)), ("1024", 1024),
                                         (4096, 4096)])
def test_parse_bytes(text, value):
    assert units.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "80 parsecs", "-1GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        units.parse_bytes(text)


def test_headroom_percent_or_size():
    assert footprint.parse_headroom("10%", 1000) == 100
    assert footprint.parse_headroom("0%", 1000) == 0
    assert footprint.parse_headroom("1KiB", 4096) == 1024
    for bad in ("100%", "-5%", "8KiB"):
        with pytest.raises(ValueError):
            footprint.parse_headroom(bad, 4096)


def test_replicas_formula():
    assert footprint.replicas_that_fit(80, 8, 10) == 7
    assert footprint.replicas_that_fit(80, 8, 100) == 0
    # libtorch: 4 of every replica's 10 (context) paid once: (72 - 4) // 6
    assert footprint.replicas_that_fit(80, 8, 10, shared=4) == 11
    assert footprint.replicas_that_fit(80, 8, 100, shared=4) == 0 and footprint.replicas_that_fit(80, 8, 4, 4) == 0


def test_shared_bytes_per_backend():
    fp = footprint.Footprint(context_overhead_bytes=500, weights_bytes=100, persistent_bytes=1, io_bytes=2,
                             peak_activation_bytes=300, allocator_slack_bytes=30)
    assert footprint.shared_bytes(fp, "python") == 0
    assert footprint.shared_bytes(fp, "libtorch") == 500
    assert footprint.shared_bytes(fp, "libtorch", weight_sharing=True) == 600
    with pytest.raises(ValueError, match="libtorch backend"):
        footprint.shared_bytes(fp, "python", weight_sharing=True)
    with pytest.raises(ValueError, match="backend: expected one of python, libtorch"):
        footprint.shared_bytes(fp, "onnx")


def test_libtorch_backend_fits_more_instances_of_the_same_footprint(small_plan):
    """One process and context for all instances: the same measured footprints, more replicas; weight sharing
    adds more. small_plan is the python backend: one process per replica."""
    assert small_plan["backend"] == "python" and small_plan["shared_bytes"] == 0
    plans = {}
    for extra in ((), ("--weight-sharing",)):
        code, plans[extra], err = plan_cli("--model", "resnet18", "--size", "224", "--batch-size", "2",
                                           "--gpu-memory", "2GiB", "--merge-layers", "maxpool", "--repeats", "0",
                                           "--backend", "libtorch", *extra)
        assert code == 0, err
        assert_self_consistent(plans[extra])
    shared, sharing = plans[()], plans[("--weight-sharing",)]
    assert shared["backend"] == "libtorch" and shared["shared_bytes"] == footprint.DEFAULT_CONTEXT_OVERHEAD
    assert shared["unsplit"]["footprint"] == small_plan["unsplit"]["footprint"]
    assert small_plan["replicas_unsplit"] < shared["replicas_unsplit"] < sharing["replicas_unsplit"]
    assert "one process for all instances" in shared["assumptions"]["formula"]


def test_seed_candidates_need_explicit_merge_layers():
    code, plan, err = plan_cli("--model", "resnet18", "--size", "64", "--batch-size", "1", "--gpu-memory", "8GiB",
                               "--modes", "seed", "--repeats", "0")
    assert code == 0, err
    assert plan["candidates"] == [] and plan["recommended"]["merge_layer"] is None
    assert any("--merge-layers" in note and "seed" in note for note in plan["notes"])
    assert plan["unsplit"]["latency_ratio"] is None  # --repeats 0: nothing timed
    assert "response_timeout_s" not in plan  # nor a response timeout derived (the writers keep theirs)


def test_no_gpu_and_no_gpu_memory_is_a_clear_error():
    from splitpack.measure.nvml import nvml_status

    if nvml_status()[0]:
        pytest.skip("this machine has an NVIDIA driver: the planner detects the GPU")
    code, _, err = plan_cli("--model", "resnet18", "--size", "64", "--batch-size", "1")
    assert code == 2 and "--gpu-memory" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def small_plan():
    """resnet18 @224 on a 2 GiB GPU: small enough to be quick, explicit candidates."""
    code, plan, err = plan_cli("--model", "resnet18", "--size", "224", "--batch-size", "2", "--gpu-memory", "2GiB",
                               "--merge-layers", "maxpool", "layer1", "--repeats", "1")
    assert code == 0, err
    return plan


def test_plan_json_has_the_documented_keys_and_is_self_consistent(small_plan):
    for key in ("model", "size", "batch_size", "gpu_memory_bytes", "replica_bytes_unsplit", "replica_bytes_split",
                "replicas_unsplit", "replicas_split", "latency_ratio", "recommended"):
        assert key in small_plan
    assert set(small_plan["recommended"]) >= {"merge_layer", "grid", "mode"}
    assert small_plan["gpu_memory_bytes"] == 2 * 1024**3 and small_plan["headroom_bytes"] == int(0.1 * 2 * 1024**3)
    assert {(c["merge_layer"], c["grid"], c["mode"]) for c in small_plan["candidates"]} == {
        ("maxpool", "2x2", "exact"), ("layer1", "2x2", "exact")}
    assert_self_consistent(small_plan)
    unsplit = small_plan["unsplit"]["footprint"]
    assert unsplit["context_overhead_bytes"] == footprint.DEFAULT_CONTEXT_OVERHEAD
    assert unsplit["weights_bytes"] == pytest.approx(11.69e6 * 4, rel=0.01)  # resnet18: 11.69 M parameters
    assert unsplit["io_bytes"] == 2 * 3 * 224 * 224 * 4 + 2 * 1000 * 4
    assert unsplit["persistent_bytes"] == 0
    assert small_plan["unsplit"]["latency_ratio"] == 1.0
    assert all(c["latency_ratio"] > 0 for c in small_plan["candidates"])
    assert "pytorch/pytorch#86509" in small_plan["assumptions"]["context_overhead_source"]
    # the response timeout: the recommendation's measured batch, times the safety factor, at least 120 s
    from splitpack.capacity.timeout import response_timeout_s

    rec = small_plan["recommended"]
    row = next(c for c in [small_plan["unsplit"]] + small_plan["candidates"]
               if (c["merge_layer"], c["grid"], c["mode"]) == (rec["merge_layer"], rec["grid"], rec["mode"]))
    assert small_plan["predicted_batch_seconds"] == round(row["latency_s"], 3)
    assert small_plan["response_timeout_s"] == response_timeout_s(row["latency_s"]) >= 120
    # a 2 GiB GPU's few replicas fit one GPU pod: what it asks for
    assert small_plan["pod"]["workers"] == rec["replicas"] and small_plan["pod"]["cpus"] == 2 * rec["replicas"]


def test_split_packs_more_replicas_at_high_resolution():
    """resnet18 @512: the activations dominate a replica once the fixed overhead is small."""
    code, plan, err = plan_cli("--model", "resnet18", "--size", "512", "--batch-size", "1", "--gpu-memory", "2GiB",
                               "--context-overhead", "16MiB", "--max-candidates", "2", "--repeats", "1")
    assert code == 0, err
    assert_self_consistent(plan)
    assert plan["replicas_split"] >= plan["replicas_unsplit"]
    assert plan["replicas_split"] > plan["replicas_unsplit"]  # strictly: split-pack is the recommendation
    assert plan["recommended"]["merge_layer"] is not None
    assert plan["unsplit"]["peak_activation_bytes"] > plan["candidates"][0]["peak_activation_bytes"]
    # the planner chose the candidates (staged plans within 1.25x and 1.1x MACs); each was measured, and
    # its predicted peak is the measured one (the CPU tracker counts what the prediction replays)
    assert 1 <= len(plan["candidates"]) <= 2
    for c in plan["candidates"]:
        assert c["estimated_peak_bytes"] == pytest.approx(c["peak_activation_bytes"], rel=0.10)
        assert len(c["merge_layer"].split(",")) == len(c["grid"].split(","))
    # the written configs deploy the planner's plan (merge layers and grids of every stage)
    from splitpack.serving.config import ServingConfig

    rec = plan["recommended"]
    handler = torchserve_deploy.torchserve_model_config(plan, {"instance_kind": "cpu"})["handler"]
    served = ServingConfig.from_mapping({k: v for k, v in handler.items() if k != "weights_source"})
    assert (served.merge_layer, served.grid) == (rec["merge_layer"], rec["grid"])


def test_headroom_and_latency_limit_are_applied(small_plan):
    code, plan, err = plan_cli("--model", "resnet18", "--size", "224", "--batch-size", "2", "--gpu-memory", "2GiB",
                               "--headroom", "1GiB", "--merge-layers", "maxpool", "--repeats", "1",
                               "--max-latency-ratio", "0.01", "--context-overhead", "0")
    assert code == 0, err
    assert plan["headroom_bytes"] == 1024**3
    assert_self_consistent(plan)
    # every split candidate is slower than 0.01x unsplit: none is eligible
    assert plan["best_split"] is None and plan["recommended"]["merge_layer"] is None


def test_written_torchserve_config_sets_workers_and_split_settings(small_plan, tmp_path):
    from splitpack.serving.config import ServingConfig

    path = torchserve_deploy.write_torchserve(small_plan, tmp_path / "model-config.yaml", {"instance_kind": "cpu"})
    config = yaml.safe_load(path.read_text())
    rec = small_plan["recommended"]
    assert config["minWorkers"] == config["maxWorkers"] == rec["replicas"]
    assert config["batchSize"] == small_plan["batch_size"]
    handler = {k: v for k, v in config["handler"].items() if k != "weights_source"}
    serving = ServingConfig.from_mapping(handler)
    assert serving.model_name == "resnet18" and serving.merge_layer == (rec["merge_layer"] or "none")
    assert config["deviceType"] == "cpu"
    assert serving.threads == "auto"  # each worker takes its share of the cores it runs on
    assert torchserve_deploy.torchserve_model_config(small_plan, {"threads": 2})["handler"]["threads"] == 2
    assert torchserve_deploy.torchserve_model_config(small_plan, {"instance_kind": "gpu"})["deviceType"] == "gpu"
    with pytest.raises(ValueError, match="batch_size: set by the plan"):
        torchserve_deploy.torchserve_model_config(small_plan, {"batch_size": 3})


@pytest.mark.filterwarnings("ignore:resnet18.*RANDOM weights")
def test_written_triton_config_sets_instance_count(small_plan, tmp_path):
    from splitpack.serving.triton.repo import config_parameters, read_model_config

    model_dir = triton_deploy.write_triton(small_plan, tmp_path / "repo", {"instance_kind": "cpu", "topk": 3, "threads": 1},
                                    name="resnet18_plan")
    config = read_model_config(model_dir / "config.pbtxt")
    rec = small_plan["recommended"]
    assert [g.count for g in config.instance_group] == [rec["replicas"]]
    assert config.max_batch_size == small_plan["batch_size"]
    params = config_parameters(config)
    assert params["merge_layer"] == (rec["merge_layer"] or "none") and params["topk"] == "3"
    assert params["threads"] == "1"
    assert (model_dir / "1" / "model.py").is_file()


def test_png(small_plan, tmp_path):
    png = tmp_path / "plan.png"
    report.plot_plan(small_plan, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# --- scripts/validate_capacity_gpu.py ---------------------------------------------------------

def run_validate(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VALIDATE), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_validate_dry_run_launches_replicas_that_match_the_plan(small_plan, tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(small_plan))
    out = tmp_path / "report.json"
    done = run_validate("--plan", str(plan_file), "--dry-run", "--dry-run-replicas", "1", "--duration", "1",
                        "--configs", "unsplit", "best_split", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["dry_run"]
    assert [r["configuration"]["name"] for r in report["results"]] == ["unsplit", "best_split"]
    for r in report["results"]:
        assert r["checks"] == {"all_started_without_oom": True, "all_ran_without_oom": True,
                               "peaks_match_plan": True}
        assert r["replicas_started"] == 1 and r["final"][0]["calls"] >= 1
        assert r["peak_activation_bytes"] == [r["configuration"]["peak_activation_bytes"]]


def test_validate_refuses_without_gpu_or_with_a_bad_plan(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "resnet18"}))
    done = run_validate("--plan", str(bad), "--dry-run")
    assert done.returncode == 2 and "missing" in done.stderr and "Traceback" not in done.stderr
    from splitpack.measure.nvml import nvml_status

    if not nvml_status()[0]:
        good = tmp_path / "plan.json"
        good.write_text(json.dumps({"model": "resnet18", "size": 64, "batch_size": 1, "gpu_memory_bytes": 1,
                                    "headroom_bytes": 0, "recommended": {"merge_layer": None},
                                    "unsplit": {"merge_layer": None, "grid": None, "mode": None, "replicas": 1,
                                                "replica_bytes": 1, "peak_activation_bytes": 1}}))
        done = run_validate("--plan", str(good), "--configs", "unsplit")
        assert done.returncode == 2 and "needs an NVIDIA GPU" in done.stderr and "--dry-run" in done.stderr


# --- the written configs in the real servers ---------------------------------------------------

@pytest.fixture()
def two_replica_split_plan(small_plan):
    """The small plan with its recommendation forced to a split config with 2 replicas (2 CPU processes)."""
    plan = json.loads(json.dumps(small_plan))
    plan["recommended"] = {"merge_layer": "layer1", "grid": "2x2", "mode": "exact", "replicas": 2,
                           "replica_bytes": 1, "latency_ratio": None, "reason": "test"}
    plan["batch_size"] = 2
    return plan


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:resnet18.*RANDOM weights")
def test_written_triton_model_loads_with_its_instances(two_replica_split_plan, tmp_path):
    from splitpack.serving.net import free_port
    from splitpack.serving.triton.server import TritonServer

    repo = tmp_path / "repo"
    triton_deploy.write_triton(two_replica_split_plan, repo, {"instance_kind": "cpu"}, name="resnet18_plan")
    import tritonclient.grpc as grpcclient

    with TritonServer(repo, grpc_port=free_port(), run_dir=tmp_path / "run", models=["resnet18_plan"]) as server:
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.is_model_ready("resnet18_plan")
            config = client.get_model_config("resnet18_plan", as_json=True)["config"]
    assert [int(g["count"]) for g in config["instance_group"]] == [2]
    assert config["parameters"]["merge_layer"]["string_value"] == "layer1"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:resnet18.*RANDOM weights")
def test_written_torchserve_archive_starts_its_workers(two_replica_split_plan, tmp_path):
    from splitpack.serving.net import free_ports
    from splitpack.serving.torchserve.archive import read_archive_config
    from splitpack.serving.torchserve.server import Ports, TorchServe

    store = tmp_path / "store"
    mar = torchserve_deploy.write_torchserve(two_replica_split_plan, store / "resnet18_plan.mar", {"instance_kind": "cpu"})
    name, config = read_archive_config(mar)
    assert config["minWorkers"] == config["maxWorkers"] == 2 and config["batchSize"] == 2
    assert config["handler"]["merge_layer"] == "layer1"
    ports = Ports(*free_ports(5))
    server = TorchServe(run_dir=tmp_path / "ts", model_store=store, ports=ports)
    try:
        status = server.start([name], timeout_s=300)
        assert status[name]["workers"].count("READY") == 2
    finally:
        server.stop()
