"""How long a worker may take for one batch: TorchServe's ``responseTimeout`` from the plan's batch latency.

TorchServe kills a worker whose batch runs past ``responseTimeout`` (120 s by default) and fails every
request of that batch; a plan that puts many large images in one batch on one core runs for minutes
(ResNet-50 @1024, a batch of 29 on one loaded core here: 442 s). So the written configs take::

    response_timeout_s = max(120, ceil(8 x predicted seconds of one batch of the plan's shape))

On the CPU the prediction is the device's calibrated time model (:mod:`splitpack.core.cost.time_model`) on
this machine's CPU at the threads one worker runs with. On a GPU, which cannot be calibrated here, it is the
plan's MACs at an assumed :data:`ASSUMED_GPU_MACS_PER_S` (planned, not measured). The factor 8 covers the
model's error (-26% to +14% on quiet runs, BENCHMARKS.md), a slower core and a shared one: ResNet-50 @1024
split-pack is predicted at 2.5 s per image on one core here (90.7 s for a batch of 36), and a batch of 29 took
15.2 s per image (6.0x) while 8-11 jobs shared the 2 cores. An explicit ``--response-timeout-s`` wins.
"""
from __future__ import annotations

import contextlib
import math

import torch

MIN_RESPONSE_TIMEOUT_S = 120  # TorchServe's default
RESPONSE_SAFETY = 8
# A GPU's rate on a plan's MACs, assumed: fp32 CNN inference of a T4-class GPU on depthwise-heavy models
# (EfficientNet); datacenter GPUs run these faster, so the batch time is an upper bound there.
ASSUMED_GPU_MACS_PER_S = 5e11
GPU_SOURCE = f"assumed GPU rate {ASSUMED_GPU_MACS_PER_S:.0e} MAC/s x the plan's MACs (planned, not measured)"
RULE = (f"response_timeout_s = max({MIN_RESPONSE_TIMEOUT_S}, ceil({RESPONSE_SAFETY} x predicted seconds of one "
        "batch)); an explicit --response-timeout-s wins")


def response_timeout_s(batch_seconds: float) -> int:
    return max(MIN_RESPONSE_TIMEOUT_S, math.ceil(RESPONSE_SAFETY * batch_seconds))


def response_timeout(batch_seconds: float | None, source: str) -> dict:
    """The plan's keys for the response timeout (none when no batch latency is known)."""
    if batch_seconds is None:
        return {}
    return {"response_timeout_s": response_timeout_s(batch_seconds), "predicted_batch_seconds": round(batch_seconds, 3),
            "batch_seconds_source": source, "response_timeout_rule": RULE}


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with ``threads`` torch threads (the time model is per thread count), then restore them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
