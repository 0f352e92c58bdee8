"""Errors raised by splitpack."""


class SplitError(RuntimeError):
    """A model (or an op in it) cannot be run with split-pack as requested.

    The message names the op, its module path and, where one exists, the
    latest merge layer before it that would work.
    """
