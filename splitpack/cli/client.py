"""Send images to a running model server and print the top-k: `splitpack client triton IMAGE...`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitpack.errors import ServerError
from splitpack.serving.extras import require
from splitpack.serving.triton.client import DEFAULT_MODEL, DEFAULT_URL, classify_each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="server", required=True)
    p = sub.add_parser("triton", help="call Triton over gRPC")
    p.set_defaults(_parser=p)
    add_triton_arguments(p)


def run(args: argparse.Namespace) -> int:
    return client_triton(args)


def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default: {DEFAULT_URL})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def client_triton(args: argparse.Namespace) -> int:
    grpcclient = require("tritonclient.grpc", "triton")
    from tritonclient.utils import InferenceServerException

    images = [path.read_bytes() for path in args.images]  # a missing file is a user error (exit 2)
    with grpcclient.InferenceServerClient(args.url) as triton:
        try:
            if not triton.is_model_ready(args.model):
                raise ServerError(f"model {args.model!r} is not ready on {args.url}")
            predictions = classify_each(triton, args.model, images, timeout=args.timeout)
        except InferenceServerException as err:
            raise ServerError(f"{args.url}: {err.message()}") from None
    failed = 0
    for path, prediction in zip(args.images, predictions):
        failed += prediction.error is not None
        if args.json:
            print(json.dumps({"image": str(path), "top_k": prediction.top_k, "error": prediction.error}))
        elif prediction.error is not None:
            print(f"{path}: error: {prediction.error}")
        else:
            print(f"{path}:")
            for rank, entry in enumerate(prediction.top_k, 1):
                print(f"  {rank}. {entry['probability']:7.2%}  {entry['label']} ({entry['index']})")
    return 1 if failed else 0
