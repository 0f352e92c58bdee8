"""What a server costs before any image is in flight, measured on this machine from real servers.

A memory limit (a cgroup) charges a deployment's processes their anonymous memory and the
file pages they bring in, once. So the fixed costs are read off a real deployment of the
model with one replica (``/proc/PID/smaps_rollup`` of each process of the server's tree):

* ``server_bytes``: the anonymous memory of everything that is not a replica (TorchServe's
  frontend JVM, or tritonserver with the gateway and supervisor ``splitpack serve triton`` runs)
  plus the file-backed pages (libtorch, Python, the JVM, ...) of the whole tree, each file once:
  shared by every replica, charged once;
* ``process_bytes``: one replica process's own anonymous memory (Python, torch, the handler)
  less its weights: paid again for each replica (a TorchServe worker, a Triton python stub);
* ``weights_bytes``: parameters and buffers, one copy per replica process.

The deployment serves small images (:data:`PROBE_SIZE`), so what its replica keeps after an
inference is the runtime, not a large image's activations (those are the per-image term).
Starting a server takes a while, so the result is cached in a small JSON file keyed by
server, model and torch version (:data:`DEFAULT_CACHE`); ``refresh`` measures again.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_CACHE = Path(".run") / "capacity" / "fixed_costs.json"
PROBE_SIZE = 64  # input size of the measured deployment: small, so its activations are noise
SERVERS = ("torchserve", "triton")
# how a replica process shows in the server's process tree
REPLICA_MARKERS = {"torchserve": "model_service_worker", "triton": "triton_python_backend_stub"}


@dataclass
class FixedCosts:
    server: str
    model: str
    server_bytes: int
    process_bytes: int
    weights_bytes: int
    measured: str  # how and when

    def to_dict(self) -> dict:
        return asdict(self)


def smaps_rollup(pid: int) -> dict[str, int]:
    """Bytes per field of /proc/PID/smaps_rollup (Rss, Pss, Anonymous, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def file_pages(pid: int) -> dict[tuple[str, str], int]:
    """Resident bytes of each file-backed mapping of a process, keyed by (file, offset)."""
    pages: dict[tuple[str, str], int] = {}
    key = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
            key = (parts[5], parts[2]) if len(parts) >= 6 and parts[5].startswith("/") else None
        elif key is not None and parts and parts[0] == "Rss:":
            pages[key] = int(parts[1]) * 1024
    return pages


def split_tree(root_pid: int, server: str) -> tuple[list[dict], list[dict], int]:
    """(replica processes, the other processes, file-backed bytes of the whole tree counted once) of a
    server's tree; each process as its smaps_rollup + pid + cmdline."""
    import psutil

    replicas, others, files = [], [], {}
    root = psutil.Process(root_pid)
    for p in [root] + root.children(recursive=True):
        try:
            info = smaps_rollup(p.pid) | {"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]}
            for key, rss in file_pages(p.pid).items():
                files[key] = max(rss, files.get(key, 0))
        except (OSError, psutil.Error):
            continue
        (replicas if REPLICA_MARKERS[server] in info["cmdline"] else others).append(info)
    return replicas, others, sum(files.values())


def costs_from_tree(server: str, model: str, replicas: list[dict], others: list[dict], file_bytes: int,
                    weights_bytes: int) -> FixedCosts:
    """The three terms from one measured deployment (one replica or more: the largest one counts):
    anonymous memory per process, file pages (libraries) once for the whole tree, as a cgroup charges them."""
    if not replicas:
        raise RuntimeError(f"no {server} replica process found in the server's process tree")
    replica = max(replicas, key=lambda r: r["Anonymous"])
    return FixedCosts(server=server, model=model,
                      server_bytes=sum(o["Anonymous"] for o in others) + file_bytes,
                      process_bytes=max(0, replica["Anonymous"] - weights_bytes), weights_bytes=weights_bytes,
                      measured=f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: smaps of a running "
                               f"{server} deployment of {model} with one replica after one inference at "
                               f"{PROBE_SIZE}x{PROBE_SIZE}")


def cache_key(server: str, model: str) -> str:
    import torch

    return f"{server}:{model}:torch-{torch.__version__}"


def load_cached(cache: Path, key: str) -> FixedCosts | None:
    try:
        return FixedCosts(**json.loads(Path(cache).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(cache: Path, key: str, costs: FixedCosts) -> None:
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = costs.to_dict()
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(cache)


def fixed_costs(server: str, model: str, weights_bytes: int, deploy, cache: Path = DEFAULT_CACHE,
                refresh: bool = False, quiet: bool = False) -> FixedCosts:
    """The cached measurement, or a new one (a real deployment started and stopped, ~30 s).
    ``deploy``: :meth:`splitpack.serving.plan_deployment.Deployment.write` (what writes and runs a plan)."""
    if server not in SERVERS:
        raise ValueError(f"server: expected one of {', '.join(SERVERS)}, got {server!r}")
    key = cache_key(server, model)
    cached = None if refresh else load_cached(cache, key)
    if cached is not None:
        return cached
    if not quiet:
        print(f"measuring the fixed costs of {server} serving {model} (one replica, started once, cached in "
              f"{cache})", file=sys.stderr, flush=True)
    costs = measure_fixed_costs(server, model, weights_bytes, deploy)
    store(cache, key, costs)
    return costs


def measure_fixed_costs(server: str, model: str, weights_bytes: int, deploy) -> FixedCosts:
    """Deploy ``model`` unsplit with one replica of batch 1, serve one small image, read its processes."""
    plan = {"model": model, "size": PROBE_SIZE, "batch_size": 1,
            "recommended": {"merge_layer": None, "grid": None, "mode": None, "replicas": 1, "batch_size": 1}}
    with tempfile.TemporaryDirectory(prefix="splitpack-fixed-costs-") as tmp:
        with deploy(server, plan, Path(tmp)) as deployment:
            deployment.start()
            deployment.infer_once(PROBE_SIZE)
            replicas, others, file_bytes = split_tree(deployment.root_pid(), server)
    return costs_from_tree(server, model, replicas, others, file_bytes, weights_bytes)
