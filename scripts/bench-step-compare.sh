#!/usr/bin/env bash
# CPU speed comparison of one prefix-tuning training step (forward, backward, optimizer step):
# the Rust crate against PyTorch + PEFT, on the same machine, one after the other.
#
#   scripts/bench-step-compare.sh [tiny|gpt2-small|qwen2-0.5b|all]      # default: tiny and gpt2-small
#
# Per shape it runs
#   cargo run --release -q -- bench step --shape SHAPE --json          (the Rust side)
#   $PYTHON tools/bench_step_torch.py --shape SHAPE --json             (the reference)
# each printing one JSON object with median_ms, min_ms, max_ms, tokens_per_s, peak_rss_mb, and
# prints a table with both medians, the speed ratio (torch median / rust median: > 1 means Rust
# is faster), both peak RSS and the memory ratio (torch peak / rust peak: > 1 means Rust uses
# less memory).
#
# Environment:
#   PYTHON           the Python with torch, transformers and peft (default /work/venv-hf/bin/python
#                    if it exists, else python3)
#   CARGO            cargo to use (default cargo)
#   BENCH_STEP_JSON  if set, a file to which the raw JSON objects are appended, one per line
# JSON is parsed with the system python3.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "bench-step-compare: error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

which_shapes=${1:-all}
case "$which_shapes" in
    tiny | gpt2-small | qwen2-0.5b) shapes=("$which_shapes") ;;
    all) shapes=(tiny gpt2-small) ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown shape '$which_shapes' (expected tiny, gpt2-small or all)"
        ;;
esac
[ $# -le 1 ] || die "too many arguments (usage: $0 [tiny|gpt2-small|all])"

if [ -z "${PYTHON:-}" ]; then
    if [ -x /work/venv-hf/bin/python ]; then
        PYTHON=/work/venv-hf/bin/python
    else
        PYTHON=python3
    fi
fi
CARGO=${CARGO:-cargo}
command -v python3 >/dev/null || die "python3 (used to parse the JSON) is not on PATH"
command -v "$CARGO" >/dev/null || die "cargo ('$CARGO') is not on PATH"
command -v "$PYTHON" >/dev/null || die "PYTHON='$PYTHON' not found"
"$PYTHON" -c 'import torch, transformers, peft' 2>/dev/null ||
    die "PYTHON='$PYTHON' cannot import torch, transformers and peft (set PYTHON to the venv's python; see tools/README.md)"
[ -f tools/bench_step_torch.py ] || die "tools/bench_step_torch.py is missing"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-step-compare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Prints the last line of $1 that is a JSON object having the contract's keys, or fails.
extract_json() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
path, who = sys.argv[1], sys.argv[2]
need = ("median_ms", "min_ms", "max_ms", "tokens_per_s", "peak_rss_mb")
obj = None
for line in open(path, encoding="utf-8", errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if isinstance(o, dict):
            obj = o
if obj is None:
    sys.exit(f"bench-step-compare: error: {who} printed no JSON object on stdout")
missing = [k for k in need if k not in obj]
if missing:
    sys.exit(f"bench-step-compare: error: {who}'s JSON lacks {', '.join(missing)}")
print(json.dumps(obj))
EOF
}

# Builds once up front, so that compile time and compile errors stay out of the timings.
echo "bench-step-compare: building the Rust side (cargo build --release) ..." >&2
"$CARGO" build --release -q || die "cargo build --release failed"

# The Rust command exists? (it prints clap's usage error for an unknown subcommand)
if ! "$CARGO" run --release -q -- bench step --help >"$tmp/help.out" 2>"$tmp/help.err"; then
    echo "---- cargo run --release -q -- bench step --help:" >&2
    tail -n 20 "$tmp/help.err" >&2
    die "the Rust command 'prefix-attn bench step' is missing (or broken): 'cargo run --release -q -- bench step --help' failed. It must exist and accept '--shape SHAPE --json'."
fi

run_rust() {
    local shape=$1 out=$tmp/rust.$1
    echo "bench-step-compare: [$shape] rust: cargo run --release -q -- bench step --shape $shape --json" >&2
    if ! "$CARGO" run --release -q -- bench step --shape "$shape" --json >"$out.stdout" 2>"$out.stderr"; then
        echo "---- stderr of the Rust side:" >&2
        tail -n 30 "$out.stderr" >&2
        die "the Rust side failed for shape $shape (see above)"
    fi
    extract_json "$out.stdout" "the Rust side ($shape)" >"$out.json" || exit 1
}

run_torch() {
    local shape=$1 out=$tmp/torch.$1
    echo "bench-step-compare: [$shape] torch: $PYTHON tools/bench_step_torch.py --shape $shape --json" >&2
    if ! "$PYTHON" tools/bench_step_torch.py --shape "$shape" --json >"$out.stdout" 2>"$out.stderr"; then
        echo "---- stderr of the PyTorch side:" >&2
        tail -n 30 "$out.stderr" >&2
        die "the PyTorch side failed for shape $shape (see above)"
    fi
    extract_json "$out.stdout" "the PyTorch side ($shape)" >"$out.json" || exit 1
}

for shape in "${shapes[@]}"; do
    run_rust "$shape"
    run_torch "$shape"
    if [ -n "${BENCH_STEP_JSON:-}" ]; then
        cat "$tmp/rust.$shape.json" "$tmp/torch.$shape.json" >>"$BENCH_STEP_JSON"
    fi
done

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || true)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
if [ -n "$(git status --porcelain 2>/dev/null | head -n 1)" ]; then commit="$commit (dirty)"; fi
echo
echo "prefix-tuning training step, CPU: ${cpu:-unknown} ($(nproc 2>/dev/null || echo '?') cores); commit $commit"
[ -z "${OPENBLAS_CORETYPE:-}" ] || echo "OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE (torch uses MKL; it does not read this)"

python3 - "$tmp" "${shapes[@]}" <<'EOF'
import json, sys
tmp, shapes = sys.argv[1], sys.argv[2:]

def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def f(v, nd=1):
    v = num(v)
    return "n/a" if v is None else f"{v:,.{nd}f}"

def ratio(a, b):
    a, b = num(a), num(b)
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"

hdr = f"{'shape':<11} {'impl':<14} {'median ms':>10} {'min ms':>10} {'max ms':>10} {'tokens/s':>10} {'peak RSS MB':>12} {'threads':>7}"
print(hdr)
print("-" * len(hdr))
summary = []
notes = []
for s in shapes:
    r = json.load(open(f"{tmp}/rust.{s}.json"))
    t = json.load(open(f"{tmp}/torch.{s}.json"))
    for name, o in (("rust", r), (t.get("impl", "pytorch+peft"), t)):
        print(f"{s:<11} {name:<14} {f(o['median_ms'], 2):>10} {f(o['min_ms'], 2):>10} {f(o['max_ms'], 2):>10} "
              f"{f(o['tokens_per_s'], 0):>10} {f(o['peak_rss_mb'], 0):>12} {str(o.get('threads', '?')):>7}")
    dims = [k for k in ("batch", "seq", "prefix_len", "mid_dim") if k in r and k in t and r[k] != t[k]]
    if dims:
        print(f"{'':<11} warning: the two sides ran different sizes: "
              + ", ".join(f"{k} {r[k]} vs {t[k]}" for k in dims))
    summary.append((s, ratio(t["median_ms"], r["median_ms"]), ratio(t["peak_rss_mb"], r["peak_rss_mb"])))
    if num(t.get("rss_before_model_mb")) is not None:
        notes.append(f"{s}: the PyTorch peak includes {t['rss_before_model_mb']:,.0f} MB in use after "
                     "importing torch/transformers/peft, before the model was built")
print()
print(f"{'shape':<11} {'speed torch/rust':>17} {'memory torch/rust':>18}")
for s, sp, mem in summary:
    print(f"{s:<11} {sp:>17} {mem:>18}")
print("speed = torch median / rust median (> 1: Rust faster); "
      "memory = torch peak RSS / rust peak RSS (> 1: Rust uses less)")
for n in notes:
    print(n)
EOF
