#!/usr/bin/env python
"""Where a plan's time goes: its recorded program against the unsplit eager model, op by op (torch.profiler).

usage: scripts/profile_ops.py --model resnet50 --size 1024 \
           --plan layer2.0@32x1,layer3.0@16x1,layer4.0@8x1,global_pool.pool@8x1 [--threads 2] [--repeats 5] [--profiles 3]

Prints, as markdown: both models' wall time (interleaved, best of ``--repeats``, heap kept), then the median of
``--profiles`` profiled calls of each (interleaved): milliseconds per aten op (the eager model's ``conv2d`` / ``batch_norm`` / ``max_pool2d`` / ``add_``
counted as the program's ``convolution`` / ``native_batch_norm`` / ``max_pool2d_with_indices`` / ``add``), and the
convolutions by weight shape (calls, milliseconds, ratio): which layers' convolutions the packs make slower
or faster. The profiler adds its own overhead to both; compare the two columns, not against the wall time.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402

import splitpack  # noqa: E402
from splitpack.core.cost.time_model import latencies_and_faults  # noqa: E402
from splitpack.measure.heap import set_heap  # noqa: E402

SAME_OP = {"aten::conv2d": "aten::convolution", "aten::batch_norm": "aten::native_batch_norm",
           "aten::max_pool2d": "aten::max_pool2d_with_indices", "aten::add_": "aten::add"}
CONVOLUTION = "aten::convolution"


def wrap(model: torch.nn.Module, plan: str) -> torch.nn.Module:
    """``stage@grid,...`` as a recorded program."""
    stages = [s.rsplit("@", 1) for s in plan.split(",")]
    return splitpack.wrap(model, ",".join(layer for layer, _ in stages), grid=",".join(g for _, g in stages),
                          compile="program")


def profiled(module: torch.nn.Module, x: torch.Tensor) -> tuple[collections.Counter, dict]:
    """(ms per top-level op, {weight shape: (calls, ms)}) of one call."""
    with profile(record_shapes=True) as prof:
        module(x)
    ops, convs = collections.Counter(), collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        name = SAME_OP.get(event.name, event.name)
        ops[name] += event.cpu_time_total / 1e3
        if name == CONVOLUTION:
            weight = tuple(event.input_shapes[1])
            convs[weight][0] += 1
            convs[weight][1] += event.cpu_time_total / 1e3
    return ops, {w: tuple(c) for w, c in convs.items()}


def median_profile(runs: list[tuple[collections.Counter, dict]]) -> tuple[collections.Counter, dict]:
    """Per op and per weight shape, the median over ``runs`` (one call's profile is noisy)."""
    names = set().union(*(ops for ops, _ in runs))
    ops = collections.Counter({n: statistics.median(r[0][n] for r in runs) for n in names})
    convs = {w: (runs[0][1][w][0], statistics.median(r[1][w][1] for r in runs)) for w in runs[0][1]}
    return ops, convs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--plan", required=True, help="stage@grid,... e.g. layer2.0@32x1,global_pool.pool@8x1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profiles", type=int, default=3, help="profiled calls of each model (median)")
    parser.add_argument("--top", type=int, default=10, help="ops listed (largest difference first)")
    args = parser.parse_args(argv)

    set_heap("kept")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = splitpack.create_model(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    split = wrap(model, args.plan)
    with torch.no_grad():
        split(x), model(x)  # the program is recorded on its first call
        (unsplit_ms, split_ms), _ = latencies_and_faults([model, split], x, args.repeats)
        runs = [(profiled(model, x), profiled(split, x)) for _ in range(args.profiles)]
    (ops_u, convs_u), (ops_s, convs_s) = (median_profile([run[i] for run in runs]) for i in (0, 1))

    print(f"{args.model} @{args.size}, `{args.plan}`, {args.threads} thread(s): unsplit {unsplit_ms:.0f} ms, "
          f"program {split_ms:.0f} ms ({split_ms / unsplit_ms:.3f}x)\n")
    print("| op | unsplit ms | program ms | difference |\n|---|---|---|---|")
    for name in sorted(set(ops_u) | set(ops_s), key=lambda n: -abs(ops_s[n] - ops_u[n]))[:args.top]:
        print(f"| {name} | {ops_u[name]:.1f} | {ops_s[name]:.1f} | {ops_s[name] - ops_u[name]:+.1f} |")
    print("\n| convolution weight | unsplit calls / ms | program calls / ms | ratio |\n|---|---|---|---|")
    for weight in sorted(set(convs_u) | set(convs_s), key=lambda w: (w[2], w[0], w[1])):
        (cu, mu), (cs, ms) = convs_u.get(weight, (0, 0.0)), convs_s.get(weight, (0, 0.0))
        ratio = f"{ms / mu:.2f}x" if mu else "-"
        print(f"| {'x'.join(map(str, weight))} | {cu} / {mu:.1f} | {cs} / {ms:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
