#!/usr/bin/env python
"""Predicted vs measured latency of the plans the planner picks with ``max_latency``.

usage: scripts/bench_latency.py [--cases resnet50:1024:1.0 mobilenetv2_100:224:1.3 ...] [--threads 2]
                                [--repeats 5] [--compile program] [--no-peak] [--measure-latency]
                                [--heap kept|default] [--json benchmarks/latency.json]

For every case (model:size:max_latency): the device's time model (calibrated on first use, cached; the
seconds it took are reported), the planner's choice within ``max_latency`` (smallest predicted peak whose
predicted latency ratio fits), then the chosen plan run as a recorded program (``--compile``) and the
unsplit eager model, interleaved in the case's own process (a fresh one per case), best of ``--repeats``:
predicted and measured seconds and ratios, and the prediction's error. Peaks: predicted (exact replay) and
measured by the activation tracker. Run it with ``nice -n 5`` and note the load (printed before and after): other processes on the cores make
the measured side slower, never the calibrated one faster. ``--clock cpu`` (one thread only) times by the
process's CPU time instead of the wall clock: what the ops cost, without the time the process waited for a
core on a loaded machine. ``--measure-latency``: the planner also times candidate plans itself and keeps the
smallest peak measured within ``max_latency`` (what it measured is in the row, beside this script's measurement).
``--heap``: each case's process keeps freed memory in the C heap (the default, "kept"), so neither model pays
page faults per call, or runs with glibc's adaptive thresholds ("default": the unsplit model's large
activations are mapped afresh on every call; splitpack.measure.heap). The row records the page faults per call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

import splitpack  # noqa: E402
from splitpack.core.cost.time_model import (INTERPRETED, PROGRAM, device_key, latencies_and_faults,  # noqa: E402
                                            time_model_for)
from splitpack.core.execute.module import SplitPack  # noqa: E402
from splitpack.core.search.planner import MEASURED_PLANS, LatencyTooLow, Planner  # noqa: E402
from splitpack.experiments.bench import in_fresh_processes, planner_measurements  # noqa: E402
from splitpack.measure.heap import HEAP_HELP, HEAP_MODES  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DEFAULT_CASES = ["resnet50:1024:1.0", "tf_efficientnet_b7:600:1.15", "mobilenetv2_100:224:1.3"]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def parse_case(text: str) -> tuple[str, int, float]:
    name, size, latency = text.rsplit(":", 2)
    return name, int(size), float(latency)


def bench_case(name: str, size: int, max_latency: float, repeats: int, compile_mode: str, peak: bool,
               clock: str = "wall", measure: int = 0) -> dict:
    torch.manual_seed(0)
    model = splitpack.create_model(name).eval()
    row = {"model": name, "size": size, "max_latency": max_latency, "threads": torch.get_num_threads(),
           "clock": clock, "load_before": load()}
    planner = Planner(model)
    start = time.perf_counter()
    time_model_for(planner.traced, size, progress=True)
    row["calibration_s"] = time.perf_counter() - start  # 0-ish when the cache had it
    start = time.perf_counter()
    latency_mode = INTERPRETED if compile_mode == "off" else PROGRAM
    try:
        choice = planner.choose((1, 3, size, size), max_latency=max_latency, latency_mode=latency_mode, measure=measure)
    except LatencyTooLow as err:
        row["error"] = str(err)
        return row
    row.update(planning_s=time.perf_counter() - start, plan=str(choice.plan), stages=len(choice.plan.stages),
               predicted_peak_bytes=choice.predicted_peak_bytes, macs_ratio=choice.predicted_macs_ratio,
               predicted_s=choice.predicted_time.seconds, predicted_unsplit_s=choice.predicted_time.unsplit_seconds,
               predicted_ratio=choice.predicted_latency_ratio, halo=list(choice.halo), batch_packs=choice.batch_packs)
    row.update(planner_measurements(choice))
    split = SplitPack(model, choice.plan, compile=compile_mode, traced=planner.traced, **choice.execution_kwargs)
    x = torch.randn(1, 3, size, size)
    (unsplit_ms, split_ms), faults = latencies_and_faults([model, split], x, repeats, CLOCKS[clock])
    row.update(measured_s=split_ms / 1e3, measured_unsplit_s=unsplit_ms / 1e3, measured_ratio=split_ms / unsplit_ms,
               page_faults_per_call=faults)
    row["error_s"] = row["predicted_s"] / row["measured_s"] - 1
    row["error_unsplit_s"] = row["predicted_unsplit_s"] / row["measured_unsplit_s"] - 1
    row["error_ratio"] = row["predicted_ratio"] / row["measured_ratio"] - 1
    if peak:
        row["measured_peak_bytes"] = peak_activation_bytes(split, x)
        row["unsplit_peak_bytes"] = peak_activation_bytes(model, x)
    row["load_after"] = load()
    return row


def execution_text(row: dict) -> str:
    """How the chosen plan runs, where it is not halo reuse one pack at a time: "; 2 recompute, batched"."""
    halo, parts = row.get("halo") or [], []
    if "recompute" in halo:
        parts.append("recompute" if set(halo) == {"recompute"} else f"{halo.count('recompute')} recompute")
    if row.get("batch_packs"):
        parts.append("batched")
    return "; " + ", ".join(parts) if parts else ""


def table(rows: list[dict]) -> str:
    lines = ["| model @size | max_latency | plan (stages) | peak pred / meas (MiB) | memory | MACs | "
             "latency pred / meas | pred / meas ms (unsplit) | error: split s, unsplit s, ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} @{r['size']} | {r['max_latency']:g} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | |")
            continue
        plan = r["plan"] if len(r["plan"]) < 60 else f"{r['plan'][:57]}..."
        meas_peak = r.get("measured_peak_bytes")
        cells = [f"`{plan}` ({r['stages']}{execution_text(r)})",
                 f"{r['predicted_peak_bytes'] / 2**20:.1f} / {meas_peak / 2**20 if meas_peak else float('nan'):.1f}",
                 f"{r['unsplit_peak_bytes'] / meas_peak:.2f}x" if meas_peak else "-",
                 f"{r['macs_ratio']:.3f}x",
                 f"{r['predicted_ratio']:.3f}x / {r['measured_ratio']:.3f}x"
                 + (f" (planner {r['planner_measured_ratio']:.3f}x)" if r.get("planner_measured_ratio") else ""),
                 f"{r['predicted_s'] * 1e3:.0f} / {r['measured_s'] * 1e3:.0f} "
                 f"({r['predicted_unsplit_s'] * 1e3:.0f} / {r['measured_unsplit_s'] * 1e3:.0f})",
                 ", ".join(f"{r[k]:+.1%}" for k in ("error_s", "error_unsplit_s", "error_ratio"))]
        lines.append(f"{head} {' | '.join(cells)} |")
    return "\n".join(lines)


def case_in_process(case: tuple[str, int, float], args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    name, size, latency = case
    row = bench_case(name, size, latency, args.repeats, args.compile, not args.no_peak, args.clock,
                     MEASURED_PLANS if args.measure_latency else 0)
    return {**row, "heap": args.heap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                        metavar="MODEL:SIZE:MAX_LATENCY")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", choices=("program", "off"), default="program")
    parser.add_argument("--no-peak", action="store_true", help="skip the tracker's peak measurements")
    parser.add_argument("--measure-latency", action="store_true",
                        help="the planner times candidate plans and keeps the smallest peak measured within")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or the process's CPU time (--threads 1 only)")
    parser.add_argument("--heap", choices=HEAP_MODES, default="kept", help=HEAP_HELP)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's work: use --threads 1")
    torch.set_num_threads(args.threads)
    print(f"device key {device_key('cpu', torch.float32)}; load {load()}", flush=True)
    rows = []
    for row in in_fresh_processes(case_in_process, args.cases, args, heap=args.heap):
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    print(f"load after: {load()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
