"""``splitpack`` command line: one sub-command per module.

Each module named in COMMANDS defines ``add_arguments(parser)`` and
``run(args) -> int``; the first line of its docstring is the help text.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": "splitpack.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitpack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
