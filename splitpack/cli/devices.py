"""Show GPU memory (total/used/free, per process) through NVML, or host memory without a driver."""
from __future__ import annotations

import argparse
import json

from splitpack.measure.nvml import DeviceReport, query_devices
from splitpack.measure.units import format_bytes as _fmt


def format_report(report: DeviceReport) -> str:
    lines = []
    if report.nvml_available and report.gpus:
        lines.append(f"NVIDIA driver {report.driver_version}, {len(report.gpus)} GPU(s)")
        for g in report.gpus:
            lines.append(f"GPU {g.index}  {g.name}  total {_fmt(g.total_bytes)}  used {_fmt(g.used_bytes)}"
                         f"  free {_fmt(g.free_bytes)}")
            for p in g.processes:
                lines.append(f"    pid {p.pid:<8} {p.name:<24} {_fmt(p.used_bytes)}")
            if not g.processes:
                lines.append("    no compute processes")
    else:
        lines.append(f"No GPU memory to report: {report.fallback_reason}. Showing host memory instead.")
    h = report.host
    lines.append(f"host: total {_fmt(h.total_bytes)}  used {_fmt(h.used_bytes)}  "
                 f"available {_fmt(h.available_bytes)}  (this process RSS {_fmt(h.process_rss_bytes)})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = query_devices()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
