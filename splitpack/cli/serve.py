"""Start, stop or probe a model server on 127.0.0.1: `splitpack serve BACKEND start|stop|status [--probe]`."""
from __future__ import annotations

import argparse
import json

from splitpack.cli import arg_type
from splitpack.cli.common import positive_int
from splitpack.serving import health
from splitpack.serving.backend import backends, get


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="server", required=True)
    for backend in backends().values():
        if backend.server is None:  # writes configs only (splitpack capacity --write-NAME)
            continue
        p = sub.add_parser(backend.name, help=backend.help)
        p.set_defaults(_parser=p)
        add_common_arguments(p)
        backend.add_arguments(p)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What every backend's start/stop/status takes."""
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--probe", action="store_true",
                        help="status: run one real inference per model; exit 0 healthy, 1 a model failed, "
                             "3 not running (a Kubernetes exec probe)")
    parser.add_argument("--json", action="store_true", help="status: print the result as JSON on stdout")
    parser.add_argument("--threads", type=arg_type(positive_int, "threads"), default=None,
                        help="start: torch threads per worker/instance (default: the cores / all of them; "
                             "a model's own `threads` setting wins)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness / exit")


def run(args: argparse.Namespace) -> int:
    backend = get(args.server)
    server = backend.server(args)
    if args.action == "start":
        for line in backend.start(server, args):
            print(line)
        return 0
    if args.action == "stop":
        pid = server.pid()
        print(f"{backend.title} stopped (pid {pid})" if server.stop(args.timeout) else f"{backend.title} is not running")
        return 0
    return report_status(server, args)


def report_status(server, args: argparse.Namespace) -> int:
    """``status [--probe]``: print what runs (and the probe per model); the exit code probes read."""
    summary = server.status()
    if summary.get("pid") is None:
        error = summary.get("error")
        print(json.dumps({"running": False, "error": error}) if args.json else
              "not running" + (f" (last start failed: {error})" if error else ""))
        return health.NOT_RUNNING
    results = server.probe() if args.probe else []
    if args.json:
        print(json.dumps(summary | {"running": True, "probe": [r.as_dict() for r in results]}, indent=2))
    else:
        print(json.dumps(summary, indent=2))
        for result in results:
            print(result.line())
    return health.exit_code(results) if args.probe else health.HEALTHY
