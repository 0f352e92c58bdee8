"""What a KServe deployment needs to know, read off a capacity plan.

One *pod* runs one server (TorchServe or Triton) with ``workers`` model replicas, each serving
batches of up to ``batch_size`` images: ``workers x batch_size`` images are in flight in a pod at
most, which is what Knative may send it at once (``containerConcurrency``) and what the autoscaler
aims for per pod (``scaleTarget``). The capacity plan decides workers, batch size and the plan
(merge layers, grids, mode); its memory figures become the pod's memory request (the predicted
usage) and limit (the memory planned for). How many pods run (``min_pods``..``max_pods``) is the
operator's choice: the plan sizes one pod.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from splitpack.serving.config import AUTO, startup_timeout_s

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class KServePlan:
    """One pod's deployment: the model, its split-pack plan, workers, batching and resources."""

    model: str  # timm name, or tv:NAME
    size: int  # input height = width the artifacts run at
    batch_size: int
    workers: int  # model replicas per pod: TorchServe workers / Triton instances
    merge_layer: str | None  # None: unsplit; a comma list for a staged plan
    grid: str | None
    mode: str | None
    memory_limit_bytes: int
    memory_request_bytes: int
    device: str = "cpu"  # cpu pods, or gpu pods (one nvidia.com/gpu each)
    cpus: int = 1
    min_pods: int = 1
    max_pods: int = 1
    max_batch_delay_ms: int = 50
    response_timeout_s: int = 120
    # seconds a worker may take to load the model: TorchServe's startupTimeout and how long the pod's
    # liveness probe and Knative's progress deadline wait (at least the load + warm-up the writer measured)
    startup_timeout_s: int = 120
    inflight: int | None = None  # images in flight per pod; default workers x batch_size

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("size", "batch_size", "workers", "cpus", "memory_limit_bytes", "memory_request_bytes",
                     "response_timeout_s", "startup_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.memory_request_bytes > self.memory_limit_bytes:
            raise ValueError(f"the pod's predicted memory ({self.memory_request_bytes} bytes) is over its limit "
                             f"({self.memory_limit_bytes} bytes)")
        if not 0 <= self.min_pods <= self.max_pods or self.max_pods < 1:
            raise ValueError(f"pods: need 0 <= min ({self.min_pods}) <= max ({self.max_pods}), max >= 1")
        if self.merge_layer is not None and (not self.grid or self.mode != "exact"):
            raise ValueError("a stock-runtime deployment runs an exact-mode plan (merge layers and grids)")

    @property
    def images_in_flight(self) -> int:
        return self.inflight or self.workers * self.batch_size

    @property
    def service_name(self) -> str:
        """The InferenceService's name (a DNS label): ``tf_efficientnet_b7`` -> ``tf-efficientnet-b7``."""
        name = re.sub(r"[^a-z0-9-]+", "-", self.model.lower()).strip("-")
        return (name if name[:1].isalpha() else "m-" + name)[:63].rstrip("-")

    @property
    def plan_text(self) -> str:
        return "unsplit" if self.merge_layer is None else f"{self.merge_layer} {self.grid} {self.mode}"


def from_capacity(report: Mapping[str, Any], deploy: Mapping[str, Any], *, min_pods: int = 1, max_pods: int = 1,
                  pod_memory_bytes: int | None = None, cpus: int | None = None) -> KServePlan:
    """The recommendation of a ``splitpack capacity`` report (its JSON) as one pod's deployment.

    ``deploy``: the schema's deploy settings (instance_kind, max_batch_delay_ms, response_timeout_s,
    startup_timeout_s; ``auto``: TorchServe's default, the stock runtime does not compile).
    Memory: CPU pods ``memory_limit_bytes`` / ``predicted_usage_bytes`` when the report has them, otherwise
    the memory planned for as their limit and the workers' replica bytes as request. GPU pods: the CPUs and
    host memory of the report's ``pod`` (an error when the plan has none: its workers do not fit one pod).
    ``pod_memory_bytes`` overrides the limit (and caps the request).
    """
    rec = report["recommended"]
    device = "gpu" if deploy.get("instance_kind", "cpu") == "gpu" else "cpu"
    workers = max(1, int(rec.get("replicas") or 1))
    batch = int(rec.get("batch_size") or report["batch_size"])
    if device == "gpu":
        pod = report.get("pod")
        if not pod:
            raise ValueError(report.get("pod_note") or "a GPU pod needs the plan's pod (CPUs and host memory of its "
                             "workers): plan it with --search-batch")
        limit = request = pod["host_memory_bytes"]
        cpus = cpus or pod["cpus"]
    elif report.get("memory") == "gpu":
        raise ValueError("a GPU plan (--search-batch) sizes GPU pods: write it with --instance-kind gpu")
    else:
        limit, request = _pod_memory(report)
    if pod_memory_bytes is not None:
        limit, request = pod_memory_bytes, min(request, pod_memory_bytes)
    return KServePlan(
        model=report["model"], size=int(report["size"]), batch_size=batch, workers=workers,
        merge_layer=rec.get("merge_layer"), grid=rec.get("grid"), mode=rec.get("mode"),
        memory_limit_bytes=int(limit), memory_request_bytes=int(request), device=device,
        cpus=cpus or workers, min_pods=min_pods, max_pods=max_pods,
        max_batch_delay_ms=int(deploy.get("max_batch_delay_ms", 50)),
        response_timeout_s=int(deploy.get("response_timeout_s", 120)),
        startup_timeout_s=startup_timeout_s(deploy.get("startup_timeout_s", AUTO), compile=None),
        inflight=report.get("inflight_images_split") if rec.get("merge_layer") else None)


def _pod_memory(report: Mapping[str, Any]) -> tuple[int, int]:
    """(limit, request) bytes of one CPU pod."""
    limit = report.get("memory_limit_bytes") or report["gpu_memory_bytes"]
    rec, workers = report["recommended"], max(1, int(report["recommended"].get("replicas") or 1))
    predicted = report.get("predicted_usage_bytes") or (
        report.get("shared_bytes", 0) + workers * (rec["replica_bytes"] - report.get("shared_bytes", 0)))
    return int(limit), int(min(limit, predicted))


def quantity(n_bytes: int) -> str:
    """Bytes as a Kubernetes quantity, rounded up to whole MiB (``1536Mi``)."""
    return f"{math.ceil(n_bytes / (1 << 20))}Mi"
