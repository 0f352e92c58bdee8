"""Prove a capacity plan under a real memory limit.

The written deployment starts inside a memory cgroup set to the plan's limit (the mechanism
behind a Kubernetes pod's limit) and is driven for ``duration_s`` by as many concurrent clients as
the plan has images in flight, each sending images at the planned size back to back. What the
kernel saw is the verdict: the cgroup's peak usage against the prediction, its OOM-kill counter,
and the requests served and failed (a timeout is a failure). Requests sent inside the window are
waited for, so a batch that started is counted. Then the unsplit model runs in the same shape
under the same limit.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

from splitpack.capacity.cgroup import MemoryCgroup

DEFAULT_DURATION_S = 60.0


def drive(send, image: bytes, clients: int, duration_s: float) -> dict:
    """``clients`` threads each sending ``image`` back to back for ``duration_s``; counts and latencies."""
    lock = threading.Lock()
    served, failed, latencies, errors = [0], [0], [], {}
    stop_at = time.monotonic() + duration_s

    def loop():
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                send(image)
                ok, error = True, None
            except Exception as e:  # every failure counts, timeouts included
                ok, error = False, f"{type(e).__name__}: {str(e)[:160]}"
            with lock:
                if ok:
                    served[0] += 1
                    latencies.append(time.monotonic() - t0)
                else:
                    failed[0] += 1
                    errors[error] = errors.get(error, 0) + 1

    start = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies.sort()
    return {"clients": clients, "duration_s": duration_s, "elapsed_s": round(elapsed, 1), "served": served[0],
            "failed": failed[0], "images_per_s": round(served[0] / elapsed, 3) if elapsed else None,
            "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "latency_max_s": round(latencies[-1], 2) if latencies else None,
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])}


def run_under_limit(deploy, server: str, plan: dict, limit_bytes: int, clients: int, duration_s: float,
                    settings: dict | None = None, request_timeout_s: float | None = None, quiet: bool = False,
                    **weights) -> dict:
    """Write ``plan`` for ``server``, start it inside a fresh cgroup of ``limit_bytes``, drive it, stop it.
    ``deploy``: :meth:`splitpack.serving.plan_deployment.Deployment.write` (what writes and runs a plan);
    ``request_timeout_s``: default: what the written deployment lets two batches take
    (:func:`splitpack.serving.plan_deployment.request_timeout`)."""
    what = (f"{plan['recommended']['merge_layer'] or 'unsplit'}: {plan['recommended']['replicas']} replica(s) x "
            f"batch {plan['recommended']['batch_size']}")
    _log(f"validating {what} under {limit_bytes / 2**30:.2f} GiB with {clients} clients for {duration_s:.0f} s", quiet)
    result: dict = {"shape": what, "merge_layer": plan["recommended"]["merge_layer"],
                    "grid": plan["recommended"]["grid"]}
    with tempfile.TemporaryDirectory(prefix="splitpack-validate-") as tmp, MemoryCgroup(limit_bytes) as cgroup:
        deployment = deploy(server, plan, Path(tmp), settings, **weights)
        request_timeout_s = result["request_timeout_s"] = request_timeout_s or deployment.request_timeout(settings)
        try:
            t0 = time.monotonic()
            try:
                deployment.start(preexec_fn=cgroup.join)
            except RuntimeError as e:  # the start failed (under the limit: often an OOM kill while loading)
                result |= {"started": False, "start_error": str(e)[-600:]}
            else:
                result |= {"started": True, "start_s": round(time.monotonic() - t0, 1),
                           "idle_usage_bytes": cgroup.stats()["usage_bytes"]}
                result |= drive(deployment.client(request_timeout_s), deployment.image_at(plan["size"]), clients,
                                duration_s)
        finally:
            result |= {"cgroup": cgroup.stats()}
            deployment.stop()
    result["peak_usage_bytes"] = result["cgroup"]["max_usage_bytes"]
    result["oom_kills"] = result["cgroup"]["oom_kills"]
    _log(f"  -> served {result.get('served', 0)}, failed {result.get('failed', 0)}, OOM kills {result['oom_kills']}, "
         f"peak {result['peak_usage_bytes'] / 2**30:.2f} GiB"
         + ("" if result["started"] else f"; did not start: {result['start_error']}"), quiet)
    return result


def unsplit_in_same_shape(plan: dict) -> dict:
    """The plan with the unsplit model in the recommended shape (replicas, batch size)."""
    other = copy.deepcopy(plan)
    other["recommended"] |= {"merge_layer": None, "grid": None, "mode": None}
    return other


def validate_plan(deploy, plan: dict, duration_s: float = DEFAULT_DURATION_S, settings: dict | None = None,
                  quiet: bool = False, unsplit: bool = True, **weights) -> dict:
    """The written plan under its limit, then (``unsplit``) the unsplit model in the same shape."""
    clients = plan["recommended"]["inflight_images"]
    limit = plan["memory_limit_bytes"]
    report = {"server": plan["server"], "memory_limit_bytes": limit, "clients": clients,
              "predicted_usage_bytes": plan["predicted_usage_bytes"]}
    report["planned"] = run_under_limit(deploy, plan["server"], plan, limit, clients, duration_s, settings, quiet=quiet,
                                        **weights)
    if unsplit and plan["recommended"]["merge_layer"] is not None:
        report["unsplit_same_shape"] = run_under_limit(deploy, plan["server"], unsplit_in_same_shape(plan), limit, clients,
                                                       duration_s, settings, quiet=quiet, **weights)
    return report


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
