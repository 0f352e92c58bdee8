"""Plan the deployment shape under a memory limit: replicas x batch size (x concurrent batches per
process) with the most images in flight, split-pack vs unsplit.

Three terms, paid at three rates::

    usage = server + replicas * (process + weights + concurrent * batch_bytes(batch))
    batch_bytes(b) = activations(b) * (1 + allocator_slack) + (2 b + 1) * input_image_bytes
    images in flight = replicas * concurrent * batch

* ``server``: once per deployment (TorchServe's frontend, tritonserver, shared libraries);
* ``process`` and ``weights``: once per replica process (each has its own runtime and copy of the weights);
* ``batch_bytes``: per batch being run; ``activations(b)`` is the cost model's replayed peak of the
  plan (or of the unsplit model) for a batch of ``b`` (:mod:`splitpack.core.cost.exact_peak`), the inputs are
  the batch tensor and each image's own tensor before stacking, plus one being decoded.

On the CPU the fixed terms are measured from real servers (:mod:`splitpack.capacity.fixed_costs`);
on a GPU ``process`` is the CUDA context (:data:`~splitpack.capacity.footprint.DEFAULT_CONTEXT_OVERHEAD`,
assumed until measured on the GPU) and ``server`` is host memory, not counted against the GPU.

A server that runs one batch at a time per process (a TorchServe worker, a Triton python-backend
instance) has ``concurrent = 1``; several batches sharing one process and one copy of the weights
(Triton's libtorch backend with several instances) is ``concurrent > 1`` with ``replicas = 1``.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable

from splitpack.capacity.footprint import DEFAULT_ALLOCATOR_SLACK

FORMULA = ("usage = server + replicas * (process + weights + concurrent * batch_bytes(batch)); "
           "batch_bytes(b) = activations(b) * (1 + allocator_slack) + (2 b + 1) * input_image_bytes")
# concurrent batches one replica process runs: one batch at a time for a TorchServe worker and
# a Triton python-backend instance
CONCURRENT_BATCHES = {"torchserve": (1,), "triton": (1,)}
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class Terms:
    """The fixed terms of the formula, in bytes."""

    server_bytes: int
    process_bytes: int
    weights_bytes: int


@dataclass(frozen=True)
class Shape:
    replicas: int
    batch_size: int
    concurrent_batches: int
    predicted_usage_bytes: int

    @property
    def inflight_images(self) -> int:
        return self.replicas * self.batch_size * self.concurrent_batches

    def to_dict(self) -> dict:
        return asdict(self) | {"inflight_images": self.inflight_images}


def usage_bytes(terms: Terms, batch_bytes: Callable[[int], int], replicas: int, batch: int,
                concurrent: int = 1) -> int:
    return terms.server_bytes + replicas * (terms.process_bytes + terms.weights_bytes
                                            + concurrent * batch_bytes(batch))


def best_shape(limit_bytes: int, terms: Terms, batch_bytes: Callable[[int], int], max_batch: int = DEFAULT_MAX_BATCH,
               concurrent: tuple[int, ...] = (1,)) -> Shape | None:
    """The shape with the most images in flight whose usage fits ``limit_bytes`` (then the least usage);
    None when not even one replica of batch 1 fits. ``batch_bytes`` must grow with the batch."""
    best: Shape | None = None
    for c in concurrent:
        replicas = 1
        while usage_bytes(terms, batch_bytes, replicas, 1, c) <= limit_bytes:
            batch = _largest_batch(limit_bytes, terms, batch_bytes, replicas, c, max_batch)
            shape = Shape(replicas, batch, c, usage_bytes(terms, batch_bytes, replicas, batch, c))
            if best is None or (shape.inflight_images, -shape.predicted_usage_bytes) > (
                    best.inflight_images, -best.predicted_usage_bytes):
                best = shape
            replicas += 1
    return best


def _largest_batch(limit: int, terms: Terms, batch_bytes, replicas: int, concurrent: int, max_batch: int) -> int:
    """Binary search: the largest batch <= max_batch that fits (batch 1 fits)."""
    lo, hi = 1, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if usage_bytes(terms, batch_bytes, replicas, mid, concurrent) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ActivationModel:
    """Predicted peak activation bytes per batch size, split (the planner's plan for the size) and
    unsplit, from the cost model's replay: the one place this module reaches into the engine."""

    def __init__(self, model_name: str, size: int, max_overhead: float | None = None):
        import splitpack
        from splitpack.core.search.planner import Planner
        from splitpack.core.cost.exact_peak import allocation_profile, unsplit_peak
        from splitpack.core.cost.plan_cost import plan_cost
        from splitpack.capacity.footprint import module_bytes

        model = splitpack.create_model(model_name).eval()
        self.weights_bytes = module_bytes(model)
        planner = Planner(model)
        shape = (1, 3, size, size)
        self.choice = planner.choose(shape, max_overhead=max_overhead)
        profile = allocation_profile(planner.traced, shape)
        self._split = lambda b: plan_cost(planner.traced, self.choice.plan, (b, 3, size, size), profile=profile).peak_bytes
        self._unsplit = lambda b: unsplit_peak(planner.traced, profile[0], b, profile[1])
        self._cache: dict[tuple[bool, int], int] = {}

    def peak(self, split: bool, batch: int) -> int:
        key = (split, batch)
        if key not in self._cache:
            self._cache[key] = int((self._split if split else self._unsplit)(batch))
        return self._cache[key]


def batch_bytes_fn(activations: Callable[[int], int], size: int, allocator_slack: float) -> Callable[[int], int]:
    image = 3 * size * size * 4  # one float32 image tensor
    return lambda b: int(activations(b) * (1 + allocator_slack)) + (2 * b + 1) * image


@dataclass
class ShapeInputs:
    model: str
    size: int
    server: str
    limit_bytes: int
    limit_source: str
    terms: Terms
    terms_source: str
    device: str = "cpu"
    allocator_slack: float = DEFAULT_ALLOCATOR_SLACK
    max_batch: int = DEFAULT_MAX_BATCH
    max_overhead: float | None = None
    headroom_bytes: int = 0  # of the limit, kept free for what the formula does not count

    @property
    def planned_within_bytes(self) -> int:
        return self.limit_bytes - self.headroom_bytes


def plan_shape(p: ShapeInputs, activations: ActivationModel | None = None, quiet: bool = False) -> dict:
    """The plan document: the best shape split and unsplit, the recommendation (split when it holds
    more images in flight), the terms and how they were obtained."""
    if not quiet:
        print(f"planning {p.model} @{p.size} under {p.limit_bytes / 2**30:.2f} GiB ({p.server})", file=sys.stderr,
              flush=True)
    activations = activations or ActivationModel(p.model, p.size, p.max_overhead)
    concurrent = CONCURRENT_BATCHES[p.server]
    shapes = {}
    for split in (True, False):
        fn = batch_bytes_fn(lambda b, s=split: activations.peak(s, b), p.size, p.allocator_slack)
        shapes[split] = best_shape(p.planned_within_bytes, p.terms, fn, p.max_batch, concurrent)
    split, unsplit = shapes[True], shapes[False]
    use_split = split is not None and (unsplit is None or split.inflight_images > unsplit.inflight_images)
    chosen = split if use_split else unsplit
    plan = activations.choice.plan
    recommended = {"merge_layer": plan.merge_layer_text if use_split else None,
                   "grid": plan.grid_text if use_split else None, "mode": "exact" if use_split else None}
    if chosen is None:
        raise ValueError(f"nothing fits {p.planned_within_bytes / 2**20:.0f} MiB ({p.limit_bytes / 2**20:.0f} MiB "
                         f"less {p.headroom_bytes / 2**20:.0f} MiB headroom): one replica of batch 1 needs "
                         f"{_one(p, activations) / 2**20:.0f} MiB even split ({p.terms_source})")
    return {
        "model": p.model, "size": p.size, "device": p.device, "server": p.server,
        "memory_limit_bytes": p.limit_bytes, "memory_limit_source": p.limit_source,
        "headroom_bytes": p.headroom_bytes, "planned_within_bytes": p.planned_within_bytes,
        "batch_size": chosen.batch_size,
        "predicted_usage_bytes": chosen.predicted_usage_bytes,
        "inflight_images_split": split.inflight_images if split else 0,
        "inflight_images_unsplit": unsplit.inflight_images if unsplit else 0,
        "recommended": recommended | chosen.to_dict() | {
            "reason": (f"{split.inflight_images} images in flight split vs "
                       f"{unsplit.inflight_images if unsplit else 0} unsplit") if use_split else
                      "split-pack fits no more images in flight than unsplit"},
        "split": (split.to_dict() if split else None) | {
            "plan": str(plan), "predicted_macs_ratio": round(activations.choice.predicted_macs_ratio, 4),
            "activation_bytes_per_image": activations.peak(True, 1)},
        "unsplit": (unsplit.to_dict() if unsplit else {}) | {"activation_bytes_per_image": activations.peak(False, 1)},
        "terms": asdict(p.terms) | {"source": p.terms_source, "allocator_slack": p.allocator_slack,
                                    "input_image_bytes": 3 * p.size * p.size * 4},
        "formula": FORMULA,
        "concurrent_batches_searched": list(concurrent),
        "max_batch_size": p.max_batch,
    }


def _one(p: ShapeInputs, activations: ActivationModel) -> int:
    return usage_bytes(p.terms, batch_bytes_fn(lambda b: activations.peak(True, b), p.size, p.allocator_slack), 1, 1)
