"""Halo reuse benchmark: one plan with halo reuse (line buffers) and with halo recompute, against the unsplit model.

For each case (model, size, exact plan) in one process, on the same input, fp32 batch 1: the unsplit
model (eager), the plan's recorded program (``compile="program"``) with ``halo="reuse"`` (the default)
and with ``halo="recompute"``; latency interleaved, best of ``--repeats``; peak activation memory by
the activation tracker (splitpack.measure.meter, as the rest of BENCHMARKS.md) next to the replay's
prediction; MACs from the plan's program; the largest error against the unsplit output.
``--batch-packs`` adds both modes with the same-shaped packs of a grid row batched into one call
(``batch_packs=True``).

    python scripts/bench_halo.py [--repeats 5] [--threads 2] [--only resnet50] [--batch-packs] [--out benchmarks/halo.json]
    python scripts/bench_halo.py --case resnet50:1024:layer2,global_pool:64x1,16x1   # any plan
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compile import finish, first_call_s, load, machine, plan_text, rel_error  # noqa: E402

import splitpack  # noqa: E402
from splitpack.core.cost.plan_cost import plan_cost  # noqa: E402
from splitpack.experiments.bench import latencies_ms  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402

# (model, size, merge layers, grids, targets: least memory ratio, largest latency ratio, largest MACs ratio)
CASES = [
    ("resnet50", 1024, "layer1,layer2,layer3,global_pool", "64x1,32x1,16x1,8x1", (10.0, 1.0, 1.05)),
    ("mobilenetv2_100", 224, "blocks.2", "8x1", (4.0, 1.30, None)),
    # coarser strips: fewer, larger ops (5 packs of 11 rows at blocks.2's 56x56) for a smaller memory ratio
    ("mobilenetv2_100", 224, "blocks.2", "5x1", (4.0, 1.30, None)),
    # the planner's choice within 1.2x MACs (splitpack.plan_for(model, (1, 3, 600, 600), max_overhead=1.2))
    ("tf_efficientnet_b7", 600, "blocks.0.0.conv_pw,blocks.0.1,blocks.0.2,blocks.0,blocks.1.0.conv_pwl,blocks.1.1,"
     "blocks.1.2,blocks.1.3,blocks.1.4,blocks.1.5,blocks.1,blocks.2.0.conv_dw,blocks.2.0.conv_pwl,blocks.2.1,"
     "blocks.2.2,blocks.2.3,blocks.2.4,blocks.2.5,blocks.2,blocks.3.0.conv_dw",
     "6x3,8x2,8x2,8x2,7x8,6x4,6x4,6x4,6x4,6x4,6x4,7x4,1x5,6x2,6x2,6x2,6x2,6x2,6x2,8x2", (8.0, 1.15, None)),
    # the same checkpoints as full-width strips (no horizontal halo, no joins across columns): 22.1 MiB
    # predicted (8.2x) at 1.127x MACs (the squeeze-excitation second passes)
    ("tf_efficientnet_b7", 600, "blocks.0.0.conv_pw,blocks.0.1,blocks.0.2,blocks.0,blocks.1.0.conv_pwl,blocks.1.1,"
     "blocks.1.2,blocks.1.3,blocks.1.4,blocks.1.5,blocks.1,blocks.2.0.conv_dw,blocks.2.0.conv_pwl,blocks.2.1,"
     "blocks.2.2,blocks.2.3,blocks.2.4,blocks.2.5,blocks.2,blocks.3.0.conv_dw",
     "24x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1,8x1,24x1,24x1,24x1,24x1,24x1,24x1,24x1",
     (8.0, 1.15, None)),
]
HALOS = ("reuse", "recompute")
BATCHED = " batched"  # a variant's name: the halo mode, then this when its packs are batched


def bench_case(name: str, size: int, merge: str, grid: str, targets, repeats: int, batch_packs: bool = False) -> dict:
    torch.manual_seed(0)
    model = splitpack.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    fns = {"unsplit": model}
    variants = [(halo, False) for halo in HALOS] + ([(halo, True) for halo in HALOS] if batch_packs else [])
    fns.update({halo + (BATCHED if batched else ""): splitpack.wrap(model, merge, grid, compile="program", halo=halo,
                                                                     batch_packs=batched) for halo, batched in variants})
    runs = [k for k in fns if k != "unsplit"]
    first = {k: first_call_s(fn, x) for k, fn in fns.items()}  # records the programs outside the timing
    with torch.inference_mode():
        ref = model(x)
        error = {halo: rel_error(fns[halo](x), ref) for halo in runs}
    peak = {k: peak_activation_bytes(fn, x) for k, fn in fns.items()}
    predicted = {halo: plan_cost(fns[halo]._traced, fns[halo].plan, x.shape, halo=fns[halo].halo,
                                   batch_packs=fns[halo].batch_packs).peak_bytes for halo in runs}
    macs = {halo: fns[halo].cost(x.shape)["macs_ratio"] for halo in runs}
    ops = {halo: fns[halo].compiled.report()[0]["ops"] for halo in runs}
    ms = dict(zip(fns, latencies_ms(list(fns.values()), x, repeats)))
    return {"model": name, "size": size, "merge_layer": merge, "grid": grid, "targets": targets,
            "latency_ms": ms, "latency_ratio": {h: ms[h] / ms["unsplit"] for h in runs},
            "peak_tracker_bytes": peak, "predicted_peak_bytes": predicted,
            "memory_ratio": {h: peak["unsplit"] / peak[h] for h in runs}, "macs_ratio": macs, "ops": ops,
            "first_call_s": first, "rel_error": error, "load_after": load()}


def table(rows: list[dict]) -> str:
    lines = ["| model @size | plan | halo | peak MiB (tracker / predicted) | memory ratio | MACs ratio | ops | "
             "latency ms | latency ratio | targets (memory, latency, MACs) | max rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = plan_text(r)
        lines.append(f"| {r['model']} @{r['size']} | unsplit (eager) | - | {r['peak_tracker_bytes']['unsplit'] / 2**20:.1f}"
                     f" | 1x | 1x | - | {r['latency_ms']['unsplit']:.0f} | 1x | | |")
        mem, lat, mac = r["targets"]
        wanted = f">= {mem}x, <= {lat}x{f', <= {mac}x' if mac else ''}" if mem else "-"
        for h in (k for k in r["latency_ms"] if k != "unsplit"):
            lines.append(
                f"| | {plan} | {h} | {r['peak_tracker_bytes'][h] / 2**20:.1f} / {r['predicted_peak_bytes'][h] / 2**20:.1f}"
                f" | **{r['memory_ratio'][h]:.2f}x** | {r['macs_ratio'][h]:.3f}x | {r['ops'][h]} | "
                f"{r['latency_ms'][h]:.0f} | **{r['latency_ratio'][h]:.2f}x** | "
                f"{wanted} | {r['rel_error'][h]:.1e} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, interleaved (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--only", help="substring filter on the model name")
    p.add_argument("--case", action="append", default=[],
                   help="MODEL:SIZE:MERGE_LAYERS:GRIDS instead of the built-in cases (repeatable)")
    p.add_argument("--batch-packs", action="store_true", help="also run each mode with batched packs")
    p.add_argument("--out", default="benchmarks/halo.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(m, int(s), ml, g, (None, None, None)) for m, s, ml, g in (c.split(":") for c in args.case)] or \
        [c for c in CASES if not args.only or args.only in c[0]]
    env = machine()
    rows = []
    for name, size, merge, grid, targets in cases:
        rows.append(bench_case(name, size, merge, grid, targets, args.repeats, args.batch_packs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finish(args.out, env, rows, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
