"""Measure split-pack against the unsplit model: peak activation memory, error and latency."""
from __future__ import annotations

import argparse
import json

import torch

from splitpack.cli import arg_type, common
from splitpack.core.compile.modes import MODES as COMPILE_MODES
from splitpack.experiments.bench import bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "measure")
    common.add_input(parser)
    common.add_split(parser, required=True)
    parser.add_argument("--repeats", type=arg_type(common.positive_int, "repeats"), default=3,
                        help="timed runs, interleaved (best reported; default: 3)")
    common.add_device(parser)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off",
                        help="exact mode: off (interpret the plan), program (the recorded straight-line program) "
                             "or inductor (that program through torch.compile); default: off")
    common.add_json(parser, "one JSON object")


def run(args: argparse.Namespace) -> int:
    model, spec = common.build_model(args)
    result = bench(spec.title, args.size, args.merge_layer, args.grid, args.mode, args.batch_size, args.repeats,
                   args.device, getattr(torch, args.dtype), model=model, compile=args.compile)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']} @{result['size']} batch {result['batch_size']}  merge {result['merge_layer']} "
          f"grid {result['grid']} {result['mode']}")
    print(f"  peak activations {result['baseline_peak_bytes'] / 2**20:.1f} MiB -> "
          f"{result['split_peak_bytes'] / 2**20:.1f} MiB  ({result['memory_ratio']:.2f}x lower)")
    print(f"  latency {result['baseline_ms']:.1f} ms -> {result['split_ms']:.1f} ms "
          f"({result['latency_ratio']:.2f}x)   max abs error {result['max_abs_error']:.2e}")
    if result["macs_ratio"] is not None:
        print(f"  convolution MACs {result['macs_unsplit'] / 1e9:.2f} G -> {result['macs_split'] / 1e9:.2f} G "
              f"({result['macs_ratio']:.2f}x: halos and second passes)")
        for stage in result["stages"]:
            print(f"    {stage['checkpoint']} @{stage['grid']}: {stage['passes']} pass(es), checkpoint "
                  f"{stage['checkpoint_bytes'] / 2**20:.2f} MiB")
    for plan in result["compiled"] or ():
        first = ", ".join(f"batch {b}: {s:.1f} s" for b, s in plan["first_call_s"].items())
        print(f"  compile={plan['mode']}: {plan['ops']} ops recorded in {plan['record_s']:.1f} s; first call {first}")
    return 0
