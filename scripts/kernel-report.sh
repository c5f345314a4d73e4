#!/usr/bin/env bash
# Static kernel report (no GPU): per kernel and arch, registers, spills, shared memory,
# threads, blocks per SM by the CUDA occupancy rule, and the SASS instruction mix of the hot
# loop (one key tile of the attention kernels) and of the whole kernel. README.md, "Kernel
# report", explains the columns; tools/kernel_report.py documents the method.
#
#   scripts/kernel-report.sh                 build (release), then print the tables
#   scripts/kernel-report.sh --json          one JSON object instead
#   scripts/kernel-report.sh --check         also judge the goals, PASS/FAIL each (exit 1 on a FAIL)
#   scripts/kernel-report.sh --fatbin-dir D  report on the fatbins in D (an OUT_DIR) instead
#   scripts/kernel-report.sh --kernels RE    only kernels whose name matches RE
#   scripts/kernel-report.sh --debug         use the dev profile (reuses a `cargo test` build;
#                                            the fatbins are the same in both profiles)
#
# It installs what it needs: the pinned nvcc (scripts/install-nvcc.sh) and, into the same
# venv, the pinned cuobjdump and nvdisasm wheels (13.2.x reads the 13.0 compiler's cubins).
# Whatever the flags, it exits non-zero when a fatbin lacks sm_80 or sm_90 SASS or the
# compute_80 PTX, or a planned kernel is missing or launched beyond its launch bounds.
set -euo pipefail
cd "$(dirname "$0")/.."

fatbin_dir=""
profile=release
pass=()
while [ $# -gt 0 ]; do
    case "$1" in
        --fatbin-dir)
            fatbin_dir=${2:?--fatbin-dir needs a directory}
            shift 2
            ;;
        --debug)
            profile=debug
            shift
            ;;
        --json | --check)
            pass+=("$1")
            shift
            ;;
        --kernels)
            pass+=("$1" "${2:?--kernels needs a regex}")
            shift 2
            ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "kernel-report: unknown argument $1 (see --help)" >&2
            exit 2
            ;;
    esac
done

venv=${PREFIX_ATTN_NVCC_VENV:-$HOME/.cache/prefix-attn/nvcc-venv}
CUDA_HOME=$(scripts/install-nvcc.sh "$venv")
export CUDA_HOME
"$venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.78 >&2
cuobjdump=$CUDA_HOME/bin/cuobjdump
nvdisasm=$CUDA_HOME/bin/nvdisasm
for tool in "$cuobjdump" "$nvdisasm"; do
    if [ ! -x "$tool" ]; then
        echo "kernel-report: $tool missing after installing the wheels" >&2
        exit 1
    fi
done

target=${CARGO_TARGET_DIR:-target}
# The launch table comes from this checkout's planners (`prefix-attn kernels --json`);
# building the release binary also builds the fatbins.
cargo_profile=()
[ "$profile" = release ] && cargo_profile=(--release)
echo "kernel-report: cargo build ${cargo_profile[*]} --bin prefix-attn" >&2
PREFIX_ATTN_REQUIRE_NVCC=1 cargo build "${cargo_profile[@]}" -q --bin prefix-attn >&2
if [ -z "$fatbin_dir" ]; then
    # The newest OUT_DIR of this profile that holds the forward's fatbin.
    newest=$(find "$target/$profile/build" -path '*/prefix-attn-*/out/prefix_attn_fwd.fatbin' \
        -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n 1 | cut -d' ' -f2- || true)
    if [ -z "$newest" ]; then
        echo "kernel-report: no $target/$profile/build/prefix-attn-*/out/prefix_attn_fwd.fatbin after the build" >&2
        exit 1
    fi
    fatbin_dir=$(dirname "$newest")
fi
echo "kernel-report: fatbins in $fatbin_dir" >&2

launches=$(mktemp)
trap 'rm -f "$launches"' EXIT
"$target/$profile/prefix-attn" kernels --json >"$launches"

python3 tools/kernel_report.py report --fatbin-dir "$fatbin_dir" \
    --cuobjdump "$cuobjdump" --nvdisasm "$nvdisasm" --launches "$launches" "${pass[@]}"
