"""CUDA graphs for fixed-size serving: one captured graph per input size and batch bucket, replayed.

A split-pack program launches hundreds of small kernels per image (every pack
runs the head's layers on a tile); a CUDA graph launches them all at once. A
graph replays fixed shapes, so batches are grouped into *buckets*
(:func:`batch_buckets`: 1, 2, 4, ... up to the largest batch served): a batch of
3 runs the bucket-4 graph on its 3 images plus one zero row, and the extra row
is cut off the output.

What needs no GPU lives here as plain functions and bookkeeping (buckets,
padding, which (size, bucket) pairs are captured, the fallbacks) and is tested
on the CPU; :func:`capture` and :class:`Graphed` need CUDA.

Fallbacks (the recorded program runs instead, with the reason logged once):
a CPU input, or a batch larger than the largest bucket.

Memory: all graphs of a module share one memory pool (the replays run one at a
time in one thread, and each output is copied out of the pool before the next
replay), so captured buckets cost the largest bucket's activations once, plus
each graph's static input and output.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from splitpack.core.compile.recording import DEFAULT_MAX_BATCH, CompiledPlans, size_key

log = logging.getLogger(__name__)
WARMUP_RUNS = 3  # on a side stream before capture (cuDNN/cuBLAS pick and cache their kernels)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch`` itself: ``8 -> (1, 2, 4, 8)``, ``6 -> (1, 2, 4, 6)``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return tuple(buckets + [max_batch])


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``batch`` images, or None when the batch is larger than all."""
    return next((b for b in sorted(buckets) if b >= batch), None)


def pad_batch(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """``x`` with zero images appended up to ``bucket`` rows."""
    if x.shape[0] == bucket:
        return x
    return torch.cat([x, x.new_zeros((bucket - x.shape[0], *x.shape[1:]))])


def unpad(out: Any, batch: int) -> Any:
    """The first ``batch`` rows of a (possibly nested) output, copied out of the graph's static buffers."""
    if isinstance(out, torch.Tensor):
        return out[:batch].clone()
    if isinstance(out, (tuple, list)):
        return type(out)(unpad(o, batch) for o in out)
    if isinstance(out, dict):
        return {k: unpad(v, batch) for k, v in out.items()}
    return out


@dataclass
class Graphed:
    """One captured graph: static input, the output it writes, the graph (CUDA only)."""

    static_input: torch.Tensor
    static_output: Any
    graph: Any  # torch.cuda.CUDAGraph

    def __call__(self, x: torch.Tensor) -> Any:
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output

    @property
    def pool(self):
        """The graph's memory pool, for the next capture to share."""
        return self.graph.pool()


def capture(fn: Callable[[torch.Tensor], Any], example: torch.Tensor, pool=None) -> Graphed:
    """Capture ``fn`` on a copy of ``example`` (a CUDA tensor of the bucket's shape)."""
    static_input = example.clone()
    stream = torch.cuda.Stream(example.device)
    stream.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(WARMUP_RUNS):
            fn(static_input)
    torch.cuda.current_stream(example.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool, stream=stream):
        static_output = fn(static_input)
    return Graphed(static_input, static_output, graph)


@dataclass
class GraphedPlans:
    """Runs a SplitPack's compiled programs from CUDA graphs, per (input size, batch bucket)."""

    plans: CompiledPlans
    max_batch: int = DEFAULT_MAX_BATCH
    buckets: tuple[int, ...] = ()
    graphs: dict[tuple, Graphed] = field(default_factory=dict)
    capture_fn: Callable[..., Callable] = capture  # (program, example, pool) -> a replayable callable
    _pool: Any = None  # the memory pool every capture shares (that of the first graph)
    _told: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.buckets = tuple(sorted(self.buckets)) or batch_buckets(self.max_batch)

    def __call__(self, x: torch.Tensor) -> Any:
        reason = self.fallback_reason(x)
        if reason is not None:
            self._tell(reason)
            return self.plans(x)
        return self.replay(x)

    def replay(self, x: torch.Tensor) -> Any:
        """``x`` through its bucket's graph (captured on first use)."""
        bucket = bucket_for(x.shape[0], self.buckets)
        graphed = self.graphs.get((size_key(x), bucket))
        if graphed is None:
            graphed = self._capture(x, bucket)
        return unpad(graphed(pad_batch(x, bucket)), x.shape[0])

    def fallback_reason(self, x: torch.Tensor) -> str | None:
        """Why ``x`` runs without a graph, or None."""
        if bucket_for(x.shape[0], self.buckets) is None:
            return (f"cuda_graphs: batches above {self.buckets[-1]} run without CUDA graphs "
                    f"(batch buckets: {', '.join(map(str, self.buckets))})")
        if x.device.type != "cuda":
            return f"cuda_graphs: inputs on {x.device.type} run without CUDA graphs"
        return None

    def _capture(self, x: torch.Tensor, bucket: int) -> Graphed:
        program = self.plans.plan(x).run
        graphed = self.capture_fn(program, pad_batch(x, bucket), self._pool)
        self._pool = getattr(graphed, "pool", self._pool)
        self.graphs[(size_key(x), bucket)] = graphed
        log.info("captured a CUDA graph for input %s, batch bucket %d", tuple(x.shape[1:]), bucket)
        return graphed

    def warm_up(self, example: torch.Tensor) -> list[int]:
        """Capture every bucket for ``example``'s size (at model load); the buckets captured."""
        done = []
        for bucket in self.buckets:
            x = example[:1].expand(bucket, *example.shape[1:]).contiguous()
            if self.fallback_reason(x) is None:
                self(x)
                done.append(bucket)
        return done

    def _tell(self, reason: str) -> None:
        if reason not in self._told:
            self._told.add(reason)
            log.warning(reason)

    def report(self) -> list[dict]:
        return self.plans.report() + [{"size": list(key[0]), "cuda_graph_bucket": bucket}
                                      for key, bucket in self.graphs]
