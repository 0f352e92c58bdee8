"""Shared test helpers."""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, TypeVar

import psutil
import pytest
import torch
from hypothesis import settings
from torch import nn

import splitpack

# CI replays the same examples every run (no flaky discoveries at merge time); locally they vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Test processes run side by side (pytest-xdist, `make test`): each gets its share of the cores, as a server's
# workers do; torch's default (every core in every process) oversubscribes them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# fp32 exactness target: max |split - unsplit| <= REL_TOL * max |unsplit|. Tiled convolutions sum the
# same products in a different blocking order, so results differ by float rounding only: ~1e-7
# relative per layer, a few 1e-6 after dozens of layers. 1e-5 leaves headroom without hiding a
# wrong halo (a missing pixel row changes outputs at the 1e-2 level, see the seed-mode tests).
REL_TOL = 1e-5
# float64: the same bugs still show at the 1e-2 level, while rounding is ~1e-16 per op; deep random-weight
# networks amplify fp32 rounding up to 1e4-fold (the brief's EfficientNetV2 turns 6e-8 into 2e-4), so
# deep models are checked strictly here.
F64_TOL = 1e-10


def exactness_bound(unsplit: torch.Tensor, ref64: torch.Tensor) -> float:
    """Allowed rel_error(split, unsplit) in fp32/fp16/bf16: split and unsplit are two roundings of
    the same float64 function, so they may differ by twice the unsplit model's own rounding error
    (measured against float64), and never by less than REL_TOL is demanded."""
    return max(REL_TOL, 2 * rel_error(unsplit, ref64))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics (timm zero-inits some gammas, which hides errors)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.data = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def one_thread():
    """Thousands of tiny pack ops: on 2 shared cores, OpenMP's spinning threads make each take milliseconds.
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """``models(name)``: a timm/torchvision model with random weights and randomized norms, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomize_norms(splitpack.create_model(name))
        return cache[name]

    return get


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (a server with its workers or stubs)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root] + root.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that exited while we looked
            pass
    return total


T = TypeVar("T")


def under_load(client_loop: Callable[[threading.Event], None], action: Callable[[], T], clients: int = 4) -> T:
    """Run ``action`` (a fault and the wait for recovery) while ``clients`` threads run ``client_loop(stop)``
    (requests until ``stop`` is set): 3 s of load before it, 3 s after; its result."""
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(stop,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        result = action()
        time.sleep(3)
        return result
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=150)


def classify_on_triton(repo, name: str, image: bytes, run_dir):
    """Start the real Triton server on ``repo`` with model ``name`` only, classify ``image`` over gRPC with
    probabilities, stop the server; returns the answer (a ``splitpack.serving.triton.client`` Prediction)."""
    import tritonclient.grpc as grpcclient

    from splitpack.serving.net import free_port
    from splitpack.serving.triton.client import classify
    from splitpack.serving.triton.server import TritonServer

    triton = TritonServer(repo, grpc_port=free_port(), metrics_port=free_port(), run_dir=run_dir, models=[name])
    triton.start(timeout=240)
    try:
        with grpcclient.InferenceServerClient(triton.url) as client:
            [prediction] = classify(client, name, [image], probabilities=True, timeout=120)
        return prediction
    finally:
        triton.stop()
