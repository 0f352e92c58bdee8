"""The schema's CLI flags: one ``--flag`` per serving parameter (splitpack.serving.config.PARAMS)."""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from splitpack.argtypes import arg_type
from splitpack.serving.config import PARAMS, SERVERS, Param, boolean, params_for


def add_flags(parser: argparse.ArgumentParser, server: str | None, *, exclude: tuple[str, ...] = (),
              defaults: Mapping[str, Any] | None = None, params: tuple[Param, ...] = PARAMS) -> None:
    """One flag per parameter ``server`` uses (None: either server). A flag left out stays None, so
    :func:`given` tells what the user set; defaults come from the schema when the settings are built
    (``defaults``: a command's own, shown in the help instead)."""
    for p in params_for(server, params=params):
        if p.name in exclude:
            continue
        shown = p.text(p.default_for(server))
        if (defaults or {}).get(p.name) is not None:
            shown = p.text(defaults[p.name])
        elif server is None and p.server_defaults:
            shown = ", ".join(f"{p.text(p.default_for(s))} ({s})" for s in SERVERS if s in p.servers)
        add_param(parser, p, shown=shown)


def add_param(parser: argparse.ArgumentParser, p: Param, *, default: Any = None, shown: str | None = None,
              required: bool = False, help: str | None = None) -> None:
    """The flag of one schema parameter: every command declares a serving parameter's flag through here,
    so its spelling, parser and help are the schema's. ``shown``: the default the help names
    (default: ``default``'s text); ``help``: the schema's text unless a command means something narrower."""
    help_text = help or p.help
    if p.name != "model_name" and not required:
        help_text += f" (default: {(p.text(default) if shown is None else shown) or 'none'})"
    if p.parse is boolean:
        parser.add_argument(p.cli_flag, dest=p.name, action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
        return
    parser.add_argument(p.cli_flag, dest=p.name, type=arg_type(p.read, p.name), default=default,
                        required=required, choices=p.choices, metavar=p.metavar, help=help_text)


def given(args: argparse.Namespace, section: str | None = None, params: tuple[Param, ...] = PARAMS) -> dict[str, Any]:
    """The schema parameters set on the command line (the others are None)."""
    return {p.name: getattr(args, p.name) for p in params
            if getattr(args, p.name, None) is not None and (section is None or p.section == section)}
