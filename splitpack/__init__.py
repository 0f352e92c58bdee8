"""splitpack: split-pack inference for image CNNs.

Split the input image into a grid of packs, run the memory-heavy early layers
one pack at a time, merge the pack activations at a merge layer, and finish
the network once. ``mode="exact"`` gives each pack the halo its receptive
field needs, so outputs equal the unsplit model's; ``mode="seed"`` is the
poster's no-halo split.
"""
from splitpack.errors import SplitError
from splitpack.core.engine import SplitPack, merge_layers, wrap
from splitpack.core.search.planner import plan_for
from splitpack.models import create_model

__all__ = ["SplitError", "SplitPack", "create_model", "merge_layers", "plan_for", "wrap"]
__version__ = "0.1.0"
