"""Per-op region rules for exact split-pack execution (see :mod:`splitpack.core.capture.rules.base`).

Importing the package registers every rule: window ops (convolution, pooling, padding),
pointwise ops and layout changes, interpolation, and reductions.
"""
from splitpack.core.capture.rules import pointwise, reduce, resize, window  # noqa: F401  (registration)
from splitpack.core.capture.rules.base import (NCHW, Layout, MetaQuery, NoRule, OpContext, Pointwise, Reduce, Region, Rule,
                                       Window, make_rule, mutates_input, register_function, register_method, register_module,
                                       spatial_dims)

__all__ = ["NCHW", "Layout", "MetaQuery", "NoRule", "OpContext", "Pointwise", "Reduce", "Region", "Rule", "Window",
           "make_rule", "mutates_input", "register_function", "register_method", "register_module", "spatial_dims"]
