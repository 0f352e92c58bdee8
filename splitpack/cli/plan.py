"""Choose a staged plan (merge layers and grids) from the cost model, under a memory budget, a MACs or a latency cap."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from splitpack.cli import UsageError, arg_type, common
from splitpack.measure.units import parse_bytes

DTYPES = ("float32", "float16", "bfloat16", "float64")


def overhead(text: str) -> float:
    value = float(text.strip().rstrip("xX"))
    if not value >= 1:
        raise ValueError(f"must be a MACs ratio >= 1 (split / unsplit), got {text}")
    return value


def latency(text: str) -> float:
    from splitpack.serving.config import latency_ratio

    value = latency_ratio(text)
    if value is None:
        raise ValueError(f"must be a latency ratio > 0 (split / unsplit), got {text}")
    return value


def budget(text: str) -> int:
    value = parse_bytes(text)
    if value <= 0:
        raise ValueError(f"must be a positive memory size, got {text}")
    return value


def png_path(text: str) -> str:
    if Path(text).suffix.lower() != ".png":
        raise ValueError(f"--png writes the front's plot: a .png file, got {text}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "plan with")
    common.add_input(parser)
    parser.add_argument("--budget", type=arg_type(budget, "memory size"), metavar="SIZE",
                        help="peak activation memory allowed for the batch (2GiB, 512MB, ...): the plan with the "
                             "fewest MACs within it")
    parser.add_argument("--max-overhead", type=arg_type(overhead, "MACs ratio"), metavar="RATIO",
                        help="MACs allowed as a ratio to the unsplit model: the plan with the smallest peak within "
                             "it (default 1.25 without --budget or --max-latency)")
    parser.add_argument("--max-latency", type=arg_type(latency, "latency ratio"), metavar="RATIO",
                        help="latency allowed as a ratio to the unsplit model on this device, predicted by the "
                             "device's time model (calibrated on first use, see `splitpack calibrate`): the plan "
                             "with the smallest peak within it; with --budget the fewest predicted seconds within "
                             "the budget")
    parser.add_argument("--measure-latency", action="store_true",
                        help="with --max-latency: also time a few candidate plans on this device, each against the "
                             "unsplit model, and keep the smallest peak measured within --max-latency less a 10%% margin "
                             "(timed twice)")
    parser.add_argument("--compile", choices=("off", "program"), default="program",
                        help="how the plan's latency is predicted to run: interpreted (off) or as a recorded "
                             "program (default)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_device(parser)
    parser.add_argument("--no-measure", action="store_true",
                        help="skip measuring the chosen plan and the unsplit model (prediction only)")
    common.add_json(parser, "the plan, the front and the measurement")
    parser.add_argument("--png", "--out", dest="out", type=arg_type(png_path, "png"), metavar="FILE.png",
                        help="plot the front (peak vs MACs ratio) with the chosen plan here")


def run(args: argparse.Namespace) -> int:
    from splitpack.experiments.plan_report import format_report, plot_front, plan_report

    if args.out:
        from splitpack.measure.plot import pyplot

        pyplot()  # a missing plot extra is reported before minutes of planning
    model, spec = common.build_model(args)
    if args.measure_latency and (args.max_latency is None or args.budget is not None):
        raise UsageError("--measure-latency measures candidates for --max-latency alone (without --budget)")
    report = plan_report(spec.title, args.size, args.batch_size, args.budget, args.max_overhead, args.device,
                         getattr(torch, args.dtype), measure=not args.no_measure, model=model,
                         max_latency=args.max_latency, latency_mode="interpreter" if args.compile == "off" else "program",
                         measure_latency=args.measure_latency)
    if args.out:
        common.write_plot(args.out, lambda path: plot_front(report, path))
        report["png"] = args.out
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
