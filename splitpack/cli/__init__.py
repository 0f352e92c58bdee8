"""``splitpack`` command line: one sub-command per module of this package.

Each module named in COMMANDS defines ``add_arguments(parser)`` and
``run(args) -> int``; the first line of its docstring is the help text.

The convention every command follows (checked by tests/test_cli.py):

* a user error (bad argument, unknown merge layer, missing file, missing pip
  extra) prints ``splitpack CMD: error: ...`` on stderr, no traceback, exit 2;
* a server that cannot start or a model that does not load prints the same
  prefix and exits 1;
* the same spellings everywhere: ``--model``, ``--merge-layer``, ``--grid RxC``,
  ``--batch-size``, ``--json`` (print JSON on stdout), ``--out`` (where results go);
* nothing is written when a command fails (outputs are built in a temporary
  place and moved into place last, see :mod:`splitpack.publish`).

``SPLITPACK_DEBUG=1`` shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from splitpack.argtypes import arg_type  # noqa: F401 (every command's argparse types)

COMMANDS = {
    "bench": "splitpack.cli.bench",
    "archive": "splitpack.cli.archive",
    "demo": "splitpack.cli.demo",
    "triton-repo": "splitpack.cli.triton_repo",
    "serve": "splitpack.cli.serve",
    "client": "splitpack.cli.client",
    "devices": "splitpack.cli.devices",
    "profile": "splitpack.cli.profile",
    "capacity": "splitpack.cli.capacity",
    "plan": "splitpack.cli.plan",
    "calibrate": "splitpack.cli.calibrate",
    "replica-probe": "splitpack.cli.replica_probe",
    "evaluate": "splitpack.cli.evaluate",
    "seams": "splitpack.cli.seams",
    "export": "splitpack.cli.export",
}
USER_ERROR_STATUS = 2
FAILURE_STATUS = 1


class UsageError(Exception):
    """Raised by a command for a user error that is not a ValueError (exit 2)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something impossible: message, no traceback, exit 2."""
    from splitpack.errors import SplitError

    return (UsageError, ValueError, SplitError, ImportError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, FileExistsError)


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
        p.set_defaults(_run=module.run, _parser=p)
        module.add_arguments(p)
    return parser


def _show_warning(prog: str, default):
    """splitpack's own warnings (e.g. "random weights") in the CLI's style; others as Python shows them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if "splitpack" not in str(filename):
            return default(message, category, filename, lineno, file, line)
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)
    return show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args, unknown = build_parser(command).parse_known_args(argv)
    if unknown:  # reported by the sub-command's parser, so the message names the command
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = args._parser.prog
    from splitpack.errors import ServerError

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning(prog, warnings.showwarning)
        try:
            return args._run(args) or 0
        except user_errors() as err:
            if os.environ.get("SPLITPACK_DEBUG"):
                raise
            print(f"{prog}: error: {err}", file=sys.stderr)
            return USER_ERROR_STATUS
        except ServerError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return FAILURE_STATUS


if __name__ == "__main__":
    sys.exit(main())
