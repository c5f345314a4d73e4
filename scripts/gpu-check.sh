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
    # Benchmarks: PyTorch SDPA on pre-concatenated K/V, ours, and their ratios
    # (tools/README.md). They print their failures but never change the exit status.
    echo "== attention benchmarks: PyTorch SDPA baseline vs ours"
    local bench="skipped (no CUDA-enabled torch for python3)" rc=0
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        bench="sdpa ok"
        rm -f /tmp/sdpa.json /tmp/ours.json
        timeout 120 python3 tools/bench_attn_sdpa.py --json /tmp/sdpa.json ||
            { rc=$?; echo "bench_attn_sdpa.py: FAILED (rc $rc)"; bench="sdpa FAILED (rc $rc)"; }
        if [ -x gpu-bin/prefix-attn ]; then
            if timeout 120 ./gpu-bin/prefix-attn bench attn --device cuda --json >/tmp/ours.json; then
                bench="$bench; ours ok"
                python3 tools/bench_attn_sdpa.py --compare /tmp/ours.json --sdpa-json /tmp/sdpa.json ||
                    { rc=$?; echo "compare: FAILED (rc $rc)"; bench="$bench; compare FAILED"; }
            else
                rc=$?
                echo "prefix-attn bench attn --device cuda: FAILED (rc $rc); its stdout began:"
                head -c 600 /tmp/ours.json || true
                bench="$bench; ours FAILED (rc $rc)"
            fi
        else
            echo "gpu-bin/prefix-attn: absent, no comparison"
            bench="$bench; ours absent"
        fi
    else
        echo "$bench"
    fi
    echo "== summary"
    echo "gpu:  $(tail -n 1 /tmp/gpu-tests.log)"
    echo "emu:  $(grep 'test result' /tmp/emu-tests.log || tail -n 1 /tmp/emu-tests.log)"
    echo "bench: $bench (not part of the exit status)"
    exit $status
}

case "${1:-run}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
