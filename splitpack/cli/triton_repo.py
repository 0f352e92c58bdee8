"""Write a Triton model directory that serves a model with split-pack (config.pbtxt + model.py + weights)."""
from __future__ import annotations

from pathlib import Path

from splitpack.serving.triton.repo import VERSION, WEIGHTS_FILE, TritonModelSpec, generate_model_dir


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="timm model name, or tv:NAME for torchvision")
    parser.add_argument("--name", help="Triton model name = directory (default: from --model)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="write splitpack's offline ImageNet weights (tf_efficientnet_lite0/1/2)")
    weights.add_argument("--weights", type=Path, help="state dict file to ship with the model")
    parser.add_argument("--merge-layer", required=True,
                        help="merge layer (module name, see `splitpack.merge_layers`); 'none' serves unsplit")
    parser.add_argument("--grid", default="2x2", help="packs per side, RxC (default: 2x2)")
    parser.add_argument("--mode", default="exact", choices=["exact", "seed"])
    parser.add_argument("--instances", type=int, default=1, help="model instances (replicas) per server")
    parser.add_argument("--kind", default="cpu", choices=["cpu", "gpu"], help="instance kind (default: cpu)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="dynamic batching: how long a request may wait for others (default: 2000)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--native-resolution", action="store_true",
                        help="serve images at their own size (longest side <= --max-side) instead of the eval crop")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--max-pixels", type=int, default=50_000_000, help="reject images with more pixels")
    parser.add_argument("--out", type=Path, default=Path("triton_repo"), help="model repository (default: triton_repo)")
    parser.add_argument("--no-check", action="store_true",
                        help="write the config without building the model (the server will validate it)")


def run(args) -> int:
    merge_layer = None if args.merge_layer.strip().lower() in ("", "none") else args.merge_layer
    spec = TritonModelSpec(
        model=args.model, name=args.name, merge_layer=merge_layer, grid=args.grid, mode=args.mode,
        pretrained=args.pretrained, weights=args.weights, instances=args.instances, kind=args.kind,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us, topk=args.topk,
        native_resolution=args.native_resolution, max_side=args.max_side, max_pixels=args.max_pixels,
    )
    model_dir = generate_model_dir(spec, args.out, check=not args.no_check)
    print(f"wrote {model_dir}/config.pbtxt, {VERSION}/model.py"
          + (f", {VERSION}/{WEIGHTS_FILE}" if (model_dir / VERSION / WEIGHTS_FILE).exists() else " (random weights)"))
    return 0
