#!/usr/bin/env python3
"""PyTorch + PEFT reference for `prefix-attn bench step`: times full prefix-tuning training steps.

One step = forward of a frozen GPT-2 (random weights, built from a GPT2Config; eval mode, all
dropouts 0, fp32) with a PEFT prefix-tuning adapter (prefix_projection=True, i.e. the two-layer
MLP prefix encoder), the causal-LM loss with labels on every token (labels = input_ids, HF's
shift-by-one mean), backward, AdamW(lr=5e-5) step on the prefix encoder's parameters only and
`zero_grad(set_to_none=True)`. Nothing comes from a model hub.

    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/bench_step_torch.py --shape tiny
    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/bench_step_torch.py --shape gpt2-small --json

It runs on 2 intra-op threads (1 inter-op thread) so that it matches the Rust side on the same
machine. The step time is time.perf_counter around the whole step (forward + backward +
optimizer step + zero_grad), after the warm-up steps; the forward and backward times are
measured inside the same steps, for information. Peak RSS is the process's ru_maxrss.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

THREADS = 2
SEED = 0

SHAPES = {
    "tiny": dict(
        n_layer=3, n_head=4, n_embd=64, vocab_size=503, n_positions=128,
        prefix_len=7, mid_dim=48, batch=8, seq=64, steps=10,
    ),
    "gpt2-small": dict(
        n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
        prefix_len=10, mid_dim=512, batch=4, seq=128, steps=5,
    ),
}


def max_rss_mb():
    # Linux: ru_maxrss is in KiB; macOS: in bytes.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def current_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def blas_lines():
    """The lines of torch.__config__.show() that say which BLAS/LAPACK torch uses."""
    out = []
    for line in torch.__config__.show().splitlines():
        line = line.strip().lstrip("- ").strip()
        if line.startswith("Build settings:"):
            for kv in line[len("Build settings:"):].split(","):
                kv = kv.strip()
                if kv.split("=")[0] in ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN"):
                    out.append(kv)
        elif any(w in line.lower() for w in ("blas", "lapack", "math kernel library", "cpu capability")):
            out.append(line)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, help="sequences per step (override)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (override)")
    ap.add_argument("--prefix-len", type=int, help="virtual tokens P (override)")
    ap.add_argument("--mid-dim", type=int, help="prefix encoder hidden size E (override)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10 for tiny, 5 for gpt2-small)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    a = ap.parse_args(argv)
    s = SHAPES[a.shape]
    for name in ("batch", "seq", "prefix_len", "mid_dim", "steps"):
        if getattr(a, name) is None:
            setattr(a, name, s[name])
    for name in ("batch", "seq", "prefix_len", "mid_dim", "steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.prefix_len + a.seq > s["n_positions"]:
        ap.error(f"prefix-len + seq = {a.prefix_len + a.seq} > n_positions {s['n_positions']}")
    return a


def build(a):
    s = SHAPES[a.shape]
    torch.manual_seed(SEED)
    cfg = GPT2Config(
        vocab_size=s["vocab_size"],
        n_positions=s["n_positions"],
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = GPT2LMHeadModel(cfg).to(torch.float32)
    pcfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=a.prefix_len,
        prefix_projection=True,
        encoder_hidden_size=a.mid_dim,
    )
    model = get_peft_model(base, pcfg)
    model.eval()  # frozen base in eval form (no dropout); the prefix encoder has none either
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "no trainable parameters"
    n_base = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=5e-5)
    g = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, s["vocab_size"], (a.batch, a.seq), generator=g)
    return cfg, model, opt, input_ids, n_base, n_train


def step(model, opt, input_ids):
    """One training step; returns (total, fwd, bwd) seconds and the loss."""
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, labels=input_ids)
    loss = out.loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t3 - t0, t1 - t0, t2 - t1, float(loss.detach())


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before the first inter-op work; harmless here

    rss_before = max_rss_mb()
    cfg, model, opt, input_ids, n_base, n_train = build(a)
    rss_built = max_rss_mb()

    losses = []
    for _ in range(a.warmup):
        losses.append(step(model, opt, input_ids)[3])
    tot, fwd, bwd = [], [], []
    for _ in range(a.steps):
        t, f, b, loss = step(model, opt, input_ids)
        tot.append(t)
        fwd.append(f)
        bwd.append(b)
        losses.append(loss)
    peak = max_rss_mb()

    med = statistics.median(tot)
    res = {
        "impl": "pytorch+peft",
        "shape": a.shape,
        "batch": a.batch,
        "seq": a.seq,
        "prefix_len": a.prefix_len,
        "mid_dim": a.mid_dim,
        "threads": torch.get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "median_ms": med * 1e3,
        "min_ms": min(tot) * 1e3,
        "max_ms": max(tot) * 1e3,
        "fwd_median_ms": statistics.median(fwd) * 1e3,
        "bwd_median_ms": statistics.median(bwd) * 1e3,
        "tokens_per_s": a.batch * a.seq / med,
        "peak_rss_mb": peak,
        "rss_before_model_mb": rss_before,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": n_train,
        "frozen_params": n_base,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "mkl": torch.backends.mkl.is_available(),
    }
    if a.json:
        print(json.dumps(res))
        return 0

    s = SHAPES[a.shape]
    print(f"PyTorch + PEFT prefix-tuning training step, shape {a.shape}")
    print(f"  model   GPT-2 L={s['n_layer']} H={s['n_head']} C={s['n_embd']} V={s['vocab_size']} "
          f"n_pos={s['n_positions']}, fp32, eval form (dropout 0), random weights")
    print(f"  prefix  P={a.prefix_len} E={a.mid_dim} (prefix_projection=True); "
          f"{n_train:,} trainable / {n_base:,} frozen params")
    print(f"  batch   {a.batch} x {a.seq} tokens, labels = input_ids; AdamW(lr=5e-5)")
    print(f"  threads {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op; "
          f"warm-up {a.warmup}, timed steps {a.steps}")
    print(f"  step    median {res['median_ms']:.2f} ms  (min {res['min_ms']:.2f}, "
          f"max {res['max_ms']:.2f})  -> {res['tokens_per_s']:,.0f} tokens/s")
    print(f"  split   forward {res['fwd_median_ms']:.2f} ms, backward {res['bwd_median_ms']:.2f} ms "
          f"(medians; the rest is AdamW + zero_grad)")
    print(f"  loss    {losses[0]:.4f} (first warm-up step) -> {losses[-1]:.4f} (last)")
    cur = current_rss_mb()
    print(f"  memory  peak RSS {peak:.0f} MB (before building the model {rss_before:.0f} MB, "
          f"after {rss_built:.0f} MB" + (f", now {cur:.0f} MB" if cur is not None else "") + ")")
    print(f"  versions torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, python {platform.python_version()}")
    print(f"  BLAS    mkl available: {res['mkl']}; torch build config:")
    for line in blas_lines():
        print(f"            {line}")
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"          (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; "
              "it only matters to OpenBLAS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
