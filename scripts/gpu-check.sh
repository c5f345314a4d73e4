#!/usr/bin/env bash
# The GPU check, in two halves.
#
#   scripts/gpu-check.sh build    # here, with a Rust toolchain: the GPU test binaries (gpu, and
#                                 # candle_cuda: the candle op's CUDA path, feature candle-cuda,
#                                 # xz-compressed) and the prefix-attn CLI, release, stripped,
#                                 # into gpu-bin/ (carry it)
#   scripts/gpu-check.sh run      # on the CUDA machine (no Rust needed): the GPU tests, the candle
#                                 # op's GPU tests, the paged decode kernel's bandwidth, then the
#                                 # attention benchmarks (ours, PyTorch SDPA), then the training
#                                 # step against PyTorch + PEFT, then a short training cuda vs cpu
#   scripts/gpu-check.sh libdirs  # the library folders `run` adds to LD_LIBRARY_PATH
#
# `run` is built for scarce GPU time and for being cut off:
#   - one budget, GPU_CHECK_BUDGET_S seconds (default 300), charged against every step; each step
#     runs under `timeout` with what is left of it, and a step that no longer fits is skipped;
#   - every step's log and each summary line are written to $OUT (when set, else a temporary
#     folder) as they happen, so a run killed at its limit still returns what it measured;
#     the compact summary comes last (and is $OUT/summary.txt);
#   - on a machine without a CUDA GPU it says so in one line within seconds and exits 77;
#   - the exit status is that of the GPU tests, the candle op's included (0 passed; 1 a failure,
#     a time-out or a binary that cannot start); the benchmarks and trainings report their
#     failures but never change it.
# run() needs tests/fixtures and tools/ (tracked) beside gpu-bin/.
set -uo pipefail
cd "$(dirname "$0")/.."

# Bundles larger than this cannot travel to the GPU machine.
readonly BUNDLE_LIMIT_MIB=64

build() {
    set -e
    export CUDA_HOME=${CUDA_HOME:-$(scripts/install-nvcc.sh)}
    export PREFIX_ATTN_REQUIRE_NVCC=1
    rm -rf gpu-bin
    mkdir -p gpu-bin
    cargo test --release --no-run --test gpu --message-format=json 2>/dev/null | copy_tests
    [ -x gpu-bin/gpu ] || { echo "gpu-check build: the gpu test binary was not built" >&2; exit 1; }
    # The candle op's CUDA path: candle compiles its kernels for one architecture (the GPU
    # machine's H100/H200: 90, unless CUDA_COMPUTE_CAP says otherwise) and links the CUDA
    # libraries, here PyPI's and a driver stub (scripts/cuda-link-libs.sh); on the GPU machine
    # the loader finds torch's and the driver's. Its own build of the dependency tree.
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDA_ROOT=$(scripts/cuda-link-libs.sh) \
        cargo test --release --no-run --features candle-cuda --test candle_cuda \
        --message-format=json 2>/dev/null | copy_tests
    [ -x gpu-bin/candle_cuda ] || {
        echo "gpu-check build: the candle_cuda test binary was not built" >&2
        exit 1
    }
    cargo build --release --bin prefix-attn
    cp target/release/prefix-attn gpu-bin/prefix-attn
    echo gpu-bin/prefix-attn
    strip gpu-bin/*
    # candle's kernels make candle_cuda large (~60 MiB stripped, mostly SASS and PTX, which
    # compress well); `run` unpacks it.
    python3 -c "$XZ_PY" pack gpu-bin/candle_cuda gpu-bin/candle_cuda.xz
    rm gpu-bin/candle_cuda
    echo gpu-bin/candle_cuda.xz
    local kib
    kib=$(du -sk gpu-bin | cut -f1)
    echo "gpu-bin: $((kib / 1024)).$(((kib % 1024) * 10 / 1024)) MiB (limit ${BUNDLE_LIMIT_MIB} MiB)"
    if [ "$kib" -ge $((BUNDLE_LIMIT_MIB * 1024)) ]; then
        echo "gpu-check build: gpu-bin is over ${BUNDLE_LIMIT_MIB} MiB and cannot be carried" >&2
        exit 1
    fi
}

# XZ_PY pack|unpack SRC DST: xz compression with Python's lzma (the GPU machine may lack xz).
readonly XZ_PY='
import lzma, shutil, sys
mode, src, dst = sys.argv[1:4]
opener = (lambda: (open(src, "rb"), lzma.open(dst, "wb", preset=6))) if mode == "pack" else (lambda: (lzma.open(src, "rb"), open(dst, "wb")))
fin, fout = opener()
with fin, fout:
    shutil.copyfileobj(fin, fout, 1 << 20)
'

# copy_tests: the test executables of cargo's JSON messages (stdin) into gpu-bin/.
copy_tests() {
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "gpu-bin/" + m["target"]["name"])
        print("gpu-bin/" + m["target"]["name"])
'
}

# libdirs: the folders that may hold cuBLAS/NVRTC (and a pip libcuda stub never counts: the
# driver's libcuda comes from the system loader path). `nvidia` is a namespace package, so its
# folders are nvidia.__path__ (nvidia.__file__ is None); every nvidia/*/lib that exists is
# listed (cu13/lib, cublas/lib, cuda_nvrtc/lib, ...), then the toolkit's lib64. The Python is
# GPU_CHECK_PYTHON (default python3).
libdirs() {
    "${GPU_CHECK_PYTHON:-python3}" - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    roots = list(getattr(nvidia, "__path__", None) or [])
except ImportError:
    roots = []
seen = []
for root in roots:
    for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
        if os.path.isdir(d) and d not in seen:
            seen.append(d)
print("\n".join(seen))
PY
    local home sub
    for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        [ -n "$home" ] || continue
        for sub in lib64 targets/x86_64-linux/lib; do
            [ -d "$home/$sub" ] && echo "$home/$sub"
        done
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# run() and its steps. W is the output folder; every line that matters is appended to a file
# there at once.

W=""
START=0
BUDGET=300

# say LINE...: to stdout and to W/gpu-check.log.
say() {
    printf '%s\n' "$*"
    printf '%s\n' "$*" >>"$W/gpu-check.log"
}

# summary LINE: one summary line, kept in W/summary.txt as it happens.
summary() {
    printf '%s\n' "$*" >>"$W/summary.txt"
    say "summary: $*"
}

# left: seconds of the budget still unspent.
left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME NOMINAL CMD...: runs CMD under timeout min(NOMINAL, what is left), its output
# (stdout and stderr) shown and written to W/NAME.log line by line. Sets STEP_RC (124: timed
# out, 125: skipped for lack of budget) and STEP_T.
step() {
    local name=$1 nominal=$2
    shift 2
    local l
    l=$(left)
    STEP_T=$nominal
    [ "$l" -lt "$STEP_T" ] && STEP_T=$l
    if [ "$STEP_T" -lt 10 ]; then
        say "-- $name: skipped ($l s of the ${BUDGET} s budget left)"
        STEP_RC=125
        return 0
    fi
    say "-- $name (timeout ${STEP_T} s, $l s of the budget left): $*"
    # bash -c: CMD may be a function of this script (exported below).
    timeout -k 5 "$STEP_T" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$W/$name.log"
    STEP_RC=${PIPESTATUS[0]}
    say "-- $name: rc $STEP_RC after $((SECONDS - START)) s in all$([ "$STEP_RC" = 124 ] && echo ", TIMED OUT after ${STEP_T} s")"
    return 0
}

# to_file FILE CMD...: CMD with its stdout (a JSON document) into FILE; stderr stays on the log.
to_file() {
    local f=$1
    shift
    "$@" >"$f"
}
export -f to_file

# verdict: "ok", "timed out after T s", "skipped (budget)" or "FAILED (rc N)" for STEP_RC.
verdict() {
    case "$STEP_RC" in
        0) echo ok ;;
        124 | 137) echo "timed out after ${STEP_T} s" ;;
        125) echo "skipped (budget)" ;;
        *) echo "FAILED (rc $STEP_RC)" ;;
    esac
}

# gpu_present: 0 when a CUDA device answers cuInit/cuDeviceGetCount through the driver's libcuda
# (python ctypes, else nvidia-smi); prints the reason when it does not.
gpu_present() {
    local why
    if command -v python3 >/dev/null 2>&1; then
        why=$(timeout 8 python3 - 2>&1 <<'PY'
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"no libcuda.so.1 on the loader path ({e})")
    sys.exit(1)
rc = cuda.cuInit(0)
if rc != 0:
    print(f"cuInit failed with CUresult {rc}")
    sys.exit(1)
n = ctypes.c_int(0)
rc = cuda.cuDeviceGetCount(ctypes.byref(n))
if rc != 0 or n.value == 0:
    print(f"cuDeviceGetCount gave {n.value} devices (CUresult {rc})")
    sys.exit(1)
PY
        ) && return 0
    elif nvidia-smi -L >/dev/null 2>&1; then
        return 0
    else
        why="neither python3 nor nvidia-smi can reach a driver"
    fi
    echo "${why:-no CUDA device}"
    return 1
}

# libs_report: the CUDA libraries the loader resolves with this
# LD_LIBRARY_PATH (the GPU test binary prints the ones it actually mapped).
libs_report() {
    timeout 8 python3 - <<'PY' || say "library probe: FAILED"
import ctypes
# libcublasLt, libcurand and libcudart: what gpu-bin/candle_cuda links besides.
names = {"libcuda": ["libcuda.so.1", "libcuda.so"],
         "libcublas": ["libcublas.so.13", "libcublas.so"],
         "libnvrtc": ["libnvrtc.so.13", "libnvrtc.so"],
         "libcublasLt": ["libcublasLt.so.13"],
         "libcurand": ["libcurand.so.10"],
         "libcudart": ["libcudart.so.13"]}
for lib, cands in names.items():
    for c in cands:
        try:
            ctypes.CDLL(c)
        except OSError:
            continue
        with open("/proc/self/maps") as f:
            paths = sorted({l.split()[-1] for l in f if "/" + lib + "." in l or "/" + lib + "-" in l})
        print(f"{lib}: {c} -> {', '.join(paths) or '(mapped path not found)'}")
        break
    else:
        print(f"{lib}: NOT FOUND (tried {', '.join(cands)})")
PY
}

run() {
    START=$SECONDS
    BUDGET=${GPU_CHECK_BUDGET_S:-300}
    if [ -n "${OUT:-}" ]; then
        W=$OUT
        mkdir -p "$W"
    else
        W=$(mktemp -d /tmp/gpu-check.XXXXXX)
    fi
    : >"$W/summary.txt"
    local why
    if ! why=$(gpu_present); then
        say "gpu-check: no CUDA GPU on this machine ($why): nothing was run"
        exit 77
    fi
    if [ ! -x gpu-bin/gpu ]; then
        say "gpu-check: gpu-bin/gpu is missing: run scripts/gpu-check.sh build on the build machine and carry gpu-bin/"
        exit 1
    fi
    local d dirs=""
    while IFS= read -r d; do
        [ -n "$d" ] && dirs="$dirs${dirs:+:}$d"
    done < <(libdirs)
    export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "== machine (logs in $W, budget ${BUDGET} s)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$W/gpu-check.log"
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    libs_report | tee -a "$W/gpu-check.log"

    say "== GPU tests"
    export PREFIX_ATTN_REQUIRE_GPU=1
    step gpu-tests 150 ./gpu-bin/gpu
    local status=0
    [ "$STEP_RC" = 0 ] || status=1
    summary "gpu: $(verdict); $(grep -E '^[0-9]+ passed, [0-9]+ failed' "$W/gpu-tests.log" 2>/dev/null | tail -n 1)"

    say "== the candle op's CUDA path (feature candle-cuda) against its CPU path and the oracle"
    local cc_dir cc_bin missing
    cc_dir=$(mktemp -d /tmp/gpu-check-candle.XXXXXX)
    cc_bin=$cc_dir/candle_cuda
    if [ ! -f gpu-bin/candle_cuda.xz ]; then
        summary "candle cuda: FAILED (gpu-bin/candle_cuda.xz is missing: rebuild gpu-bin)"
        status=1
    elif ! python3 -c "$XZ_PY" unpack gpu-bin/candle_cuda.xz "$cc_bin" || ! chmod +x "$cc_bin"; then
        summary "candle cuda: FAILED (cannot unpack gpu-bin/candle_cuda.xz)"
        status=1
    elif missing=$(ldd "$cc_bin" 2>&1 | grep 'not found'); then
        # It links the CUDA libraries: without one of them it cannot start at all.
        say "$missing"
        summary "candle cuda: FAILED (cannot start: $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')not found on LD_LIBRARY_PATH)"
        status=1
    else
        step candle-cuda 90 "$cc_bin"
        [ "$STEP_RC" = 0 ] || status=1
        summary "candle cuda: $(verdict); $(grep -E '^[0-9]+ passed, [0-9]+ failed' "$W/candle-cuda.log" 2>/dev/null | tail -n 1)"
    fi
    rm -rf "$cc_dir"

    say "== paged decode kernel at the decode shape: GB/s against the measured copy (H200 goals: B=64 80 %, B<=4 50 %)"
    step bench-decode 60 to_file "$W/decode.json" ./gpu-bin/prefix-attn bench decode-kernel --device cuda --json
    summary "decode kernel: $(verdict); $(decode_headline "$W/decode.json")"

    say "== attention benchmarks: ours (fused vs naive concat), PyTorch SDPA, ratios"
    local torch_cuda=0 b=""
    step bench-ours 90 to_file "$W/ours.json" ./gpu-bin/prefix-attn bench attn --device cuda --json
    b="ours $(verdict)"
    [ "$STEP_RC" = 0 ] && table_ours "$W/ours.json" | tee -a "$W/gpu-check.log"
    timeout 30 python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && torch_cuda=1
    if [ "$torch_cuda" = 1 ]; then
        step bench-sdpa 75 python3 -u tools/bench_attn_sdpa.py --json "$W/sdpa.json"
        b="$b; sdpa $(verdict)"
        if [ "$STEP_RC" = 0 ] && [ -s "$W/ours.json" ]; then
            step bench-compare 20 python3 -u tools/bench_attn_sdpa.py --compare "$W/ours.json" --sdpa-json "$W/sdpa.json"
            b="$b; compare $(verdict)"
        fi
    else
        b="$b; sdpa skipped (no CUDA-enabled torch)"
    fi
    summary "bench: $b"
    [ -s "$W/ours.json" ] && summary "bench: $(headline "$W/ours.json")"

    say "== training step: ours vs PyTorch + PEFT (gpt2-small, B=8, T=128, P=10, cuda)"
    local args=(--shape gpt2-small --batch 8 --seq 128 --prefix-len 10 --warmup 3 --steps 10 --device cuda --json)
    local s=""
    step step-ours 60 to_file "$W/step-ours.json" ./gpu-bin/prefix-attn bench step "${args[@]}"
    s="ours $(verdict)"
    if [ "$torch_cuda" = 1 ]; then
        step step-torch 75 to_file "$W/step-torch.json" python3 -u tools/bench_step_torch.py "${args[@]}"
        s="$s; torch $(verdict)"
    else
        s="$s; torch skipped (no CUDA-enabled torch)"
    fi
    step_table "$W/step-ours.json" "$W/step-torch.json" | tee -a "$W/gpu-check.log"
    summary "step: $s; $(step_table "$W/step-ours.json" "$W/step-torch.json" | tail -n 1)"

    say "== training: tiny-c fixture, 6 steps, cuda vs cpu"
    local fx=tests/fixtures/gpt2/tiny-c t="" dev
    for dev in cuda cpu; do
        rm -rf "$W/train-$dev"
        step "train-$dev" 45 ./gpu-bin/prefix-attn train --model "$fx/model" --data "$fx/eval.jsonl" \
            --init "$fx/prefix_encoder.safetensors" --prefix-len 5 --mid-dim 16 --steps 6 --batch-size 2 \
            --lr 1e-3 --lr-schedule constant --device "$dev" --out "$W/train-$dev"
        t="$t${t:+; }$dev $(verdict)"
    done
    train_table "$W/train-cuda/log.jsonl" "$W/train-cpu/log.jsonl" | tee -a "$W/gpu-check.log"
    summary "train: $t; $(train_table "$W/train-cuda/log.jsonl" "$W/train-cpu/log.jsonl" | tail -n 1)"

    say "== summary ($((SECONDS - START)) s of ${BUDGET} s; logs in $W)"
    cat "$W/summary.txt"
    exit $status
}

# table_ours FILE: our attention benchmark as a table.
table_ours() {
    python3 - "$1" <<'PY' || echo "ours table: FAILED"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"device {d['device']}: ceilings {d['ceiling_gflops']/1e3:.0f} TFLOP/s, {d['ceiling_gbs']:.0f} GB/s")
print(f"{'shape':<18}{'fwd ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'roof':>7}{'bwd ms':>9}{'TFLOP/s':>9}{'roof':>7}{'xnaive f':>10}{'xnaive b':>10}{'naive +MB':>11}")
for r in d["rows"]:
    print(f"{r['shape']:<18}{r['fwd_ms']:>9.3f}{r['fwd_gflops']/1e3:>9.1f}{r['fwd_gbs']:>8.0f}{100*r['fwd_roofline']:>6.0f}%"
          f"{r['bwd_ms']:>9.3f}{r['bwd_gflops']/1e3:>9.1f}{100*r['bwd_roofline']:>6.0f}%"
          f"{r['speedup_fwd']:>9.2f}x{r['speedup_bwd']:>9.2f}x{r['naive_extra_mb']:>11.1f}")
    print(f"{'':<18}fused vs naive: {r.get('check')}")
PY
}

# headline FILE: one line of fused-vs-naive speed-ups per shape.
headline() {
    python3 - "$1" <<'PY' 2>/dev/null || echo "ours: unreadable $1"
import json, sys
d = json.load(open(sys.argv[1]))
print("fused/naive " + ", ".join(f"{r['shape']} fwd {r['speedup_fwd']:.2f}x bwd {r['speedup_bwd']:.2f}x" for r in d["rows"]))
PY
}

# decode_headline FILE: the decode kernel's GB/s and fraction of the copy per batch size.
decode_headline() {
    python3 - "$1" <<'PY' 2>/dev/null || echo "unreadable $1"
import json, sys
d = json.load(open(sys.argv[1]))
def goal(r):
    if r["h200_goal"] is None:
        return ""
    return f", goal {r['h200_goal']:.0%} {'met' if r['goal_met'] else 'NOT met'}"
print(f"copy {d['copy_gbs']:.0f} GB/s; " + "; ".join(
    f"B={r['batch']} {r['gb_per_s']:.0f} GB/s ({r['fraction_of_copy']:.0%}{goal(r)})" for r in d["rows"]))
PY
}

# step_table OURS TORCH: the training-step comparison; its last line is the ratio.
step_table() {
    python3 - "$1" "$2" <<'PY' || echo "step table: FAILED"
import json, sys

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def num(d, k):
    v = d.get(k)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)

ours, torch = load(sys.argv[1]), load(sys.argv[2])
print(f"{'':14}{'median ms':>11}{'tokens/s':>12}{'peak dev MB':>13}  loss first -> last")
for name, d in [("ours", ours), ("pytorch+peft", torch)]:
    fl, ll = num(d, "first_loss"), num(d, "last_loss")
    loss = "n/a" if fl is None or ll is None else f"{fl:.4f} -> {ll:.4f}"
    print(f"{name:14}{fmt(num(d, 'median_ms'), '.2f'):>11}{fmt(num(d, 'tokens_per_s'), ',.0f'):>12}"
          f"{fmt(num(d, 'peak_device_mb'), '.0f'):>13}  {loss}")
if torch:
    print(f"torch side: {torch.get('gpu')}, base {torch.get('dtype')}, prefix encoder "
          f"{torch.get('prefix_encoder_dtype')}, attention {torch.get('attn_implementation')}; torch "
          f"{torch.get('torch')}, transformers {torch.get('transformers')}, peft {torch.get('peft')}")

def ratio(k):
    a, b = num(torch, k), num(ours, k)
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

print(f"torch/ours speed {ratio('median_ms')} (>1: ours faster), peak memory {ratio('peak_device_mb')} (>1: ours smaller)")
PY
}

# train_table CUDA_LOG CPU_LOG: the two loss columns; its last line is the largest difference.
train_table() {
    python3 - "$1" "$2" <<'PY' || echo "train table: FAILED"
import json, sys

def losses(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if "loss" in r:
                        out[r["step"]] = float(r["loss"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{path}: {e}")
    return out

cu, cp = losses(sys.argv[1]), losses(sys.argv[2])
diffs = []
if cu or cp:
    print(f"{'step':>5}{'loss cuda':>14}{'loss cpu':>14}{'|diff|':>12}")
    for s in sorted(set(cu) | set(cp)):
        a, b = cu.get(s), cp.get(s)
        d = abs(a - b) if a is not None and b is not None else None
        if d is not None:
            diffs.append(d)
        f = lambda v, spec: "n/a" if v is None else format(v, spec)
        print(f"{s:>5}{f(a, '.6f'):>14}{f(b, '.6f'):>14}{f(d, '.2e'):>12}")
print("max |loss cuda - loss cpu|: " + (f"{max(diffs):.3e} over {len(diffs)} steps" if diffs else "n/a"))
PY
}

case "${1:-run}" in
    build) build ;;
    run) run ;;
    libdirs) libdirs ;;
    *)
        echo "usage: $0 build|run|libdirs" >&2
        exit 2
        ;;
esac
