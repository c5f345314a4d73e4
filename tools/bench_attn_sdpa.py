#!/usr/bin/env python3
"""PyTorch baselines for `prefix-attn bench attn`: attention over pre-concatenated prefix K/V.

For each named shape of docs/ARCHITECTURE.md §6 (src/attn/shapes.rs) it times, in fp16 on a CUDA GPU:

* concat       the naive method's materialisation: the prefix table [1, P, Hkv, D] expanded
               over the batch and concatenated before each sequence's K and V along the key
               axis, `torch.cat([k_pre.expand(B, P, Hkv, D), k], dim=1)`, for K and for V;
* sdpa fwd     `torch.nn.functional.scaled_dot_product_attention` on the pre-concatenated K/V
               (keys P + Tk) with `attn_mask=causal_lower_right(Tq, P + Tk)` (bottom-right
               aligned causal mask, the contract of docs/ARCHITECTURE.md §1; plain `is_causal=True` is
               top-left aligned when Tq != P + Tk) and `enable_gqa=True` where Hq != Hkv;
* sdpa fwd+bwd the same forward with autograd, `torch.autograd.grad` w.r.t. q and the
               concatenated k, v, then the expanded prefix gradient reduced over the batch in
               fp32 (`dk_cat[:, :P].sum(0, dtype=float32)`, same for v), which is what our
               kernels return (dK_pre, dV_pre summed over the sequences that use the prefix);
* unfused      the textbook attention on the same concatenated K/V: QK^T matmul, scale, mask,
               softmax in fp32, cast back, PV matmul (K/V heads repeated for GQA, as HF's
               repeat_kv does), forward and forward+backward (same gradient reduction).

Tensors are token-major as in the contract ([B, T, H, D]); SDPA gets `.transpose(1, 2)` views.
The SDPA backend is chosen by trying `sdpa_kernel([FLASH_ATTENTION])`, then EFFICIENT_ATTENTION,
then MATH; the backend that actually ran (forward and backward) is read from the profiler's aten
op names and reported. Each shape's SDPA and unfused results are checked against each other on
one input set before timing (max |diff| of o, relative max |diff| of the reduced prefix grads).

Timing (CUDA): after warm-up, each sample enqueues `inner` iterations between two CUDA events
behind a `torch.cuda._sleep` spin kernel long enough to cover the host's enqueue time, so the
events measure GPU execution without Python launch gaps (the host enqueue time per iteration is
reported too, as `*_host_ms`; `launch_bound` lists measurements whose enqueue outlasted the spin
kernel). Iterations rotate over several input sets whose total size exceeds `--rotate-mb`
(default 256 MB, 5x the H200's 50 MB L2) so that L2 does not flatter. The median over samples is
reported. CPU: time.perf_counter per iteration, median.

FLOPs are counted exactly as `NamedShape::fwd_flops` in src/attn/shapes.rs (with
`AttnProblem::visible_pairs` / `visible_seq_keys` in src/attn/mod.rs): 4*D per visible
(query, key) pair over batch and query heads; fwd+bwd = 3.5x fwd (backward = 2.5x fwd,
`bwd_flops` in src/bench/mod.rs).

    python3 tools/bench_attn_sdpa.py --json /tmp/sdpa.json          # GPU, all shapes, < 90 s
    python3 tools/bench_attn_sdpa.py --device cpu --quick           # CPU smoke test (scaled)
    python3 tools/bench_attn_sdpa.py --selftest                     # mask and gradient checks
    python3 tools/bench_attn_sdpa.py --compare /tmp/ours.json --sdpa-json /tmp/sdpa.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

T_START = time.perf_counter()

# ---------------------------------------------------------------------------------------------
# Shapes and FLOP counts (src/attn/shapes.rs, docs/ARCHITECTURE.md §6)
# ---------------------------------------------------------------------------------------------

# Copied from `shapes::SHAPES` (src/attn/shapes.rs).
SHAPES = [
    dict(name="gpt2-train", batch=8, heads_q=12, heads_kv=12, tq=128, tk=128,
         prefix_len=10, head_dim=64, causal=True),
    dict(name="gpt2-long-prefix", batch=8, heads_q=12, heads_kv=12, tq=512, tk=512,
         prefix_len=200, head_dim=64, causal=True),
    dict(name="llm-long", batch=4, heads_q=16, heads_kv=4, tq=4096, tk=4096,
         prefix_len=64, head_dim=128, causal=True),
    dict(name="decode", batch=64, heads_q=32, heads_kv=8, tq=1, tk=2048,
         prefix_len=64, head_dim=128, causal=True),
]
SHAPE_NAMES = [s["name"] for s in SHAPES]
DIM_KEYS = ("batch", "heads_q", "heads_kv", "tq", "tk", "prefix_len", "head_dim")


def cpu_scaled(s):
    """`NamedShape::cpu_scaled` (src/attn/shapes.rs): llm-long and decode shrink to B = 1 and at
    most 512 keys; the GPT-2 shapes stay as they are."""
    s = dict(s)
    if s["name"] == "llm-long":
        s.update(batch=1, tq=512, tk=512)
    elif s["name"] == "decode":
        s.update(batch=1, tk=512)
    return s


def visible_seq_keys(s, i):
    """`AttnProblem::visible_seq_keys` (src/attn/mod.rs) with lens_q = Tq, lens_k = Tk."""
    if not s["causal"]:
        return s["tk"]
    return min(max(i + s["tk"] - s["tq"] + 1, 0), s["tk"])


def fwd_flops(s):
    """`NamedShape::fwd_flops` (src/attn/shapes.rs): 4 * D * `visible_pairs()`, where
    visible_pairs (src/attn/mod.rs) sums P + visible_seq_keys(b, i) over the batch and the
    query rows and multiplies by Hq (one prefix shared by the batch, no padding)."""
    per_seq = sum(s["prefix_len"] + visible_seq_keys(s, i) for i in range(s["tq"]))
    return 4.0 * s["head_dim"] * per_seq * s["batch"] * s["heads_q"]


BWD_FACTOR = 2.5  # src/bench/mod.rs: bwd_flops = 2.5 * fwd_flops (docs/ARCHITECTURE.md §6)


def dims_str(s):
    return (f"B={s['batch']} Hq/Hkv={s['heads_q']}/{s['heads_kv']} Tq={s['tq']} Tk={s['tk']} "
            f"P={s['prefix_len']} D={s['head_dim']}")


# ---------------------------------------------------------------------------------------------
# The attention variants (torch imported lazily: --compare needs only json)
# ---------------------------------------------------------------------------------------------

torch = None
F = None


def import_torch():
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F


def contract_mask(s, device):
    """Bool [Tq, P + Tk], True = visible: every prefix key, and sequence key j iff
    j <= i + (Tk - Tq) when causal (docs/ARCHITECTURE.md §1, no padding). Built independently of
    causal_lower_right so the unfused baseline doubles as a check of it."""
    tq, tk, p = s["tq"], s["tk"], s["prefix_len"]
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    seq = (j <= i + (tk - tq)) if s["causal"] else torch.ones(tq, tk, dtype=torch.bool,
                                                                  device=device)
    return torch.cat([torch.ones(tq, p, dtype=torch.bool, device=device), seq], dim=1)


def concat_kv(pre, x):
    """[prefix ; sequence] per sequence: pre [1, P, Hkv, D] (NP = 1), x [B, Tk, Hkv, D]."""
    b = x.shape[0]
    return torch.cat([pre[0].unsqueeze(0).expand(b, -1, -1, -1), x], dim=1)


class Attn:
    """The two attention implementations for one shape; inputs token-major [B, T, H, D],
    outputs [B, Hq, Tq, D] (SDPA's layout; a view of token-major memory for flash)."""

    def __init__(self, s, device):
        from torch.nn.attention.bias import causal_lower_right
        self.s = s
        self.scale = 1.0 / math.sqrt(s["head_dim"])
        self.gqa = s["heads_q"] != s["heads_kv"]
        self.group = s["heads_q"] // s["heads_kv"]
        nk = s["prefix_len"] + s["tk"]
        self.bias = causal_lower_right(s["tq"], nk) if s["causal"] else None
        self.masked_out = ~contract_mask(s, device)

    def sdpa(self, q, kc, vc):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=self.bias,
            scale=self.scale, enable_gqa=self.gqa)

    def unfused(self, q, kc, vc):
        qh, kh, vh = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        if self.group > 1:  # HF's repeat_kv: materialise the K/V heads per query head
            kh = kh.repeat_interleave(self.group, dim=1)
            vh = vh.repeat_interleave(self.group, dim=1)
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        sc = torch.matmul(qh, kh.transpose(-1, -2)).to(acc) * self.scale
        sc = sc.masked_fill(self.masked_out, float("-inf"))
        p = torch.softmax(sc, dim=-1)
        return torch.matmul(p.to(q.dtype), vh)


def fwd_bwd(attn_fn, st, p):
    """Forward with autograd, backward w.r.t. q and the concatenated k, v, then the prefix
    gradient reduced over the batch in fp32. Returns o, dq, dk, dv (sequence part), dk_pre,
    dv_pre ([P, Hkv, D])."""
    o = attn_fn(st["q"], st["kc"], st["vc"])
    dq, dkc, dvc = torch.autograd.grad(o, (st["q"], st["kc"], st["vc"]), st["do"].transpose(1, 2))
    red = torch.float32 if dkc.dtype in (torch.float16, torch.bfloat16) else dkc.dtype
    dkp = dkc[:, :p].sum(0, dtype=red)
    dvp = dvc[:, :p].sum(0, dtype=red)
    return o, dq, dkc[:, p:], dvc[:, p:], dkp, dvp


def make_set(s, device, dtype, gen):
    b, tq, tk = s["batch"], s["tq"], s["tk"]
    hq, hkv, d, p = s["heads_q"], s["heads_kv"], s["head_dim"], s["prefix_len"]

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dtype)

    st = dict(q=rnd(b, tq, hq, d), k=rnd(b, tk, hkv, d), v=rnd(b, tk, hkv, d),
              kp=rnd(1, p, hkv, d), vp=rnd(1, p, hkv, d), do=rnd(b, tq, hq, d))
    st["kc"] = concat_kv(st["kp"], st["k"]).requires_grad_(True)
    st["vc"] = concat_kv(st["vp"], st["v"]).requires_grad_(True)
    st["q"].requires_grad_(True)
    return st


def set_bytes(st):
    return sum(t.numel() * t.element_size() for t in st.values())


# ---------------------------------------------------------------------------------------------
# Backend selection and detection
# ---------------------------------------------------------------------------------------------


def backend_list():
    from torch.nn.attention import SDPBackend
    return [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("math", SDPBackend.MATH)]


def classify_ops(names):
    """The SDPA backend(s) seen among aten op names (forward and backward)."""
    found = []
    for n in names:
        if "flash_attention" in n:
            k = "flash"
        elif "efficient_attention" in n:
            k = "efficient"
        elif "cudnn_attention" in n:
            k = "cudnn"
        elif "attention_math" in n:
            k = "math"
        else:
            continue
        if k not in found:
            found.append(k)
    return found


def profile_ops(fn):
    """The aten op names that fn dispatches, backward included (a TorchDispatchMode also sees
    the ops that the autograd engine runs on its device threads; no profiler, no log noise)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


def detect_backend(fn):
    """Runs fn under a dispatch mode: which SDPA kernels ran. 'math' if none of the fused ops
    appears but a softmax does (the math path decomposes into matmul/softmax ops)."""
    names = profile_ops(fn)
    found = classify_ops(names)
    if not found:
        found = ["math"] if any("softmax" in n for n in names) else ["unknown"]
    return "+".join(found)


def first_line(e):
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:160]


def choose_backend(attn, st, p, sync):
    """Tries flash, efficient, math in that order (fwd and fwd+bwd must both run)."""
    tried = []
    for name, be in backend_list():
        try:
            from torch.nn.attention import sdpa_kernel
            with warnings.catch_warnings(record=True) as wlist:
                warnings.simplefilter("always")
                with sdpa_kernel([be]):
                    with torch.no_grad():
                        attn.sdpa(st["q"], st["kc"], st["vc"])
                    fwd_bwd(attn.sdpa, st, p)
                    sync()
            return name, be, tried, [first_line(w.message) for w in wlist]
        except Exception as e:  # RuntimeError "No available kernel", or an older torch's API
            tried.append(f"{name}: {type(e).__name__}: {first_line(e)}")
    return None, None, tried, []


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device, args, deadline):
        self.cuda = device.type == "cuda"
        self.args = args
        self.deadline = deadline
        if self.cuda:
            self.cyc_per_ms = self._calibrate_sleep()

    def _calibrate_sleep(self):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = None
        for _ in range(3):
            a.record()
            torch.cuda._sleep(2_000_000)
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
            best = ms if best is None else min(best, ms)
        return 2_000_000 / max(best, 1e-3)

    def out_of_time(self):
        return time.perf_counter() > self.deadline

    def measure(self, fn, nsets):
        """fn(i) runs iteration i (uses input set i % nsets). Returns dict with median ms per
        iteration, host enqueue ms per iteration, samples, inner, launch_bound."""
        a = self.args
        if self.cuda:
            return self._measure_cuda(fn, nsets, a.warmup, a.samples)
        return self._measure_cpu(fn, nsets, a.warmup, a.samples)

    def _measure_cpu(self, fn, nsets, warmup, samples):
        for i in range(warmup):
            fn(i % nsets)
        times = []
        t_cap = time.perf_counter() + self.args.max_measure_s
        for i in range(samples):
            t0 = time.perf_counter()
            fn(i % nsets)
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > t_cap and len(times) >= 2:
                break
        ms = statistics.median(times)
        return dict(ms=ms, host_ms=ms, samples=len(times), inner=1, launch_bound=False)

    def _measure_cuda(self, fn, nsets, warmup, samples):
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        it = 0
        for _ in range(max(warmup, 1)):
            fn(it % nsets)
            it += 1
        torch.cuda.synchronize()
        # Estimate: a few iterations back to back (upper bound: includes launch gaps).
        n_est = min(max(nsets, 2), 4)
        s0, s1 = ev(), ev()
        s0.record()
        h0 = time.perf_counter()
        for _ in range(n_est):
            fn(it % nsets)
            it += 1
        h1 = time.perf_counter()
        s1.record()
        s1.synchronize()
        est_ms = s0.elapsed_time(s1) / n_est
        host_ms = (h1 - h0) * 1e3 / n_est
        inner = int(min(max(math.ceil(self.args.target_ms / max(est_ms, 1e-3)), 1),
                        self.args.max_inner))
        # Shrink the number of samples if one sample is long (keep >= 3).
        per_sample_s = (est_ms + host_ms) * inner / 1e3 + 0.002
        samples = int(max(min(samples, self.args.max_measure_s / per_sample_s), 3))
        sleep_ms = min(1.5 * host_ms * inner + 0.5, 500.0)
        cycles = int(sleep_ms * self.cyc_per_ms)
        times, hosts, gaps = [], [], 0
        for _ in range(samples):
            a, b = ev(), ev()
            torch.cuda._sleep(cycles)
            a.record()
            h0 = time.perf_counter()
            for _ in range(inner):
                fn(it % nsets)
                it += 1
            h1 = time.perf_counter()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / inner)
            hosts.append((h1 - h0) * 1e3 / inner)
            if (h1 - h0) * 1e3 > sleep_ms:
                gaps += 1
        return dict(ms=statistics.median(times), host_ms=statistics.median(hosts),
                    samples=samples, inner=inner, launch_bound=gaps > samples // 2)


# ---------------------------------------------------------------------------------------------
# Benchmark of one shape
# ---------------------------------------------------------------------------------------------


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, ref):
    return max_abs(a, ref) / max(ref.double().abs().max().item(), 1e-30)


def bench_shape(s, device, dtype, args, timer):
    import torch.nn.attention as tna
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    p = s["prefix_len"]
    row = dict(shape=s["name"], **{k: s[k] for k in DIM_KEYS}, causal=s["causal"],
               fwd_flops=fwd_flops(s), fwdbwd_flops=(1 + BWD_FACTOR) * fwd_flops(s))
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    st0 = make_set(s, device, dtype, gen)
    one = set_bytes(st0)
    nsets = 2 if not cuda else int(min(max(math.ceil(args.rotate_mb * 1e6 / one), 4), 32))
    nsets = max(1, min(nsets, int(args.max_set_mb * 1e6 // one)))
    sets = [st0] + [make_set(s, device, dtype, gen) for _ in range(nsets - 1)]
    row.update(input_sets=nsets, set_mb=one / 1e6)
    attn = Attn(s, device)

    # Backend choice and detection.
    name, be, tried, warns = choose_backend(attn, st0, p, sync)
    row["sdpa_tried"] = tried
    if warns and args.verbose:
        row["sdpa_warnings"] = sorted(set(warns))[:5]
    if be is None:
        row.update(sdpa_backend=None, sdpa_backend_bwd=None)
    else:
        with tna.sdpa_kernel([be]):
            def run_fwd():
                with torch.no_grad():
                    attn.sdpa(st0["q"], st0["kc"], st0["vc"])
                sync()

            def run_fb():
                fwd_bwd(attn.sdpa, st0, p)
                sync()

            row["sdpa_requested"] = name
            try:
                row["sdpa_backend"] = detect_backend(run_fwd)
                bwd_ops = [n for n in profile_ops(run_fb) if "backward" in n]
                row["sdpa_backend_bwd"] = ("+".join(classify_ops(bwd_ops)) or "math") \
                    if bwd_ops else "unseen"
            except Exception as e:  # detection is informative only
                row.setdefault("errors", []).append(f"backend detection: {first_line(e)}")
                row["sdpa_backend"] = row["sdpa_backend_bwd"] = f"{name}?"

            # Numerical check on set 0: SDPA against the unfused path.
            got = fwd_bwd(attn.sdpa, st0, p)
        ref = fwd_bwd(attn.unfused, st0, p)
        errs = dict(o=max_abs(got[0], ref[0]), dq=rel_err(got[1], ref[1]),
                    dk_pre=rel_err(got[4], ref[4]), dv_pre=rel_err(got[5], ref[5]))
        tol_abs, tol_rel = (2e-2, 2e-2) if dtype in (torch.float16, torch.bfloat16) else (1e-4, 1e-4)
        ok = errs["o"] <= tol_abs and all(errs[k] <= tol_rel for k in ("dq", "dk_pre", "dv_pre"))
        row["check"] = dict(vs="unfused", ok=ok, **{k: float(f"{v:.3g}") for k, v in errs.items()})
        del got, ref
    sync()

    def t_concat(i):
        st = sets[i]
        concat_kv(st["kp"], st["k"])
        concat_kv(st["vp"], st["v"])

    def t_sdpa_fwd(i):
        st = sets[i]
        attn.sdpa(st["q"], st["kc"], st["vc"])

    def t_sdpa_fb(i):
        fwd_bwd(attn.sdpa, sets[i], p)

    def t_unf_fwd(i):
        st = sets[i]
        attn.unfused(st["q"], st["kc"], st["vc"])

    def t_unf_fb(i):
        fwd_bwd(attn.unfused, sets[i], p)

    plan = [("concat", t_concat, False, None), ("sdpa_fwd", t_sdpa_fwd, False, be),
            ("sdpa_fwdbwd", t_sdpa_fb, True, be), ("unfused_fwd", t_unf_fwd, False, None),
            ("unfused_fwdbwd", t_unf_fb, True, None)]
    launch_bound, skipped = [], []
    for key, fn, grad, backend in plan:
        if key.startswith("sdpa") and be is None:
            row[key + "_ms"] = None
            continue
        if timer.out_of_time():
            row[key + "_ms"] = None
            skipped.append(key)
            continue
        try:
            with torch.set_grad_enabled(grad):
                if backend is not None:
                    with tna.sdpa_kernel([backend]):
                        m = timer.measure(fn, nsets)
                else:
                    m = timer.measure(fn, nsets)
        except (RuntimeError, MemoryError) as e:  # e.g. out of memory: report, go on
            row[key + "_ms"] = None
            row.setdefault("errors", []).append(f"{key}: {first_line(e)}")
            if cuda:
                torch.cuda.empty_cache()
            continue
        row[key + "_ms"] = m["ms"]
        row[key + "_host_ms"] = m["host_ms"]
        row[key + "_samples"] = f"{m['samples']}x{m['inner']}"
        if m["launch_bound"]:
            launch_bound.append(key)
    row["launch_bound"] = launch_bound
    if skipped:
        row["skipped_time_budget"] = skipped

    # Derived numbers.
    e = torch.finfo(dtype).bits // 8
    kv_seq = s["batch"] * s["tk"] * s["heads_kv"] * s["head_dim"]
    kv_pre = p * s["heads_kv"] * s["head_dim"]
    kv_cat = s["batch"] * (p + s["tk"]) * s["heads_kv"] * s["head_dim"]
    row["concat_bytes"] = 2 * (kv_seq + kv_pre + kv_cat) * e
    if row.get("concat_ms"):
        row["concat_gbs"] = row["concat_bytes"] / row["concat_ms"] / 1e6
    for k in ("sdpa", "unfused"):
        f, fb = row.get(k + "_fwd_ms"), row.get(k + "_fwdbwd_ms")
        row[k + "_fwd_tflops"] = row["fwd_flops"] / f / 1e9 if f else None
        row[k + "_fwdbwd_tflops"] = row["fwdbwd_flops"] / fb / 1e9 if fb else None
    if row.get("sdpa_fwd_ms") and row.get("sdpa_fwdbwd_ms"):
        # fwd+bwd minus the no-grad forward: an estimate of the backward alone (the autograd
        # forward also writes the LSE, so this slightly overstates the backward).
        row["sdpa_bwd_ms_est"] = row["sdpa_fwdbwd_ms"] - row["sdpa_fwd_ms"]
    del sets, st0
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def print_table(meta, rows):
    print(f"# SDPA on pre-concatenated prefix K/V: {meta['device_name']}, {meta['dtype']}, "
          f"torch {meta['torch']}{', CPU-scaled shapes' if meta['cpu_scaled'] else ''}")
    print("# ms = median per call; TF/s with the FLOPs of src/attn/shapes.rs "
          "(fwd+bwd = 3.5x fwd); concat = both K and V")
    hdr = (f"{'shape':<17} {'backend f/b':<16} {'concat':>8} {'GB/s':>6} {'sdpa fwd':>9} "
           f"{'TF/s':>6} {'sdpa f+b':>9} {'TF/s':>6} {'unf fwd':>9} {'TF/s':>6} "
           f"{'unf f+b':>9} {'TF/s':>6}  check")
    print(hdr)
    print("-" * len(hdr))
    def tf(x):
        return fmt(x, ".1f" if (x or 0) >= 1 else ".3f")

    for r in rows:
        bk = f"{r.get('sdpa_backend') or '-'}/{r.get('sdpa_backend_bwd') or '-'}"
        c = r.get("check")
        chk = "-" if c is None else (("ok" if c["ok"] else "MISMATCH") +
                                     f" (o {c['o']:.1e}, dKp {c['dk_pre']:.1e})")
        print(f"{r['shape']:<17} {bk[:16]:<16} {fmt(r.get('concat_ms')):>8} "
              f"{fmt(r.get('concat_gbs'), '.0f'):>6} {fmt(r.get('sdpa_fwd_ms')):>9} "
              f"{tf(r.get('sdpa_fwd_tflops')):>6} {fmt(r.get('sdpa_fwdbwd_ms')):>9} "
              f"{tf(r.get('sdpa_fwdbwd_tflops')):>6} {fmt(r.get('unfused_fwd_ms')):>9} "
              f"{tf(r.get('unfused_fwd_tflops')):>6} {fmt(r.get('unfused_fwdbwd_ms')):>9} "
              f"{tf(r.get('unfused_fwdbwd_tflops')):>6}  {chk}")
    for r in rows:
        notes = []
        if r.get("sdpa_requested") and r.get("sdpa_backend") != r["sdpa_requested"]:
            notes.append(f"requested {r['sdpa_requested']}, ran {r['sdpa_backend']}")
        if r.get("sdpa_tried"):
            notes.append("unavailable: " + "; ".join(r["sdpa_tried"]))
        if r.get("launch_bound"):
            notes.append("host enqueue outlasted the spin kernel (launch gaps possible): "
                         + ", ".join(r["launch_bound"]))
        if r.get("skipped_time_budget"):
            notes.append("skipped (time budget): " + ", ".join(r["skipped_time_budget"]))
        if r.get("errors"):
            notes.append("errors: " + "; ".join(r["errors"]))
        for w in r.get("sdpa_warnings", []):
            notes.append("warning: " + w)
        for n in notes:
            print(f"  {r['shape']}: {n}")
    print(f"# dims: " + "; ".join(f"{r['shape']} {dims_str(r)} x{r['input_sets']} sets"
                                  for r in rows))
    print(f"# total {time.perf_counter() - T_START:.1f} s")


# ---------------------------------------------------------------------------------------------
# --compare: our `prefix-attn bench attn --json` against the SDPA JSON
# ---------------------------------------------------------------------------------------------


def load_json_tolerant(path):
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # Log lines around the JSON: take the first line, or the longest span, that parses.
    for line in text.splitlines():
        line = line.strip()
        if line[:1] in "[{":
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    for opener, closer in (("{", "}"), ("[", "]")):
        a, b = text.find(opener), text.rfind(closer)
        if 0 <= a < b:
            try:
                return json.loads(text[a:b + 1])
            except json.JSONDecodeError:
                pass
    raise ValueError(f"{path}: no JSON found ({len(text)} bytes; starts {text[:80]!r})")


def rows_of(doc):
    """Rows from a list, {"rows": [...]}, {"results"/"shapes": [...]}, or {shape: {...}}."""
    meta = {}
    if isinstance(doc, dict):
        meta = {k: v for k, v in doc.items() if not isinstance(v, (list, dict))}
        for key in ("rows", "results", "shapes", "benchmarks"):
            if isinstance(doc.get(key), list):
                return doc[key], meta
        if doc and all(isinstance(v, dict) for v in doc.values()):
            return [dict(v, shape=v.get("shape", k)) for k, v in doc.items()], meta
        if "shape" in doc:
            return [doc], meta
        return [], meta
    if isinstance(doc, list):
        return doc, meta
    return [], meta


def shape_name(r):
    s = r.get("shape", r.get("name"))
    if isinstance(s, dict):
        s = s.get("name")
    return s


def pick(r, *keys):
    for k in keys:
        if isinstance(r.get(k), (int, float)):
            return float(r[k]), k
    return None, None


def compare(ours_path, sdpa_path):
    try:
        ours_doc = load_json_tolerant(ours_path)
        sdpa_doc = load_json_tolerant(sdpa_path)
    except (OSError, ValueError) as e:
        print(f"compare: {e}")
        return 1
    ours, ours_meta = rows_of(ours_doc)
    sdpa, sdpa_meta = rows_of(sdpa_doc)
    print(f"# ours: {ours_path} ({len(ours)} rows"
          + (f", device {ours_meta['device']}" if "device" in ours_meta else "") + ")")
    print(f"# sdpa: {sdpa_path} ({len(sdpa)} rows, {sdpa_meta.get('device_name', '?')}, "
          f"{sdpa_meta.get('dtype', '?')})")
    if not ours:
        top = list(ours_doc.keys()) if isinstance(ours_doc, dict) else type(ours_doc).__name__
        print(f"compare: no rows found in {ours_path}; top level: {top}")
        return 1
    if "device" in ours_meta and "device" in sdpa_meta and ours_meta["device"] != sdpa_meta["device"]:
        print(f"# WARNING: devices differ (ours {ours_meta['device']}, sdpa {sdpa_meta['device']})")
    by_shape = {shape_name(r): r for r in sdpa}
    print("# x = SDPA (or unfused) time / our time, > 1: ours faster; 'x cat+' counts the concat "
          "with SDPA; ours f+b = fwd_ms + bwd_ms")
    hdr = (f"{'shape':<17} {'ours fwd':>9} {'sdpa fwd':>9} {'x sdpa':>7} {'x cat+':>7} "
           f"{'ours f+b':>9} {'sdpa f+b':>9} {'x sdpa':>7} {'x cat+':>7} {'x unf f+b':>9}  "
           f"{'sdpa backend':<12}")
    print(hdr)
    print("-" * len(hdr))
    notes, lacking = [], {}
    for r in ours:
        name = shape_name(r)
        fwd, fk = pick(r, "fwd_ms", "fused_fwd_ms", "fwd_median_ms", "forward_ms")
        bwd, bk = pick(r, "bwd_ms", "fused_bwd_ms", "bwd_median_ms", "backward_ms")
        fb, _ = pick(r, "fwdbwd_ms", "fwd_bwd_ms", "fused_fwdbwd_ms")
        if fb is None and fwd is not None and bwd is not None:
            fb = fwd + bwd
        if fwd is None and fb is None:
            notes.append(f"{name}: no fwd_ms/bwd_ms in our row; keys found: {sorted(r)}")
        s = by_shape.get(name)
        if s is None:
            notes.append(f"{name}: not in the SDPA JSON (it has {sorted(by_shape, key=str)})")
            print(f"{str(name):<17} {fmt(fwd):>9} {'-':>9} {'-':>7} {'-':>7} {fmt(fb):>9}")
            continue
        diff = [f"{k} {r[k]} vs {s[k]}" for k in DIM_KEYS
                if k in r and k in s and r[k] != s[k]]
        if diff:
            notes.append(f"{name}: dimensions differ (ours vs sdpa: {', '.join(diff)}); "
                         "times not comparable, ratios omitted")
        missing = [k for k in DIM_KEYS if k not in r]
        if missing and not diff:
            lacking.setdefault(", ".join(missing), []).append(str(name))

        def ratio(num, den):
            return None if diff or not num or not den else num / den

        sf, sfb, cat = s.get("sdpa_fwd_ms"), s.get("sdpa_fwdbwd_ms"), s.get("concat_ms")
        print(f"{name:<17} {fmt(fwd):>9} {fmt(sf):>9} {fmt(ratio(sf, fwd), '.2f'):>7} "
              f"{fmt(ratio(sf + cat if sf and cat else None, fwd), '.2f'):>7} "
              f"{fmt(fb):>9} {fmt(sfb):>9} {fmt(ratio(sfb, fb), '.2f'):>7} "
              f"{fmt(ratio(sfb + cat if sfb and cat else None, fb), '.2f'):>7} "
              f"{fmt(ratio(s.get('unfused_fwdbwd_ms'), fb), '.2f'):>9}  "
              f"{str(s.get('sdpa_backend')) + '/' + str(s.get('sdpa_backend_bwd')):<12}")
    for miss, names in lacking.items():
        notes.append(f"{', '.join(names)}: our rows lack {miss}; assumed equal to SDPA's")
    only = [n for n in by_shape if n not in {shape_name(r) for r in ours}]
    if only:
        notes.append(f"in the SDPA JSON only: {', '.join(map(str, only))}")
    for n in notes:
        print("  " + n)
    return 0


# ---------------------------------------------------------------------------------------------
# --selftest: the mask alignment and the reduced prefix gradient, on tiny float64 shapes
# ---------------------------------------------------------------------------------------------


def hand_mask(s):
    """The contract's mask from explicit loops (docs/ARCHITECTURE.md §1, no padding)."""
    tq, tk, p = s["tq"], s["tk"], s["prefix_len"]
    rows = []
    for i in range(tq):
        row = [True] * p
        for j in range(tk):
            row.append((not s["causal"]) or j <= i + (tk - tq))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def loop_reference(s, st):
    """Explicit loops over (b, h, i), with per-sequence prefix leaves shared by the batch:
    autograd accumulates the prefix gradient over b. Returns o [B,Hq,Tq,D] and grads."""
    b_, tq, tk, hq, hkv, d, p = (s[k] for k in ("batch", "tq", "tk", "heads_q", "heads_kv",
                                                  "head_dim", "prefix_len"))
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    q = st["q"].detach().clone().requires_grad_(True)
    k = st["k"].detach().clone().requires_grad_(True)
    v = st["v"].detach().clone().requires_grad_(True)
    kp = st["kp"][0].detach().clone().requires_grad_(True)
    vp = st["vp"][0].detach().clone().requires_grad_(True)
    outs = torch.zeros(b_, hq, tq, d, dtype=q.dtype)
    loss = 0.0
    for b in range(b_):
        for h in range(hq):
            kv = h // g
            for i in range(tq):
                keys, vals = [], []
                for j in range(p):
                    keys.append(kp[j, kv])
                    vals.append(vp[j, kv])
                for j in range(tk):
                    if (not s["causal"]) or j <= i + tk - tq:
                        keys.append(k[b, j, kv])
                        vals.append(v[b, j, kv])
                sc = torch.stack([q[b, i, h] @ kk for kk in keys]) * scale
                w = torch.softmax(sc, dim=0)
                o = sum(w[n] * vals[n] for n in range(len(vals)))
                outs[b, h, i] = o.detach()
                loss = loss + (o * st["do"][b, i, h]).sum()
    loss.backward()
    return outs, q.grad, k.grad, v.grad, kp.grad, vp.grad


def selftest():
    import torch.nn.attention as tna
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    torch.manual_seed(0)
    dev = torch.device("cpu")
    dt = torch.float64
    cases = [
        dict(name="gqa Tq<Tk", batch=2, heads_q=4, heads_kv=2, tq=3, tk=5, prefix_len=2,
             head_dim=8, causal=True),
        dict(name="square", batch=3, heads_q=2, heads_kv=2, tq=4, tk=4, prefix_len=3,
             head_dim=4, causal=True),
        dict(name="decode mqa", batch=2, heads_q=4, heads_kv=1, tq=1, tk=6, prefix_len=2,
             head_dim=8, causal=True),
        dict(name="non-causal", batch=2, heads_q=2, heads_kv=1, tq=3, tk=4, prefix_len=2,
             head_dim=4, causal=False),
    ]
    failures = []

    def check(cond, what):
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    gen = torch.Generator().manual_seed(1)
    for s in cases:
        p = s["prefix_len"]
        nk = p + s["tk"]
        print(f"case {s['name']}: {dims_str(s)} causal={s['causal']}")
        hm = hand_mask(s)
        check(torch.equal(hm, contract_mask(s, dev)), "contract_mask == hand-built loop mask")
        if s["causal"]:
            lr = causal_lower_right(s["tq"], nk)._materialize(dev)
            check(torch.equal(lr, hm), "causal_lower_right(Tq, P+Tk) == hand-built mask")
            ul = causal_upper_left(s["tq"], nk)._materialize(dev)
            if s["tq"] != nk:
                check(not torch.equal(ul, hm), "is_causal=True (upper-left) would differ")
        st = make_set(s, dev, dt, gen)
        attn = Attn(s, dev)
        ref = loop_reference(s, st)
        # SDPA with an explicit hand-built mask (no CausalBias), GQA expanded by hand.
        g = s["heads_q"] // s["heads_kv"]
        with torch.no_grad():
            o_hand = F.scaled_dot_product_attention(
                st["q"].transpose(1, 2),
                st["kc"].transpose(1, 2).repeat_interleave(g, dim=1),
                st["vc"].transpose(1, 2).repeat_interleave(g, dim=1),
                attn_mask=hm, scale=attn.scale)
        check(max_abs(o_hand, ref[0]) < 1e-12,
              f"SDPA(explicit mask) == loop reference (max |diff| {max_abs(o_hand, ref[0]):.1e})")
        names = ["o", "dq", "dk", "dv", "dk_pre", "dv_pre"]
        variants = [("unfused", attn.unfused, None)]
        for bname, be in backend_list():
            variants.append((f"sdpa[{bname}]", attn.sdpa, be))
        for vname, fn, be in variants:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if be is None:
                        got = fwd_bwd(fn, st, p)
                    else:
                        with tna.sdpa_kernel([be]):
                            got = fwd_bwd(fn, st, p)
                            ran = detect_backend(lambda: fn(st["q"], st["kc"], st["vc"]))
                        vname += f" ran {ran}"
            except RuntimeError as e:
                print(f"  --   {vname}: not available on CPU float64 ({first_line(e)})")
                continue
            got = list(got)
            errs = {n: max_abs(a, b) for n, a, b in zip(names, got, ref)}
            worst = max(errs.values())
            check(worst < 1e-10, f"{vname}: o, dq, dk, dv, dk_pre, dv_pre == loop reference "
                                 f"(max |diff| {worst:.1e})")
        # Finite differences of L = sum(o * dO) w.r.t. a few prefix entries, through the SDPA
        # forward on the concatenation (central differences, float64).
        _, _, _, _, dkp, dvp = fwd_bwd(attn.sdpa, st, p)

        def loss(kp, vp):
            with torch.no_grad():
                kc, vc = concat_kv(kp, st["k"]), concat_kv(vp, st["v"])
                o = attn.sdpa(st["q"], kc, vc)
                return (o * st["do"].transpose(1, 2)).sum().item()

        eps, worst = 1e-6, 0.0
        for which, grad in (("kp", dkp), ("vp", dvp)):
            for _ in range(3):
                idx = tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in grad.shape)
                plus = {"kp": st["kp"].clone(), "vp": st["vp"].clone()}
                minus = {"kp": st["kp"].clone(), "vp": st["vp"].clone()}
                plus[which][(0,) + idx] += eps
                minus[which][(0,) + idx] -= eps
                fd = (loss(plus["kp"], plus["vp"]) - loss(minus["kp"], minus["vp"])) / (2 * eps)
                worst = max(worst, abs(fd - grad[idx].item()) / max(abs(fd), 1e-3))
        check(worst < 1e-6, f"reduced prefix grads == finite differences "
                            f"(6 entries, max rel diff {worst:.1e})")
    print(f"selftest: {'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See tools/README.md.")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda if "
                    "available)")
    ap.add_argument("--shape", default="all", help=f"all or one of {', '.join(SHAPE_NAMES)} "
                    "(comma-separated list allowed)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                    help="default float16 on CUDA, float32 on the CPU")
    ap.add_argument("--scale", default="auto", choices=["auto", "full", "cpu"],
                    help="full shapes, or cpu-scaled (NamedShape::cpu_scaled); auto: full on "
                         "CUDA, cpu-scaled on the CPU")
    ap.add_argument("--quick", action="store_true",
                    help="few samples (CPU smoke test); on the CPU also halves the GPT-2 batches")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3; "
                    "quick 1)")
    ap.add_argument("--samples", type=int, default=None, help="timed samples per measurement "
                    "(default 9 on CUDA, 5 on the CPU; quick 3)")
    ap.add_argument("--target-ms", type=float, default=5.0,
                    help="CUDA: GPU time per sample; short calls are repeated to reach it")
    ap.add_argument("--max-inner", type=int, default=40, help="CUDA: most calls per sample")
    ap.add_argument("--max-measure-s", type=float, default=2.0,
                    help="soft cap on one measurement's timed part")
    ap.add_argument("--rotate-mb", type=float, default=256.0,
                    help="CUDA: rotate input sets totalling at least this (4..32 sets)")
    ap.add_argument("--max-set-mb", type=float, default=8000.0,
                    help="cap on the memory of all input sets of one shape")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from start after which remaining measurements are skipped "
                         "(default 75; quick 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--compare", metavar="OURS_JSON",
                    help="compare `prefix-attn bench attn --json` output with SDPA results "
                         "(from --sdpa-json, else measured now)")
    ap.add_argument("--sdpa-json", metavar="PATH",
                    help="with --compare: SDPA results written earlier by --json")
    ap.add_argument("--selftest", action="store_true",
                    help="check causal_lower_right against a hand-built mask and the reduced "
                         "prefix gradient against loops and finite differences (CPU, float64)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("-v", "--verbose", action="store_true", help="also list SDPA warnings")
    args = ap.parse_args()

    if args.compare and args.sdpa_json:
        return compare(args.compare, args.sdpa_json)
    if args.sdpa_json and not args.compare:
        ap.error("--sdpa-json goes with --compare")

    import_torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.selftest:
        return selftest()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_attn_sdpa: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    dtype = {"auto": torch.float16 if cuda else torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.samples is None:
        args.samples = 3 if args.quick else (9 if cuda else 5)
    if args.time_budget is None:
        args.time_budget = 50.0 if args.quick else 75.0
    scaled = args.scale == "cpu" or (args.scale == "auto" and not cuda)

    wanted = SHAPE_NAMES if args.shape == "all" else args.shape.split(",")
    for w in wanted:
        if w not in SHAPE_NAMES:
            ap.error(f"--shape {w}: expected all or one of {', '.join(SHAPE_NAMES)}")
    shapes = [s for s in SHAPES if s["name"] in wanted]
    if scaled:
        shapes = [cpu_scaled(s) for s in shapes]
    if args.quick and not cuda:
        shapes = [dict(s, batch=max(1, s["batch"] // 2)) for s in shapes]

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    meta = dict(tool="tools/bench_attn_sdpa.py", device=device.type, device_name=name,
                torch=torch.__version__, cuda=torch.version.cuda, dtype=str(dtype).split(".")[-1],
                cpu_scaled=scaled, quick=args.quick, rotate_mb=args.rotate_mb,
                timing=("cuda events behind a spin kernel, median per call" if cuda
                        else "perf_counter per call, median"),
                flops="src/attn/shapes.rs NamedShape::fwd_flops; fwdbwd = 3.5x fwd")
    timer = Timer(device, args, T_START + args.time_budget)
    rows = []
    for s in shapes:
        if timer.out_of_time():
            rows.append(dict(shape=s["name"], **{k: s[k] for k in DIM_KEYS},
                             skipped_time_budget=["all"], input_sets=0))
            continue
        try:
            rows.append(bench_shape(s, device, dtype, args, timer))
        except Exception as e:  # keep going: one shape's failure must not lose the others
            rows.append(dict(shape=s["name"], **{k: s[k] for k in DIM_KEYS}, input_sets=0,
                             errors=[f"{type(e).__name__}: {first_line(e)}"]))
            if cuda:
                torch.cuda.empty_cache()
        print(f"  [{time.perf_counter() - T_START:5.1f} s] {s['name']} done", file=sys.stderr,
              flush=True)
    meta["total_s"] = time.perf_counter() - T_START
    print_table(meta, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        print(f"# wrote {args.json}")
    rc = 0
    if any(r.get("check") and not r["check"]["ok"] for r in rows):
        print("# WARNING: SDPA and the unfused baseline disagree on some shape (see check)")
        rc = 1
    if args.compare:
        print()
        if not args.json:
            args.json = "/tmp/bench_attn_sdpa.json"
            with open(args.json, "w") as f:
                json.dump(dict(meta, rows=rows), f, indent=1)
        rc = compare(args.compare, args.json) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
