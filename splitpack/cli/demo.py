"""Demo: package pretrained tf_efficientnet_lite0 with exact split-pack, serve it with TorchServe, classify a cat.

Steps: ``splitpack archive`` (real ImageNet weights, exact split-pack 2x2) into
the model store, start TorchServe on 127.0.0.1, POST the bundled cat photo,
print the top-5 with labels and the peak activation memory saved by
split-pack, stop the server.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from splitpack.cli import arg_type
from splitpack.cli import common
from splitpack.core.plan.spec import parse_grid
from splitpack.errors import ServerError
from splitpack.serving.extras import require
from splitpack.serving.config import ServingConfig
from splitpack.serving.net import free_ports
from splitpack.serving.predictor import SAMPLE_IMAGE
from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE, build_archive
from splitpack.serving.torchserve.server import Ports, TorchServe

DEMO_MODEL = "tf_efficientnet_lite0"
DEMO_NAME = "lite0_splitpack"
# Exact-mode merge layer with the lowest peak for lite0 (2x2, CPU): -63% at 224, -71% at 896
# vs blocks.1 -61%/-62%, blocks.3 -45%/-68% (sweep in docs/torchserve.md).
DEMO_MERGE_LAYER = "blocks.2"
DEMO_GRID = "2x2"
DEMO_RUN_DIR = Path(".run") / "torchserve-demo"


def memory_saving(model_name: str, merge_layer: str, grid: tuple[int, int], sizes: list[int]) -> list[tuple]:
    """[(side, unsplit_bytes, split_bytes)] peak activation memory, batch 1, CPU."""
    import torch

    import splitpack
    from splitpack.measure.meter import peak_activation_bytes

    model = splitpack.create_model(model_name)
    wrapped = splitpack.wrap(model, merge_layer=merge_layer, grid=grid, mode="exact")
    rows = []
    for side in sizes:
        x = torch.randn(1, 3, side, side)
        with torch.inference_mode():
            wrapped(x)  # build the per-size plan outside the measurement
        rows.append((side, peak_activation_bytes(model, x), peak_activation_bytes(wrapped, x)))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", default=str(SAMPLE_IMAGE), help="image to classify (default: bundled cat photo)")
    common.add_split(parser, mode=False, defaults={"merge_layer": DEMO_MERGE_LAYER, "grid": DEMO_GRID})
    parser.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--run-dir", default=str(DEMO_RUN_DIR))
    parser.add_argument("--memory-sizes", type=arg_type(_sizes, "sizes"), default=[224, 896],
                        help="input sides for the memory comparison (default: 224,896)")


def _sizes(text: str) -> list[int]:
    return [common.positive_int(s) for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)
    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    t0 = time.monotonic()
    config = ServingConfig(DEMO_MODEL, merge_layer=args.merge_layer, grid=grid, mode="exact")
    mar = build_archive(config, {"batch_size": 4, "max_batch_delay_ms": 20}, pretrained=True, name=DEMO_NAME,
                        export_path=args.model_store, force=True)
    print(f"packaged {mar}: {DEMO_MODEL} (pretrained ImageNet weights), exact split-pack "
          f"{grid[0]}x{grid[1]} merged at {args.merge_layer} ({time.monotonic() - t0:.1f} s)")

    server = TorchServe(run_dir=args.run_dir, model_store=args.model_store, ports=Ports(*free_ports(5)))
    server.stop()  # a demo server left over from an interrupted run
    t0 = time.monotonic()
    server.start([DEMO_NAME], timeout_s=300)
    try:
        print(f"TorchServe READY in {time.monotonic() - t0:.1f} s at {server.inference_url} "
              f"(logs: {server.log_dir})")
        requests = require("requests", "torchserve")
        response = requests.post(f"{server.inference_url}/predictions/{DEMO_NAME}", data=image.read_bytes(),
                                 headers={"Content-Type": "application/octet-stream", **server.headers("inference")},
                                 timeout=120)
        if response.status_code != 200:
            raise ServerError(f"request failed: HTTP {response.status_code}: {response.text}")
        print(f"{image.name} -> top-5:")
        for rank, p in enumerate(response.json()["predictions"], 1):
            print(f"  {rank}. {p['label']:<40} {100 * p['probability']:6.2f}%  (class {p['index']})")
    finally:
        server.stop()
        print("TorchServe stopped")

    sizes = args.memory_sizes
    print("peak activation memory, batch 1 (splitpack.measure.meter.peak_activation_bytes, CPU):")
    for side, unsplit, split in memory_saving(DEMO_MODEL, args.merge_layer, grid, sizes):
        print(f"  3x{side}x{side}: unsplit {unsplit / 2**20:7.2f} MiB -> split-pack {split / 2**20:7.2f} MiB "
              f"({100 * (split - unsplit) / unsplit:+.1f}%)")
    return 0
