"""How many CPU threads each server worker / model instance gives torch.

Every TorchServe worker and every Triton python-backend stub is its own process,
and torch starts one intra-op thread per core in each of them by default: two
workers on two cores run four busy threads that preempt each other mid-convolution
(measured here: 2-30x lower throughput and tail latency than one thread each). The
default therefore splits the cores between the processes of a server:

    threads per process = max(1, cores available // processes)

where *cores available* honours the CPU affinity mask and a cgroup CPU quota (a
container limited to 2 CPUs on a 64-core host gets 2), and *processes* is the total
number of workers (TorchServe) or instances (Triton) of all models the server loads.

``splitpack serve ... start`` computes it and exports it, before any worker imports
torch, as OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS (read once, when
the libraries load) and SPLITPACK_THREADS; each worker then calls
:func:`apply_threads`, where a model's own ``threads`` setting (model-config.yaml
``handler: threads``, config.pbtxt ``parameters threads``) wins over the server's.
Inter-op threads are 1: split-pack runs its packs one after another, so an inter-op
pool would only add idle threads.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

SERVER_DEFAULT_ENV = "SPLITPACK_THREADS"
LIBRARY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cores() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_quota(path: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs allowed by the cgroup quota (rounded up), or None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def default_threads(processes: int, cores: int | None = None) -> int:
    """Threads per process when ``processes`` share ``cores`` (default: :func:`available_cores`)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, processes))


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a server whose workers/instances each run ``threads`` threads."""
    return {name: str(threads) for name in (*LIBRARY_ENV, SERVER_DEFAULT_ENV)}


def resolve_threads(configured: int | None, processes: int, env: dict | None = None) -> int:
    """The model's own setting, else the server's (SPLITPACK_THREADS), else the cores / ``processes``."""
    if configured:
        return int(configured)
    env = os.environ if env is None else env
    server_default = env.get(SERVER_DEFAULT_ENV, "")
    if server_default.isdigit() and int(server_default) > 0:
        return int(server_default)
    return default_threads(processes)


def configure_threads(configured: int | str | None, replicas: int) -> dict[str, int]:
    """What a worker/instance calls first: its model's ``threads`` (``auto`` = the server's share, else
    the cores / ``replicas``), applied to torch. Returns what took effect, for the log."""
    return apply_threads(resolve_threads(None if configured in (None, "", "auto") else int(configured), replicas))


def apply_threads(threads: int) -> dict[str, int]:
    """Set torch's intra-op threads (and 1 inter-op thread) in this process; returns what took effect."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work; keep what is there
        pass
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
