#!/usr/bin/env python3
"""The transformers side of `prefix-attn bench decode`: tokens per second of transformers' own
cached `generate` (greedy, `use_cache=True`, no prefix: its fastest path) on the same random
model shape (GPT-2, or `qwen2-0.5b`: a Qwen2ForCausalLM of Qwen2-0.5B's shape), batch and
lengths as the Rust benchmark (16 prompts of 16 tokens, 32 new tokens each; every request
generates all of them: `min_new_tokens` = `max_new_tokens`).

    /work/venv-hf/bin/python tools/bench_decode_hf.py --shape gpt2-small [--reps 3]
    /work/venv-hf/bin/python tools/bench_decode_hf.py --shape qwen2-0.5b

Prints one JSON object: {"method": "transformers-generate-cached-no-prefix", "tokens",
"seconds" (median of the timed runs), "tokens_per_s", "torch_threads", versions}. One warm-up
run first. The model is random (transformers' own init, seeded): decode cost does not depend
on the weights' values.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "tiny": dict(n_layer=3, n_head=4, n_embd=64, vocab_size=503, n_positions=256),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    # What `prefix-attn bench decode --shape qwen2-0.5b` builds (src/bench/mod.rs).
    "qwen2-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                       tie_word_embeddings=True),
}


def build(shape):
    if shape == "qwen2-0.5b":
        cfg = Qwen2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=0)
        return cfg, Qwen2ForCausalLM(cfg).eval()
    cfg = GPT2Config(**SHAPES[shape], n_inner=None, bos_token_id=0, eos_token_id=0)
    return cfg, GPT2LMHeadModel(cfg).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg, model = build(args.shape)
    g = torch.Generator().manual_seed(17)
    ids = torch.randint(1, cfg.vocab_size, (args.requests, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)

    def once():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape == (args.requests, args.prompt_len + args.new_tokens), out.shape
        return dt

    once()  # warm-up
    times = [once() for _ in range(args.reps)]
    sec = statistics.median(times)
    tokens = args.requests * args.new_tokens
    print(json.dumps({
        "method": "transformers-generate-cached-no-prefix",
        "shape": args.shape,
        "requests": args.requests,
        "tokens": tokens,
        "seconds": sec,
        "seconds_all": times,
        "tokens_per_s": tokens / sec,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
