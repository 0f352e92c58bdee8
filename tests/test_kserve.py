"""KServe: manifests from a capacity plan, checked against the vendored CRD and KServe's own rules."""
from __future__ import annotations

import ast
import base64
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

import splitpack
from splitpack import cli
from splitpack.serving.kserve import manifests, validate
from splitpack.serving.kserve.plan import KServePlan, from_capacity, quantity
from splitpack.serving.kserve.storage import write_kserve
from splitpack.serving.predictor import SAMPLE_IMAGE
from conftest import rel_error

MiB, GiB = 1 << 20, 1 << 30


def run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue() if code else out.getvalue()


@pytest.fixture(scope="module")
def capacity_report() -> dict:
    """A real `splitpack capacity` report: resnet18 @64, batch 2, one explicit split candidate."""
    code, out = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--batch-size", "2", "--gpu-memory",
                         "2GiB", "--merge-layers", "layer1", "--repeats", "0", "--quiet", "--json"])
    assert code == 0, out
    return json.loads(out)


def cpu_plan(**changes) -> KServePlan:
    fields = dict(model="resnet50", size=1024, batch_size=4, workers=2, merge_layer="layer1,layer3",
                  grid="4x4,2x2", mode="exact", memory_limit_bytes=8 * GiB, memory_request_bytes=6 * GiB,
                  min_pods=1, max_pods=3)
    return KServePlan(**(fields | changes))


@pytest.mark.parametrize("flavour", manifests.FLAVOURS)
@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_every_manifest_passes_the_crd_schema_and_kserve_rules(flavour, device):
    plan = cpu_plan(device=device)
    manifest = manifests.inference_service(plan, flavour, f"s3://bucket/models/{flavour}")
    assert validate.schema_errors(manifest) == []
    assert validate.kserve_rule_errors(manifest) == []
    predictor = manifest["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["scaleTarget"] == predictor["containerConcurrency"] == 2 * 4  # workers x batch in flight
    model = predictor["model"]
    assert model["runtime"] == manifests.RUNTIMES[flavour] and model["storageUri"].endswith(flavour)
    resources = model["resources"]
    assert resources["limits"]["memory"] == "8192Mi" and resources["requests"]["memory"] == "6144Mi"
    assert ("nvidia.com/gpu" in resources["limits"]) == (device == "gpu")
    annotations = manifest["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(manifests.METRICS_PORTS[flavour])


def test_the_schema_check_finds_unknown_fields_and_bad_values():
    manifest = manifests.inference_service(cpu_plan(), "triton", "pvc://models/triton")
    broken = copy.deepcopy(manifest)
    broken["spec"]["predictor"]["scaleMetrics"] = "concurrency"  # misspelt: strict field validation refuses it
    broken["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] = "lots"
    broken["spec"]["predictor"]["maxReplicas"] = "3"
    errors = validate.schema_errors(broken)
    assert len(errors) == 3, errors
    assert any("scaleMetrics" in e for e in errors) and any("limits.memory" in e for e in errors)
    assert any(e.startswith("spec.predictor.maxReplicas") for e in errors)
    with pytest.raises(validate.InvalidManifest, match="scaleMetrics"):
        validate.check_manifest(broken)


@pytest.mark.parametrize("change, message", [
    ({"minReplicas": 4, "maxReplicas": 3}, "must be <= maxReplicas"),
    ({"minReplicas": -1}, "minReplicas: -1 must be >= 0"),
    ({"containerConcurrency": -1}, "containerConcurrency: -1 must be >= 0"),
    ({"scaleMetric": "cpu"}, "not a Knative autoscaler metric"),
    ({"scaleMetric": "rps", "scaleTarget": 0}, "rps must be at least 1"),
])
def test_kserve_rules_refuse_what_its_webhook_refuses(change, message):
    manifest = manifests.inference_service(cpu_plan(), "torchserve", "pvc://models/torchserve")
    manifest["spec"]["predictor"].update(change)
    errors = validate.kserve_rule_errors(manifest)
    assert len(errors) == 1 and message in errors[0], errors


def test_kserve_rules_allow_an_unbounded_maximum_and_check_the_name():
    manifest = manifests.inference_service(cpu_plan(), "torchserve", "pvc://models/torchserve")
    manifest["spec"]["predictor"].update(minReplicas=5, maxReplicas=0)  # 0: no upper bound
    assert validate.kserve_rule_errors(manifest) == []
    manifest["metadata"]["name"] = "ResNet_50"
    assert validate.kserve_rule_errors(manifest) == [
        "metadata.name: 'ResNet_50' must match [a-z]([-a-z0-9]*[a-z0-9])? (lower case, digits, '-')"]


def test_config_properties_has_what_the_torchserve_runtime_reads():
    plan = cpu_plan(max_batch_delay_ms=20, response_timeout_s=300)
    text = manifests.config_properties(plan)
    settings = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert settings["enable_envvars_config"] == "true"
    assert settings["model_store"] == "/mnt/models/model-store"
    assert settings["inference_address"] == "http://127.0.0.1:8085"  # only KServe's wrapper in the pod calls it
    assert settings["metrics_mode"] == "prometheus" and settings["metrics_address"].endswith(":8082")
    snapshot = json.loads(settings["model_snapshot"])
    assert snapshot["modelCount"] == 1
    assert snapshot["models"]["resnet50"]["1.0"] == {
        "defaultVersion": True, "marName": "resnet50.mar", "minWorkers": 2, "maxWorkers": 2, "batchSize": 4,
        "maxBatchDelay": 20, "responseTimeout": 300, "startupTimeout": 120}


@pytest.mark.parametrize("flavour", manifests.FLAVOURS)
def test_a_slow_model_load_is_waited_for_not_restarted(flavour):
    """A big model at a big size loads for minutes: TorchServe's startupTimeout, the pod's liveness probe and
    Knative's progress deadline all wait the startup timeout (liveness would otherwise restart it in a loop)."""
    plan = cpu_plan(startup_timeout_s=1800)
    manifest = manifests.inference_service(plan, flavour, "pvc://models/r50")
    assert validate.schema_errors(manifest) == [] and validate.kserve_rule_errors(manifest) == []
    assert manifest["spec"]["predictor"]["model"]["livenessProbe"]["initialDelaySeconds"] == 1800
    assert manifest["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "2100s"
    settings = dict(line.split("=", 1) for line in manifests.config_properties(plan).splitlines() if "=" in line)
    assert json.loads(settings["model_snapshot"])["models"]["resnet50"]["1.0"]["startupTimeout"] == 1800
    quick = manifests.inference_service(cpu_plan(startup_timeout_s=60), flavour, "pvc://models/r50")
    assert quick["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "600s"  # Knative's default


def test_the_startup_timeout_covers_the_measured_load_or_the_configured_one():
    from splitpack.serving.kserve.storage import STARTUP_SAFETY, with_measured_startup

    assert with_measured_startup(cpu_plan(), 100.2).startup_timeout_s == math.ceil(STARTUP_SAFETY * 100.2)
    assert with_measured_startup(cpu_plan(startup_timeout_s=900), 1.0).startup_timeout_s == 900


def test_plan_from_a_capacity_report(capacity_report):
    rec = capacity_report["recommended"]
    plan = from_capacity(capacity_report, {"instance_kind": "cpu", "max_batch_delay_ms": 10}, min_pods=2, max_pods=5)
    assert plan.model == "resnet18" and plan.size == 64 and plan.batch_size == 2
    assert plan.workers == rec["replicas"] and plan.cpus == rec["replicas"]
    assert (plan.merge_layer, plan.grid, plan.mode) == (rec["merge_layer"], rec["grid"], rec["mode"])
    assert plan.memory_limit_bytes == 2 * GiB  # CPU pods: the memory planned for
    assert plan.memory_request_bytes == min(2 * GiB, rec["replicas"] * rec["replica_bytes"])
    assert plan.images_in_flight == rec["replicas"] * 2 and plan.max_batch_delay_ms == 10
    assert plan.startup_timeout_s == 120  # auto: TorchServe's default (the stock runtime does not compile)
    assert from_capacity(capacity_report, {"startup_timeout_s": 1800}).startup_timeout_s == 1800
    for flavour in manifests.FLAVOURS:
        validate.check_manifest(manifests.inference_service(plan, flavour, "gs://bucket/resnet18"))
    gpu = from_capacity(capacity_report, {"instance_kind": "gpu"})
    assert gpu.device == "gpu" and gpu.memory_limit_bytes == gpu.memory_request_bytes > 0
    assert from_capacity(capacity_report, {"instance_kind": "cpu"}, pod_memory_bytes=3 * GiB).memory_limit_bytes == 3 * GiB


def test_plan_reads_the_memory_cgroup_fields_of_a_capacity_report(capacity_report):
    """A report that planned under a memory limit says so; its figures win over the GPU-memory ones."""
    report = copy.deepcopy(capacity_report)
    report["recommended"].update(merge_layer="layer1", grid="2x2", mode="exact", replicas=3, batch_size=4)
    report.update(memory_limit_bytes=3 * GiB, predicted_usage_bytes=2 * GiB + 5, inflight_images_split=10)
    plan = from_capacity(report, {"instance_kind": "cpu"})
    assert (plan.workers, plan.batch_size, plan.images_in_flight) == (3, 4, 10)
    assert (plan.memory_limit_bytes, plan.memory_request_bytes) == (3 * GiB, 2 * GiB + 5)
    predictor = manifests.inference_service(plan, "torchserve", "pvc://m/r18")["spec"]["predictor"]
    assert predictor["containerConcurrency"] == predictor["scaleTarget"] == 10
    assert predictor["model"]["resources"]["requests"]["memory"] == "2049Mi"


def test_the_response_timeout_is_the_plans_unless_given(capacity_report):
    """A plan whose batch takes minutes: TorchServe's responseTimeout and Knative's request timeout cover it."""
    from splitpack.serving.config import deploy_settings
    from splitpack.serving.deploy import planned_settings

    report = capacity_report | {"response_timeout_s": 900, "predicted_batch_seconds": 112.4}
    for given, expected in (({}, 900), ({"response_timeout_s": 300}, 300)):
        _, deploy = planned_settings(report, given, "torchserve")
        plan = from_capacity(report, deploy_settings("torchserve", deploy))
        assert plan.response_timeout_s == expected
        # Knative's request timeout is capped at its default max-revision-timeout-seconds, so the manifest deploys
        timeout = manifests.inference_service(plan, "torchserve", "pvc://m/r18")["spec"]["predictor"]["timeout"]
        assert timeout == min(expected, manifests.KNATIVE_MAX_TIMEOUT_S) == (600 if expected == 900 else expected)
        settings = dict(line.split("=", 1) for line in manifests.config_properties(plan).splitlines() if "=" in line)
        assert json.loads(settings["model_snapshot"])["models"]["resnet18"]["1.0"]["responseTimeout"] == expected
    assert "response_timeout_s" not in planned_settings(report, {}, "triton")[1]  # TorchServe's setting only
    # Knative refuses a request timeout over its max-revision-timeout-seconds (600 s by default): the writer says so
    assert manifests.timeout_warning(cpu_plan(response_timeout_s=600)) is None
    assert "set spec.predictor.timeout to 900" in manifests.timeout_warning(cpu_plan(response_timeout_s=900))


def test_gpu_pods_run_the_workers_one_pod_can_hold(capacity_report):
    """The replica planner's count is not a pod: 92 workers on one GPU is refused, a few are given their cores."""
    from splitpack.capacity.pod import HOST_BYTES_PER_WORKER, HOST_BYTES_SERVER, GpuPod

    workers = capacity_report["recommended"]["replicas"]
    assert capacity_report["pod"] == GpuPod().to_dict() | GpuPod().resources(workers)  # what the plan's workers need
    plan = from_capacity(capacity_report, {"instance_kind": "gpu"})
    assert plan.cpus == 2 * workers and plan.memory_limit_bytes == HOST_BYTES_SERVER + workers * HOST_BYTES_PER_WORKER
    crowded = copy.deepcopy(capacity_report)
    del crowded["pod"]
    crowded |= GpuPod().plan_keys(92)
    with pytest.raises(ValueError, match="92 workers do not fit one GPU pod.*--search-batch"):
        from_capacity(crowded, {"instance_kind": "gpu"})
    few = copy.deepcopy(capacity_report)
    with pytest.raises(ValueError, match="--instance-kind gpu"):  # a GPU plan's memory is not a CPU pod's
        from_capacity(few | {"memory": "gpu", "memory_limit_bytes": 80 * GiB}, {"instance_kind": "cpu"})


@pytest.mark.parametrize("changes, message", [
    ({"memory_request_bytes": 9 * GiB}, "over its limit"),
    ({"min_pods": 4, "max_pods": 3}, "pods"),
    ({"mode": "seed"}, "exact-mode"),
    ({"device": "tpu"}, "device"),
])
def test_a_plan_kserve_would_refuse_or_cannot_run_is_an_error(changes, message):
    with pytest.raises(ValueError, match=message):
        cpu_plan(**changes)


def test_names_and_quantities():
    assert cpu_plan(model="tf_efficientnet_b7").service_name == "tf-efficientnet-b7"
    assert cpu_plan(model="tv:resnet18").service_name == "tv-resnet18"
    assert quantity(1) == "1Mi" and quantity(MiB) == "1Mi" and quantity(MiB + 1) == "2Mi"


# --- the written directory: both flavours' storage --------------------------------------------------------

STOCK_MODEL, STOCK_SIZE = "tf_efficientnet_lite0", 224  # pretrained weights ship offline (splitpack[pretrained])
IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[KServePlan, Path]:
    """Both flavours for lite0 @224 with a split plan: 1 worker x batch 2 per CPU pod."""
    plan = KServePlan(STOCK_MODEL, STOCK_SIZE, batch_size=2, workers=1, merge_layer="blocks.2", grid="2x2",
                      mode="exact", memory_limit_bytes=2 * GiB, memory_request_bytes=GiB, max_pods=2)
    out = tmp_path_factory.mktemp("kserve") / "out"
    write_kserve(plan, out, pretrained=True, storage_uri="s3://bucket/lite0", log=lambda m: None)
    return plan, out


def test_written_directory_has_both_flavours_and_valid_manifests(written):
    plan, out = written
    for flavour in manifests.FLAVOURS:
        manifest = yaml.safe_load((out / flavour / "inferenceservice.yaml").read_text())
        validate.check_manifest(manifest)
        assert manifest["spec"]["predictor"]["model"]["storageUri"] == f"s3://bucket/lite0/{flavour}"
    storage = out / "torchserve" / "storage"
    assert sorted(p.name for p in (storage / "model-store").iterdir()) == ["tf_efficientnet_lite0.mar"]
    written_config = (storage / "config" / "config.properties").read_text()
    snapshot = json.loads(re.search(r"^model_snapshot=(.*)$", written_config, re.M).group(1))
    startup = snapshot["models"]["tf_efficientnet_lite0"]["1.0"]["startupTimeout"]
    assert startup >= plan.startup_timeout_s  # the configured one, or more if the measured load needs it
    assert written_config == manifests.config_properties(dataclasses.replace(plan, startup_timeout_s=startup))
    for flavour in manifests.FLAVOURS:
        manifest = yaml.safe_load((out / flavour / "inferenceservice.yaml").read_text())
        assert manifest["spec"]["predictor"]["model"]["livenessProbe"]["initialDelaySeconds"] == startup
    with zipfile.ZipFile(storage / "model-store" / "tf_efficientnet_lite0.mar") as mar:
        names = set(mar.namelist())
        assert names == {"model.pt", "splitpack_stock_handler.py", "splitpack_decode.py", "splitpack_model.json",
                         "MAR-INF/MANIFEST.json"}
        handler = mar.read("splitpack_stock_handler.py").decode()
    imported = {n.split(".")[0] for node in ast.walk(ast.parse(handler)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])}
    assert imported <= {"__future__", "base64", "json", "logging", "os", "torch", "torchvision", "ts",
                        "splitpack_decode"}, imported  # what KServe's TorchServe image has


def test_triton_directory_is_a_libtorch_model_plain_torch_loads(written):
    from splitpack.serving.triton.repo import read_model_config

    plan, out = written
    model_dir = out / "triton" / "storage" / "tf_efficientnet_lite0_libtorch"
    config = read_model_config(model_dir / "config.pbtxt")  # Triton's own ModelConfig protobuf
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == plan.batch_size
    assert [(g.count, g.kind) for g in config.instance_group] == [(plan.workers, 2)]  # KIND_CPU
    assert list(config.input[0].dims) == [3, STOCK_SIZE, STOCK_SIZE] and list(config.output[0].dims) == [1000]
    program = torch.jit.load(str(model_dir / "1" / "model.pt"))  # what the libtorch backend does
    model = splitpack.create_model(STOCK_MODEL, pretrained=True).eval()
    x = torch.randn(3, 3, STOCK_SIZE, STOCK_SIZE)
    with torch.inference_mode():
        out, reference = program(x), model(x)
    assert rel_error(out, reference) <= 1e-5  # exact mode, fp32 (README)


def test_capacity_writes_kserve_from_its_plan(tmp_path, capacity_report):
    out = tmp_path / "kserve"
    code, err = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--batch-size", "2", "--gpu-memory",
                         "2GiB", "--merge-layers", "layer1", "--repeats", "0", "--quiet", "--instance-kind", "cpu",
                         "--max-pods", "4", "--storage-uri", "gs://b/r18", "--write-kserve", str(out)])
    assert code == 0, err
    rec = capacity_report["recommended"]
    for flavour in manifests.FLAVOURS:
        manifest = yaml.safe_load((out / flavour / "inferenceservice.yaml").read_text())
        validate.check_manifest(manifest)
        predictor = manifest["spec"]["predictor"]
        assert predictor["containerConcurrency"] == rec["replicas"] * 2 and predictor["maxReplicas"] == 4
    assert (out / "triton" / "storage" / "resnet18_libtorch" / "1" / "model.pt").is_file()
    code, err = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--gpu-memory", "2GiB", "--repeats", "0",
                         "--merge-layers", "layer1", "--quiet", "--min-pods", "3", "--max-pods", "2",
                         "--write-kserve", str(tmp_path / "bad")])
    assert code == 2 and "pods" in err and not (tmp_path / "bad").exists()
    code, err = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--gpu-memory", "2GiB", "--repeats", "0",
                         "--merge-layers", "layer1", "--quiet", "--native-resolution",
                         "--write-kserve", str(tmp_path / "bad")])
    assert code == 2 and "--native-resolution" in err and not (tmp_path / "bad").exists()


def test_capacity_writes_a_gpu_pod_from_its_shape_search(tmp_path):
    """--search-batch: workers x batch within the pod's cores and host memory, the response timeout from the
    predicted batch; the manifest asks for what those workers need."""
    out = tmp_path / "kserve"
    code, text = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--gpu-memory", "4GiB", "--search-batch",
                          "--largest-batch", "8", "--pod-cpus", "6", "--quiet", "--json", "--max-pods", "2",
                          "--write-kserve", str(out)])
    assert code == 0, text
    plan = json.loads(text)
    rec, pod = plan["recommended"], plan["pod"]
    assert (rec["replicas"], rec["batch_size"]) == (3, 8)  # 6 cores / 2 per worker; the largest batch
    assert pod["cpus"] == 6 and plan["response_timeout_s"] >= plan["predicted_batch_seconds"]
    manifest = yaml.safe_load((out / "torchserve" / "inferenceservice.yaml").read_text())
    validate.check_manifest(manifest)
    predictor = manifest["spec"]["predictor"]
    resources = predictor["model"]["resources"]
    assert resources["limits"] == {"cpu": "6", "memory": quantity(pod["host_memory_bytes"]), "nvidia.com/gpu": "1"}
    assert predictor["containerConcurrency"] == rec["inflight_images"] == 24
    assert predictor["timeout"] == plan["response_timeout_s"]
    written = (out / "torchserve" / "storage" / "config" / "config.properties").read_text()
    snapshot = json.loads(re.search(r"^model_snapshot=(.*)$", written, re.M).group(1))["models"]["resnet18"]["1.0"]
    assert (snapshot["minWorkers"], snapshot["batchSize"], snapshot["responseTimeout"]) == (
        3, 8, plan["response_timeout_s"])
    code, text = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--gpu-memory", "4GiB", "--search-batch",
                          "--memory-limit", "3GiB", "--quiet"])
    assert code == 2 and "give one" in text
    # the replica planner's count on a big GPU is no pod: refused, nothing written
    code, text = run_cli(["capacity", "--model", "resnet18", "--size", "64", "--gpu-memory", "80GiB", "--repeats", "0",
                          "--merge-layers", "layer1", "--quiet", "--write-kserve", str(tmp_path / "crowded")])
    assert code == 2 and "do not fit one GPU pod" in text and not (tmp_path / "crowded").exists()


# --- the TorchServe storage on the stock runtime's packages only ------------------------------------------

# what KServe's TorchServe image has, at this project's versions (no splitpack, no timm)
STOCK_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "torchserve==0.12.0", "torch-model-archiver==0.12.0",
                  "pillow", "numpy<2", "pyyaml")


@pytest.fixture(scope="session")
def stock_venv(request) -> Path:
    """A fresh virtual environment with only :data:`STOCK_PACKAGES` and what they require, built once into
    pytest's cache and reused while its package list is the same.

    Where this test's own environment has those packages at those versions, their installed files (the same
    wheels' files) are linked into the new environment: a second pip install unpacks ~4 GiB (torch, CUDA wheels)
    for a minute. Elsewhere pip installs them. Either way the environment is a plain venv (not
    --system-site-packages) that holds neither splitpack nor timm."""
    key = hashlib.sha256(" ".join((sys.version, *STOCK_PACKAGES)).encode()).hexdigest()[:12]
    root = Path(request.config.cache.mkdir(f"stock-torchserve-{key}"))
    venv, done = root / "venv", root / "complete"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        # not --system-site-packages; pip only where it installs
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        if not link_installed(STOCK_PACKAGES, venv):
            subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip"], check=True, capture_output=True)
            pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-input", "--quiet", *STOCK_PACKAGES],
                                 capture_output=True, text=True, env=clean_env(venv), timeout=1200)
            if pip.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.skip("cannot build the stock TorchServe environment offline: pip: "
                            + " ".join((pip.stderr or pip.stdout).strip().splitlines()[-3:]))
        done.touch()
    for module in ("splitpack", "timm"):
        missing = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True,
                                 env=clean_env(venv), cwd=root)
        assert missing.returncode != 0, f"the stock environment must not see {module}"
    return venv


def installed_closure(requirements) -> list[metadata.Distribution] | None:
    """The distributions of this environment that ``requirements`` resolve to, their requirements (with the
    extras asked for) included; None where one is missing or at a version the requirement excludes."""
    todo, found = [Requirement(r) for r in requirements], {}
    while todo:
        requirement = todo.pop()
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            return None
        if not requirement.specifier.contains(dist.version, prereleases=True):
            return None
        name = canonicalize_name(dist.metadata["Name"])
        extras = set(requirement.extras) | (found[name][1] if name in found else set())
        if name in found and extras == found[name][1]:
            continue
        found[name] = (dist, extras)
        for needed in map(Requirement, dist.requires or []):
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(needed)
    return [dist for dist, _ in found.values()]


def link_installed(requirements, venv: Path) -> bool:
    """Install ``requirements`` into ``venv`` as hard links to this environment's installed files (copies
    across file systems) and console scripts that run ``venv``'s python; False (nothing linked) where this
    environment lacks one of them (see :func:`installed_closure`) or has one outside its prefix."""
    dists = installed_closure(requirements)
    if dists is None or not all(Path(d.locate_file("")).is_relative_to(sys.prefix) for d in dists):
        return False
    for dist in dists:
        site = Path(dist.locate_file(""))
        link_files(site, venv / site.relative_to(sys.prefix), dist.files or [])
        for entry in dist.entry_points.select(group="console_scripts"):
            write_console_script(venv, entry)
    return True


def link_files(site: Path, target: Path, files) -> None:
    for file in files:
        source = site / file
        # scripts (../../../bin) are written for the venv; a RECORD may list a file twice, namespace packages share one
        if str(file).startswith("..") or not source.is_file() or (target / file).exists():
            continue
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target / file)
        except OSError:
            shutil.copy2(source, target / file)


def write_console_script(venv: Path, entry: metadata.EntryPoint) -> None:
    """What pip writes for a console_scripts entry point: ``module:function`` run by ``venv``'s python."""
    module, _, function = entry.value.partition(":")
    script = venv / "bin" / entry.name
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {function.split('.')[0]}\n"
                      f"if __name__ == '__main__':\n    sys.exit({function}())\n")
    script.chmod(0o755)


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a process in ``venv`` only: no PYTHONPATH, no project venv on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env | {"PATH": os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])} | extra


def localized(text: str, mount: Path, ports: dict[int, int]) -> str:
    """KServe's paths and ports -> this machine's: /mnt/models at ``mount``, every port to a free one, loopback."""
    text = text.replace(manifests.MOUNT, str(mount)).replace("0.0.0.0", "127.0.0.1")
    for port, free in ports.items():
        text = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(free), text)
    return text


def held_out_images() -> dict[str, bytes]:
    """The bundled photo, ImageNet sample photos when present, and images the decoder must convert."""
    chelsea = SAMPLE_IMAGE.read_bytes()
    images = {"chelsea.jpg": chelsea}
    for path in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:4] if IMAGENET_SAMPLE.is_dir() else []:
        images[path.name] = path.read_bytes()
    photo = Image.open(io.BytesIO(chelsea)).convert("RGB")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # 16-bit greyscale
    for name, image in (("alpha.png", rgba), ("grey16.png", grey16)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images[name] = buffer.getvalue()
    return images


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_stock_torchserve_serves_the_written_storage_like_the_unsplit_model(written, stock_venv, tmp_path):
    from splitpack.serving.config import ServingConfig, weights_data_config
    from splitpack.serving.net import free_ports
    from splitpack.serving.predictor import Predictor

    plan, out = written
    mount = tmp_path / "mnt-models"  # /mnt/models, where the storage initializer puts storageUri
    shutil.copytree(out / "torchserve" / "storage", mount)
    ports = dict(zip((manifests.TS_INFERENCE_PORT, manifests.METRICS_PORTS["torchserve"], *manifests.TS_GRPC_PORTS),
                     free_ports(4)))
    config = mount / "config" / "config.properties"
    config.write_text(localized(config.read_text(), mount, ports))
    manifest = yaml.safe_load((out / "torchserve" / "inferenceservice.yaml").read_text())
    probes = {kind: [localized(a, mount, ports) for a in manifest["spec"]["predictor"]["model"][kind]["exec"]["command"]]
              for kind in ("readinessProbe", "livenessProbe")}
    run = tmp_path / "run"
    run.mkdir()
    # the container's env: the runtime sets TS_SERVICE_ENVELOPE from the protocol (v1: kserve)
    env = clean_env(stock_venv, TMPDIR=str(run), TEMP=str(run), TS_SERVICE_ENVELOPE="kserve")
    args = manifests.runtime_command("torchserve", str(mount))
    with open(run / "torchserve.out", "w") as log:
        subprocess.run(args, env=env, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                       check=True, timeout=120)
    try:
        deadline = time.monotonic() + 600
        while subprocess.run(probes["readinessProbe"], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, (run / "logs" / "model_log.log").read_text()[-3000:]
            time.sleep(2)
        assert subprocess.run(probes["livenessProbe"], env=env).returncode == 0

        predictor = Predictor(ServingConfig.from_mapping({
            "model_name": STOCK_MODEL, "merge_layer": "none",
            "data_config": weights_data_config(splitpack.create_model(STOCK_MODEL, pretrained=True)) | {
                "input_size": [3, STOCK_SIZE, STOCK_SIZE]}}), weights="pretrained")
        url = f"http://127.0.0.1:{ports[manifests.TS_INFERENCE_PORT]}/predictions/{STOCK_MODEL}"
        images = held_out_images()
        status, answer = post_json(url, {"instances": [{"data": base64.b64encode(b).decode()}
                                                       for b in images.values()]})
        assert status == 200, answer
        for (name, data), served in zip(images.items(), answer["predictions"]):
            expected = predictor.top_k(predictor.predict([predictor.decode(data)])[0])
            assert [(p["index"], p["label"]) for p in served["predictions"]] == \
                [(p["index"], p["label"]) for p in expected], name
            # exact mode: logits within 1e-5 of their scale, so probabilities move by far less than 1e-4
            assert max(abs(s["probability"] - e["probability"])
                       for s, e in zip(served["predictions"], expected)) < 1e-4, name
        status, answer = post_json(url, {"instances": [{"data": base64.b64encode(b"not an image").decode()}]})
        assert status == 400 and "not an image" in answer["predictions"][0]["message"]
        status, answer = post_json(url, {"instances": [{"data": base64.b64encode(images["chelsea.jpg"]).decode()}]})
        assert status == 200  # still serving
        metrics_url = f"http://127.0.0.1:{ports[manifests.METRICS_PORTS['torchserve']]}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=30) as response:
            assert "ts_inference_requests_total" in response.read().decode()
    finally:
        subprocess.run(["torchserve", "--stop", "--foreground"], env=env, cwd=run, capture_output=True, timeout=120)
