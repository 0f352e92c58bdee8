"""The schema's CLI flags: one ``--flag`` per serving parameter (splitpack.serving.config.PARAMS)."""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from splitpack.cli import arg_type
from splitpack.serving.config import PARAMS, SERVERS, Param, boolean, params_for


def add_flags(parser: argparse.ArgumentParser, server: str | None, *, exclude: tuple[str, ...] = (),
              defaults: Mapping[str, Any] | None = None, params: tuple[Param, ...] = PARAMS) -> None:
    """One flag per parameter ``server`` uses (None: either server). A flag left out stays None, so
    :func:`given` tells what the user set; defaults come from the schema when the settings are built
    (``defaults``: a command's own, shown in the help instead)."""
    for p in params_for(server, params=params):
        if p.name in exclude:
            continue
        default = p.text(p.default_for(server))
        if (defaults or {}).get(p.name) is not None:
            default = p.text(defaults[p.name])
        elif server is None and p.server_defaults:
            default = ", ".join(f"{p.text(p.default_for(s))} ({s})" for s in SERVERS if s in p.servers)
        help_text = p.help if p.name == "model_name" else f"{p.help} (default: {default or 'none'})"
        if p.parse is boolean:
            parser.add_argument(p.cli_flag, dest=p.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        parser.add_argument(p.cli_flag, dest=p.name, type=arg_type(p.read, p.name), default=None,
                            choices=p.choices, metavar=p.metavar, help=help_text)


def given(args: argparse.Namespace, section: str | None = None, params: tuple[Param, ...] = PARAMS) -> dict[str, Any]:
    """The schema parameters set on the command line (the others are None)."""
    return {p.name: getattr(args, p.name) for p in params
            if getattr(args, p.name, None) is not None and (section is None or p.section == section)}
