"""One model replica inside a server worker: what every backend's worker code shares.

A TorchServe handler worker and a Triton model instance load, serve and report the same way:

* load: the serving config from the backend's config section (model-config.yaml ``handler:``,
  config.pbtxt ``parameters``), the worker's share of the threads and its C heap's mode, the model built by
  :func:`build_predictor` (the one place a served model is built), the backend's own checks,
  a warm-up forward (a model that cannot run fails at load time, planning happens before the
  first request), then one log line of the effective settings;
* serve: :meth:`Predictor.serve` (one request's error never fails another), then the
  device-memory and plan gauges through the backend's :class:`Gauges` (reporting never fails a
  request);
* map: each outcome is probabilities or a :data:`~splitpack.serving.predictor.ServeError` whose
  ``status`` says whose fault it is (< 500: the caller's, HTTP 400/413 / INVALID_ARGUMENT; else the
  server's, HTTP 500 / INTERNAL).

A backend keeps only its request/response translation (:func:`answer` with its own two callbacks).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

import torch

from splitpack.measure.heap import set_heap
from splitpack.serving.config import ServingConfig
from splitpack.serving.metrics import update_memory_gauges, update_plan_gauges
from splitpack.serving.predictor import BadRequest, InferenceFailed, Predictor, ServeError
from splitpack.serving.threads import configure_threads

R = TypeVar("R")
Outcome = torch.Tensor | BadRequest | InferenceFailed


class Gauges(Protocol):
    """A backend's custom-metrics API for splitpack's gauges (:mod:`splitpack.serving.metrics`)."""

    def memory(self, values: dict[str, float]) -> None: ...

    def plans(self, plans: list[dict]) -> None: ...


def build_predictor(config: ServingConfig, weights: str | None, device: str | torch.device = "cpu",
                    base_dir: str | Path | None = None, batch_size: int | None = None) -> Predictor:
    """The served model for ``config`` (its files, a model file or labels, relative to ``base_dir``; CUDA-graph
    buckets up to the server's ``batch_size``): the one place every backend (and the packaging check) builds it."""
    return Predictor(config, weights=weights, device=device, base_dir=base_dir, batch_size=batch_size)


class Replica:
    """A loaded, warmed-up model replica and how it serves a batch of requests."""

    def __init__(self, section: Mapping[str, Any], server: str, *, replicas: int,
                 weights: Callable[[dict], str | None], device: str | torch.device, base_dir: str | Path | None,
                 warn: Callable[[str], None], check: Callable[[Predictor], None] | None = None,
                 batch_size: int | None = None):
        """``section``: the backend's config section (text values); ``server``: the backend's name in the
        schema; ``replicas``: worker processes sharing the cores; ``weights(artifacts)``: the state-dict
        file from the section's artifact keys (None: random weights); ``base_dir``: the folder the
        deployment ships the config's files in (the .mar's, the model version's); ``warn``: the backend's log;
        ``check``: the backend's own checks of the built model, before the warm-up; ``batch_size``: the largest
        batch the server forms (model-config.yaml batchSize, config.pbtxt max_batch_size)."""
        config, self.artifacts = ServingConfig.from_section(dict(section), server)
        self.threads = configure_threads(config.threads, replicas)
        self.warn = warn
        self.heap = {"heap_kept": set_heap(config.heap)}  # before the model allocates anything
        if config.heap == "kept" and not self.heap["heap_kept"]:
            warn("heap: kept needs glibc's mallopt; this C library's heap runs as it is")
        self.gauges: Gauges | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            # An unknown merge layer raises ValueError naming the valid layers: the backend reports it.
            self.predictor = build_predictor(config, weights(self.artifacts), device, base_dir, batch_size)
        for warning in caught:
            warn(str(warning.message))
        if check is not None:
            check(self.predictor)
        self.predictor.warmup()  # planned (merge_layer auto: the plan resolved) before the first request

    def describe(self) -> dict:
        """The effective settings, threads and heap mode, for the backend's "ready" log line."""
        return self.predictor.describe() | self.threads | self.heap

    def serve(self, payloads: Sequence) -> list[Outcome]:
        """Per request (its encoded images, or the BadRequest the backend already found): its probabilities
        or its error (:meth:`Predictor.serve`); then the gauges."""
        outcomes = self.predictor.serve(payloads)
        if self.gauges is not None:
            errors = (update_memory_gauges(self.gauges.memory, self.predictor.device, self.predictor.last_peak_bytes),
                      update_plan_gauges(self.gauges.plans, self.predictor.plans()))
            for error in filter(None, errors):  # reporting must never fail a request
                self.warn(f"splitpack metrics not reported: {error!r}")
        return outcomes


def answer(outcome: Outcome, ok: Callable[[torch.Tensor], R], refuse: Callable[[ServeError], R]) -> R:
    """One outcome in the backend's terms: ``ok(probabilities)`` or ``refuse(error)`` (``error.status``:
    < 500 the caller's fault, else the server's)."""
    return refuse(outcome) if isinstance(outcome, ServeError) else ok(outcome)
