#!/usr/bin/env bash
# Serve triton_repo/ with the Triton server bundled in the nvidia-pytriton wheel (127.0.0.1 only).
#
#   scripts/triton.sh repo            (re)generate triton_repo/tf_efficientnet_lite0 (config, model.py, weights)
#   scripts/triton.sh start           generate the weights if missing, start, wait until ready
#   scripts/triton.sh stop | status
#   scripts/triton.sh client IMG...   classify images over gRPC (top-5 with labels)
#
# Environment: PYTHON (default .venv/bin/python), TRITON_REPO (triton_repo), GRPC_PORT (8001),
# METRICS_PORT (8002, 0 = off), HTTP_PORT (0 = off), RUN_DIR (.run: backends copy, pid file, log).
# Same as `splitpack triton-repo`, `splitpack serve triton` and `splitpack client triton`
# (python -m splitpack.cli imports only the command it runs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
TRITON_REPO="${TRITON_REPO:-triton_repo}"
GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
HTTP_PORT="${HTTP_PORT:-0}"
RUN_DIR="${RUN_DIR:-.run}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The shipped model: real ImageNet weights, exact split-pack merging after blocks.2
# (peak activation memory 13.3 MB -> 4.3 MB at 224x224, outputs equal to the unsplit model).
# The weights (19 MB) are not in git; this command writes them.
generate_repo() {
  "$PYTHON" -m splitpack.cli triton-repo --model tf_efficientnet_lite0 --pretrained \
    --merge-layer blocks.2 --grid 2x2 --mode exact --replicas 1 --out "$TRITON_REPO"
}

serve() {
  "$PYTHON" -m splitpack.cli serve triton "$1" --repo "$TRITON_REPO" --grpc-port "$GRPC_PORT" \
    --metrics-port "$METRICS_PORT" --http-port "$HTTP_PORT" --run-dir "$RUN_DIR"
}

case "${1:-}" in
  repo) generate_repo ;;
  start)
    [ -f "$TRITON_REPO/tf_efficientnet_lite0/1/model.pt" ] || generate_repo
    serve start ;;
  stop | status) serve "$1" ;;
  client) shift; "$PYTHON" -m splitpack.cli client triton --url "127.0.0.1:$GRPC_PORT" "$@" ;;
  *) echo "usage: $0 repo|start|stop|status|client IMAGE..." >&2; exit 2 ;;
esac
