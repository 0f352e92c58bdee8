"""Send images to a running model server and print the top-k: `splitpack client triton IMAGE...`.

Each entry of CLIENTS names a module defining ``add_client_arguments(parser)`` and
``client(args) -> int``.
"""
from __future__ import annotations

from splitpack.cli import add_server_subcommands, run_server_subcommand

CLIENTS = {
    "triton": "splitpack.serving.triton.client",
}


def add_arguments(parser) -> None:
    add_server_subcommands(parser, CLIENTS, "add_client_arguments", "client", "call {name} over its client API")


run = run_server_subcommand
