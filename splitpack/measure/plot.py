"""matplotlib for the ``--png`` plots (profile, capacity, evaluate, seams): an optional extra."""
from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend; ImportError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plots need matplotlib: pip install 'splitpack[plot]' ({err})") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
