#!/usr/bin/env bash
# Creates .venv and installs spiral with its test tools. Safe to re-run.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
#   no GPU  -> torch==2.13.0 (CPU build where the machine or your index provides it)
#   GPU     -> set TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0' with your CUDA index in PIP_EXTRA_INDEX_URL
# Extras: SPIRAL_EXTRAS=dev,vllm bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${SPIRAL_EXTRAS:-dev}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
touch .venv/.installed
echo "spiral installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
