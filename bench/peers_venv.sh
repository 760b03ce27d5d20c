#!/usr/bin/env bash
# A benchmark-only venv with anomalib, for bench/bench_peers.py. Kept apart from .venv: anomalib pins
# its own dependency set, and inspectd's serving never imports it.
# Usage: bash bench/peers_venv.sh [VENV_DIR]   (default .venv-peers, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-peers}"
PYTHON="${PYTHON:-python3.11}"
ANOMALIB_VERSION="${ANOMALIB_VERSION:-2.7.0}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# The same torch/torchvision as inspectd's venv (timm imports torchvision; the pair must match).
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 "anomalib==$ANOMALIB_VERSION"
"$VENV/bin/python" -c "import anomalib, torch; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed"
