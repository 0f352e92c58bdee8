#!/usr/bin/env python
"""Check a capacity plan on a real GPU: do N replicas of the planned configuration fit?

For each configuration to check (default: the plan's recommendation and the
unsplit model), start N replica processes (``splitpack replica-probe
--hold``: each loads the model on the GPU and keeps running inference at the
planned batch size), sample NVML while all N run, then stop them and check:

* every replica started and ran without an out-of-memory error;
* the GPU memory they use together (NVML device used - used before) is within
  ``--tolerance`` of the plan (N x replica_bytes);
* each replica's own NVML memory is at most its planned replica_bytes x (1 + tolerance)
  (skipped, with a note, where NVML cannot see the processes' pids, e.g. in a container);
* the GPU did not go over (total - headroom).

It also reports what the plan could only assume: the CUDA context overhead
(NVML process bytes - torch reserved) and the allocator slack (torch max
reserved - max allocated). Exit status 0 when all checks pass, 1 when one fails,
2 on bad input.

``--dry-run`` runs the same orchestration on the CPU (at most
``--dry-run-replicas`` processes, RSS instead of NVML) and checks that every
replica reports the plan's peak activation bytes: a test of this script and of
the probe, not of a GPU.

Examples::

    splitpack capacity --model resnet50 --size 1024 --batch-size 4 --gpu-memory 80GiB --json > plan.json
    python scripts/validate_capacity_gpu.py --plan plan.json --out validation.json
    python scripts/validate_capacity_gpu.py --plan plan.json --dry-run
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from splitpack.capacity.probe import probe_command, read_probe_line  # noqa: E402
from splitpack.measure import nvml as devices  # noqa: E402

GiB = 1024**3
REQUIRED_KEYS = ("model", "size", "batch_size", "gpu_memory_bytes", "headroom_bytes", "recommended", "unsplit")


class Replica:
    """One probe process; its stdout lines arrive on a queue."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-20:]

    def next_report(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": f"no report within {timeout:.0f} s"}
        if line is None:
            return {"ok": False, "error": "exited without a report: " + "".join(self.stderr_tail)[-1500:]}
        return read_probe_line(line)

    def release(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def stop(self, timeout: float = 30) -> None:
        """Wait for the exit; terminate, then kill, only this process if it hangs."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
    else:
        from splitpack.capacity.footprint import parse_headroom
        from splitpack.capacity.planner import PlanInputs, plan_capacity
        from splitpack.measure.units import parse_bytes

        if not (args.model and args.size and args.batch_size and args.gpu_memory):
            raise ValueError("give --plan FILE, or --model, --size, --batch-size and --gpu-memory to plan here")
        gpu = parse_bytes(args.gpu_memory)
        plan = plan_capacity(PlanInputs(model=args.model, size=args.size, batch_size=args.batch_size,
                                        gpu_memory_bytes=gpu,
                                        gpu_memory_source=f"--gpu-memory {args.gpu_memory}",
                                        headroom_bytes=parse_headroom(args.headroom, gpu), repeats=1))
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        raise ValueError(f"not a `splitpack capacity --json` plan: missing {', '.join(missing)}")
    return plan


def configurations(plan: dict[str, Any], which: list[str]) -> list[dict[str, Any]]:
    """(name, merge_layer, grid, mode, replicas, replica_bytes, peak_activation_bytes) to check."""
    rows = {"unsplit": plan["unsplit"]}
    rec = plan["recommended"]
    match = next((c for c in plan.get("candidates", []) if c["merge_layer"] == rec["merge_layer"]
                  and c["grid"] == rec["grid"] and c["mode"] == rec["mode"]), None)
    rows["recommended"] = plan["unsplit"] if rec["merge_layer"] is None else match
    best = plan.get("best_split")
    if best:
        rows["best_split"] = next((c for c in plan["candidates"] if c["merge_layer"] == best["merge_layer"]
                                   and c["grid"] == best["grid"] and c["mode"] == best["mode"]), None)
    out, seen = [], set()
    for name in which:
        row = rows.get(name)
        if row is None:
            raise ValueError(f"the plan has no {name} configuration")
        key = (row["merge_layer"], row["grid"], row["mode"])
        if key in seen:
            continue
        seen.add(key)
        out.append({"name": name, "merge_layer": row["merge_layer"], "grid": row["grid"], "mode": row["mode"],
                    "replicas": row["replicas"], "replica_bytes": row["replica_bytes"],
                    "peak_activation_bytes": row["peak_activation_bytes"]})
    return out


def _sample_gpu(index: int, pids: set[int]) -> tuple[int, dict[int, int]]:
    gpu = devices.gpu_memory(index)
    return gpu.used_bytes, {p.pid: p.used_bytes for p in gpu.processes if p.pid in pids and p.used_bytes is not None}


def check_configuration(plan: dict, cfg: dict, args: argparse.Namespace) -> dict[str, Any]:
    dry = args.dry_run
    n = cfg["replicas"] if args.replicas is None else args.replicas
    if dry:
        n = min(n, args.dry_run_replicas)
    device = "cpu" if dry else args.device
    result: dict[str, Any] = {"configuration": cfg, "replicas_started": n, "device": device, "checks": {}, "notes": []}
    if n < 1:
        result["notes"].append("the plan fits no replica of this configuration; nothing to start")
        result["checks"]["fits"] = False
        return result
    cmd = probe_command(plan["model"], plan["size"], plan["batch_size"], cfg["merge_layer"], cfg["grid"], cfg["mode"],
                        device, repeats=1, hold=True)
    result["command"] = " ".join(cmd)
    index = None
    baseline = None
    if not dry:
        index = devices.nvml_index(int(device.split(":")[1]) if ":" in device else 0)
        gpu = devices.gpu_memory(index)
        baseline = gpu.used_bytes
        result.update(gpu_name=gpu.name, gpu_total_bytes=gpu.total_bytes, gpu_used_before_bytes=baseline)
        if gpu.processes:
            result["notes"].append(f"{len(gpu.processes)} other process(es) on the GPU before the start")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    replicas: list[Replica] = []
    try:
        for _ in range(n):
            replicas.append(Replica(cmd, env))
        deadline = time.monotonic() + args.start_timeout
        ready = [r.next_report(max(1.0, deadline - time.monotonic())) for r in replicas]
        result["ready"] = ready
        started = all(r.get("ok") for r in ready)
        result["checks"]["all_started_without_oom"] = started
        if started:
            pids = {r.proc.pid for r in replicas}
            used_max, per_process_max = 0, {}
            t_end = time.monotonic() + args.duration
            while time.monotonic() < t_end:
                if dry:
                    import psutil

                    per = {r.proc.pid: psutil.Process(r.proc.pid).memory_info().rss for r in replicas
                           if r.proc.poll() is None}
                    used = sum(per.values())
                else:
                    used, per = _sample_gpu(index, pids)
                used_max = max(used_max, used)
                for pid, b in per.items():
                    per_process_max[pid] = max(per_process_max.get(pid, 0), b)
                time.sleep(args.sample_interval)
            result["used_max_bytes"] = used_max
            result["per_process_max_bytes"] = per_process_max
        for r in replicas:
            r.release()
        finals = [r.next_report(args.stop_timeout) for r in replicas]
        result["final"] = finals
        result["checks"]["all_ran_without_oom"] = started and all(f.get("ok") for f in finals)
    finally:
        for r in replicas:
            r.release()
            r.stop()
    if not result["checks"]["all_started_without_oom"]:
        return result

    tol = args.tolerance
    if dry:
        # the CPU tracker is deterministic: each replica must measure what the plan measured
        peaks = [r["peak_activation_bytes"] for r in result["ready"]]
        planned = cfg["peak_activation_bytes"]
        result["peak_activation_bytes"] = peaks
        result["checks"]["peaks_match_plan"] = all(abs(p - planned) <= tol * planned for p in peaks)
        result["notes"].append("dry run on the CPU: RSS sampled instead of NVML; GPU fit not checked")
        return result

    planned_total = n * cfg["replica_bytes"]
    used_delta = result["used_max_bytes"] - baseline
    result.update(planned_total_bytes=planned_total, used_delta_bytes=used_delta,
                  used_vs_plan=used_delta / planned_total if planned_total else None)
    result["checks"]["total_within_tolerance"] = abs(used_delta - planned_total) <= tol * planned_total
    result["checks"]["under_gpu_minus_headroom"] = (
        result["used_max_bytes"] <= result["gpu_total_bytes"] - plan["headroom_bytes"])
    per = result["per_process_max_bytes"]
    if len(per) == n:
        result["per_replica_bytes"] = {"min": min(per.values()), "median": int(statistics.median(per.values())),
                                       "max": max(per.values())}
        result["checks"]["each_replica_within_plan"] = max(per.values()) <= cfg["replica_bytes"] * (1 + tol)
    else:
        result["notes"].append(f"NVML attributed memory to {len(per)} of {n} replica pids (container pid "
                               "namespace?): per-replica check skipped, device total still checked")
    contexts = [r.get("context_overhead_bytes") for r in result["ready"] if r.get("context_overhead_bytes")]
    if contexts:
        result["measured_context_overhead_bytes"] = int(statistics.median(contexts))
    slack = [(r["torch_max_reserved_bytes"] - r["torch_max_allocated_bytes"]) / max(1, r["peak_activation_bytes"])
             for r in result["ready"] if "torch_max_reserved_bytes" in r]
    if slack:
        result["measured_allocator_slack"] = statistics.median(slack)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", help="JSON from `splitpack capacity ... --json`")
    parser.add_argument("--model")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--gpu-memory")
    parser.add_argument("--headroom", default="10%")
    parser.add_argument("--configs", nargs="+", default=["recommended", "unsplit"],
                        choices=["recommended", "unsplit", "best_split"])
    parser.add_argument("--replicas", type=int, help="start this many instead of the plan's count")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="allowed relative difference between measured and planned memory (default 0.15)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds to sample while all replicas run")
    parser.add_argument("--sample-interval", type=float, default=0.25)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--stop-timeout", type=float, default=120.0)
    parser.add_argument("--dry-run", action="store_true", help="CPU only: check the orchestration, not a GPU")
    parser.add_argument("--dry-run-replicas", type=int, default=2)
    parser.add_argument("--out", help="write the report JSON here as well")
    args = parser.parse_args(argv)

    try:
        plan = load_plan(args)
        configs = configurations(plan, args.configs)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"validate_capacity_gpu: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        ok, reason = devices.nvml_status()
        if not ok:
            print(f"validate_capacity_gpu: needs an NVIDIA GPU ({reason}); use --dry-run to check on the CPU",
                  file=sys.stderr)
            return 2
    report = {"plan": {k: plan[k] for k in REQUIRED_KEYS}, "dry_run": args.dry_run, "tolerance": args.tolerance,
              "driver_version": None if args.dry_run else devices.query_devices().driver_version,
              "results": [check_configuration(plan, cfg, args) for cfg in configs]}
    report["passed"] = all(r["checks"] and all(r["checks"].values()) for r in report["results"])
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    for r in report["results"]:
        cfg = r["configuration"]
        print(f"{cfg['name']}: {r['replicas_started']} replicas on {r['device']}: "
              + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in r["checks"].items())
              + (f"; used {r['used_delta_bytes'] / GiB:.2f} GiB vs planned {r['planned_total_bytes'] / GiB:.2f} GiB"
                 if "used_delta_bytes" in r else ""), file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
