#!/usr/bin/env python
"""The planner's evidence (merge_layer auto), written into BENCHMARKS.md between its planner markers.

usage: scripts/bench_planner.py [--models M ...] [--sizes 512 1024] [--brute-size 512] [--cap 1.25]
                                [--planning-model efficientnet_b7 --planning-size 600]
                                [--parts accuracy brute planning hand] [--hand-models M ...]
                                [--write BENCHMARKS.md] [--json benchmarks/planner.json]

1. Prediction accuracy: for every model and size, the predicted peak (splitpack.core.cost.exact_peak: the
   executor's memory behaviour replayed on the program) against the measured one (the CPU tracker,
   splitpack.measure.meter, one real run under inference_mode) for the planner's choice and two fixed
   plans (one checkpoint; a staged plan to the global pooling).
2. Planner vs brute force at --brute-size within the MACs cap: every one-checkpoint plan x square grids
   1..6 and every two-stage plan x square grids 1..6 for both stages, ranked by predicted peak; the three
   best and the planner's choice are measured.
3. Planning time (trace, then plan) for --planning-model at --planning-size, and for each model.
4. Planner vs hand plans: for each hand-picked plan of BENCHMARKS.md's staged table
   (scripts/bench_suite.py's STAGED), the planner's plan within the hand plan's MACs ratio; both measured.

Measurements run with one torch thread: peak bytes do not depend on it, and on a shared 2-core machine
thousands of tiny pack ops under OpenMP would take minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

import splitpack  # noqa: E402
from bench_suite import STAGED  # noqa: E402
from splitpack.core.cost.fast_estimate import Estimator  # noqa: E402
from splitpack.core.plan.spec import Plan, Stage, parse_plan  # noqa: E402
from splitpack.core.search.planner import Planner, _SizeContext  # noqa: E402
from splitpack.core.cost.plan_cost import plan_cost  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402
from splitpack.measure.units import MiB  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0", "convnext_nano")
FIXED = {  # one checkpoint; a staged plan to the global pooling
    "resnet18": [("layer2", "3x3"), ("maxpool,layer3,global_pool", "4x4,2x2,2x2")],
    "resnet50": [("layer2", "3x3"), ("maxpool,layer3.0,layer4.0,global_pool", "4x4,8x8,4x4,2x2")],
    "mobilenetv2_100": [("blocks.2", "4x4"), ("blocks.1,blocks.3,global_pool", "4x4,2x2,2x2")],
    "efficientnet_b0": [("blocks.1.0.se", "3x3"), ("blocks.1,blocks.2,blocks.3,blocks.5,global_pool",
                                                   "4x4,4x2,3x3,2x2,2x2")],
    "convnext_nano": [("stages.1", "3x3"), ("stem,stages.1,head.global_pool", "4x4,2x2,2x2")],
}
BEGIN, END = "<!-- planner:begin -->", "<!-- planner:end -->"
PARTS = ("accuracy", "brute", "planning", "hand")  # predicted vs measured, vs brute force, planning time, vs hand plans
GRIDS = range(1, 7)
COARSE = re.compile(r"^([^.]+|(layer|blocks|stages)\.\d+)$")


def measured_peak(model, traced, plan: Plan, shape, **execution) -> int:
    """The tracker's peak of ``plan`` run as ``execution`` says (SplitPack's ``halo``, ``batch_packs``)."""
    split = splitpack.SplitPack(model, plan, traced=traced, **execution)
    split.program(shape)  # planned before the measured call, as a server's warm-up does
    return peak_activation_bytes(split, torch.randn(shape))


def accuracy(name: str, sizes, cap: float, log) -> list[dict]:
    model = splitpack.create_model(name)
    planner = Planner(model)
    rows = []
    for size in sizes:
        shape = (1, 3, size, size)
        chosen = planner.choose(shape, max_overhead=cap)
        plans = [("planner", chosen.plan)] + [("fixed", parse_plan(ml, g)) for ml, g in FIXED[name]]
        for kind, plan in plans:
            cost = plan_cost(planner.traced, plan, shape)
            measured = measured_peak(model, planner.traced, plan, shape)
            rows.append({"model": name, "size": size, "kind": kind, "plan": str(plan), "predicted": cost.peak_bytes,
                         "measured": measured, "error": cost.peak_bytes / measured - 1, "macs_ratio": cost.macs_ratio})
            log(f"accuracy {name}@{size} {plan}: predicted {cost.peak_bytes / MiB:.2f} MiB, "
                f"measured {measured / MiB:.2f} MiB")
    return rows


def coarse(name: str) -> bool:
    """A top-level module or a block of a top-level sequence (layer1, blocks.3, stages.2, global_pool): the
    two-stage brute force pairs these (all pairs of the 14..70 checkpoints: up to 15,000 replays per model)."""
    return COARSE.match(name) is not None


def brute_force_plans(context: _SizeContext, cap: float) -> list[Plan]:
    """Every one-stage plan with square grids 1..6, and every two-stage plan between coarse checkpoints with
    square grids 1..6 per stage, within ``cap`` (MACs from an unlimited search table: the programs' numbers)."""
    full = Estimator(context.planner.traced, context.planner.checkpoints, context.shapes, context.dtype,
                     context.profile, max_passes=10**6, max_span=10**6)
    cps, limit = context.planner.checkpoints, cap * context.unsplit_macs
    by_source: dict[int, list] = {}
    for o in full.options:
        by_source.setdefault(o.source, []).append(o)
    plans = []
    for first in by_source[0]:
        for g in GRIDS:
            if not first.valid[g - 1, g - 1]:
                continue
            head = first.macs[g - 1, g - 1]
            last = cps[first.end - 1]
            if head + full.tail_macs(last) <= limit:
                plans.append(Plan((Stage(last.name, (g, g)),)))
            for second in by_source.get(first.end, []) if last.spatial and coarse(last.name) else []:
                end = cps[second.end - 1]
                if not coarse(end.name):
                    continue
                for g2 in GRIDS:
                    if second.valid[g2 - 1, g2 - 1] and \
                            head + second.macs[g2 - 1, g2 - 1] + full.tail_macs(end) <= limit:
                        plans.append(Plan((Stage(last.name, (g, g)), Stage(end.name, (g2, g2)))))
    return plans


def versus_brute_force(name: str, size: int, cap: float, log) -> dict:
    model = splitpack.create_model(name)
    planner = Planner(model)
    shape = (1, 3, size, size)
    start = time.perf_counter()
    chosen = planner.choose(shape, max_overhead=cap)
    planning = time.perf_counter() - start
    context = _SizeContext(planner, shape, planner.dtype)
    start = time.perf_counter()
    plans = brute_force_plans(context, cap)
    profile = (context.profile, context.shapes)
    predicted = sorted(((plan_cost(planner.traced, p, shape, profile=profile), p) for p in plans),
                       key=lambda cp: cp[0].peak_bytes)
    predicted = [(c, p) for c, p in predicted if c.macs_ratio <= cap]
    brute_s = time.perf_counter() - start
    top = [{"plan": str(p), "predicted": c.peak_bytes, "macs_ratio": c.macs_ratio,
            "measured": measured_peak(model, planner.traced, p, shape)} for c, p in predicted[:3]]
    chosen_measured = measured_peak(model, planner.traced, chosen.plan, shape)
    best = min(top, key=lambda t: t["measured"])
    log(f"brute force {name}@{size}: {len(plans)} plans, best measured {best['measured'] / MiB:.2f} MiB "
        f"({best['plan']}); planner {chosen_measured / MiB:.2f} MiB ({chosen.plan})")
    return {"model": name, "size": size, "cap": cap, "plans": len(plans), "brute_seconds": brute_s,
            "planning_seconds": planning, "chosen": str(chosen.plan), "chosen_predicted": chosen.predicted_peak_bytes,
            "chosen_measured": chosen_measured, "chosen_macs_ratio": chosen.predicted_macs_ratio, "top": top,
            "best_measured": best["measured"], "best_plan": best["plan"],
            "ratio": chosen_measured / best["measured"]}


def planning_time(name: str, size: int, cap: float, log) -> dict:
    model = splitpack.create_model(name)
    start = time.perf_counter()
    planner = Planner(model)
    traced = time.perf_counter() - start
    cpu = time.process_time()
    choice = planner.choose((1, 3, size, size), max_overhead=cap)
    cpu = time.process_time() - cpu
    log(f"planning {name}@{size}: trace {traced:.1f} s, plan {choice.seconds:.1f} s ({cpu:.1f} s CPU) -> {choice.plan}")
    return {"model": name, "size": size, "trace_seconds": traced, "planning_seconds": choice.seconds, "cpu_seconds": cpu,
            "checkpoints": len(planner.checkpoints), "plan": str(choice.plan),
            "predicted_peak": choice.predicted_peak_bytes, "macs_ratio": choice.predicted_macs_ratio}


def versus_hand_plan(name: str, size: int, merge: str, grid: str, log) -> dict:
    """The hand plan and the planner's plan within the hand plan's MACs ratio, predicted and measured."""
    model = splitpack.create_model(name)
    planner = Planner(model)
    shape = (1, 3, size, size)
    hand = parse_plan(merge, grid)
    hand_cost = plan_cost(planner.traced, hand, shape)
    chosen = planner.choose(shape, max_overhead=hand_cost.macs_ratio)
    rows = {"model": name, "size": size, "hand": str(hand), "hand_macs_ratio": hand_cost.macs_ratio,
            "hand_predicted": hand_cost.peak_bytes, "hand_measured": measured_peak(model, planner.traced, hand, shape),
            "chosen": str(chosen.plan), "chosen_macs_ratio": chosen.predicted_macs_ratio,
            "chosen_predicted": chosen.predicted_peak_bytes,
            "chosen_measured": measured_peak(model, planner.traced, chosen.plan, shape)}
    rows["ratio"] = rows["chosen_measured"] / rows["hand_measured"]
    log(f"hand {name}@{size}: hand {rows['hand_measured'] / MiB:.2f} MiB at {hand_cost.macs_ratio:.3f}x, planner "
        f"{rows['chosen_measured'] / MiB:.2f} MiB at {chosen.predicted_macs_ratio:.3f}x ({chosen.plan})")
    return rows


def hand_table(rows: list[dict]) -> list[str]:
    return table(["model", "size", "hand plan", "MACs ratio", "measured MiB", "planner's plan (within the hand plan's "
                  "MACs)", "MACs ratio", "predicted MiB", "measured MiB", "planner / hand"],
                 [[r["model"], r["size"], f"`{r['hand']}`", f"{r['hand_macs_ratio']:.3f}", mib(r["hand_measured"]),
                   f"`{r['chosen']}`", f"{r['chosen_macs_ratio']:.3f}", mib(r["chosen_predicted"]),
                   mib(r["chosen_measured"]), f"**{r['ratio']:.2f}**"] for r in rows])


def mib(n: int) -> str:
    return f"{n / MiB:.2f}"


def table(columns: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown(results: dict, command: str) -> str:
    load = results["load"]
    lines = [BEGIN, "## Planner (`merge_layer: auto`, `splitpack plan`)", "",
             "```bash", command, "```", "",
             f"Machine: the project's 2-core x86_64 box, torch {torch.__version__}, fp32, batch 1, one torch thread "
             f"for the measured runs (peak bytes do not depend on it); load average {load[0]:.2f} / {load[1]:.2f} "
             f"when it started and {results['load_end'][0]:.2f} when it ended"
             + (" (shared with other work: the timings are from a loaded machine)" if max(load[0], 1e-9) > 1.0 else "")
             + ". Predicted = `splitpack.core.cost.exact_peak` (the executor's memory behaviour replayed on the program, "
               "allocations per op from one fake-tensor run); measured = `splitpack.measure.meter` on a real run.",
             "", "### Predicted vs measured peak activation memory", ""]
    lines += table(["model", "size", "plan", "MACs ratio", "predicted MiB", "measured MiB", "error"],
                   [[r["model"], r["size"], f"`{r['plan']}`" + (" (planner)" if r["kind"] == "planner" else ""),
                     f"{r['macs_ratio']:.3f}", mib(r["predicted"]), mib(r["measured"]), f"{100 * r['error']:+.2f}%"]
                    for r in results["accuracy"]])
    worst = max((abs(r["error"]) for r in results["accuracy"]), default=0.0)  # --models with none: timing only
    lines += ["", f"Largest error over {len(results['accuracy'])} plans: {100 * worst:.2f}%.", "",
              f"### Planner vs brute force (@{results['brute_size']}, within {results['cap']}x MACs)", "",
              "Brute force: every one-checkpoint plan x square grids 1..6, and every two-stage plan between coarse "
              "checkpoints (top-level modules and the blocks of a top-level sequence: `layer3`, `blocks.4`, "
              "`stages.2`; all pairs would be up to 15,000 replays per model) x square grids 1..6 per stage, within "
              "the cap, ranked by predicted peak (the replay, which equals the measured peak); its three best and "
              "the planner's choice measured.", ""]
    lines += table(["model", "plans", "brute force s", "planner s", "best brute-force plan", "measured MiB",
                    "planner's plan", "measured MiB", "MACs ratio", "planner / best"],
                   [[r["model"], r["plans"], f"{r['brute_seconds']:.0f}", f"{r['planning_seconds']:.1f}",
                     f"`{r['best_plan']}`", mib(r["best_measured"]), f"`{r['chosen']}`", mib(r["chosen_measured"]),
                     f"{r['chosen_macs_ratio']:.3f}", f"**{r['ratio']:.2f}**"] for r in results["brute"]])
    lines += ["", "`planner / best` is the planner's measured peak over the brute force's best measured peak: below 1, the "
              "planner's plan needs less memory than any plan the brute force tried (it searches staged plans of any "
              "length over every checkpoint, with rows x columns grids up to 8x8).",
              "", "### Planning time", ""]
    lines += table(["model", "size", "checkpoints", "trace s", "plan s (wall)", "plan s (CPU)", "plan", "predicted MiB",
                    "MACs ratio"],
                   [[r["model"], r["size"], r["checkpoints"], f"{r['trace_seconds']:.1f}", f"{r['planning_seconds']:.1f}",
                     f"{r['cpu_seconds']:.1f}", f"`{r['plan']}`", mib(r["predicted_peak"]), f"{r['macs_ratio']:.3f}"]
                    for r in results["planning"]])
    lines += ["", "`plan s` is `Planner.choose` (allocation profile and shapes from one fake-tensor run, the search, "
              "the finalists' exact replays), as wall-clock and as this process's CPU time (one thread: the CPU "
              "time is what an idle machine's wall clock would show); `trace s` is the fx trace every split-pack "
              "model pays once.", "", "### Planner vs hand plans (the staged table's, within their MACs)", ""]
    lines += hand_table(results["hand"])
    lines += ["", "`planner / hand`: the planner's measured peak over the hand plan's; at most 1 on every row is the "
              "planner doing at least as well as a person within the same compute.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--sizes", nargs="*", type=int, default=[512, 1024])
    parser.add_argument("--brute-size", type=int, default=512)
    parser.add_argument("--cap", type=float, default=1.25)
    parser.add_argument("--planning-model", default="efficientnet_b7")
    parser.add_argument("--planning-size", type=int, default=600)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run (default: all; --write needs all)")
    parser.add_argument("--hand-models", nargs="*", help="hand-plan rows of these models only (default: all)")
    parser.add_argument("--write", type=Path, help="BENCHMARKS.md to put the section into")
    parser.add_argument("--json", type=Path, help="raw results here")
    args = parser.parse_args(argv)
    if args.write and set(args.parts) != set(PARTS):
        parser.error("--write rewrites the whole section: it needs every part")
    torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = {"load": os.getloadavg(), "cap": args.cap, "brute_size": args.brute_size}
    planning = "planning" in args.parts
    results["planning"] = [planning_time(args.planning_model, args.planning_size, args.cap, log)] if planning else []
    results["accuracy"] = [row for name in args.models for row in accuracy(name, args.sizes, args.cap, log)] \
        if "accuracy" in args.parts else []
    results["brute"] = [versus_brute_force(name, args.brute_size, args.cap, log) for name in args.models] \
        if "brute" in args.parts else []
    results["planning"] += [planning_time(name, args.brute_size, args.cap, log) for name in args.models] if planning else []
    results["hand"] = [versus_hand_plan(name, size, merge, grid, log) for name, size, _, merge, grid, _ in STAGED
                       if args.hand_models is None or name in args.hand_models] if "hand" in args.parts else []
    results["load_end"] = os.getloadavg()
    command = "scripts/bench_planner.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(results, command.strip())
    print(section)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()
