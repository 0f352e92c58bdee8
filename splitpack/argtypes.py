"""argparse types from value parsers, shared by the CLI and the backends' own ``splitpack serve`` flags."""
from __future__ import annotations

import argparse


def arg_type(parse, name: str | None = None):
    """An argparse ``type=`` from a parser that raises ValueError: its message becomes argparse's."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name or getattr(parse, "__name__", "value")
    return convert


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value
