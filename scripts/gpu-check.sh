#!/usr/bin/env bash
# The GPU check, in two halves (DESIGN.md §7).
#
#   scripts/gpu-check.sh build   # here, with a Rust toolchain: release, stripped test binaries
#                                # (the GPU tests in one binary) into gpu-bin/
#   scripts/gpu-check.sh run     # on the CUDA machine (no Rust needed): runs them with
#                                # PREFIX_ATTN_REQUIRE_GPU=1 and prints a compact summary last
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
    export CUDA_HOME=${CUDA_HOME:-$(scripts/install-nvcc.sh)}
    export PREFIX_ATTN_REQUIRE_NVCC=1
    rm -rf gpu-bin
    mkdir -p gpu-bin
    cargo test --release --no-run --test gpu --test kernels_emu --message-format=json 2>/dev/null |
        python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "gpu-bin/" + m["target"]["name"])
        print("gpu-bin/" + m["target"]["name"])
'
    strip gpu-bin/*
    du -sh gpu-bin
}

run() {
    # cuBLAS/NVRTC may live in the toolkit or in a pip-installed nvidia/cu13 beside Python.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        $(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null)/cu13/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    done
    echo "== machine"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas\.so|libnvrtc\.so' | head -n 5 || true
    local status=0
    echo "== GPU tests"
    PREFIX_ATTN_REQUIRE_GPU=1 ./gpu-bin/gpu | tee /tmp/gpu-tests.log || status=1
    echo "== emulator suite (same binary build)"
    ./gpu-bin/kernels_emu -q 2>&1 | tail -n 3 | tee /tmp/emu-tests.log || status=1
    echo "== summary"
    echo "gpu:  $(tail -n 1 /tmp/gpu-tests.log)"
    echo "emu:  $(grep 'test result' /tmp/emu-tests.log || tail -n 1 /tmp/emu-tests.log)"
    exit $status
}

case "${1:-run}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
