#!/usr/bin/env python
"""Rewrite the parameter table of docs/parameters.md from the schema (splitpack.serving.config.PARAMS)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from splitpack.serving.config import markdown_table  # noqa: E402

DOC = ROOT / "docs" / "parameters.md"
BLOCK = re.compile(r"(<!-- parameters:begin[^>]*-->\n).*?(<!-- parameters:end -->)", re.S)


def render(text: str) -> str:
    if not BLOCK.search(text):
        raise SystemExit(f"{DOC}: no <!-- parameters:begin --> ... <!-- parameters:end --> block")
    return BLOCK.sub(lambda m: m.group(1) + markdown_table() + m.group(2), text)


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote the parameter table of {DOC}")
