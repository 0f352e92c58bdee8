#!/usr/bin/env python
"""Classify images with a splitpack model served by Triton, over gRPC; prints top-k with labels.

    python scripts/triton_client.py splitpack/assets/chelsea.jpg [--url 127.0.0.1:8001] [--model NAME] [--json]

Same as `splitpack client triton ...`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from splitpack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["client", "triton", *sys.argv[1:]]))
