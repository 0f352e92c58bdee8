"""Errors raised by splitpack."""


class SplitError(RuntimeError):
    """A model (or an op in it) cannot be run with split-pack as requested.

    The message names the op, its module path and, where one exists, the
    latest merge layer before it that would work.
    """


class ServerError(RuntimeError):
    """A model server could not be found, started or stopped, or a model did not load.

    Not the user's input: the CLI reports it with exit status 1 (user errors exit 2).
    """
