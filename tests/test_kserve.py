"""KServe: manifests from a capacity plan, checked against the vendored CRD and KServe's own rules."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest

from splitpack import cli
from splitpack.serving.kserve import manifests, validate
from splitpack.serving.kserve.plan import KServePlan, from_capacity, quantity

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def capacity_report() -> dict:
    """A real `splitpack capacity` report: resnet18 @64, batch 2, one explicit split candidate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["capacity", "--model", "resnet18", "--size", "64", "--batch-size", "2", "--gpu-memory",
                         "2GiB", "--merge-layers", "layer1", "--repeats", "0", "--quiet", "--json"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


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
        "maxBatchDelay": 20, "responseTimeout": 300}


def test_plan_from_a_capacity_report(capacity_report):
    rec = capacity_report["recommended"]
    plan = from_capacity(capacity_report, {"instance_kind": "cpu", "max_batch_delay_ms": 10}, min_pods=2, max_pods=5)
    assert plan.model == "resnet18" and plan.size == 64 and plan.batch_size == 2
    assert plan.workers == rec["replicas"] and plan.cpus == rec["replicas"]
    assert (plan.merge_layer, plan.grid, plan.mode) == (rec["merge_layer"], rec["grid"], rec["mode"])
    assert plan.memory_limit_bytes == 2 * GiB  # CPU pods: the memory planned for
    assert plan.memory_request_bytes == min(2 * GiB, rec["replicas"] * rec["replica_bytes"])
    assert plan.images_in_flight == rec["replicas"] * 2 and plan.max_batch_delay_ms == 10
    for flavour in manifests.FLAVOURS:
        validate.check_manifest(manifests.inference_service(plan, flavour, "gs://bucket/resnet18"))
    gpu = from_capacity(capacity_report, {"instance_kind": "gpu"})
    assert gpu.device == "gpu" and gpu.memory_limit_bytes == gpu.memory_request_bytes > 0
    assert from_capacity(capacity_report, {"instance_kind": "cpu"}, pod_memory_bytes=3 * GiB).memory_limit_bytes == 3 * GiB


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
