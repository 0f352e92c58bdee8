"""How a plan runs (``compile=``): the words, without torch, so that server configs and the CLI check them
without importing it."""
from __future__ import annotations

from typing import Any

OFF, PROGRAM, INDUCTOR = "off", "program", "inductor"
MODES = (OFF, PROGRAM, INDUCTOR)
_ALIASES = {"false": OFF, "none": OFF, "no": OFF, "0": OFF, "": OFF, "true": INDUCTOR, "yes": INDUCTOR,
            "1": INDUCTOR, "graph": PROGRAM}


def compile_mode(value: Any) -> str:
    """``compile=`` -> one of :data:`MODES`: False/None/"off" interprets the plan (the reference path),
    "program" runs the recorded straight-line program, True/"inductor" that program through torch.compile."""
    if value is None or isinstance(value, bool):
        return INDUCTOR if value else OFF
    word = str(value).strip().lower()
    word = _ALIASES.get(word, word)
    if word not in MODES:
        raise ValueError(f"compile: expected one of {', '.join(MODES)} (or true/false), got {value!r}")
    return word
