"""Measure split-pack against the unsplit model: peak activation memory, error and latency."""
from __future__ import annotations

import argparse
import json
import time

import torch

from splitpack.core.engine import parse_grid, wrap
from splitpack.measure.meter import peak_activation_bytes
from splitpack.models import create_model


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def latencies_ms(fns, x, repeats: int) -> list[float]:
    """Best-of-``repeats`` latency of each fn, runs interleaved so load changes hit all alike."""
    best = [float("inf")] * len(fns)
    with torch.inference_mode():
        for fn in fns:
            fn(x)  # warm-up: plans, allocator, oneDNN kernels
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                _sync(x)
                start = time.perf_counter()
                fn(x)
                _sync(x)
                best[i] = min(best[i], (time.perf_counter() - start) * 1e3)
    return best


def bench(model_name: str, size: int, merge_layer: str, grid, mode: str = "exact", batch: int = 1,
          repeats: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32, model=None) -> dict:
    """One comparison, baseline and split measured in this process on the same input."""
    model = model if model is not None else create_model(model_name)
    model = model.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    split = wrap(model, merge_layer, grid, mode)
    with torch.inference_mode():
        ref = model(x)
        out = split(x)
    baseline_peak = peak_activation_bytes(model, x)
    split_peak = peak_activation_bytes(split, x)
    baseline_ms, split_ms = latencies_ms([model, split], x, repeats)
    rows, cols = parse_grid(grid)
    return {
        "model": model_name,
        "size": size,
        "batch": batch,
        "merge_layer": merge_layer,
        "grid": f"{rows}x{cols}",
        "mode": mode,
        "device": str(x.device),
        "dtype": str(dtype).replace("torch.", ""),
        "baseline_peak_bytes": baseline_peak,
        "split_peak_bytes": split_peak,
        "memory_ratio": baseline_peak / split_peak,
        "max_abs_error": (out.float() - ref.float()).abs().max().item(),
        "output_scale": ref.float().abs().max().item(),
        "baseline_ms": baseline_ms,
        "split_ms": split_ms,
        "latency_ratio": split_ms / baseline_ms,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name, or tv:NAME for torchvision (random weights)")
    p.add_argument("--size", type=int, required=True, help="input height and width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--merge-layer", required=True)
    p.add_argument("--grid", default="2x2", help="N or RxC")
    p.add_argument("--mode", choices=("exact", "seed"), default="exact")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, interleaved (best reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    result = bench(args.model, args.size, args.merge_layer, args.grid, args.mode, args.batch, args.repeats,
                   args.device, getattr(torch, args.dtype))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} @{result['size']} batch {result['batch']}  merge {result['merge_layer']} "
              f"grid {result['grid']} {result['mode']}")
        print(f"  peak activations {result['baseline_peak_bytes'] / 2**20:.1f} MiB -> "
              f"{result['split_peak_bytes'] / 2**20:.1f} MiB  ({result['memory_ratio']:.2f}x lower)")
        print(f"  latency {result['baseline_ms']:.1f} ms -> {result['split_ms']:.1f} ms "
              f"({result['latency_ratio']:.2f}x)   max abs error {result['max_abs_error']:.2e}")
    return 0
