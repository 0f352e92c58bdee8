#!/usr/bin/env bash
# The main demo: package pretrained tf_efficientnet_lite0 with exact split-pack into model_store/,
# start TorchServe on 127.0.0.1, classify the bundled cat photo, print the top-5 and the
# activation memory split-pack saves, stop the server. Same as `splitpack demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m splitpack.cli demo "$@"
