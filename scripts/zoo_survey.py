#!/usr/bin/env python
"""The zoo survey: the planner's plan (merge_layer auto, default objective) for each model of the zoo.

usage: scripts/zoo_survey.py [--models M ...] [--size 512] [--float64] [--json benchmarks/zoo.json]
                             [--max-latency 1.3 [--measure-latency] [--repeats 5] [--clock wall|cpu]]
                             [--heap kept|default]

Per model (random weights, fp32, batch 1): the planner's plan at --size, the unsplit and split peak
activation memory measured by the CPU tracker (splitpack.measure.meter) and their ratio, the MACs
ratio read off the plan's program, the predicted peak against the measured one, and exactness: the
split output against the unsplit one in fp32 (max |split - unsplit| / max |unsplit|) and, with
--float64, the same plan run in float64 (random-weight fp32 networks amplify rounding; float64 shows
a wrong halo at the 1e-2 level and rounding at 1e-16). A model exact mode cannot plan gets a row with
the error. Prints a markdown table (BENCHMARKS.md's zoo section) and writes the rows as JSON.

Memory and MACs do not depend on the machine's load; measurements run with one torch thread.
With --max-latency the planner's objective is the smallest peak within that predicted latency ratio
(the device's time model, splitpack.core.cost.time_model), and each row adds the predicted latency ratio
and the measured one: the plan as a recorded program (compile="program") against the unsplit eager model,
interleaved, best of --repeats (--clock cpu: the process's CPU time, for a loaded machine). With
--measure-latency the planner times candidate plans itself (``measure_latency``: the smallest peak *measured*
within the limit) and the row keeps what it measured beside the survey's own measurement, taken afterwards.
--heap: the C heap keeps freed memory ("kept", the default: no page faults per call for either model) or
runs with glibc's adaptive thresholds ("default"); splitpack.measure.heap.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import splitpack  # noqa: E402
from bench_planner import measured_peak  # noqa: E402
from splitpack.core.cost.time_model import latencies_and_faults  # noqa: E402
from splitpack.core.search.planner import MEASURED_PLANS, Planner  # noqa: E402
from splitpack.experiments.bench import in_fresh_processes, planner_measurements  # noqa: E402
from splitpack.measure.heap import HEAP_HELP, HEAP_MODES  # noqa: E402
from splitpack.measure.meter import peak_activation_bytes  # noqa: E402
from splitpack.measure.units import MiB  # noqa: E402

ZOO = ("resnet50", "resnet18", "seresnet50", "resnext50_32x4d", "mobilenetv2_100", "mobilenetv3_large_100",
       "efficientnet_b0", "tf_efficientnet_lite0", "efficientnetv2_rw_s", "convnext_tiny", "regnetx_016",
       "regnety_016", "densenet121", "vgg16", "cspdarknet53", "ghostnet_100", "mnasnet_100", "rexnet_100",
       "repvgg_a2", "hrnet_w18_small", "dla34", "inception_v3", "res2net50_14w_8s", "ese_vovnet19b_dw",
       "fbnetc_100", "nf_resnet50", "tresnet_m", "mixnet_s")
F64_TOL = 1e-10  # tests/conftest.py's float64 exactness bound


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def split_error(model, plan, x: torch.Tensor, **execution) -> float:
    """Split vs unsplit on ``x`` in the model's dtype (the plan is traced again for it)."""
    with torch.inference_mode():
        return rel_error(splitpack.SplitPack(model, plan, **execution)(x), model(x))


def latency(row: dict, model, planner: Planner, choice, x: torch.Tensor, repeats: int, clock) -> None:
    """The predicted latency ratio, and the measured one of the plan as a recorded program."""
    split = splitpack.SplitPack(model, choice.plan, compile="program", traced=planner.traced, **choice.execution_kwargs)
    (unsplit_ms, split_ms), faults = latencies_and_faults([model, split], x, repeats, clock)
    row.update(predicted_latency_ratio=choice.predicted_latency_ratio, measured_latency_ratio=split_ms / unsplit_ms,
               unsplit_ms=unsplit_ms, split_ms=split_ms, page_faults_per_call=faults)


def survey(name: str, size: int, float64: bool, max_latency: float | None = None, repeats: int = 5,
           clock=time.perf_counter, measure: int = 0) -> dict:
    torch.manual_seed(0)
    model = splitpack.create_model(name).eval()
    shape = (1, 3, size, size)
    row = {"model": name, "size": size}
    start = time.perf_counter()
    try:
        planner = Planner(model)
        choice = planner.choose(shape, max_latency=max_latency, measure=measure)
    except (splitpack.SplitError, ValueError) as err:
        return {**row, "error": f"{type(err).__name__}: {err}"}
    x = torch.randn(shape)
    unsplit = peak_activation_bytes(model, x)
    run = choice.execution_kwargs  # what was predicted is what is measured
    split = measured_peak(model, planner.traced, choice.plan, shape, **run)
    row.update(plan=str(choice.plan), stages=len(choice.plan.stages), **run,
               unsplit_peak=unsplit, split_peak=split,
               memory_ratio=unsplit / split, macs_ratio=choice.predicted_macs_ratio,
               predicted_peak=choice.predicted_peak_bytes, prediction_error=choice.predicted_peak_bytes / split - 1,
               fp32_error=split_error(model, choice.plan, x, **run), planning_seconds=choice.seconds)
    row.update(planner_measurements(choice))
    if max_latency is not None:
        latency(row, model, planner, choice, x, repeats, clock)
    if float64:
        row["float64_error"] = split_error(model.double(), choice.plan, x.double(), **run)
        row["exact"] = row["float64_error"] <= F64_TOL
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows: list[dict]) -> str:
    timed = any("measured_latency_ratio" in r for r in rows)
    lines = ["| model | plan | unsplit MiB | split MiB | memory ratio | MACs ratio | predicted / measured peak | "
             "fp32 error | float64 error |" + (" latency predicted / measured |" if timed else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | not planned: {r['error'][:160]} | - | - | - | - | - | - | - |"
                         + (" - |" if timed else ""))
            continue
        f64 = f"{r['float64_error']:.1e}" if "float64_error" in r else "not run"
        planner = f" (planner {r['planner_measured_ratio']:.2f}x)" if r.get("planner_measured_ratio") else ""
        f64 += f" | {r['predicted_latency_ratio']:.2f}x / **{r['measured_latency_ratio']:.2f}x**{planner}" if timed else ""
        lines.append(f"| {r['model']} | {r['stages']} stages | {r['unsplit_peak'] / MiB:.1f} | {r['split_peak'] / MiB:.1f} | "
                     f"**{r['memory_ratio']:.2f}x** | {r['macs_ratio']:.2f}x | "
                     f"{r['predicted_peak'] / MiB:.1f} / {r['split_peak'] / MiB:.1f} ({r['prediction_error']:+.1%}) | "
                     f"{r['fp32_error']:.1e} | {f64} |")
    return "\n".join(lines)


def survey_in_process(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    row = survey(name, args.size, args.float64, args.max_latency, args.repeats,
                 time.process_time if args.clock == "cpu" else time.perf_counter,
                 MEASURED_PLANS if args.measure_latency else 0)
    return {**row, "heap": args.heap}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ZOO), metavar="M", help="a subset (default: the whole zoo)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--float64", action="store_true", help="also check exactness with the model in float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/zoo.json")
    p.add_argument("--max-latency", type=float, help="plan the smallest peak within this predicted latency ratio and "
                   "measure the plan's latency (compile='program') against the unsplit model")
    p.add_argument("--measure-latency", action="store_true",
                   help="--max-latency: the planner times candidate plans and keeps the smallest peak measured within")
    p.add_argument("--repeats", type=int, default=5, help="--max-latency: timed runs each, interleaved, best kept")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="--max-latency: the wall clock, or the process's CPU time (one thread, a loaded machine)")
    p.add_argument("--heap", choices=HEAP_MODES, default="kept", help=HEAP_HELP)
    args = p.parse_args()
    rows = []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for row in tqdm(in_fresh_processes(survey_in_process, args.models, args, heap=args.heap),
                    total=len(args.models), desc="zoo", file=sys.stderr):
        rows.append(row)
        tqdm.write(json.dumps(row), file=sys.stderr)
        # after every model: a long survey stopped early still leaves the rows it measured
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(table(rows))
    for r in rows:
        if "plan" in r:
            print(f"- {r['model']}: `{r['plan']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
