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
assumed until measured on the GPU) and ``server`` is host memory, not counted against the GPU; the workers
of one GPU pod are bounded by its cores and host memory (:class:`~splitpack.capacity.pod.GpuPod`), so more
images in flight come from a larger batch, not from more processes.

Every plan carries the predicted seconds of one batch of its shape and the response timeout derived from
it (:mod:`splitpack.capacity.timeout`).

A server that runs one batch at a time per process (a TorchServe worker, a Triton python-backend
instance) has ``concurrent = 1``; several batches sharing one process and one copy of the weights
(Triton's libtorch backend with several instances) is ``concurrent > 1`` with ``replicas = 1``.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable

from splitpack.capacity.footprint import DEFAULT_ALLOCATOR_SLACK
from splitpack.capacity.pod import GpuPod
from splitpack.capacity.timeout import ASSUMED_GPU_MACS_PER_S, GPU_SOURCE, response_timeout, torch_threads

FORMULA = ("usage = server + replicas * (process + weights + concurrent * batch_bytes(batch)); "
           "batch_bytes(b) = activations(b) * (1 + allocator_slack) + (2 b + 1) * input_image_bytes")
FORMULA_GPU = ("gpu usage = workers * (cuda_context + weights + batch_bytes(batch)); batch_bytes(b) = activations(b) "
               "* (1 + allocator_slack) + b * input_image_bytes; workers <= pod max_workers")
GPU_NOTE = ("planned, not measured: no GPU was available. The CUDA context per worker is assumed (or "
            "--context-overhead), the activations are the cost model's replay (bytes the GPU allocates alike) "
            "with an assumed allocator slack, the pod's host memory per worker is assumed; measure the context "
            "and the slack on the GPU with scripts/validate_capacity_gpu.py")
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
               concurrent: tuple[int, ...] = (1,), max_replicas: int | None = None) -> Shape | None:
    """The shape with the most images in flight whose usage fits ``limit_bytes`` (then the least usage), with
    at most ``max_replicas`` replicas (a pod's bound); None when not even one replica of batch 1 fits.
    ``batch_bytes`` must grow with the batch."""
    best: Shape | None = None
    for c in concurrent:
        replicas = 1
        while (max_replicas is None or replicas <= max_replicas) and usage_bytes(terms, batch_bytes, replicas, 1,
                                                                                 c) <= limit_bytes:
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
        self.planner, self.size = planner, size

    def batch_seconds(self, split: bool, batch: int, threads: int) -> float:
        """Predicted seconds of one batch (the plan's program, or the unsplit model) on this machine's CPU
        at ``threads`` torch threads: the device's calibrated time model (calibrated on first use)."""
        with torch_threads(threads):
            predicted = self.planner.plan_time(self.choice.plan, (batch, 3, self.size, self.size))
        return predicted.seconds if split else predicted.unsplit_seconds

    def gpu_batch_seconds(self, split: bool, batch: int) -> float:
        """Seconds of one batch on a GPU: the plan's MACs at the assumed rate
        (:data:`~splitpack.capacity.timeout.ASSUMED_GPU_MACS_PER_S`); no GPU time model is calibrated without one."""
        return batch * (self.choice.macs if split else self.choice.unsplit_macs) / ASSUMED_GPU_MACS_PER_S

    def peak(self, split: bool, batch: int) -> int:
        key = (split, batch)
        if key not in self._cache:
            self._cache[key] = int((self._split if split else self._unsplit)(batch))
        return self._cache[key]


def batch_bytes_fn(activations: Callable[[int], int], size: int, allocator_slack: float,
                   gpu: bool = False) -> Callable[[int], int]:
    """Bytes of one batch in flight. On the host the inputs are each image's tensor, the stacked batch and one
    image being decoded (2 b + 1); on a GPU only the stacked batch is on the device (b)."""
    image = 3 * size * size * 4  # one float32 image tensor
    inputs = (lambda b: b) if gpu else (lambda b: 2 * b + 1)
    return lambda b: int(activations(b) * (1 + allocator_slack)) + inputs(b) * image


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
    # a GPU plan: the limit is the GPU's memory, workers are bounded by the pod's cores and host memory
    pod: GpuPod | None = None
    threads_per_worker: int = 1  # torch threads one worker runs with (the batch latency is predicted at it)

    @property
    def planned_within_bytes(self) -> int:
        return self.limit_bytes - self.headroom_bytes

    @property
    def gpu(self) -> bool:
        return self.pod is not None

    def batch_bytes(self, activations: "ActivationModel", split: bool) -> Callable[[int], int]:
        return batch_bytes_fn(lambda b: activations.peak(split, b), self.size, self.allocator_slack, self.gpu)


def plan_shape(p: ShapeInputs, activations: ActivationModel | None = None, quiet: bool = False) -> dict:
    """The plan document: the best shape split and unsplit, the recommendation (split when it holds
    more images in flight), the terms and how they were obtained."""
    if not quiet:
        print(f"planning {p.model} @{p.size} under {p.limit_bytes / 2**30:.2f} GiB ({p.server})", file=sys.stderr,
              flush=True)
    activations = activations or ActivationModel(p.model, p.size, p.max_overhead)
    concurrent = CONCURRENT_BATCHES[p.server]
    max_replicas = p.pod.max_workers if p.pod else None
    shapes = {split: best_shape(p.planned_within_bytes, p.terms, p.batch_bytes(activations, split), p.max_batch,
                                concurrent, max_replicas) for split in (True, False)}
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
    if p.gpu:
        seconds, source = activations.gpu_batch_seconds(use_split, chosen.batch_size), GPU_SOURCE
    else:
        seconds = activations.batch_seconds(use_split, chosen.batch_size, p.threads_per_worker)
        source = f"time model: this machine's CPU at {p.threads_per_worker} thread(s) per worker"
    return {
        "model": p.model, "size": p.size, "device": p.device, "server": p.server,
        "memory": "gpu" if p.gpu else "host",
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
        "formula": FORMULA_GPU if p.gpu else FORMULA,
        "concurrent_batches_searched": list(concurrent),
        "max_batch_size": p.max_batch,
    } | response_timeout(seconds, source) | _gpu_keys(p, chosen)


def _gpu_keys(p: ShapeInputs, chosen: Shape) -> dict:
    """A GPU plan's pod (its bounds, and the CPU and host memory of the workers it runs) and what is planned."""
    if not p.gpu:
        return {}
    return {"gpu_memory_bytes": p.limit_bytes, "notes": [GPU_NOTE]} | p.pod.plan_keys(chosen.replicas)


def _one(p: ShapeInputs, activations: ActivationModel) -> int:
    return usage_bytes(p.terms, p.batch_bytes(activations, True), 1, 1)
