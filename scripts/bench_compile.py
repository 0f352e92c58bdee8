"""Compiled split-pack benchmark: split-pack latency / unsplit latency without and with compilation, and peak memory.

For each case (model, size, exact plan) in one process, on the same input, interleaved, best of
``--repeats``: the unsplit model (eager), split-pack interpreted (``compile=off``, the reference),
the recorded straight-line program (``compile=program``) and, for the models in ``--inductor``,
that program through torch.compile (``compile=inductor``) next to ``torch.compile`` of the unsplit
model. Peak memory of every variant with the same meter (the CPU allocator's events,
splitpack.measure.allocations, which also sees buffers of compiled code) and, for the interpreter and
the program, the activation tracker the rest of BENCHMARKS.md uses.

    python scripts/bench_compile.py [--repeats 5] [--inductor mobilenetv2_100] [--out benchmarks/compile.json]

Inductor compiles the split program's kernels once per pack shape: minutes per model on a 2-core CPU
(the first call, reported), hence only MobileNetV2 by default; ``--inductor all`` for every case. The
compile caches go to a fresh directory (TORCHINDUCTOR_CACHE_DIR), so the time is a cold compile.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# a cold compile, whatever ran on this machine before (set before torch reads it)
CACHE = tempfile.mkdtemp(prefix="bench_compile_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_suite import B0, per_block  # noqa: E402  (the staged plans of the staged suite)

import splitpack  # noqa: E402
from splitpack.experiments.bench import latencies_ms  # noqa: E402
from splitpack.measure.allocations import peak_allocated_bytes  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402

# (model, size, merge layers, grids, target latency ratio)
CASES = [
    ("mobilenetv2_100", 224, "blocks.2", "4x4", 1.3),
    ("resnet50", 1024, "layer2", "3x3", 1.0),  # the fastest exact plan of the single-stage table (3.25x less memory)
    ("resnet50", 1024, "maxpool,layer3.0,layer4.0,global_pool", "4x4,8x4,4x2,2x2", 1.0),  # the staged suite's plan
    ("efficientnet_b0", 600, *per_block(B0, ["8x8"] + ["4x4"] * 4 + ["2x2"] * 11, "global_pool", "2x2"), 1.5),
]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def machine() -> dict:
    """The run's torch, CPU, threads and load (printed to stderr as it starts)."""
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_before": load()}
    print(f"# {env}", file=sys.stderr, flush=True)
    return env


def finish(out: str, env: dict, rows: list[dict], text: str) -> None:
    """Writes the rows and the machine (with the load after) to ``out`` as JSON and prints the table."""
    env["load_after"] = load()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    print(f"machine: {env}\n")
    print(text)


def first_call_s(fn, x) -> float:
    """Seconds of the first call (recording, compilation)."""
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - start


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def variants(model, merge: str, grid: str, inductor: bool) -> dict:
    found = {"unsplit": model, "split": splitpack.wrap(model, merge, grid),
             "split_program": splitpack.wrap(model, merge, grid, compile="program")}
    if inductor:
        found["unsplit_inductor"] = torch.compile(model)
        found["split_inductor"] = splitpack.wrap(model, merge, grid, compile="inductor")
    return found


def bench_case(name: str, size: int, merge: str, grid: str, target: float, repeats: int, inductor: bool) -> dict:
    torch.manual_seed(0)
    model = splitpack.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    fns = variants(model, merge, grid, inductor)
    compile_s = {k: first_call_s(fn, x) for k, fn in fns.items()}
    with torch.inference_mode():
        ref = model(x)
        error = {k: rel_error(fn(x), ref) for k, fn in fns.items()}
    allocator = {k: peak_allocated_bytes(fn, x) for k, fn in fns.items()}
    tracker = {k: peak_activation_bytes(fns[k], x) for k in ("unsplit", "split", "split_program")}
    ms = dict(zip(fns, latencies_ms(list(fns.values()), x, repeats)))
    ratio = {k: ms[k] / ms["unsplit"] for k in fns}
    if inductor:
        ratio["split_inductor_vs_unsplit_inductor"] = ms["split_inductor"] / ms["unsplit_inductor"]
    return {"model": name, "size": size, "merge_layer": merge, "grid": grid, "target_ratio": target,
            "ops": fns["split_program"].compiled.report()[0]["ops"],
            "macs_ratio": fns["split"].cost(x.shape)["macs_ratio"], "latency_ms": ms, "latency_ratio": ratio,
            "first_call_s": compile_s, "peak_allocator_bytes": allocator, "peak_tracker_bytes": tracker,
            "rel_error": error, "load_after": load()}


def plan_text(row: dict) -> str:
    names, grids = row["merge_layer"].split(","), row["grid"].split(",")
    if len(names) <= 4:
        return ", ".join(f"{n} @{g}" for n, g in zip(names, grids))
    return f"{len(names)} stages: {names[0]} @{grids[0]} .. {names[-1]} @{grids[-1]}"


def _x(v) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _mib(v) -> str:
    return f"{v / 2**20:.1f}" if v is not None else "-"


def _s(v) -> str:
    return f"{v:.0f}" if v is not None else "-"


def table(rows: list[dict]) -> str:
    lines = ["| model @size | plan | ops | MACs ratio | unsplit ms | interpreter | program | inductor | "
             "inductor vs unsplit inductor | target | peak MiB interpreter / program / inductor (allocator) | "
             "program vs interpreter peak (tracker) | first call s: program / inductor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, a, t, c = r["latency_ratio"], r["peak_allocator_bytes"], r["peak_tracker_bytes"], r["first_call_s"]
        lines.append(
            f"| {r['model']} @{r['size']} | {plan_text(r)} | {r['ops']} | {r['macs_ratio']:.2f}x | "
            f"{r['latency_ms']['unsplit']:.0f} | "
            f"{_x(q['split'])} | **{_x(q['split_program'])}** | **{_x(q.get('split_inductor'))}** | "
            f"{_x(q.get('split_inductor_vs_unsplit_inductor'))} | <= {r['target_ratio']}x | "
            f"{_mib(a['split'])} / {_mib(a['split_program'])} / {_mib(a.get('split_inductor'))} | "
            f"{t['split_program'] / t['split'] - 1:+.1%} | {_s(c['split_program'])} / {_s(c.get('split_inductor'))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, interleaved (best kept)")
    p.add_argument("--inductor", default="mobilenetv2_100",
                   help="comma list of models also run through torch.compile, or 'all' / 'none'")
    p.add_argument("--only", help="substring filter on the model name")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); on a machine "
                   "shared with other jobs 1 thread is steadier (2 threads wait on each other)")
    p.add_argument("--out", default="benchmarks/compile.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inductor = {c[0] for c in CASES} if args.inductor == "all" else set(args.inductor.split(","))
    env = machine()
    rows = []
    for name, size, merge, grid, target in [c for c in CASES if not args.only or args.only in c[0]]:
        rows.append(bench_case(name, size, merge, grid, target, args.repeats, name in inductor))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finish(args.out, env, rows, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
