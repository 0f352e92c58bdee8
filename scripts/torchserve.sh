#!/usr/bin/env bash
# Start, stop or inspect TorchServe serving every .mar in model_store/ on 127.0.0.1.
#   scripts/torchserve.sh start [--models a,b] [--timeout 300] [--threads N] [--bind ADDR] [--no-token-auth (loopback only)] ...
#   scripts/torchserve.sh stop
#   scripts/torchserve.sh status [--probe]
# Same as `splitpack serve torchserve ...`; `start` returns once every model's workers are READY.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m splitpack.cli serve torchserve "$@"
