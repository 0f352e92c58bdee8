"""TorchServe handler for split-pack inference (entry point for `torch-model-archiver --handler`).

The handler itself ships inside the package, so an installed splitpack archives models
without a checkout: see :mod:`splitpack.serving.torchserve.handler`. This file is the
same class for operators who run torch-model-archiver by hand from a checkout.
"""
from splitpack.serving.torchserve.handler import *  # noqa: F401,F403
from splitpack.serving.torchserve.handler import SplitPackHandler  # noqa: F401
