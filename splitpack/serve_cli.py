"""Start or stop a model server: `splitpack serve triton|torchserve start|stop|status`.

Each entry of SERVERS names a module defining ``add_serve_arguments(parser)`` and
``serve(args) -> int``.
"""
from __future__ import annotations

import importlib

SERVERS = {
    "triton": "splitpack.triton_server",
    "torchserve": "splitpack.torchserve",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="server", required=True)
    for name, module_name in SERVERS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=f"{name} server")
        module.add_serve_arguments(p)
        p.set_defaults(_serve=module.serve)


def run(args) -> int:
    return args._serve(args)
