#!/usr/bin/env bash
# Installs nvcc from PyPI, pinned so that its PTX is no newer than a CUDA 13.0 driver loads
# (docs/ARCHITECTURE.md §7), into a virtual environment, and prints the CUDA_HOME to use:
#   export CUDA_HOME=$(scripts/install-nvcc.sh)
# The venv defaults to ~/.cache/prefix-attn/nvcc-venv (first argument to override).
set -euo pipefail
venv=${1:-${PREFIX_ATTN_NVCC_VENV:-$HOME/.cache/prefix-attn/nvcc-venv}}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
home=$(ls -d "$venv"/lib/python3.*/site-packages/nvidia/cu13 | head -n 1)
if [ ! -x "$home/bin/nvcc" ]; then
    echo "install-nvcc: no nvcc under $home" >&2
    exit 1
fi
echo "$home"
