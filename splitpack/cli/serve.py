"""Start or stop a model server: `splitpack serve triton|torchserve start|stop|status`.

Each entry of SERVERS names a module defining ``add_serve_arguments(parser)`` and
``serve(args) -> int``.
"""
from __future__ import annotations

from splitpack.cli import add_server_subcommands, run_server_subcommand

SERVERS = {
    "triton": "splitpack.serving.triton.server",
    "torchserve": "splitpack.serving.torchserve.archive",
}


def add_arguments(parser) -> None:
    add_server_subcommands(parser, SERVERS, "add_serve_arguments", "serve", "{name} server")


run = run_server_subcommand
