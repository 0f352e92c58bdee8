"""Readiness/liveness probes shared by both servers: one real inference per model.

A server that answers ``/ping`` or ``is_server_ready`` can still fail every request
(a TorchServe model whose workers keep crashing, a Triton instance whose stub died),
so the probe sends the bundled cat photo to each model and checks that labelled
predictions come back. ``splitpack serve torchserve|triton status --probe`` prints
one line per model and exits with :func:`exit_code`, usable as a Kubernetes exec probe.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

# Exit codes of `status --probe` (3 follows the LSB `status` convention for "not running").
HEALTHY, UNHEALTHY, NOT_RUNNING = 0, 1, 3


@dataclass
class ProbeResult:
    model: str
    ok: bool
    ms: float
    detail: str  # the top-1 label, or why the probe failed

    def line(self) -> str:
        return f"{self.model}: {'ok' if self.ok else 'FAILED'} in {self.ms:.0f} ms: {self.detail}"

    def as_dict(self) -> dict:
        return asdict(self)


def probe_image() -> bytes:
    from splitpack.serving.predictor import SAMPLE_IMAGE

    return SAMPLE_IMAGE.read_bytes()


def timed_probe(model: str, infer: Callable[[], str]) -> ProbeResult:
    """Run ``infer`` (returns the top-1 label, raises on failure) and time it."""
    start = time.perf_counter()
    try:
        label = infer()
        ok, detail = bool(label), label or "no prediction in the answer"
    except Exception as err:  # noqa: BLE001 -- any failure is the probe's answer
        ok, detail = False, _message(err)
    return ProbeResult(model, ok, round((time.perf_counter() - start) * 1000, 1), detail)


def exit_code(results: list[ProbeResult]) -> int:
    return HEALTHY if results and all(r.ok for r in results) else UNHEALTHY


def _message(err: Exception) -> str:
    message = err.message() if callable(getattr(err, "message", None)) else str(err)
    return " ".join(str(message).split())[:500]
