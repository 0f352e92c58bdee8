"""Send images to a running model server and print the top-k: `splitpack client triton IMAGE...`.

Each entry of CLIENTS names a module defining ``add_client_arguments(parser)`` and
``client(args) -> int``.
"""
from __future__ import annotations

import importlib

CLIENTS = {
    "triton": "splitpack.triton_client",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="server", required=True)
    for name, module_name in CLIENTS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=f"call {name} over its client API")
        module.add_client_arguments(p)
        p.set_defaults(_client=module.client)


def run(args) -> int:
    return args._client(args)
