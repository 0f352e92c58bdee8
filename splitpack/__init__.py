"""splitpack: split-pack inference for image CNNs.

Split the input image into a grid of packs, run the memory-heavy early layers
one pack at a time, merge the pack activations at a merge layer, and finish
the network once. ``mode="exact"`` gives each pack the halo its receptive
field needs, so outputs equal the unsplit model's; ``mode="seed"`` is the
poster's no-halo split.

The names below are imported on first use (PEP 562), so that ``import splitpack``
alone does not import torch: commands that only manage servers (``splitpack serve
SERVER stop|status``) answer in a fraction of a second.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from splitpack.errors import SplitError

if TYPE_CHECKING:
    from splitpack.core.engine import SplitPack, merge_layers, wrap
    from splitpack.core.search.planner import plan_for
    from splitpack.models import create_model

_LAZY = {"SplitPack": "splitpack.core.engine", "merge_layers": "splitpack.core.engine",
         "wrap": "splitpack.core.engine", "plan_for": "splitpack.core.search.planner",
         "create_model": "splitpack.models"}
__all__ = ["SplitError", "SplitPack", "create_model", "merge_layers", "plan_for", "wrap"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'splitpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
