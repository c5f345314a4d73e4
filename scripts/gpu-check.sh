#!/usr/bin/env bash
# The GPU check, in two halves (DESIGN.md §7).
#
#   scripts/gpu-check.sh build   # here, with a Rust toolchain: release, stripped test binaries
#                                # (the GPU tests in one binary) and the prefix-attn CLI into
#                                # gpu-bin/
#   scripts/gpu-check.sh run     # on the CUDA machine (no Rust needed): runs them with
#                                # PREFIX_ATTN_REQUIRE_GPU=1, then the benchmarks and a short
#                                # training on cuda and cpu, and prints a compact summary last
#
# gpu-bin/ is git-ignored: carry it to the GPU machine. run() needs tests/fixtures (tracked).
# The benchmark and training steps print their failures but never change the exit status;
# they are skipped once run() has used GPU_CHECK_BUDGET_S seconds (default 480).
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
    cargo build --release --bin prefix-attn
    cp target/release/prefix-attn gpu-bin/prefix-attn
    echo gpu-bin/prefix-attn
    strip gpu-bin/*
    du -sh gpu-bin
}

# tmo NOMINAL: the timeout for the next optional step, NOMINAL seconds or what is left of
# run()'s budget, whichever is less; prints 0 once fewer than 20 seconds are left.
tmo() {
    local left=$((${GPU_CHECK_BUDGET_S:-480} - SECONDS))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# to RC T: ", timed out after T s" when RC is timeout's status, else nothing.
to() {
    if [ "$1" = 124 ]; then echo ", timed out after $2 s"; fi
}

run() {
    SECONDS=0
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
    echo "== attention benchmarks: ours (fused vs naive concat), PyTorch SDPA, ratios"
    local bench="" rc=0 torch_cuda=0 ours=0
    rm -f /tmp/sdpa.json /tmp/ours.json
    if [ -x gpu-bin/prefix-attn ]; then
        if timeout 150 ./gpu-bin/prefix-attn bench attn --device cuda --json >/tmp/ours.json; then
            ours=1
            bench="ours ok"
            python3 - /tmp/ours.json <<'PY' || true
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
        else
            rc=$?
            echo "prefix-attn bench attn --device cuda: FAILED (rc $rc); its stdout began:"
            head -c 600 /tmp/ours.json || true
            bench="ours FAILED (rc $rc)"
        fi
    else
        echo "gpu-bin/prefix-attn: absent (scripts/gpu-check.sh build copies it)"
        bench="ours absent"
    fi
    python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && torch_cuda=1
    if [ "$torch_cuda" = 1 ]; then
        if timeout 120 python3 tools/bench_attn_sdpa.py --json /tmp/sdpa.json; then
            bench="$bench; sdpa ok"
            if [ "$ours" = 1 ]; then
                python3 tools/bench_attn_sdpa.py --compare /tmp/ours.json --sdpa-json /tmp/sdpa.json ||
                    { rc=$?; echo "compare: FAILED (rc $rc)"; bench="$bench; compare FAILED"; }
            fi
        else
            rc=$?
            echo "bench_attn_sdpa.py: FAILED (rc $rc)"
            bench="$bench; sdpa FAILED (rc $rc)"
        fi
    else
        echo "SDPA baseline skipped: no CUDA-enabled torch for python3"
        bench="$bench; sdpa skipped"
    fi
    step_bench
    train_check
    echo "== summary"
    echo "gpu:  $(tail -n 1 /tmp/gpu-tests.log)"
    echo "emu:  $(grep 'test result' /tmp/emu-tests.log || tail -n 1 /tmp/emu-tests.log)"
    echo "bench: $bench (not part of the exit status)"
    echo "step: $step (not part of the exit status)"
    echo "train: $train (not part of the exit status)"
    exit $status
}

# Training step, gpt2-small B=8 T=128 P=10: ours (--device cuda) against PyTorch + PEFT (fp16
# base, fp32 prefix encoder, eager; tools/README.md). Sets $step; never fails.
step_bench() {
    local args=(--shape gpt2-small --batch 8 --seq 128 --prefix-len 10 --warmup 3 --steps 10
        --device cuda --json)
    local rc=0 t
    echo "== training step: ours vs PyTorch + PEFT (gpt2-small, B=8, T=128, P=10, cuda)"
    step=""
    rm -f /tmp/step-ours.json /tmp/step-torch.json
    t=$(tmo 150)
    if [ ! -x gpu-bin/prefix-attn ]; then
        echo "gpu-bin/prefix-attn: absent"
        step="ours absent"
    elif [ "$t" = 0 ]; then
        echo "ours: skipped (time budget)"
        step="ours skipped (time budget)"
    elif timeout "$t" ./gpu-bin/prefix-attn bench step "${args[@]}" >/tmp/step-ours.json; then
        step="ours ok"
    else
        rc=$?
        echo "prefix-attn bench step --device cuda: FAILED (rc $rc$(to "$rc" "$t")); its stdout began:"
        head -c 600 /tmp/step-ours.json || true
        echo
        step="ours FAILED (rc $rc)"
    fi
    t=$(tmo 150)
    if [ "$torch_cuda" != 1 ]; then
        echo "torch: skipped (no CUDA-enabled torch for python3)"
        step="$step; torch skipped (no CUDA torch)"
    elif [ "$t" = 0 ]; then
        echo "torch: skipped (time budget)"
        step="$step; torch skipped (time budget)"
    elif timeout "$t" python3 tools/bench_step_torch.py "${args[@]}" >/tmp/step-torch.json; then
        step="$step; torch ok"
    else
        rc=$?
        echo "bench_step_torch.py --device cuda: FAILED (rc $rc$(to "$rc" "$t")); its stdout began:"
        head -c 600 /tmp/step-torch.json || true
        echo
        step="$step; torch FAILED (rc $rc)"
    fi
    python3 - /tmp/step-ours.json /tmp/step-torch.json <<'PY' || echo "step table: FAILED (rc $?)"
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
rows = [("ours", ours), ("pytorch+peft", torch)]
print(f"{'':14}{'median ms':>11}{'tokens/s':>12}{'peak dev MB':>13}  loss first -> last")
for name, d in rows:
    fl, ll = num(d, "first_loss"), num(d, "last_loss")
    loss = "n/a" if fl is None or ll is None else f"{fl:.4f} -> {ll:.4f}"
    print(f"{name:14}{fmt(num(d, 'median_ms'), '.2f'):>11}{fmt(num(d, 'tokens_per_s'), ',.0f'):>12}"
          f"{fmt(num(d, 'peak_device_mb'), '.0f'):>13}  {loss}")

def ratio(k):
    a, b = num(torch, k), num(ours, k)
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

print(f"torch / ours: speed {ratio('median_ms')} (> 1: ours faster), "
      f"peak memory {ratio('peak_device_mb')} (> 1: ours smaller)")
if torch:
    print(f"torch side: {torch.get('gpu')}, base {torch.get('dtype')}, prefix encoder "
          f"{torch.get('prefix_encoder_dtype')}, attention {torch.get('attn_implementation')}, "
          f"model resident {fmt(num(torch, 'model_device_mb'), '.0f')} MB; torch "
          f"{torch.get('torch')}, transformers {torch.get('transformers')}, peft {torch.get('peft')}")
PY
}

# A short end-to-end training on the tiny-c fixture, --device cuda and --device cpu, and their
# loss columns side by side. Sets $train; never fails.
train_check() {
    local fx=tests/fixtures/gpt2/tiny-c rc=0 t dev
    local args=(--model "$fx/model" --data "$fx/eval.jsonl" --init "$fx/prefix_encoder.safetensors"
        --prefix-len 5 --mid-dim 16 --steps 6 --batch-size 2 --lr 1e-3 --lr-schedule constant)
    echo "== training: tiny-c fixture, 6 steps, cuda vs cpu"
    train=""
    if [ ! -x gpu-bin/prefix-attn ]; then
        echo "gpu-bin/prefix-attn: absent"
        train="absent"
        return 0
    fi
    for dev in cuda cpu; do
        rm -rf "/tmp/train-$dev"
        t=$(tmo 90)
        if [ "$t" = 0 ]; then
            echo "train --device $dev: skipped (time budget)"
            train="$train${train:+; }$dev skipped (time budget)"
        elif timeout "$t" ./gpu-bin/prefix-attn train "${args[@]}" --device "$dev" \
            --out "/tmp/train-$dev" >"/tmp/train-$dev.log" 2>&1; then
            train="$train${train:+; }$dev ok"
        else
            rc=$?
            echo "prefix-attn train --device $dev: FAILED (rc $rc$(to "$rc" "$t")); its output ends:"
            tail -n 15 "/tmp/train-$dev.log" || true
            train="$train${train:+; }$dev FAILED (rc $rc)"
        fi
    done
    python3 - /tmp/train-cuda/log.jsonl /tmp/train-cpu/log.jsonl <<'PY' || echo "train table: FAILED (rc $?)"
import json, sys

def losses(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[r["step"]] = float(r["loss"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{path}: {e}")
    return out

cu, cp = losses(sys.argv[1]), losses(sys.argv[2])
if not cu and not cp:
    sys.exit(0)
print(f"{'step':>5}{'loss cuda':>14}{'loss cpu':>14}{'|diff|':>12}")
diffs = []
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
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
