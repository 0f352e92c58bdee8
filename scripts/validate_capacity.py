#!/usr/bin/env python
"""Capacity under a real memory limit (CPU): plan, validate inside a memory cgroup, print a BENCHMARKS.md row.

    python scripts/validate_capacity.py --model resnet50 --size 1024 --memory-limit 3GiB --server torchserve \
        --out bench_results/capacity_resnet50_1024.json

Runs `splitpack capacity --memory-limit ... --device cpu --validate --json` (the planned shape, then the
unsplit model in the same shape, each for --duration seconds with as many clients as images in flight),
keeps its JSON and prints the table row. Exit 2 where no memory cgroup can be made.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 2**30


def row(plan: dict, command: str) -> str:
    v = plan["validation"]
    split, unsplit = v["planned"], v.get("unsplit_same_shape") or {}
    rec = plan["recommended"]

    def outcome(run: dict) -> str:
        if not run:
            return "-"
        if not run.get("started", True):
            return f"did not start ({run['oom_kills']} OOM kills)"
        return (f"{run['served']} served / {run['failed']} failed, {run['oom_kills']} OOM kills, "
                f"peak {run['peak_usage_bytes'] / GiB:.2f} GiB")

    return (f"| {plan['model']} @{plan['size']} | {plan['server']} | {plan['memory_limit_bytes'] / GiB:g} GiB | "
            f"{rec['replicas']} x {rec['batch_size']} | {plan['inflight_images_split']} vs "
            f"{plan['inflight_images_unsplit']} | {plan['predicted_usage_bytes'] / GiB:.2f} / "
            f"{split['peak_usage_bytes'] / GiB:.2f} GiB | {split.get('served', 0)} / {split.get('failed', 0)} / "
            f"{split['oom_kills']} | {split.get('images_per_s') or 0:.2f} | {outcome(unsplit)} | `{command}` |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--memory-limit", required=True)
    parser.add_argument("--server", default="torchserve", choices=["torchserve", "triton"])
    parser.add_argument("--duration", default="60")
    parser.add_argument("--out", type=Path, help="write the plan + validation JSON here")
    args, extra = parser.parse_known_args(argv)
    from splitpack import cli

    argv = ["capacity", "--model", args.model, "--size", args.size, "--memory-limit", args.memory_limit,
            "--device", "cpu", "--server", args.server, "--validate", "--duration", args.duration, "--json", *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    if code != 0:
        return code
    plan = json.loads(out.getvalue())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(plan, indent=2))
    given = ["--model", args.model, "--size", args.size, "--memory-limit", args.memory_limit, "--server", args.server,
             *(["--duration", args.duration] if args.duration != "60" else []), *extra]
    command = "python scripts/validate_capacity.py " + " ".join(map(shlex.quote, given))
    print(row(plan, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
