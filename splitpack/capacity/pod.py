"""What one GPU pod gives its workers besides the GPU: CPU cores and host memory.

A GPU pod runs one server with ``workers`` model processes sharing the pod's GPU. Each worker needs
CPU cores (decoding, resizing, stacking the batch, launching kernels) and host memory (Python, torch
and the CUDA libraries, its copy of the weights before they move to the GPU), neither of which the
GPU plan counts. These bounds cap the workers a pod may run, so that more images in flight come from
a larger batch, not from more processes; the pod's CPU and host-memory requests are derived from the
workers it runs.

The host-memory terms are **assumed, not measured** (no GPU was available where this was written): a
CPU-only TorchServe worker with torch loaded is 0.4-0.5 GiB of its own plus its weights here
(docs/capacity.md, fixed costs), the CUDA libraries add about 1 GiB more; 2 GiB per worker covers both.
Check them with ``kubectl top pod`` on the cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitpack.measure.units import GiB

HOST_BYTES_PER_WORKER = 2 * GiB  # assumed: a worker process with torch, the CUDA libraries and its weights
HOST_BYTES_SERVER = 1 * GiB  # assumed: the server itself (TorchServe's JVM and KServe's wrapper)
DEFAULT_POD_CPUS = 8
DEFAULT_CPUS_PER_WORKER = 2
DEFAULT_POD_HOST_MEMORY = 16 * GiB
HOST_MEMORY_SOURCE = (f"assumed, not measured: {HOST_BYTES_SERVER // GiB} GiB for the server + "
                      f"{HOST_BYTES_PER_WORKER // GiB} GiB per worker (torch, CUDA libraries, weights); check with "
                      "kubectl top pod")


@dataclass(frozen=True)
class GpuPod:
    """One GPU pod's CPU and host-memory budget (``--pod-cpus``, ``--cpus-per-worker``, ``--pod-host-memory``)."""

    cpus: int = DEFAULT_POD_CPUS
    cpus_per_worker: int = DEFAULT_CPUS_PER_WORKER
    host_memory_bytes: int = DEFAULT_POD_HOST_MEMORY

    def __post_init__(self):
        if self.cpus < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"pod cpus ({self.cpus}) and cpus per worker ({self.cpus_per_worker}) must be >= 1")
        if self.max_workers < 1:
            raise ValueError(f"a GPU pod of {self.cpus} CPU(s) and {self.host_memory_bytes / GiB:.1f} GiB of host "
                             f"memory cannot run one worker ({self.cpus_per_worker} CPU(s), "
                             f"{(HOST_BYTES_SERVER + HOST_BYTES_PER_WORKER) / GiB:.0f} GiB with the server)")

    @property
    def max_workers(self) -> int:
        """The most workers the pod's cores and host memory allow."""
        by_memory = (self.host_memory_bytes - HOST_BYTES_SERVER) // HOST_BYTES_PER_WORKER
        return int(min(self.cpus // self.cpus_per_worker, by_memory))

    def resources(self, workers: int) -> dict:
        """The pod's CPU and host-memory requests for ``workers`` workers (what the manifest asks for)."""
        if not 1 <= workers <= self.max_workers:
            raise ValueError(f"{workers} workers do not fit one GPU pod of {self.cpus} CPU(s) and "
                             f"{self.host_memory_bytes / GiB:.1f} GiB of host memory (at most {self.max_workers}): "
                             "plan the GPU pod with --search-batch, or give it more with --pod-cpus/--pod-host-memory")
        return {"workers": workers, "cpus": workers * self.cpus_per_worker,
                "host_memory_bytes": host_memory_bytes(workers)}

    def to_dict(self) -> dict:
        return {"pod_cpus": self.cpus, "cpus_per_worker": self.cpus_per_worker,
                "pod_host_memory_bytes": self.host_memory_bytes, "max_workers": self.max_workers,
                "host_memory_source": HOST_MEMORY_SOURCE}

    def plan_keys(self, workers: int) -> dict:
        """A GPU plan's ``pod`` (what a GPU pod running its ``workers`` asks for), or a note when they do not
        fit one pod (a deployment writer then refuses GPU pods)."""
        try:
            return {"pod": self.to_dict() | self.resources(workers)}
        except ValueError as e:
            return {"pod_note": str(e)}


def host_memory_bytes(workers: int) -> int:
    """Host memory of a GPU pod running ``workers`` workers (assumed terms, see the module docstring)."""
    return HOST_BYTES_SERVER + workers * HOST_BYTES_PER_WORKER
