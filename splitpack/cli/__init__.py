"""``splitpack`` command line: one sub-command per module.

Each module named in COMMANDS defines ``add_arguments(parser)`` and
``run(args) -> int``; the first line of its docstring is the help text.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS = {
    "bench": "splitpack.experiments.bench",
    "archive": "splitpack.serving.torchserve.archive",
    "demo": "splitpack.cli.demo",
    "triton-repo": "splitpack.serving.triton.repo",
    "serve": "splitpack.cli.serve",
    "client": "splitpack.cli.client",
    "devices": "splitpack.measure.devices",
    "profile": "splitpack.measure.profile",
    "capacity": "splitpack.capacity.planner",
    "evaluate": "splitpack.experiments.evaluate",
    "seams": "splitpack.experiments.seams",
}


def add_server_subcommands(parser, registry: dict[str, str], add_name: str, run_name: str, help_fmt: str) -> None:
    """One sub-command per server in ``registry`` (name -> module with ``add_name``/``run_name`` functions)."""
    sub = parser.add_subparsers(dest="server", required=True)
    for name, module_name in registry.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_fmt.format(name=name))
        getattr(module, add_name)(p)
        p.set_defaults(_server_run=getattr(module, run_name))


def standalone(prog: str, doc: str | None, add: Callable, run: Callable, argv: list[str] | None = None) -> int:
    """``python -m MODULE ...`` for one command module, without importing the other commands."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    add(parser)
    return run(parser.parse_args(argv))


def run_server_subcommand(args) -> int:
    return args._server_run(args)


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (a broken command cannot break the others)."""
    parser = argparse.ArgumentParser(prog="splitpack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        if command is not None and name != command:
            sub.add_parser(name)
            continue
        module = _load(name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
