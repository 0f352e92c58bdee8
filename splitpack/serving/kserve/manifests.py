"""InferenceService manifests and TorchServe's config.properties for a :class:`KServePlan`.

Both flavours run KServe's stock ClusterServingRuntimes (config/runtimes of the release vendored in
``crd/``), picked by name because both runtimes list the ``pytorch`` model format:

* ``kserve-torchserve``: ``torchserve --start --model-store=/mnt/models/model-store
  --ts-config=/mnt/models/config/config.properties``; KServe's wrapper answers the v1 protocol on the
  container port 8080 and forwards to TorchServe's inference address; metrics on 8082.
* ``kserve-tritonserver``: ``tritonserver --model-store=/mnt/models --http-port=8080 --grpc-port=9000``;
  metrics on Triton's default 8002.

Scaling is Knative's (``Serverless`` mode): ``containerConcurrency`` caps the requests a pod gets at
once at the images it can have in flight (workers x batch size), so extra requests wait in the
queue-proxy instead of growing the pod's memory past what the plan measured, and ``scaleTarget``
asks for another pod when that many are in flight on average.
"""
from __future__ import annotations

import json
from typing import Any

from splitpack.serving.kserve.plan import KServePlan, quantity

API_VERSION = "serving.kserve.io/v1beta1"
CONTAINER_PORT = 8080  # both runtimes serve the cluster's requests here (Knative routes to this port only)
MOUNT = "/mnt/models"  # where KServe's storage initializer puts what storageUri points to
TORCHSERVE, TRITON = "torchserve", "triton"
FLAVOURS = (TORCHSERVE, TRITON)
RUNTIMES = {TORCHSERVE: "kserve-torchserve", TRITON: "kserve-tritonserver"}
PROTOCOLS = {TORCHSERVE: "v1", TRITON: "v2"}
METRICS_PORTS = {TORCHSERVE: 8082, TRITON: 8002}
# TorchServe inside the pod: only KServe's wrapper (same pod) talks to it, so it listens on loopback
TS_INFERENCE_PORT, TS_GRPC_PORTS = 8085, (7070, 7071)
TS_VERSION = "1.0"  # the archive's version, which model_snapshot names
KNATIVE_PROGRESS_DEADLINE_S = 600  # Knative Serving's default progress-deadline
# Knative refuses a revision whose timeoutSeconds exceeds config-defaults' max-revision-timeout-seconds (600 s
# by default): the manifest's request timeout is capped there, so it deploys on a stock cluster
KNATIVE_MAX_TIMEOUT_S = 600
POD_START_S = 300  # image pull and storage download before the server starts: an allowance, not measured


def torchserve_model_name(plan: KServePlan) -> str:
    """The .mar's name, which is the model's name on TorchServe and in KServe's v1 URLs."""
    from splitpack.serving.torchserve.archive import archive_name

    return archive_name(plan.model)


def triton_model_name(plan: KServePlan) -> str:
    from splitpack.serving.triton.libtorch import libtorch_model_name

    return libtorch_model_name(plan.model)


def config_properties(plan: KServePlan, model_store: str = f"{MOUNT}/model-store") -> str:
    """TorchServe's config.properties as KServe's TorchServe runtime reads it."""
    name = torchserve_model_name(plan)
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {name: {TS_VERSION: {
        "defaultVersion": True, "marName": f"{name}.mar", "minWorkers": plan.workers, "maxWorkers": plan.workers,
        "batchSize": plan.batch_size, "maxBatchDelay": plan.max_batch_delay_ms,
        "responseTimeout": plan.response_timeout_s, "startupTimeout": plan.startup_timeout_s}}}}
    lines = [
        f"# splitpack: {plan.model} @{plan.size}, plan {plan.plan_text}, {plan.workers} workers x batch "
        f"{plan.batch_size} per pod",
        f"inference_address=http://127.0.0.1:{TS_INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{TS_INFERENCE_PORT}",
        f"metrics_address=http://0.0.0.0:{METRICS_PORTS[TORCHSERVE]}",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        f"grpc_inference_port={TS_GRPC_PORTS[0]}",
        f"grpc_management_port={TS_GRPC_PORTS[1]}",
        # loopback only (above): the wrapper calls TorchServe without a key
        "disable_token_authorization=true",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        "number_of_netty_threads=4",
        # Knative sends at most containerConcurrency requests: the queue never needs more
        f"job_queue_size={max(10, plan.images_in_flight)}",
        # KServe's wrapper sets the request envelope (v1/v2) through TS_SERVICE_ENVELOPE
        "enable_envvars_config=true",
        "install_py_dep_per_model=false",  # the archive needs nothing the image lacks; pods may be offline
        f"model_store={model_store}",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
    ]
    return "\n".join(lines) + "\n"


def _resources(plan: KServePlan) -> dict[str, Any]:
    requests = {"cpu": str(plan.cpus), "memory": quantity(plan.memory_request_bytes)}
    limits = {"cpu": str(plan.cpus), "memory": quantity(plan.memory_limit_bytes)}
    if plan.device == "gpu":
        limits["nvidia.com/gpu"] = "1"  # extended resources: the request equals the limit
        requests["nvidia.com/gpu"] = "1"
    return {"requests": requests, "limits": limits}


def _torchserve_ready_command(name: str) -> list[str]:
    """TorchServe's own readiness: its describe-model API shows a READY worker (``/ping`` says Healthy
    while a model keeps failing to load). An exec probe, since Knative routes probes to port 8080 only."""
    script = ("import json,sys,urllib.request as u;"
              f"m=json.load(u.urlopen('http://127.0.0.1:{TS_INFERENCE_PORT}/models/{name}',timeout=5));"
              "sys.exit(0 if any(w.get('status')=='READY' for w in m[0].get('workers',[])) else 1)")
    return ["python3", "-c", script]


def _torchserve_live_command() -> list[str]:
    script = ("import json,sys,urllib.request as u;"
              f"sys.exit(0 if json.load(u.urlopen('http://127.0.0.1:{TS_INFERENCE_PORT}/ping',timeout=5))"
              ".get('status')=='Healthy' else 1)")
    return ["python3", "-c", script]


def request_timeout_s(plan: KServePlan) -> int:
    """The manifest's request timeout: the response timeout, at most Knative's default maximum."""
    return min(plan.response_timeout_s, KNATIVE_MAX_TIMEOUT_S)


def timeout_warning(plan: KServePlan) -> str | None:
    """Why the manifest's request timeout is shorter than TorchServe's response timeout, if it is."""
    if plan.response_timeout_s <= KNATIVE_MAX_TIMEOUT_S:
        return None
    return (f"the response timeout {plan.response_timeout_s} s (one batch may take that long) is above Knative's "
            f"default max-revision-timeout-seconds: the manifest's timeout is {KNATIVE_MAX_TIMEOUT_S} s, so a request "
            f"whose batch runs longer gets a timeout from Knative; on a cluster whose knative-serving config-defaults "
            f"allow more, set spec.predictor.timeout to {plan.response_timeout_s}, or plan a smaller batch "
            "(--largest-batch)")


def progress_deadline_s(plan: KServePlan) -> int:
    """Knative's progress deadline: the model's startup timeout plus the pod's own start, at least Knative's default."""
    return max(KNATIVE_PROGRESS_DEADLINE_S, plan.startup_timeout_s + POD_START_S)


def probes(plan: KServePlan, flavour: str) -> dict[str, dict]:
    """readinessProbe and livenessProbe on the server's own health endpoints."""
    timing = {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    # The model loads before the server is live (Triton) or ready (TorchServe): liveness waits as long as a
    # worker may take to load it (the startup timeout), so a slow load is not restarted in a loop.
    start = {"initialDelaySeconds": plan.startup_timeout_s}
    if flavour == TORCHSERVE:
        ready = {"exec": {"command": _torchserve_ready_command(torchserve_model_name(plan))}}
        live = {"exec": {"command": _torchserve_live_command()}}
    else:
        ready = {"httpGet": {"path": "/v2/health/ready", "port": CONTAINER_PORT}}
        live = {"httpGet": {"path": "/v2/health/live", "port": CONTAINER_PORT}}
    return {"readinessProbe": ready | timing, "livenessProbe": live | timing | start}


def inference_service(plan: KServePlan, flavour: str, storage_uri: str) -> dict[str, Any]:
    """The InferenceService of ``flavour`` (torchserve or triton) serving ``storage_uri``."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour: expected one of {', '.join(FLAVOURS)}, got {flavour!r}")
    inflight = plan.images_in_flight
    annotations = {
        # Knative: the concurrency autoscaler below ("Serverless" is read as "Knative" by KServe 0.15+)
        "serving.kserve.io/deploymentMode": "Serverless",
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "prometheus.kserve.io/port": str(METRICS_PORTS[flavour]),
        "prometheus.kserve.io/path": "/metrics",
        "splitpack/plan": f"{plan.model} @{plan.size}: {plan.plan_text}; {plan.workers} workers x batch "
                          f"{plan.batch_size}",
        # Knative fails a revision that is not ready within its progress deadline (600 s by default): allow the
        # model's load on top of the pod's own start (image pull, storage download)
        "serving.knative.dev/progress-deadline": f"{progress_deadline_s(plan)}s",
    }
    model = {"modelFormat": {"name": "pytorch"}, "runtime": RUNTIMES[flavour], "protocolVersion": PROTOCOLS[flavour],
             "storageUri": storage_uri, "resources": _resources(plan)} | probes(plan, flavour)
    predictor = {"minReplicas": plan.min_pods, "maxReplicas": plan.max_pods, "scaleMetric": "concurrency",
                 "scaleTarget": inflight, "containerConcurrency": inflight,
                 "timeout": request_timeout_s(plan), "model": model}
    return {"apiVersion": API_VERSION, "kind": "InferenceService",
            "metadata": {"name": f"{plan.service_name}-{flavour}", "annotations": annotations},
            "spec": {"predictor": predictor}}


def manifest_yaml(manifest: dict[str, Any], command: str | None = None) -> str:
    import yaml

    header = f"# Generated by: {command}\n" if command else ""
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)


def runtime_command(flavour: str, storage: str = MOUNT) -> list[str]:
    """The stock runtime's container args with ``/mnt/models`` at ``storage`` (what the tests start)."""
    if flavour == TORCHSERVE:
        return ["torchserve", "--start", f"--model-store={storage}/model-store",
                f"--ts-config={storage}/config/config.properties"]
    return ["tritonserver", f"--model-store={storage}", "--grpc-port=9000", "--http-port=8080", "--allow-grpc=true",
            "--allow-http=true"]
