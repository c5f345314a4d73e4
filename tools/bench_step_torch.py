#!/usr/bin/env python3
"""PyTorch + PEFT reference for `prefix-attn bench step`: times full prefix-tuning training steps.

One step = forward of a frozen GPT-2 (random weights, built from a GPT2Config; eval mode, all
dropouts 0; or, --shape qwen2-0.5b, a Qwen2ForCausalLM of Qwen2-0.5B's shape from a Qwen2Config) with a PEFT prefix-tuning adapter (prefix_projection=True, i.e. the two-layer MLP
prefix encoder), the causal-LM loss with labels on every token (labels = input_ids, HF's
shift-by-one mean), backward, AdamW(lr=5e-5) step on the prefix encoder's parameters only and
`zero_grad(set_to_none=True)`. Nothing comes from a model hub.

    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/bench_step_torch.py --shape tiny
    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/bench_step_torch.py --shape gpt2-small --json
    python3 tools/bench_step_torch.py --shape gpt2-small --batch 8 --seq 128 --prefix-len 10 \\
        --warmup 3 --steps 10 --device cuda --json          # the GPU goal's shape

--device cpu (default): everything in fp32 on 2 intra-op threads (1 inter-op thread), so that
it matches the Rust side on the same machine.

--device cuda: the natural PEFT setup on a GPU, eager mode (no torch.compile, no AMP autocast,
torch's default TF32 settings). The frozen base GPT-2 is cast to float16 (`base.half()`) and
moved to the GPU before get_peft_model; PEFT builds the prefix encoder in float32 (its
parameters and AdamW state stay fp32) and casts the encoder's output, the prefix K/V, to the
base model's dtype (fp16) in get_prompt. The loss is HF's own: the lm_head logits are fp16,
ForCausalLMLoss upcasts them to fp32 (`logits.float()`) and takes the mean cross-entropy in
fp32; backward then runs through the fp16 model (no loss scaling). That is the baseline as
users run it. Inputs live on the GPU; the thread settings are left alone.

The step time is time.perf_counter around the whole step (forward + backward + optimizer step +
zero_grad), after the warm-up steps; the forward and backward times are measured inside the
same steps, for information. On CUDA, torch.cuda.synchronize() runs before every timer read, so
each time covers the GPU work queued in its phase. Peak RSS is the process's ru_maxrss. On CUDA
also: model_device_mb = torch.cuda.memory_allocated() once the model, its adapter and the
inputs are on the device; peak_device_mb = torch.cuda.max_memory_allocated() over the warm-up
and timed steps, counted from a reset_peak_memory_stats() right after the build (so it
includes the resident model, the AdamW state and the activations).
"""

import argparse
import json
import os
import platform
import re
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
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

THREADS = 2
MB = 1024.0 * 1024.0
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
    # Qwen2-0.5B's shape (what `prefix-attn bench step --shape qwen2-0.5b` builds).
    "qwen2-0.5b": dict(
        family="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896, n_inner=4864,
        vocab_size=151936, n_positions=32768, prefix_len=10, mid_dim=512, batch=4, seq=128,
        steps=3,
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
    ap.add_argument("--device", default="cpu",
                    help="cpu (fp32, default) or cuda[:N] (fp16 base model, fp32 prefix encoder)")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        ap.error(f"--device {a.device}: expected cpu or cuda[:N]")
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
    a.cuda = a.device.startswith("cuda")
    a.index = None
    a.dev = torch.device("cpu")
    if a.cuda:
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable "
                   "CUDA device (torch.cuda.is_available() is False)")
            ap.error(f"--device {a.device}: {why}")
        idx = int(a.device.split(":")[1]) if ":" in a.device else 0
        if idx >= torch.cuda.device_count():
            ap.error(f"--device {a.device}: only {torch.cuda.device_count()} CUDA device(s)")
        a.index = idx
        a.dev = torch.device("cuda", idx)
    return a


def build(a):
    s = SHAPES[a.shape]
    torch.manual_seed(SEED)
    if s.get("family") == "qwen2":
        cfg = Qwen2Config(
            vocab_size=s["vocab_size"],
            hidden_size=s["n_embd"],
            intermediate_size=s["n_inner"],
            num_hidden_layers=s["n_layer"],
            num_attention_heads=s["n_head"],
            num_key_value_heads=s["n_kv_head"],
            max_position_embeddings=s["n_positions"],
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            attention_dropout=0.0,
            bos_token_id=151643,
            eos_token_id=151643,
        )
        base = Qwen2ForCausalLM(cfg).to(torch.float32)
    else:
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
        base = GPT2LMHeadModel(cfg).to(torch.float32)  # initialised in fp32 on the CPU (seeded)
    if a.cuda:
        # The frozen base in fp16 on the GPU; PEFT then builds the prefix encoder (fp32) on the
        # base model's device and casts its output to fp16.
        base = base.half().to(a.dev)
    pcfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=a.prefix_len,
        prefix_projection=True,
        encoder_hidden_size=a.mid_dim,
    )
    model = get_peft_model(base, pcfg)
    model.to(a.dev)  # a no-op on the CPU and where PEFT already placed the encoder
    model.eval()  # frozen base in eval form (no dropout); the prefix encoder has none either
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "no trainable parameters"
    n_base = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=5e-5)
    g = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, s["vocab_size"], (a.batch, a.seq), generator=g).to(a.dev)
    return cfg, model, opt, input_ids, n_base, n_train


def step(model, opt, input_ids, sync):
    """One training step; returns (total, fwd, bwd) seconds and the loss. `sync` runs before
    every timer read (torch.cuda.synchronize on CUDA, nothing on the CPU)."""
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, labels=input_ids)
    loss = out.loss
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    return t3 - t0, t1 - t0, t2 - t1, float(loss.detach())


def dtypes(model):
    """(base model dtype, prefix encoder dtype) as strings."""
    base = next(p for p in model.parameters() if not p.requires_grad).dtype
    enc = next(p for p in model.parameters() if p.requires_grad).dtype
    return str(base).replace("torch.", ""), str(enc).replace("torch.", "")


def main(argv=None):
    a = parse_args(argv)
    if a.cuda:
        torch.cuda.set_device(a.index)
        sync = torch.cuda.synchronize
    else:
        torch.set_num_threads(THREADS)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # only settable before the first inter-op work; harmless here

        def sync():
            pass

    rss_before = max_rss_mb()
    cfg, model, opt, input_ids, n_base, n_train = build(a)
    rss_built = max_rss_mb()
    base_dtype, enc_dtype = dtypes(model)
    model_dev_mb = None
    if a.cuda:
        torch.cuda.synchronize()
        model_dev_mb = torch.cuda.memory_allocated() / MB
        torch.cuda.reset_peak_memory_stats()

    losses = []
    for _ in range(a.warmup):
        losses.append(step(model, opt, input_ids, sync)[3])
    tot, fwd, bwd = [], [], []
    for _ in range(a.steps):
        t, f, b, loss = step(model, opt, input_ids, sync)
        tot.append(t)
        fwd.append(f)
        bwd.append(b)
        losses.append(loss)
    peak = max_rss_mb()
    peak_dev_mb = torch.cuda.max_memory_allocated() / MB if a.cuda else None

    med = statistics.median(tot)
    res = {
        "impl": "pytorch+peft",
        "device": a.device,
        "dtype": base_dtype,
        "prefix_encoder_dtype": enc_dtype,
        "gpu": torch.cuda.get_device_name(a.index) if a.cuda else None,
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
        "peak_device_mb": peak_dev_mb,
        "model_device_mb": model_dev_mb,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": n_train,
        "frozen_params": n_base,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "mkl": torch.backends.mkl.is_available(),
    }
    if a.json:
        print(json.dumps(res))
        return 0

    s = SHAPES[a.shape]
    print(f"PyTorch + PEFT prefix-tuning training step, shape {a.shape}, device {a.device}"
          + (f" ({res['gpu']})" if a.cuda else ""))
    print(f"  model   {s.get('family', 'gpt2')} L={s['n_layer']} H={s['n_head']} C={s['n_embd']} V={s['vocab_size']} "
          f"n_pos={s['n_positions']}, {base_dtype}, eval form (dropout 0), random weights, "
          f"attention {res['attn_implementation']}")
    print(f"  prefix  P={a.prefix_len} E={a.mid_dim} (prefix_projection=True), encoder {enc_dtype}; "
          f"{n_train:,} trainable / {n_base:,} frozen params")
    print(f"  batch   {a.batch} x {a.seq} tokens, labels = input_ids; AdamW(lr=5e-5)")
    if a.cuda:
        print(f"  timing  eager, torch.cuda.synchronize() before each timer read; "
              f"warm-up {a.warmup}, timed steps {a.steps}")
    else:
        print(f"  threads {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} "
              f"inter-op; warm-up {a.warmup}, timed steps {a.steps}")
    print(f"  step    median {res['median_ms']:.2f} ms  (min {res['min_ms']:.2f}, "
          f"max {res['max_ms']:.2f})  -> {res['tokens_per_s']:,.0f} tokens/s")
    print(f"  split   forward {res['fwd_median_ms']:.2f} ms, backward {res['bwd_median_ms']:.2f} ms "
          f"(medians; the rest is AdamW + zero_grad)")
    print(f"  loss    {losses[0]:.4f} (first warm-up step) -> {losses[-1]:.4f} (last)")
    cur = current_rss_mb()
    print(f"  memory  peak RSS {peak:.0f} MB (before building the model {rss_before:.0f} MB, "
          f"after {rss_built:.0f} MB" + (f", now {cur:.0f} MB" if cur is not None else "") + ")")
    if a.cuda:
        print(f"  device  peak {peak_dev_mb:.0f} MB allocated during the steps "
              f"(model + adapter + inputs after the build: {model_dev_mb:.0f} MB)")
    print(f"  versions torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"transformers {transformers.__version__}, "
          f"peft {peft.__version__}, python {platform.python_version()}")
    if a.cuda:
        return 0
    print(f"  BLAS    mkl available: {res['mkl']}; torch build config:")
    for line in blas_lines():
        print(f"            {line}")
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"          (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; "
              "it only matters to OpenBLAS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
