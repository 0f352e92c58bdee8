"""What runs a SplitPack's forward: the interpreter (None), its compiled programs, or CUDA graphs of them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from splitpack.core.compile.cudagraphs import GraphedPlans
from splitpack.core.compile.recording import DEFAULT_MAX_BATCH, OFF, PROGRAM, CompiledPlans, compile_mode

if TYPE_CHECKING:
    from splitpack.core.execute.module import SplitPack


def compiled_runner(split: "SplitPack", mode: str, cuda_graphs: bool = False,
                    max_batch: int = DEFAULT_MAX_BATCH) -> Callable | None:
    """What runs ``split``'s forward: None (the interpreter), its compiled programs, or CUDA graphs of them
    (batch buckets up to ``max_batch``)."""
    mode = compile_mode(mode)
    if mode == OFF and not cuda_graphs:
        return None
    if split.mode != "exact":
        raise ValueError("compile and cuda_graphs need mode='exact' (seed mode is interpreted)")
    plans = CompiledPlans(split, PROGRAM if mode == OFF else mode)
    if not cuda_graphs:
        return plans
    return GraphedPlans(plans, max_batch)
