#!/usr/bin/env python3
"""Reference fixtures for the Rust GPT-2 / prefix-tuning code.

Builds three tiny random GPT-2 models with Hugging Face transformers (tiny-a: f32, head dim 16, a
tokenizer; tiny-b: bf16 legacy-style checkpoint, head dim 16; tiny-c: fp16, head dim 64, the size
the CUDA kernels take), wraps them in a PEFT prefix-tuning model (prefix_projection=True, i.e. the
two-layer MLP prefix encoder) and writes, per model, everything a Rust test needs to check itself
against PyTorch:

    tests/fixtures/gpt2/<name>/
        model/config.json, model/model.safetensors (+ model/tokenizer.json for tiny-a)
        prefix_encoder.safetensors   initial PEFT PrefixEncoder state dict (f32, PEFT names)
        adapter/                     what peft_model.save_pretrained() writes
        eval.jsonl                   the batch, unpadded: {"input_ids": [...], "labels": [...]}
        expected.safetensors         f64 reference values (logits, losses, prefix, grads, greedy gen,
                                     and train.<run>.*: 3 optimiser steps with AdamW / SGD + schedules);
                                     tiny-c also fp16.*: the same stack run with the model in fp16
                                     (fp32 prefix encoder and AdamW, summed-loss backward divided by the
                                     token count at the encoder), the error scale for fp16 backends
        versions.json                versions, configs, seeds, tensor names, what was verified

Every reference value is computed in float64 from exactly the weights that are stored (for
tiny-b: the bf16-rounded weights, for tiny-c the fp16-rounded ones). The script also checks, with
asserts, that

  * PEFT's logits equal a hand-built forward of the plain model with past_key_values built from
    the prefix as [P, L, 2, H, D], explicit position_ids P..P+T-1 and mask cat(ones(P), mask);
  * both equal an independent from-scratch GPT-2 forward written below (no transformers code);
  * loss and gradients from PEFT equal those of the hand-built path;
  * the saved checkpoints load back with transformers / PEFT and give the same logits;
  * the torch.optim training runs (TRAIN_RUNS) equal a hand-built path (encoder written out, prefix
    via past_key_values, AdamW / SGD / linear schedule from their formulas), their first loss is
    `loss`, and AdamW's losses go down;
  * tiny-c's fp16 run: PEFT keeps the encoder in fp32 and hands the model prefix.half() (its logits
    equal a hand-built fp16 past_key_values forward bit for bit), its greedy ids equal the f64 ones
    with gaps well above the fp16 error, and its AdamW losses go down. It prints how far each fp16.*
    value is from its f64 counterpart (also in versions.json -> fp16.deviation_vs_f64).

With --llama it writes the Llama-family fixtures instead (LLAMA_MODELS: a Llama with GQA, a Qwen2
with q/k/v biases and a tied head, a Mistral; tests/fixtures/llama/<name>/, the same files and
keys, plus fp16.*/bf16.* forwards), checked the same way against an independent from-scratch
forward (llama_scratch_forward) and finite differences; see tools/README.md.

Run from the repository root (see tools/README.md for the venv):

    /work/venv-hf/bin/python tools/make_fixtures.py --out tests/fixtures/gpt2

Deterministic (seeded) and idempotent: the output folder of each model is deleted and rewritten
(`--only tiny-c` rebuilds one model; the others' bytes do not depend on it).
"""

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import peft  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
try:
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "peft": "0.21.2"}

MODELS = [
    dict(
        name="tiny-a",
        seed=1234,
        vocab_size=503,
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        layer_norm_epsilon=1e-5,
        P=5,
        E=48,
        storage="f32-hf",  # save_pretrained as is
        tokenizer=True,
        T=12,
        lengths=[12, 9, 5],
        gen_prompt_text="name : The Eagle | food :",
        eos_token_id=None,  # the tokenizer's <|endoftext|> id
    ),
    dict(
        name="tiny-b",
        seed=4321,
        vocab_size=97,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        layer_norm_epsilon=1e-5,
        P=3,
        E=16,
        storage="bf16-legacy",  # bf16, no "transformer." prefix, no lm_head, + h.{i}.attn.bias
        tokenizer=False,
        T=10,
        lengths=[10, 7, 4],
        gen_prompt_len=4,
        eos_token_id=96,
    ),
    dict(
        # head_dim 64 (the CUDA kernels' size), stored in fp16, plus an fp16 run of the reference
        # stack (expected.safetensors keys fp16.*) that sets the tolerance scale of fp16 backends
        name="tiny-c",
        seed=2546,  # picked: greedy generations of 4 and 3 distinct ids, top-1/top-2 gaps >= 0.1
        vocab_size=331,
        n_positions=64,
        n_embd=128,
        n_layer=3,
        n_head=2,
        n_inner=128,  # = C, not the default 4*C: keeps the folder small (and tests n_inner)
        layer_norm_epsilon=1e-5,
        P=5,
        E=16,  # small: transform.2.weight [L*2*C, E] is stored 9 times (f64 grads, 3 runs; f32 fp16.*)
        storage="f16-hf",  # fp16, as save_pretrained writes a float16 model ("transformer." names)
        tokenizer=False,
        T=12,
        lengths=[12, 9, 5],
        gen_prompt_len=4,
        eos_token_id=330,
        fp16_run=True,
    ),
]

PROMPT_TOKENS = 2  # labels are -100 on the first 2 tokens of each sequence
MAX_NEW = 8
EOT = "<|endoftext|>"

# Optimiser-step references (train.<run>.*): each run starts from prefix_encoder.safetensors and
# takes TRAIN_STEPS steps on the whole eval batch. "schedule": None = constant lr, else the kwargs
# of transformers.get_linear_schedule_with_warmup, stepped after every optimizer step.
TRAIN_STEPS = 3
TRAIN_RUNS = [
    dict(name="adamw", optimizer="AdamW",
         kwargs=dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
         schedule=None),
    dict(name="sgd", optimizer="SGD",
         kwargs=dict(lr=0.5),
         schedule=dict(num_warmup_steps=1, num_training_steps=TRAIN_STEPS)),
    dict(name="adamw_linear", optimizer="AdamW",
         kwargs=dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
         schedule=dict(num_warmup_steps=0, num_training_steps=TRAIN_STEPS)),
]
ENC_PARAMS = ["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
              "transform.2.bias"]


# ----------------------------------------------------------------------------------------------
# tokenizer (tiny-a)
# ----------------------------------------------------------------------------------------------

def make_corpus(seed):
    """A few hundred made-up E2E-style restaurant table-to-text pairs."""
    rng = random.Random(seed)
    names = ["The Eagle", "The Mill", "Blue Spice", "The Punter", "Aromi", "Cotto", "Zizzi",
             "The Golden Curry", "Green Man", "The Wrestlers", "Fitzbillies", "Loch Fyne",
             "The Phoenix", "Strada", "The Vaults", "Alimentum", "Bibimbap House", "Giraffe"]
    foods = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food"]
    areas = ["city centre", "riverside"]
    prices = ["cheap", "moderate", "high", "less than £20", "more than £30", "£20-25"]
    ratings = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
    eat_types = ["coffee shop", "pub", "restaurant"]
    near = ["Café Rouge", "The Sorrento", "Burger King", "Avalon", "Crowne Plaza Hotel",
            "Raja Indian Cuisine", "All Bar One", "Express by Holiday Inn"]
    lines = []
    for _ in range(400):
        name = rng.choice(names)
        food = rng.choice(foods)
        area = rng.choice(areas)
        price = rng.choice(prices)
        rating = rng.choice(ratings)
        et = rng.choice(eat_types)
        nb = rng.choice(near)
        fam = rng.choice(["yes", "no"])
        kind = rng.randrange(5)
        if kind == 0:
            mr = f"name : {name} | food : {food}"
            txt = f"{name} serves {food} food."
        elif kind == 1:
            mr = f"name : {name} | eatType : {et} | area : {area}"
            txt = f"{name} is a {et} in the {area}."
        elif kind == 2:
            mr = f"name : {name} | food : {food} | priceRange : {price} | near : {nb}"
            txt = f"Near {nb} you can find {name}, which offers {food} food at {price} prices."
        elif kind == 3:
            mr = f"name : {name} | customer rating : {rating} | familyFriendly : {fam}"
            ff = "is family friendly" if fam == "yes" else "is not family friendly"
            txt = f"{name} has a {rating} customer rating and {ff}."
        else:
            mr = f"name : {name} | eatType : {et} | food : {food} | area : {area} | near : {nb}"
            txt = f"The {et} {name} serves {food} food in the {area} near {nb}."
        lines.append(f"{mr} || {txt}")
    return lines


def train_tokenizer(vocab_size, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = make_corpus(seed)
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    assert eot is not None
    # round trip on a few corpus lines
    for line in corpus[:20]:
        enc = tok.encode(line)
        assert tok.decode(enc.ids) == line, (line, tok.decode(enc.ids))
    return tok, eot, len(corpus)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------

def build_model(spec, eos):
    cfg = GPT2Config(
        vocab_size=spec["vocab_size"],
        n_positions=spec["n_positions"],
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_inner=spec.get("n_inner"),  # None (= 4*C) for tiny-a/b
        layer_norm_epsilon=spec["layer_norm_epsilon"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
        initializer_range=0.1,
        bos_token_id=eos,
        eos_token_id=eos,
        attn_implementation="eager",
    )
    torch.manual_seed(spec["seed"])
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, (Conv1D, torch.nn.Linear)) and getattr(mod, "bias", None) is not None:
                mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))
    model.eval()
    assert model.config._attn_implementation == "eager"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    return model


def init_prefix_encoder(enc, seed):
    g = torch.Generator().manual_seed(seed)
    stds = {
        "embedding.weight": 0.5,
        "transform.0.weight": 0.2,
        "transform.0.bias": 0.1,
        "transform.2.weight": 0.2,
        "transform.2.bias": 0.1,
    }
    sd = {}
    params = dict(enc.named_parameters())
    assert sorted(params) == sorted(stds), sorted(params)
    for name, std in stds.items():
        p = params[name]
        sd[name] = (std * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(torch.float32)
    return sd


def peft_config(spec):
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec["P"],
        prefix_projection=True,
        encoder_hidden_size=spec["E"],
    )


# ----------------------------------------------------------------------------------------------
# independent from-scratch GPT-2 (f64), no transformers code
# ----------------------------------------------------------------------------------------------

def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def scratch_forward(sd, cfg, input_ids, attn_mask, prefix=None):
    """sd: HF names with 'transformer.' prefix, f64. prefix: [P, L*2*C] or None.

    Layout assumed for the prefix: view(P, L, 2, H, D), [:, l, 0] = keys, [:, l, 1] = values.
    Real tokens use positions P..P+T-1; every query sees all prefix slots, and sequence key j
    when j <= i and attn_mask[b, j] == 1.
    """
    B, T = input_ids.shape
    C, H, L = cfg.n_embd, cfg.n_head, cfg.n_layer
    D = C // H
    eps = cfg.layer_norm_epsilon
    P = 0 if prefix is None else prefix.shape[0]
    pos = torch.arange(P, P + T)
    x = sd["transformer.wte.weight"][input_ids] + sd["transformer.wpe.weight"][pos][None]
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]  # [Tq, Tk]
    allowed = causal[None] & (attn_mask[:, None, :] != 0)  # [B, Tq, Tk]
    allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), allowed], dim=2)  # [B, Tq, P+Tk]
    pre = None if prefix is None else prefix.view(P, L, 2, H, D)

    def ln(v, name):
        return F.layer_norm(v, (C,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def conv(v, name):  # Conv1D: weight [in, out]
        return v @ sd[name + ".weight"] + sd[name + ".bias"]

    for layer in range(L):
        p = f"transformer.h.{layer}."
        h = ln(x, p + "ln_1")
        qkv = conv(h, p + "attn.c_attn").view(B, T, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, D]
        if pre is not None:
            k = torch.cat([pre[:, layer, 0][None].expand(B, P, H, D), k], dim=1)
            v = torch.cat([pre[:, layer, 1][None].expand(B, P, H, D), v], dim=1)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        a = torch.softmax(s, dim=-1)
        o = torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, C)
        x = x + conv(o, p + "attn.c_proj")
        h = ln(x, p + "ln_2")
        x = x + conv(gelu_new(conv(h, p + "mlp.c_fc")), p + "mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return x @ sd["transformer.wte.weight"].T


# ----------------------------------------------------------------------------------------------
# hand-built prefixed forward through the plain HF model
# ----------------------------------------------------------------------------------------------

def kv_geometry(cfg):
    """(layers, key/value heads, head dim) of a GPT-2 or Llama-family config."""
    if cfg.model_type == "gpt2":
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, d


def prefix_to_cache(prefix, cfg, batch):
    """[P, L*2*Hkv*D] -> DynamicCache, prefix laid out as [P, L, 2 (key, value), Hkv, D]."""
    P = prefix.shape[0]
    L, H, D = kv_geometry(cfg)
    pre = prefix.view(P, L, 2, H, D)
    cache = DynamicCache(config=cfg)
    for layer in range(L):
        k = pre[:, layer, 0].permute(1, 0, 2)[None].expand(batch, H, P, D)  # [B, H, P, D]
        v = pre[:, layer, 1].permute(1, 0, 2)[None].expand(batch, H, P, D)
        cache.update(k, v, layer)
    return cache


def hand_forward(model, prefix, input_ids, attn_mask):
    B, T = input_ids.shape
    P = prefix.shape[0]
    cache = prefix_to_cache(prefix, model.config, B)
    pos = torch.arange(P, P + T)[None].expand(B, T)
    mask = torch.cat([torch.ones(B, P, dtype=attn_mask.dtype), attn_mask], dim=1)
    return model(input_ids=input_ids, past_key_values=cache, position_ids=pos, attention_mask=mask,
                 use_cache=True)


# ----------------------------------------------------------------------------------------------
# greedy generation without KV cache
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy(forward_logits, prompt, eos, max_new):
    ids = list(prompt)
    new, gaps = [], []
    for _ in range(max_new):
        logits = forward_logits(torch.tensor([ids], dtype=torch.long))[0, -1]
        top = torch.topk(logits, 2)
        nxt = int(top.indices[0])
        assert nxt == int(torch.argmax(logits))
        new.append(nxt)
        gaps.append(float(top.values[0] - top.values[1]))
        ids.append(nxt)
        if nxt == eos:
            break
    return new, gaps


# ----------------------------------------------------------------------------------------------
# per model
# ----------------------------------------------------------------------------------------------

def lm_loss(logits, labels):
    """HF's causal-LM loss (shift by one, ignore -100, mean over the counted tokens), but in the
    logits' own dtype: transformers' ForCausalLMLoss does logits.float(), i.e. it would round an
    f64 model's loss (and the gradient flowing back through it) to f32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="mean")


def close(a, b, tol, what):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs diff {err:.3e} (scale {scale:.3e})"
    return err


def st_names(path):
    with safe_open(path, "pt") as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
        return out, f.metadata()


# ----------------------------------------------------------------------------------------------
# optimiser-step references
# ----------------------------------------------------------------------------------------------

def linear_lambda(k, num_warmup_steps, num_training_steps):
    """The linear-with-warmup multiplier for LambdaLR's step counter k, written out here (not
    transformers' code) to check the lrs that the scheduler hands the optimizer."""
    if k < num_warmup_steps:
        return float(k) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - k) / float(max(1, num_training_steps - num_warmup_steps)))


def hand_train(run, m64, enc_sd, input_ids, attn_mask, labels):
    """The same run with no PEFT and no torch.optim: the encoder forward written out
    (tanh(emb @ W0^T + b0) @ W2^T + b2), the prefix fed through hand-built past_key_values, and
    AdamW / SGD written from their textbook formulas. Returns (losses, lrs, params)."""
    w = {k: enc_sd[k].to(torch.float64).clone() for k in ENC_PARAMS}
    kw = run["kwargs"]
    base_lr = kw["lr"]
    b1, b2 = kw.get("betas", (0.9, 0.999))
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v2 = {k: torch.zeros_like(v) for k, v in w.items()}
    losses, lrs = [], []
    for k in range(TRAIN_STEPS):
        lr = base_lr if run["schedule"] is None else base_lr * linear_lambda(k, **run["schedule"])
        leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
        pfx = torch.tanh(leaves["embedding.weight"] @ leaves["transform.0.weight"].T
                         + leaves["transform.0.bias"]) @ leaves["transform.2.weight"].T + leaves["transform.2.bias"]
        loss = lm_loss(hand_forward(m64, pfx, input_ids, attn_mask).logits, labels)
        grads = dict(zip(ENC_PARAMS, torch.autograd.grad(loss, [leaves[n] for n in ENC_PARAMS])))
        losses.append(loss.item())
        lrs.append(lr)
        t = k + 1
        for n in ENC_PARAMS:
            g = grads[n]
            if run["optimizer"] == "SGD":
                w[n] = w[n] - lr * g
                continue
            w[n] = w[n] * (1.0 - lr * kw["weight_decay"])  # decoupled weight decay, before the moments
            m[n] = b1 * m[n] + (1.0 - b1) * g
            v2[n] = b2 * v2[n] + (1.0 - b2) * g * g
            m_hat = m[n] / (1.0 - b1 ** t)
            denom = torch.sqrt(v2[n]) / math.sqrt(1.0 - b2 ** t) + kw["eps"]  # eps after the bias correction
            w[n] = w[n] - lr * m_hat / denom
    return losses, lrs, w


def train_references(spec, pcfg, m64, enc_sd, input_ids, attn_mask, labels, loss0):
    """Runs TRAIN_RUNS with torch.optim on the f64 PEFT model. Returns (tensors, info, notes)."""
    P = spec["P"]
    tensors, info, notes = {}, {}, []
    max_hand = 0.0
    for run in TRAIN_RUNS:
        name = run["name"]
        with torch.random.fork_rng(devices=[]):  # get_peft_model draws from the global RNG
            pm = get_peft_model(copy.deepcopy(m64), pcfg).eval()
        enc = pm.prompt_encoder["default"]
        enc.load_state_dict({k: v.to(torch.float64) for k, v in enc_sd.items()}, strict=True)
        enc.to(torch.float64)
        params = [p_ for _, p_ in enc.named_parameters()]
        assert [k for k, _ in enc.named_parameters()] == ENC_PARAMS
        assert all(p_.dtype == torch.float64 and p_.requires_grad for p_ in params)
        assert all(not p_.requires_grad for p_ in pm.get_base_model().parameters())
        assert sum(p_.requires_grad for p_ in pm.parameters()) == len(ENC_PARAMS)
        opt = getattr(torch.optim, run["optimizer"])(params, **run["kwargs"])
        sched = None if run["schedule"] is None else get_linear_schedule_with_warmup(opt, **run["schedule"])
        # on CPU torch.optim picks the single-tensor (for-loop) implementation
        from torch.optim.optimizer import _default_to_fused_or_foreach
        assert opt.defaults.get("foreach") is None and opt.defaults.get("fused") in (None, False)
        assert _default_to_fused_or_foreach(params, False, False) == (False, False)
        losses, lrs, snaps = [], [], []
        for _ in range(TRAIN_STEPS):
            opt.zero_grad(set_to_none=True)
            out = pm(input_ids=input_ids, attention_mask=attn_mask)
            loss = lm_loss(out.logits, labels)
            assert loss.dtype == torch.float64
            loss.backward()
            losses.append(loss.item())
            lrs.append(float(opt.param_groups[0]["lr"]))
            snaps.append([p_.detach().clone() for p_ in params])
            opt.step()
            if sched is not None:
                sched.step()
        with torch.no_grad():
            prefix = enc(torch.arange(P)[None])[0].detach().clone()
            saved = pm.get_prompt_embedding_to_save("default")
            loss_after = lm_loss(pm(input_ids=input_ids, attention_mask=attn_mask).logits, labels).item()
        assert torch.equal(saved, prefix), f"{name}: get_prompt_embedding_to_save != encoder output"
        assert prefix.dtype == torch.float64

        # sanity
        assert losses[0] == loss0, f"{name}: first loss {losses[0]!r} != loss {loss0!r}"
        if name == "adamw":
            assert losses[0] > losses[1] > losses[2] > loss_after, (name, losses, loss_after)
        if run["schedule"] is not None:
            want = [run["kwargs"]["lr"] * linear_lambda(k, **run["schedule"]) for k in range(TRAIN_STEPS)]
            assert lrs == want, (name, lrs, want)
            if run["schedule"]["num_warmup_steps"] == 1:
                # warmup 1: the first update uses lr 0, so step 1 changes nothing
                assert lrs[0] == 0.0 and losses[1] == losses[0]
                assert all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1]))
        else:
            assert lrs == [run["kwargs"]["lr"]] * TRAIN_STEPS
        # independent path: hand-built forward + textbook optimizer formulas
        h_losses, h_lrs, h_w = hand_train(run, m64, enc_sd, input_ids, attn_mask, labels)
        assert h_lrs == lrs, (name, h_lrs, lrs)
        for a, b in zip(h_losses, losses):
            max_hand = max(max_hand, close(torch.tensor(a), torch.tensor(b), 1e-12, f"{name} hand loss"))
        for k, p_ in enc.named_parameters():
            max_hand = max(max_hand, close(h_w[k], p_.detach(), 1e-10, f"{name} hand {k}"))

        tensors[f"train.{name}.losses"] = torch.tensor(losses, dtype=torch.float64)
        tensors[f"train.{name}.lrs"] = torch.tensor(lrs, dtype=torch.float64)
        tensors[f"train.{name}.prefix"] = prefix
        for k, p_ in enc.named_parameters():
            tensors[f"train.{name}.{k}"] = p_.detach().clone()
        settings = {"optimizer": f"torch.optim.{run['optimizer']}", "kwargs": run["kwargs"],
                    "resolved_defaults": {k: v for k, v in opt.defaults.items()
                                          if isinstance(v, (int, float, str, bool, type(None), tuple))}}
        if run["schedule"] is None:
            settings["schedule"] = "constant"
        else:
            settings["schedule"] = {"fn": "transformers.get_linear_schedule_with_warmup", **run["schedule"],
                                    "stepped": "scheduler.step() after every opt.step()"}
        info[name] = {**settings, "steps": TRAIN_STEPS, "lrs": lrs, "losses": losses,
                      "loss_after_last_step": loss_after}
        del pm, opt, sched
    notes.append(f"train.*: torch.optim runs reproduced by a hand-built path (encoder written out, prefix via "
                 f"past_key_values, textbook AdamW/SGD): max diff {max_hand:.2e}; first losses == loss")
    return tensors, info, notes


# ----------------------------------------------------------------------------------------------
# fp16 run of the same reference stack (tiny-c): the error scale for fp16 backends
# ----------------------------------------------------------------------------------------------

def lm_loss_sum(logits, labels):
    """The sum (not the mean) of lm_loss's token losses."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def deviation(a, ref, mask=None):
    """(max |a - ref|, that / max |ref|), in f64; mask (broadcast to ref) selects the entries."""
    a = torch.as_tensor(a).to(torch.float64)
    ref = torch.as_tensor(ref).to(torch.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if mask is not None:
        mask = mask.expand(ref.shape)
        a, ref = a[mask], ref[mask]
    err = (a - ref).abs().max().item()
    return err, err / ref.abs().max().item()


class SummedLossAtPrefix:
    """Loss scaling for a PEFT model over an fp16 base: the backward is started from the *summed*
    token loss, and this forward hook on the fp32 PrefixEncoder divides the gradient by the token
    count (an fp32 tensor divided in fp32) where it reaches the encoder's output, i.e. where the
    gradient re-enters fp32 through PEFT's `.to(float16)`. It also records the batch-summed
    gradient of the summed loss at that point ([P, L*2*C], fp32) and checks the dtypes."""

    def __init__(self, enc, count):
        self.count = count
        self.grad_sum = None
        self.out_dtype = None
        self.handle = enc.register_forward_hook(self._forward)

    def _forward(self, _mod, _inp, output):
        self.out_dtype = output.dtype
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, g):
        assert g.dtype == torch.float32, g.dtype
        # it arrives through the backward of PEFT's .to(float16): every entry is an fp16 value
        assert torch.equal(g.to(torch.float16).to(torch.float32), g)
        assert torch.isfinite(g).all()
        self.grad_sum = g.sum(0).detach().clone()
        return g / self.count


def fp16_references(spec, pcfg, model, enc_sd, input_ids, attn_mask, labels, prompt, eos, ref):
    """The reference stack again with the base model in float16 (`model.half()`, CPU), PEFT's
    PrefixEncoder and torch's AdamW kept in fp32, the loss HF-style from logits upcast to fp32, and
    the backward of the summed loss divided by the token count at the encoder output
    (SummedLossAtPrefix). `model`: the fp32 model holding the fp16-rounded weights; `ref`: the f64
    expected tensors. Returns (tensors, info, notes); tensors are keyed fp16.<f64 key>."""
    P = spec["P"]
    cfg = model.config
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    B, T = input_ids.shape
    count = int((labels[:, 1:] != -100).sum())
    notes = []
    m16 = copy.deepcopy(model).to(torch.float16).eval()
    for p_ in m16.parameters():
        p_.requires_grad_(False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), m16.state_dict().items()):
        assert k == k2 and torch.equal(a, b.to(torch.float32)), f"{k}: weights are not fp16 values"

    def peft16():
        with torch.random.fork_rng(devices=[]):  # get_peft_model draws from the global RNG
            pm16 = get_peft_model(copy.deepcopy(m16), pcfg).eval()
        enc16 = pm16.prompt_encoder["default"]
        # PEFT builds the PrefixEncoder in the default dtype (fp32) whatever the base model's dtype
        assert all(p_.dtype == torch.float32 for p_ in enc16.parameters())
        enc16.load_state_dict(enc_sd, strict=True)
        assert [k for k, _ in enc16.named_parameters()] == ENC_PARAMS
        assert all(p_.dtype == torch.float32 and p_.requires_grad for p_ in enc16.parameters())
        assert all(p_.dtype == torch.float16 and not p_.requires_grad for p_ in pm16.get_base_model().parameters())
        assert pm16.base_model_torch_dtype == torch.float16  # get_prompt casts the prefix to this
        return pm16, enc16

    # ---- forward / backward -------------------------------------------------------------------
    pm16, enc16 = peft16()
    hook = SummedLossAtPrefix(enc16, count)
    pm16.zero_grad(set_to_none=True)
    logits16 = pm16(input_ids=input_ids, attention_mask=attn_mask).logits
    assert logits16.dtype == torch.float16 and hook.out_dtype == torch.float32
    lf = logits16.float()
    loss16 = lm_loss(lf, labels)  # HF: logits.float(), then the token mean, in fp32
    loss_sum = lm_loss_sum(lf, labels)
    assert loss16.dtype == torch.float32 and loss_sum.dtype == torch.float32
    close(loss_sum.detach() / count, loss16.detach(), 1e-6, "fp16: summed loss / count vs mean loss")
    loss_sum.backward()
    grads16 = {k: p_.grad.detach().clone() for k, p_ in enc16.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads16.values())
    grad_prefix16 = hook.grad_sum / count  # the f64 convention: d mean-loss / d prefix, batch-summed
    with torch.no_grad():
        hf = pm16(input_ids=input_ids, attention_mask=attn_mask, labels=labels)
        # the encoder output as get_prompt computes it: for [B, P] tokens (fp32 rounding depends on the
        # matmul's row count, so a [1, P] call may differ in the last bit and then round differently)
        prefix_b = enc16(torch.arange(P)[None].expand(B, P))
        assert all(torch.equal(prefix_b[b], prefix_b[0]) for b in range(B))
        hand = hand_forward(m16, prefix_b[0].to(torch.float16), input_ids, attn_mask).logits
        logits_base16 = m16(input_ids=input_ids, attention_mask=attn_mask).logits
        loss_base16 = lm_loss(logits_base16.float(), labels)
    assert hf.loss.dtype == torch.float32
    e_hf = close(hf.loss, loss16.detach(), 1e-6, "fp16: HF's own loss vs lm_loss(logits.float())")
    assert torch.equal(hf.logits, logits16.detach())
    e_hand = (hand.float() - lf.detach()).abs().max().item()
    assert e_hand == 0.0, f"fp16 PEFT logits != hand-built past_key_values from prefix.half(): {e_hand}"
    notes.append(
        "fp16.*: PEFT 0.21.2 keeps the PrefixEncoder in fp32 when the base model is fp16 (it is built in "
        "the default dtype; get_peft_model only moves it to the device) and PeftModel.get_prompt casts "
        "its output with past_key_values.to(base_model_torch_dtype) = float16 before building the "
        "cache; the backward of that cast returns an fp32 gradient holding fp16 values. The fp16 PEFT "
        "logits equal, bit for bit, the fp16 model run with hand-built past_key_values from "
        "prefix.half(); HF's own loss (labels passed) is the fp32 token mean of logits.float() "
        f"(agrees to {e_hf:.1e})")

    # ---- greedy generation ------------------------------------------------------------------
    def peft_logits(ids):
        return pm16(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()

    def base_logits(ids):
        return m16(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()

    gen_ids, gen_gaps = greedy(peft_logits, prompt, eos, MAX_NEW)
    gen_ids_b, gen_gaps_b = greedy(base_logits, prompt, eos, MAX_NEW)
    hook.handle.remove()
    del pm16

    # ---- AdamW run --------------------------------------------------------------------------
    run = next(r for r in TRAIN_RUNS if r["name"] == "adamw")
    pmt, enct = peft16()
    hook_t = SummedLossAtPrefix(enct, count)
    params = [p_ for _, p_ in enct.named_parameters()]
    opt = torch.optim.AdamW(params, **run["kwargs"])
    losses, lrs = [], []
    for step in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        lf_t = pmt(input_ids=input_ids, attention_mask=attn_mask).logits.float()
        losses.append(lm_loss(lf_t, labels).item())
        lrs.append(float(opt.param_groups[0]["lr"]))
        lm_loss_sum(lf_t, labels).backward()
        if step == 0:
            for k, p_ in enct.named_parameters():
                assert torch.equal(p_.grad, grads16[k]), f"fp16 train step 0 grad {k}"
        opt.step()
    with torch.no_grad():
        prefix_t = enct(torch.arange(P)[None])[0].detach().clone()
        loss_after = lm_loss(pmt(input_ids=input_ids, attention_mask=attn_mask).logits.float(), labels).item()
    hook_t.handle.remove()
    assert losses[0] == loss16.item()
    assert losses[0] > losses[1] > losses[2] > loss_after, losses
    assert lrs == [run["kwargs"]["lr"]] * TRAIN_STEPS

    f32 = lambda t: torch.as_tensor(t, dtype=torch.float32).detach().contiguous()  # noqa: E731
    i32 = lambda t: torch.as_tensor(t).to(torch.int32).contiguous()  # noqa: E731
    tensors = {
        "fp16.logits": f32(logits16.detach()),
        "fp16.logits_base": f32(logits_base16),
        "fp16.loss": f32(loss16).reshape(()),
        "fp16.loss_base": f32(loss_base16).reshape(()),
        "fp16.grad.prefix": f32(grad_prefix16),
        "fp16.gen.ids": i32(gen_ids),
        "fp16.gen.gaps": f32(gen_gaps),
        "fp16.gen.ids_base": i32(gen_ids_b),
        "fp16.gen.gaps_base": f32(gen_gaps_b),
        "fp16.train.adamw.losses": f32(losses),
        "fp16.train.adamw.lrs": torch.tensor(lrs, dtype=torch.float64),
        "fp16.train.adamw.prefix": f32(prefix_t),
    }
    tensors.update({f"fp16.grad.{k}": f32(v) for k, v in grads16.items()})
    tensors.update({f"fp16.train.adamw.{k}": f32(p_) for k, p_ in enct.named_parameters()})
    for k, v in tensors.items():
        assert torch.isfinite(v.double()).all(), k

    # ---- deviations from the f64 references -------------------------------------------------
    assert gen_ids == ref["gen.ids"].tolist() and gen_ids_b == ref["gen.ids_base"].tolist(), \
        "fp16 greedy generation differs from f64: pick another seed"
    real = attn_mask.bool()[:, :, None]
    dev = {}
    for k, v in tensors.items():
        base = k[len("fp16."):]
        if base.startswith("gen.ids") or base.endswith(".lrs"):
            continue
        dev[k] = deviation(v, ref[base], real if base.startswith("logits") else None)
    print(f"{spec['name']}: fp16 run vs f64 reference (max abs, max abs / max |f64|):")
    for k, (a, r) in dev.items():
        print(f"    {k:34s} {a:10.3e} {r:10.3e}")
    min_gap = min(ref["gen.gaps"].min().item(), ref["gen.gaps_base"].min().item())
    max_gap_err = max(dev["fp16.gen.gaps"][0], dev["fp16.gen.gaps_base"][0])
    assert min_gap >= 0.05 and min_gap > 4 * max_gap_err, (min_gap, max_gap_err)
    # AdamW's first steps move each entry by about lr * sign(g): an entry whose gradient is near zero
    # can go the other way under fp16 rounding, a difference of up to 2*lr per step
    lr = run["kwargs"]["lr"]
    flips = {k: int(((tensors[f"fp16.train.adamw.{k}"].double() - ref[f"train.adamw.{k}"]).abs() > lr).sum())
             for k in ENC_PARAMS}
    print(f"    fp16.train.adamw entries off by more than lr={lr}: {flips}")

    info = {
        "what": "the reference stack again in fp16 (keys fp16.*): GPT2LMHeadModel.half() (CPU, eager attention, "
                "the stored fp16 weights), PEFT's PrefixEncoder in fp32, its output cast to fp16 by "
                "PeftModel.get_prompt, logits fp16",
        "loss": "fp16.loss / fp16.loss_base / fp16.train.adamw.losses: fp32 token mean of CE(logits.float()), as "
                "transformers computes it",
        "backward": f"backward of the summed token loss (fp32 sum over the {count} counted tokens of "
                    "CE(logits.float())) through the fp16 model; where the gradient reaches the encoder's fp32 "
                    "output (after the backward of PEFT's .to(float16)) it is divided by the token count in "
                    "fp32, so fp16.grad.* are gradients of the mean loss, like grad.*",
        "grad_prefix": "fp16.grad.prefix = (batch sum of d summed-loss / d prefix at the fp32 encoder output) / count "
                       "= d mean-loss / d prefix summed over the batch, the convention of grad.prefix",
        "train": "fp16.train.adamw.*: train.adamw's run (torch.optim.AdamW, same kwargs, 3 steps, the whole batch) "
                 "with the fp16 model, fp32 encoder parameters and AdamW state, and the backward above",
        "gen": "fp16.gen.*: the greedy loop of gen.* (full prefixed forward each step, no cache) on the fp16 "
               "model; gaps are top-1 minus top-2 of the fp16 logits upcast to fp32",
        "token_count": count,
        "dtypes": "fp16.* are F32 (exactly the fp16/fp32 values computed), fp16.train.adamw.lrs F64, ids I32",
        "deviation_vs_f64": {k: {"max_abs": a, "max_rel": r} for k, (a, r) in dev.items()},
        "deviation_notes": "max_rel = max_abs / max |f64 reference|; logits over attention_mask == 1 positions",
        "gen_ids_equal_f64": True,
        "gen_min_gap_f64": min_gap,
        "train_adamw_entries_off_by_more_than_lr": flips,
        "train_adamw_note": "AdamW's early updates are about lr * sign(grad) per entry, so entries whose "
                            "gradient is near zero can move the other way under fp16 rounding (up to 2*lr per "
                            "step): the max abs deviation of fp16.train.adamw.<param> is set by those few "
                            "entries (see train_adamw_entries_off_by_more_than_lr), not by rounding at large",
        "train_losses": losses,
        "train_loss_after_last_step": loss_after,
    }
    return tensors, info, notes


def make_one(spec, root):
    name = spec["name"]
    out = os.path.join(root, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    mdir = os.path.join(out, "model")
    adir = os.path.join(out, "adapter")
    os.makedirs(mdir)
    notes = []
    info = {"name": name, "seed": spec["seed"]}

    # ---- tokenizer -------------------------------------------------------------------------
    tok = None
    if spec["tokenizer"]:
        tok, eos, n_lines = train_tokenizer(spec["vocab_size"], spec["seed"])
        info["tokenizer"] = {
            "trained_on": f"{n_lines} templated restaurant table-to-text lines (make_corpus, seed {spec['seed']})",
            "vocab_size": tok.get_vocab_size(),
            "eos_token": EOT,
            "eos_token_id": eos,
            "pre_tokenizer": "ByteLevel(add_prefix_space=False)",
            "decoder": "ByteLevel",
            "post_processor": "ByteLevel(trim_offsets=False)",
        }
    else:
        eos = spec["eos_token_id"]
    info["eos_token_id"] = eos

    # ---- model -----------------------------------------------------------------------------
    model = build_model(spec, eos)
    cfg = model.config
    V, C, L, H = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head
    D = C // H
    P, E = spec["P"], spec["E"]

    if spec["storage"] == "f32-hf":
        model.save_pretrained(mdir, safe_serialization=True)
        notes.append("model/model.safetensors written by transformers save_pretrained (f32) unchanged")
    elif spec["storage"] == "f16-hf":
        # round to fp16 first: every reference value below uses the rounded weights (upcast)
        model = model.to(torch.float16)
        model.save_pretrained(mdir, safe_serialization=True)  # config.json says dtype float16
        model = model.to(torch.float32)
        notes.append("model/model.safetensors written by transformers save_pretrained from the model cast to "
                     "float16 (F16 tensors, 'transformer.' names, no lm_head.weight: tied); the f64 "
                     "references use exactly these fp16 values, upcast")
    else:
        # round to bf16 first: every reference value below uses the rounded weights
        model = model.to(torch.bfloat16)
        model.save_pretrained(mdir, safe_serialization=True)  # config.json says dtype bfloat16
        path = os.path.join(mdir, "model.safetensors")
        sd = load_file(path)
        new = {}
        for k, v in sd.items():
            if k == "lm_head.weight":
                continue  # tied to wte
            k2 = k[len("transformer."):] if k.startswith("transformer.") else k
            new[k2] = v.to(torch.bfloat16).contiguous()
        npos = cfg.n_positions
        for i in range(L):
            # old checkpoints (e.g. the original gpt2 safetensors) carry the causal mask buffer
            new[f"h.{i}.attn.bias"] = torch.tril(torch.ones(npos, npos, dtype=torch.float32)).view(1, 1, npos, npos)
        os.remove(path)
        save_file(dict(sorted(new.items())), path, metadata={"format": "pt"})
        model = model.to(torch.float32)
        notes.append("model/model.safetensors rewritten: bf16, names without 'transformer.', no lm_head.weight "
                     "(tied), plus F32 h.{i}.attn.bias [1,1,n_positions,n_positions] lower-triangular mask buffers")
    if tok is not None:
        tok.save(os.path.join(mdir, "tokenizer.json"))
    model_names, model_meta = st_names(os.path.join(mdir, "model.safetensors"))
    info["model_safetensors"] = {"metadata": model_meta, "tensors": model_names}
    with open(os.path.join(mdir, "config.json")) as f:
        info["model_config"] = json.load(f)
    gen_cfg = os.path.join(mdir, "generation_config.json")
    if os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            info["generation_config"] = json.load(f)

    # reload check: transformers reads the stored checkpoint back to the same weights
    reloaded = GPT2LMHeadModel.from_pretrained(mdir, attn_implementation="eager", dtype=torch.float32).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), f"reload mismatch at {k1}/{k2}"
    notes.append("transformers from_pretrained(model/) reproduces the (rounded) weights bit-exactly")
    del reloaded

    # ---- PEFT prefix tuning (f32, as trained) -------------------------------------------------
    pcfg = peft_config(spec)
    pm32 = get_peft_model(copy.deepcopy(model), pcfg)
    enc32 = pm32.prompt_encoder["default"]
    assert type(enc32).__name__ == "PrefixEncoder"
    enc_sd = init_prefix_encoder(enc32, spec["seed"] + 2)
    enc32.load_state_dict(enc_sd, strict=True)
    shapes = {k: list(v.shape) for k, v in enc_sd.items()}
    assert shapes == {
        "embedding.weight": [P, C], "transform.0.weight": [E, C], "transform.0.bias": [E],
        "transform.2.weight": [L * 2 * C, E], "transform.2.bias": [L * 2 * C],
    }, shapes
    save_file(enc_sd, os.path.join(out, "prefix_encoder.safetensors"))
    pm32.save_pretrained(adir)
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # boilerplate model card; not needed by anything
        notes.append("adapter/README.md (PEFT's boilerplate model card) removed")
    ad_names, ad_meta = st_names(os.path.join(adir, "adapter_model.safetensors"))
    with open(os.path.join(adir, "adapter_config.json")) as f:
        ad_cfg = json.load(f)
    info["adapter_safetensors"] = {"metadata": ad_meta, "tensors": ad_names}
    info["adapter_config"] = ad_cfg
    info["peft_config_runtime"] = {
        k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
        for k, v in pm32.peft_config["default"].to_dict().items()
    }
    assert pm32.peft_config["default"].num_layers == L
    assert pm32.peft_config["default"].num_attention_heads == H
    assert pm32.peft_config["default"].token_dim == C
    assert pm32.peft_config["default"].num_transformer_submodules == 1
    ad_saved = load_file(os.path.join(adir, "adapter_model.safetensors"))
    with torch.no_grad():
        prefix32 = enc32(torch.arange(P)[None])[0]
    assert torch.equal(ad_saved["prompt_embeddings"], prefix32), "adapter prompt_embeddings != encoder output"
    notes.append("adapter prompt_embeddings == PrefixEncoder(arange(P)) in f32 (bit-exact)")

    # ---- f64 reference -----------------------------------------------------------------------
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    for p_ in m64.parameters():
        p_.requires_grad_(False)
    pm = get_peft_model(copy.deepcopy(m64), pcfg).eval()
    enc = pm.prompt_encoder["default"]
    enc.load_state_dict({k: v.to(torch.float64) for k, v in enc_sd.items()}, strict=True)
    enc.to(torch.float64)
    assert all(p_.dtype == torch.float64 and p_.requires_grad for p_ in enc.parameters())
    assert all(not p_.requires_grad for p_ in pm.get_base_model().parameters())
    base_sd = {k: v.detach() for k, v in m64.state_dict().items()}
    if "lm_head.weight" not in base_sd:
        base_sd["lm_head.weight"] = base_sd["transformer.wte.weight"]

    # batch
    g = torch.Generator().manual_seed(spec["seed"] + 3)
    B, T = len(spec["lengths"]), spec["T"]
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attn_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    real_ids = [i for i in range(V) if i != eos]
    eval_rows = []
    for b, n in enumerate(spec["lengths"]):
        ids = [real_ids[int(j)] for j in torch.randint(len(real_ids), (n,), generator=g)]
        input_ids[b, :n] = torch.tensor(ids)
        attn_mask[b, :n] = 1
        labels[b, PROMPT_TOKENS:n] = torch.tensor(ids[PROMPT_TOKENS:])
        eval_rows.append({"input_ids": ids, "labels": labels[b, :n].tolist()})

    # PEFT forward/backward; capture the encoder output (the prefix) with a forward hook
    captured = {}

    def hook(_mod, _inp, output):
        output.retain_grad()
        captured["prefix"] = output

    handle = enc.register_forward_hook(hook)
    pm.zero_grad(set_to_none=True)
    pout = pm(input_ids=input_ids, attention_mask=attn_mask)
    loss_t = lm_loss(pout.logits, labels)
    loss_t.backward()
    handle.remove()
    logits = pout.logits.detach()
    loss = loss_t.detach()
    pre_b = captured["prefix"]  # [B, P, L*2*C], one copy per sequence
    assert pre_b.shape == (B, P, L * 2 * C) and pre_b.dtype == torch.float64
    prefix = pre_b[0].detach().clone()
    for b in range(1, B):
        assert torch.equal(pre_b[b].detach(), prefix)
    grad_prefix = pre_b.grad.sum(0)
    grads = {f"grad.{k}": p_.grad.detach().clone() for k, p_ in enc.named_parameters()}
    assert logits.dtype == torch.float64 and logits.shape == (B, T, V)

    with torch.no_grad():
        base_out = m64(input_ids=input_ids, attention_mask=attn_mask, labels=labels)
        logits_base = base_out.logits
        loss_base = lm_loss(logits_base, labels)
        # HF's own loss (labels passed to the model) agrees to f32 precision
        hf_loss = pm(input_ids=input_ids, attention_mask=attn_mask, labels=labels).loss
    close(hf_loss.double(), loss, 2e-6, "HF (f32-upcast) loss vs f64 loss")
    close(base_out.loss.double(), loss_base, 2e-6, "HF (f32-upcast) base loss vs f64 loss")
    assert hf_loss.dtype == torch.float32
    notes.append(f"loss/loss_base are HF's causal-LM loss computed in f64 (shift, ignore -100, token mean); "
                 f"transformers' own loss upcasts logits with .float(), i.e. f32 even for an f64 model, "
                 f"and agrees to {abs(hf_loss.item() - loss.item()):.1e}")

    # check 1+2: hand-built past_key_values ([P, L, 2, H, D]), position_ids P..P+T-1
    prefix_h = prefix.clone().requires_grad_(True)
    hout = hand_forward(m64, prefix_h, input_ids, attn_mask)
    hloss = lm_loss(hout.logits, labels)
    hloss.backward()
    e_hand = close(hout.logits.detach(), logits, 1e-12, "PEFT logits vs hand-built past_key_values")
    close(hloss.detach(), loss, 1e-12, "PEFT loss vs hand-built")
    close(prefix_h.grad, grad_prefix, 1e-12, "grad.prefix vs hand-built")
    # the same hand-built forward with the default positions 0..T-1 must NOT match
    with torch.no_grad():
        cache = prefix_to_cache(prefix, m64.config, B)
        wrong = m64(input_ids=input_ids, past_key_values=cache,
                    position_ids=torch.arange(T)[None].expand(B, T),
                    attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), attn_mask], 1)).logits
    assert (wrong - logits).abs().max().item() > 1e-3, "positions 0.. give the same logits?"
    # and the other natural layout, [P, 2, L, H, D], must not match either
    with torch.no_grad():
        swapped = prefix.view(P, L, 2, H, D).transpose(1, 2).reshape(P, L * 2 * C)
        alt = hand_forward(m64, swapped, input_ids, attn_mask).logits
    assert (alt - logits).abs().max().item() > 1e-3
    notes.append(
        f"PEFT logits == plain model with hand-built past_key_values (prefix.view(P,L,2,H,D); "
        f"key=[:,l,0], value=[:,l,1], each permuted to [B,H,P,D]), position_ids=arange(P,P+T), "
        f"mask=cat(ones(P),mask): max abs diff {e_hand:.2e}; loss and grad.prefix equal too")
    notes.append("positions 0..T-1 or a [P,2,L,H,D] layout give different logits (> 1e-3)")

    # check: independent from-scratch forward (no transformers code)
    with torch.no_grad():
        sl = scratch_forward(base_sd, m64.config, input_ids, attn_mask, prefix)
        sl0 = scratch_forward(base_sd, m64.config, input_ids, attn_mask, None)
    e_s = close(sl, logits, 1e-10, "from-scratch prefixed forward vs PEFT")
    e_s0 = close(sl0, logits_base, 1e-10, "from-scratch plain forward vs HF")
    # HF loss by hand: shift, ignore -100, mean over counted tokens
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    manual_loss = -lp[keep].gather(-1, tgt[keep][:, None]).mean()
    close(manual_loss, loss, 1e-12, "loss = shifted, -100-ignored token mean")
    notes.append(f"independent from-scratch f64 GPT-2 (gelu_new, Conv1D, tied head) matches: prefixed "
                 f"{e_s:.2e}, plain {e_s0:.2e}; loss = mean over {int(keep.sum())} shifted labelled tokens")

    # check: grads of the encoder params via the hand path equal PEFT's
    enc_ref = copy.deepcopy(enc)
    enc_ref.zero_grad(set_to_none=True)
    pfx = enc_ref(torch.arange(P)[None])[0]
    close(pfx.detach(), prefix, 1e-14, "encoder output recomputed (batch 1)")
    lm_loss(hand_forward(m64, pfx, input_ids, attn_mask).logits, labels).backward()
    for k, p_ in enc_ref.named_parameters():
        close(p_.grad, grads[f"grad.{k}"], 1e-12, f"grad.{k} vs hand-built")
    # check: finite difference on a couple of encoder entries
    with torch.no_grad():
        for k, idx in [("transform.2.bias", (0,)), ("embedding.weight", (P - 1, 1))]:
            p_ = dict(enc_ref.named_parameters())[k]
            h = 1e-6
            old = p_[idx].item()
            p_[idx] = old + h
            lp_ = lm_loss(hand_forward(m64, enc_ref(torch.arange(P)[None])[0], input_ids, attn_mask).logits, labels)
            p_[idx] = old - h
            lm_ = lm_loss(hand_forward(m64, enc_ref(torch.arange(P)[None])[0], input_ids, attn_mask).logits, labels)
            p_[idx] = old
            fd = (lp_ - lm_).item() / (2 * h)
            an = grads[f"grad.{k}"][idx].item()
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (k, fd, an)
    notes.append("encoder grads equal the hand-built path's and central finite differences (2 entries)")

    # PEFT adapter folder loads back and reproduces the f32 logits
    with torch.no_grad():
        ref32 = pm32(input_ids=input_ids, attention_mask=attn_mask).logits
        back = PeftModel.from_pretrained(copy.deepcopy(model), adir).eval()
        back32 = back(input_ids=input_ids, attention_mask=attn_mask).logits
    e_back = close(back32, ref32, 1e-5, "PeftModel.from_pretrained(adapter/) logits vs original")
    close(ref32.double(), logits, 1e-4, "f32 PEFT logits vs f64")
    notes.append(f"PeftModel.from_pretrained(adapter/) (inference_mode: embedding := prompt_embeddings) "
                 f"matches the f32 PEFT model: max abs diff {e_back:.2e}")
    del back

    # ---- greedy generation (full recompute each step) ----------------------------------------
    if tok is not None:
        prompt = tok.encode(spec["gen_prompt_text"]).ids
        info["gen_prompt_text"] = spec["gen_prompt_text"]
    else:
        prompt = [real_ids[int(j)] for j in torch.randint(len(real_ids), (spec["gen_prompt_len"],), generator=g)]
    info["gen_prompt_ids"] = prompt

    def peft_logits(ids):
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    def base_logits(ids):
        return m64(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    gen_ids, gen_gaps = greedy(peft_logits, prompt, eos, MAX_NEW)
    gen_ids_b, gen_gaps_b = greedy(base_logits, prompt, eos, MAX_NEW)
    # the from-scratch forward agrees on every step's logits
    with torch.no_grad():
        seq = torch.tensor([prompt + gen_ids[:-1]])
        sl = scratch_forward(base_sd, m64.config, seq, torch.ones_like(seq), prefix)[0, len(prompt) - 1:]
        assert sl.argmax(-1).tolist() == gen_ids
    assert len(prompt) + MAX_NEW + P <= cfg.n_positions
    info["gen"] = {"max_new": MAX_NEW, "ids": gen_ids, "gaps": gen_gaps, "ids_base": gen_ids_b,
                   "gaps_base": gen_gaps_b, "min_gap": min(gen_gaps), "min_gap_base": min(gen_gaps_b)}
    if tok is not None:
        info["gen"]["text"] = tok.decode(gen_ids)
        info["gen"]["text_base"] = tok.decode(gen_ids_b)

    # ---- optimiser-step references ------------------------------------------------------------
    train_tensors, train_info, train_notes = train_references(spec, pcfg, m64, enc_sd, input_ids, attn_mask,
                                                              labels, loss.item())
    notes.extend(train_notes)

    # ---- write -------------------------------------------------------------------------------
    i32 = lambda t: torch.as_tensor(t).to(torch.int32).contiguous()  # noqa: E731
    f64 = lambda t: torch.as_tensor(t, dtype=torch.float64).detach().contiguous()  # noqa: E731
    expected = {
        "input_ids": i32(input_ids),
        "attention_mask": i32(attn_mask),
        "labels": i32(labels),
        "logits": f64(logits),
        "logits_base": f64(logits_base),
        "loss": f64(loss).reshape(()),
        "loss_base": f64(loss_base).reshape(()),
        "prefix": f64(prefix),
        "grad.prefix": f64(grad_prefix),
        "gen.prompt_ids": i32(prompt),
        "gen.ids": i32(gen_ids),
        "gen.gaps": f64(gen_gaps),
        "gen.ids_base": i32(gen_ids_b),
        "gen.gaps_base": f64(gen_gaps_b),
    }
    expected.update({k: f64(v) for k, v in grads.items()})
    expected.update({k: f64(v) for k, v in train_tensors.items()})
    if spec.get("fp16_run"):
        fp16_tensors, info["fp16"], fp16_notes = fp16_references(spec, pcfg, model, enc_sd, input_ids, attn_mask,
                                                                 labels, prompt, eos, expected)
        notes.extend(fp16_notes)
        expected.update(fp16_tensors)
    save_file(dict(sorted(expected.items())), os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "eval.jsonl"), "w") as f:
        for row in eval_rows:
            f.write(json.dumps(row) + "\n")

    info["shapes"] = {"B": B, "T": T, "lengths": spec["lengths"], "V": V, "C": C, "L": L, "H": H, "D": D,
                      "P": P, "E": E, "prompt_tokens_ignored": PROMPT_TOKENS}
    info["seeds"] = {
        "model_init": f"torch.manual_seed({spec['seed']}) before GPT2LMHeadModel(config)",
        "layernorm_and_bias_perturbation": spec["seed"] + 1,
        "prefix_encoder_init": spec["seed"] + 2,
        "batch_and_gen_prompt": spec["seed"] + 3,
        "tokenizer_corpus": spec["seed"] if tok is not None else None,
    }
    info["weights"] = {
        "init": "transformers GPT-2 init with initializer_range=0.1, then LayerNorm weight 1+0.1*randn, "
                "LayerNorm bias 0.1*randn, every Conv1D/Linear bias 0.05*randn",
        "stored_dtype": {"f32-hf": "float32", "f16-hf": "float16"}.get(spec["storage"], "bfloat16"),
        "reference_from": "the stored weights, converted to float64",
        "prefix_encoder_init": "N(0, std): embedding 0.5, transform.0/2.weight 0.2, biases 0.1; stored f32",
    }
    info["prefix_encoder_safetensors"] = st_names(os.path.join(out, "prefix_encoder.safetensors"))[0]
    info["expected_safetensors"] = st_names(os.path.join(out, "expected.safetensors"))[0]
    info["loss"] = loss.item()
    info["loss_base"] = loss_base.item()
    info["train"] = {
        "what": "prefix encoder only (base frozen, eval mode, no dropout), float64 (encoder and model), "
                "starting from prefix_encoder.safetensors (f32 values, converted); every step uses the "
                "whole eval batch (B sequences, right-padded, attention_mask, labels as in expected); "
                "loss = HF causal-LM loss in f64 (shift, ignore -100, mean over the batch's counted tokens)",
        "loop": "for each step: opt.zero_grad(); loss = lm_loss(peft_model(ids, mask).logits, labels); "
                "loss.backward(); record loss and opt.param_groups[0]['lr']; opt.step(); scheduler.step()",
        "losses": "train.<run>.losses[k] = loss of step k's batch before step k's update (losses[0] == loss)",
        "lrs": "train.<run>.lrs[k] = lr used by step k's update = base_lr * lambda(k) (that product, in "
               "f64: e.g. 0.01 * (2/3) = 0.006666666666666666, not 0.02/3); LambdaLR applies lambda(0) at "
               "construction, so the first update uses lambda(0), which is 0 with a warmup (sgd: its "
               "first step changes nothing and losses[1] == losses[0])",
        "linear_lambda": "k < W: k / max(1, W); else max(0, (N - k) / max(1, N - W)); W = num_warmup_steps, "
                         "N = num_training_steps",
        "adamw_update": "t = k+1; p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; "
                        "p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)  "
                        "(torch single-tensor Adam with decoupled_weight_decay; all params, biases and "
                        "embedding included, get weight decay)",
        "sgd_update": "p -= lr * g",
        "implementation": "torch.optim on CPU, foreach=None resolves to the single-tensor loop",
        "runs": train_info,
    }
    info["notes"] = notes
    return info

# ----------------------------------------------------------------------------------------------
# Llama family (--llama): Llama with GQA and Qwen2 with q/k/v biases and a tied head
# ----------------------------------------------------------------------------------------------

LLAMA_MODELS = [
    dict(
        # GQA 4 query / 2 KV heads of head_dim 64 (what the CUDA kernels take), head_dim explicit
        # and not hidden_size / heads (q width 256 > C = 128), untied head, rope_theta and
        # rms_norm_eps not the defaults, stored bf16 in two shards (model.safetensors.index.json)
        name="llama-gqa",
        model_type="llama",
        seed=7101,
        config=dict(vocab_size=211, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
        storage="bf16-sharded",
        P=4, E=16, T=12, lengths=[12, 9, 5], gen_prompt_len=4, eos_token_id=210,
    ),
    dict(
        # Qwen2: q/k/v biases (no o bias), tied head, GQA 2 query / 1 KV heads of 64,
        # rope_theta 20000, no sliding window; stored f32 by save_pretrained
        name="qwen2-tied",
        model_type="qwen2",
        seed=7205,  # picked: greedy top-1/top-2 gaps >= 0.12 with and without the prefix
        config=dict(vocab_size=173, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                    rms_norm_eps=1e-5, rope_theta=20000.0, tie_word_embeddings=True,
                    use_sliding_window=False),
        storage="f32-hf",
        P=4, E=16, T=12, lengths=[12, 9, 5], gen_prompt_len=4, eos_token_id=172,
    ),
    dict(
        # Mistral: no biases, untied head, GQA 4 query / 1 KV heads of 32 (the cpu backend takes
        # any head dim), a sliding window as long as the context (so never in use), stored f16
        name="mistral-f16",
        model_type="mistral",
        seed=7303,
        config=dict(vocab_size=157, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                    max_position_embeddings=64, sliding_window=64, rms_norm_eps=1e-5,
                    rope_theta=30000.0, tie_word_embeddings=False),
        storage="f16-hf",
        P=4, E=16, T=12, lengths=[12, 9, 5], gen_prompt_len=4, eos_token_id=156,
    ),
]


def _rms_forward_f64(orig):
    """transformers' RMSNorm upcasts to float32 (a no-op in an f32 model). For the f64 reference
    it would round every normalised activation to f32, which finite differences cannot see through,
    so in f64 the same formula runs in f64; other dtypes keep transformers' own code."""
    def forward(self, hidden_states):
        if hidden_states.dtype == torch.float64:
            var = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))
        return orig(self, hidden_states)
    return forward


def _eager_attention_f64(orig):
    """transformers' eager attention takes its softmax in float32 (a no-op in an f32 model); in
    f64 the same code runs with an f64 softmax, for the reason of _rms_forward_f64."""
    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if query.dtype != torch.float64:
            return orig(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        g = module.num_key_value_groups
        key_states, value_states = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        w = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        out = torch.matmul(w, value_states).transpose(1, 2).contiguous()
        return out, w
    return forward


def patch_f64_upcasts():
    """The two places where transformers' Llama/Qwen2 compute in f32 whatever the model dtype
    (RMSNorm, the eager softmax) compute in f64 in an f64 model; f32/f16/bf16 models are
    untouched."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    norms = {modeling_llama: "LlamaRMSNorm", modeling_qwen2: "Qwen2RMSNorm", modeling_mistral: "MistralRMSNorm"}
    for m, norm_name in norms.items():
        if not getattr(m, "_f64_patched", False):
            norm = getattr(m, norm_name)
            norm.forward = _rms_forward_f64(norm.forward)
            m.eager_attention_forward = _eager_attention_f64(m.eager_attention_forward)
            m._f64_patched = True


def rope_theta_of(cfg):
    rp = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        assert rp.get("rope_type", "default") == "default", rp
        return float(rp["rope_theta"])
    return float(cfg.rope_theta)


def rope_tables_f32(theta, D, start, T):
    """cos, sin [T, D/2] as transformers computes them (f32 inverse frequencies, f32 angle
    pos * inv_freq, f32 cos/sin), returned in f64."""
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float32) / D))
    ang = torch.arange(start, start + T, dtype=torch.int64).to(torch.float32)[:, None] * inv[None]
    return ang.cos().double(), ang.sin().double()


def llama_scratch_forward(sd, cfg, input_ids, attn_mask, prefix=None):
    """An independent f64 Llama/Qwen2 forward (no transformers code) with the prefix as PEFT
    feeds it: prefix keys/values [P, L, 2, Hkv, D] not rotated, real tokens at positions
    P..P+T-1 (their q and k rotated, rotate-half form), every query sees every prefix slot."""
    L, Hkv, D = kv_geometry(cfg)
    Hq = cfg.num_attention_heads
    G = Hq // Hkv
    B, T = input_ids.shape
    P = 0 if prefix is None else prefix.shape[0]
    eps = cfg.rms_norm_eps
    cos, sin = rope_tables_f32(rope_theta_of(cfg), D, P, T)
    half = D // 2

    def rope(x):  # [B, H, T, D]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    x = sd["model.embed_tokens.weight"][input_ids]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    ok = torch.cat([torch.ones(B, T, P, dtype=torch.bool), causal[None] & attn_mask.bool()[:, None, :]], -1)
    pre = None if prefix is None else prefix.view(P, L, 2, Hkv, D)
    for layer in range(L):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").view(B, T, Hq, D).transpose(1, 2))
        k = rope(lin(h, p + "self_attn.k_proj").view(B, T, Hkv, D).transpose(1, 2))
        v = lin(h, p + "self_attn.v_proj").view(B, T, Hkv, D).transpose(1, 2)
        if pre is not None:
            k = torch.cat([pre[:, layer, 0].permute(1, 0, 2)[None].expand(B, Hkv, P, D), k], 2)
            v = torch.cat([pre[:, layer, 1].permute(1, 0, 2)[None].expand(B, Hkv, P, D), v], 2)
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~ok[:, None], float("-inf"))
        a = torch.softmax(s, -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, T, Hq * D), p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return x @ head.T


def build_llama(spec):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    eos = spec["eos_token_id"]
    kw = dict(spec["config"], initializer_range=0.1, attention_dropout=0.0, hidden_act="silu",
              bos_token_id=eos, eos_token_id=eos, attn_implementation="eager")
    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "mistral": (MistralConfig, MistralForCausalLM)}[spec["model_type"]]
    cfg = cfg_cls(**kw)
    torch.manual_seed(spec["seed"])
    model = cls(cfg)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight"):
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
            elif name.endswith(".bias"):
                prm.copy_(0.05 * torch.randn(prm.shape, generator=g))
    model.eval()
    assert model.config._attn_implementation == "eager"
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == spec["config"]["tie_word_embeddings"], "lm_head tying differs from the config"
    return model, eos


def half_references(model, pcfg, enc_sd, input_ids, attn_mask, labels, ref, dtype):
    """The prefixed forward with the base model in `dtype` (fp16 or bf16; PEFT keeps its encoder in
    fp32 and casts the prefix to the model dtype): logits and loss, for the half-precision error
    scale of future kernel backends. Returns (tensors, info)."""
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    mh = copy.deepcopy(model).to(dtype).eval()
    with torch.random.fork_rng(devices=[]):
        pmh = get_peft_model(mh, pcfg).eval()
    pmh.prompt_encoder["default"].load_state_dict(enc_sd, strict=True)
    with torch.no_grad():
        lg = pmh(input_ids=input_ids, attention_mask=attn_mask).logits
        assert lg.dtype == dtype
        loss = lm_loss(lg.float(), labels)
        lgb = mh(input_ids=input_ids, attention_mask=attn_mask).logits
    mask = attn_mask.bool()[..., None]
    e, rel = deviation(lg, ref["logits"], mask)
    eb, relb = deviation(lgb, ref["logits_base"], mask)
    info = {"logits_max_abs_vs_f64": e, "logits_rel_vs_f64": rel, "logits_base_rel_vs_f64": relb,
            "loss": loss.item(), "loss_abs_vs_f64": abs(loss.item() - ref["loss"].item())}
    print(f"  {tag}: logits rel {rel:.2e} (base {relb:.2e}), loss {loss.item():.6f} "
          f"vs {ref['loss'].item():.6f}")
    tensors = {f"{tag}.logits": lg.double(), f"{tag}.logits_base": lgb.double(),
               f"{tag}.loss": loss.double().reshape(())}
    return tensors, info


def make_llama(spec, root):
    name = spec["name"]
    out = os.path.join(root, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    mdir = os.path.join(out, "model")
    adir = os.path.join(out, "adapter")
    os.makedirs(mdir)
    notes = []
    info = {"name": name, "seed": spec["seed"]}
    patch_f64_upcasts()

    model, eos = build_llama(spec)
    cfg = model.config
    L, Hkv, D = kv_geometry(cfg)
    V, C, Hq = cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads
    KW = Hkv * D
    P, E = spec["P"], spec["E"]
    info["eos_token_id"] = eos

    cls = type(model)
    if spec["storage"] == "bf16-sharded":
        model = model.to(torch.bfloat16)
        model.save_pretrained(mdir, safe_serialization=True, max_shard_size="400KB")
        model = model.to(torch.float32)
        assert os.path.exists(os.path.join(mdir, "model.safetensors.index.json")), "not sharded"
        notes.append("model/ written by save_pretrained from the model cast to bfloat16, in shards "
                     "(max_shard_size 400KB: model.safetensors.index.json + model-0000i-of-0000n.safetensors); "
                     "the f64 references use exactly these bf16 values, upcast")
    elif spec["storage"] == "f16-hf":
        model = model.to(torch.float16)
        model.save_pretrained(mdir, safe_serialization=True)
        model = model.to(torch.float32)
        notes.append("model/model.safetensors written by save_pretrained from the model cast to float16; the "
                     "f64 references use exactly these fp16 values, upcast")
    else:
        model.save_pretrained(mdir, safe_serialization=True)
        notes.append("model/model.safetensors written by save_pretrained (f32) unchanged")
    shard_files = sorted(f for f in os.listdir(mdir) if f.endswith(".safetensors"))
    info["model_safetensors"] = {f: st_names(os.path.join(mdir, f))[0] for f in shard_files}
    with open(os.path.join(mdir, "config.json")) as f:
        info["model_config"] = json.load(f)
    reloaded = cls.from_pretrained(mdir, attn_implementation="eager", dtype=torch.float32).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), f"reload mismatch at {k1}/{k2}"
    # The references use the reloaded model: casting the in-memory model to bf16 and back also
    # rounded its (non-persistent) rotary inv_freq buffer, which from_pretrained recomputes.
    model = reloaded
    model.config.name_or_path = model.name_or_path = ""  # as built from a config: adapters name no base
    notes.append("transformers from_pretrained(model/) reproduces the (rounded) weights bit-exactly; "
                 "the references use that reloaded model (fresh f32 rotary tables)")

    # ---- PEFT (f32) ----------------------------------------------------------------------------
    pcfg = peft_config(spec)
    pm32 = get_peft_model(copy.deepcopy(model), pcfg)
    enc32 = pm32.prompt_encoder["default"]
    enc_sd = init_prefix_encoder(enc32, spec["seed"] + 2)
    enc32.load_state_dict(enc_sd, strict=True)
    shapes = {k: list(v.shape) for k, v in enc_sd.items()}
    assert shapes == {
        "embedding.weight": [P, KW], "transform.0.weight": [E, KW], "transform.0.bias": [E],
        "transform.2.weight": [L * 2 * KW, E], "transform.2.bias": [L * 2 * KW],
    }, shapes
    rc = pm32.peft_config["default"]
    assert rc.token_dim == KW and rc.num_attention_heads == Hkv and rc.num_layers == L, rc
    notes.append(f"PEFT on GQA: token_dim = head_dim * num_key_value_heads = {KW}, num_attention_heads = "
                 f"num_key_value_heads = {Hkv}; prompt_embeddings [P, L*2*{KW}] laid out [layer][k,v][kv head][d]")
    save_file(enc_sd, os.path.join(out, "prefix_encoder.safetensors"))
    pm32.save_pretrained(adir)
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    with open(os.path.join(adir, "adapter_config.json")) as f:
        info["adapter_config"] = json.load(f)
    ad_saved = load_file(os.path.join(adir, "adapter_model.safetensors"))
    with torch.no_grad():
        prefix32 = enc32(torch.arange(P)[None])[0]
    assert torch.equal(ad_saved["prompt_embeddings"], prefix32)

    # ---- f64 reference -------------------------------------------------------------------------
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    for p_ in m64.parameters():
        p_.requires_grad_(False)
    pm = get_peft_model(copy.deepcopy(m64), pcfg).eval()
    enc = pm.prompt_encoder["default"]
    enc.load_state_dict({k: v.to(torch.float64) for k, v in enc_sd.items()}, strict=True)
    enc.to(torch.float64)
    base_sd = {k: v.detach() for k, v in m64.state_dict().items()}
    if cfg.tie_word_embeddings:
        base_sd.pop("lm_head.weight", None)

    # the rotary tables transformers uses are the f32 ones of rope_tables_f32
    rot = m64.model.rotary_emb
    probe = torch.zeros(1, 1, D, dtype=torch.float64)
    hc, hs = rot(probe, torch.arange(P, P + 20)[None])
    mc, ms = rope_tables_f32(rope_theta_of(cfg), D, P, 20)
    assert torch.equal(hc[0, :, :D // 2], mc) and torch.equal(hs[0, :, :D // 2], ms), "rotary tables differ"
    a64 = torch.arange(P, P + 20, dtype=torch.float64)[:, None] / (rope_theta_of(cfg) ** (
        torch.arange(0, D, 2, dtype=torch.float64) / D))
    notes.append(f"rotary cos/sin of transformers equal f32 inv_freq = 1/theta^(2i/D), f32 angle pos*inv_freq, "
                 f"f32 cos/sin (bit-exact, even in the f64 model; f64 angles would differ by "
                 f"{(a64.cos() - mc).abs().max().item():.1e} at positions < {P + 20})")
    notes.append("RMSNorm and the eager attention softmax: transformers computes them in f32 even for an "
                 "f64 model; the f64 references here compute the same formulas in f64 (patched, f64 inputs "
                 "only: patch_f64_upcasts), so the references are f64-accurate and finite differences "
                 "meaningful; in an f32 model the patched and the original code are the same computation")

    g = torch.Generator().manual_seed(spec["seed"] + 3)
    B, T = len(spec["lengths"]), spec["T"]
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attn_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    real_ids = [i for i in range(V) if i != eos]
    eval_rows = []
    for b, n in enumerate(spec["lengths"]):
        ids = [real_ids[int(j)] for j in torch.randint(len(real_ids), (n,), generator=g)]
        input_ids[b, :n] = torch.tensor(ids)
        attn_mask[b, :n] = 1
        labels[b, PROMPT_TOKENS:n] = torch.tensor(ids[PROMPT_TOKENS:])
        eval_rows.append({"input_ids": ids, "labels": labels[b, :n].tolist()})

    captured = {}

    def hook(_mod, _inp, output):
        output.retain_grad()
        captured["prefix"] = output

    handle = enc.register_forward_hook(hook)
    pm.zero_grad(set_to_none=True)
    pout = pm(input_ids=input_ids, attention_mask=attn_mask)
    loss_t = lm_loss(pout.logits, labels)
    loss_t.backward()
    handle.remove()
    logits = pout.logits.detach()
    loss = loss_t.detach()
    pre_b = captured["prefix"]
    assert pre_b.shape == (B, P, L * 2 * KW) and pre_b.dtype == torch.float64
    prefix = pre_b[0].detach().clone()
    grad_prefix = pre_b.grad.sum(0)
    grads = {f"grad.{k}": p_.grad.detach().clone() for k, p_ in enc.named_parameters()}
    with torch.no_grad():
        logits_base = m64(input_ids=input_ids, attention_mask=attn_mask).logits
        loss_base = lm_loss(logits_base, labels)
    mask = attn_mask.bool()[..., None]

    # hand-built past_key_values, positions P..P+T-1
    prefix_h = prefix.clone().requires_grad_(True)
    hout = hand_forward(m64, prefix_h, input_ids, attn_mask)
    hloss = lm_loss(hout.logits, labels)
    hloss.backward()
    e_hand = close(hout.logits.detach(), logits, 1e-12, "PEFT logits vs hand-built past_key_values")
    close(prefix_h.grad, grad_prefix, 1e-12, "grad.prefix vs hand-built")
    with torch.no_grad():
        cache = prefix_to_cache(prefix, m64.config, B)
        wrong = m64(input_ids=input_ids, past_key_values=cache, position_ids=torch.arange(T)[None].expand(B, T),
                    attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), attn_mask], 1)).logits
    assert (wrong - logits).abs().max().item() > 1e-3, "positions 0.. give the same logits?"
    notes.append(f"PEFT logits == plain model with hand-built past_key_values (prefix.view(P,L,2,Hkv,D)), "
                 f"position_ids=arange(P,P+T), mask=cat(ones(P),mask): max abs diff {e_hand:.2e}; "
                 f"positions 0..T-1 give different logits")

    with torch.no_grad():
        sl = llama_scratch_forward(base_sd, m64.config, input_ids, attn_mask, prefix)
        sl0 = llama_scratch_forward(base_sd, m64.config, input_ids, attn_mask, None)
        # a prefix whose keys were rotated (at positions 0..P-1) would differ
    e_s = close(sl * mask, logits * mask, 1e-10, "from-scratch prefixed forward vs PEFT")
    e_s0 = close(sl0 * mask, logits_base * mask, 1e-10, "from-scratch plain forward vs HF")
    notes.append(f"independent from-scratch f64 forward (RMSNorm, rotate-half RoPE on q and new k only, "
                 f"GQA, SwiGLU{', q/k/v biases' if cfg.model_type == 'qwen2' else ''}, "
                 f"{'tied' if cfg.tie_word_embeddings else 'untied'} head) matches at real positions: "
                 f"prefixed {e_s:.2e}, plain {e_s0:.2e}")

    # encoder gradients: hand path and central finite differences
    enc_ref = copy.deepcopy(enc)
    enc_ref.zero_grad(set_to_none=True)
    pfx = enc_ref(torch.arange(P)[None])[0]
    lm_loss(hand_forward(m64, pfx, input_ids, attn_mask).logits, labels).backward()
    for k, p_ in enc_ref.named_parameters():
        close(p_.grad, grads[f"grad.{k}"], 1e-12, f"grad.{k} vs hand-built")
    max_fd = 0.0
    with torch.no_grad():
        for k, idx in [("transform.2.bias", (0,)), ("transform.2.bias", (L * 2 * KW - 1,)),
                       ("embedding.weight", (P - 1, 1)), ("transform.0.weight", (E - 1, 3))]:
            p_ = dict(enc_ref.named_parameters())[k]
            h = 1e-6
            old = p_[idx].item()
            p_[idx] = old + h
            lp_ = lm_loss(hand_forward(m64, enc_ref(torch.arange(P)[None])[0], input_ids, attn_mask).logits, labels)
            p_[idx] = old - h
            lm_ = lm_loss(hand_forward(m64, enc_ref(torch.arange(P)[None])[0], input_ids, attn_mask).logits, labels)
            p_[idx] = old
            fd = (lp_ - lm_).item() / (2 * h)
            an = grads[f"grad.{k}"][idx].item()
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (k, fd, an)
            max_fd = max(max_fd, abs(fd - an))
    notes.append(f"encoder grads equal the hand-built path's and central finite differences (4 entries, "
                 f"max diff {max_fd:.1e})")

    with torch.no_grad():
        ref32 = pm32(input_ids=input_ids, attention_mask=attn_mask).logits
        back = PeftModel.from_pretrained(copy.deepcopy(model), adir).eval()
        back32 = back(input_ids=input_ids, attention_mask=attn_mask).logits
    e_back = close(back32, ref32, 1e-5, "PeftModel.from_pretrained(adapter/) logits vs original")
    close(ref32.double() * mask, logits * mask, 1e-4, "f32 PEFT logits vs f64")
    notes.append(f"PeftModel.from_pretrained(adapter/) matches the f32 PEFT model: {e_back:.2e}")
    del back

    # ---- greedy generation (use_cache=False: full recompute) ----------------------------------
    prompt = [real_ids[int(j)] for j in torch.randint(len(real_ids), (spec["gen_prompt_len"],), generator=g)]

    def peft_logits(ids):
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    def base_logits(ids):
        return m64(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    gen_ids, gen_gaps = greedy(peft_logits, prompt, eos, MAX_NEW)
    gen_ids_b, gen_gaps_b = greedy(base_logits, prompt, eos, MAX_NEW)
    with torch.no_grad():
        seq = torch.tensor([prompt + gen_ids[:-1]])
        sl = llama_scratch_forward(base_sd, m64.config, seq, torch.ones_like(seq), prefix)[0, len(prompt) - 1:]
        assert sl.argmax(-1).tolist() == gen_ids
    assert len(prompt) + MAX_NEW + P <= cfg.max_position_embeddings
    info["gen"] = {"prompt": prompt, "max_new": MAX_NEW, "ids": gen_ids, "gaps": gen_gaps,
                   "ids_base": gen_ids_b, "gaps_base": gen_gaps_b, "min_gap": min(gen_gaps),
                   "min_gap_base": min(gen_gaps_b)}
    notes.append("gen.*: greedy with use_cache=False (PEFT's generate(use_cache=True) mangles the prefix "
                 "for Llama with these versions); the from-scratch forward gives the same ids")

    # ---- optimiser steps (torch.optim, same runs as GPT-2) --------------------------------------
    train_tensors, train_info, train_notes = train_references(spec, pcfg, m64, enc_sd, input_ids, attn_mask,
                                                              labels, loss.item())
    notes.extend(train_notes)

    i32 = lambda t: torch.as_tensor(t).to(torch.int32).contiguous()  # noqa: E731
    f64 = lambda t: torch.as_tensor(t, dtype=torch.float64).detach().contiguous()  # noqa: E731
    expected = {
        "input_ids": i32(input_ids), "attention_mask": i32(attn_mask), "labels": i32(labels),
        "logits": f64(logits), "logits_base": f64(logits_base),
        "loss": f64(loss).reshape(()), "loss_base": f64(loss_base).reshape(()),
        "prefix": f64(prefix), "grad.prefix": f64(grad_prefix),
        "gen.prompt_ids": i32(prompt), "gen.ids": i32(gen_ids), "gen.gaps": f64(gen_gaps),
        "gen.ids_base": i32(gen_ids_b), "gen.gaps_base": f64(gen_gaps_b),
    }
    expected.update({k: f64(v) for k, v in grads.items()})
    expected.update({k: f64(v) for k, v in train_tensors.items()})
    info["half"] = {}
    for dt in (torch.float16, torch.bfloat16):
        t_, i_ = half_references(model, pcfg, enc_sd, input_ids, attn_mask, labels, expected, dt)
        expected.update({k: f64(v) for k, v in t_.items()})
        info["half"][str(dt)] = i_
    save_file(dict(sorted(expected.items())), os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "eval.jsonl"), "w") as f:
        for row in eval_rows:
            f.write(json.dumps(row) + "\n")
    info["shapes"] = {"B": B, "T": T, "lengths": spec["lengths"], "V": V, "C": C, "L": L, "Hq": Hq,
                      "Hkv": Hkv, "D": D, "P": P, "E": E, "prompt_tokens_ignored": PROMPT_TOKENS}
    info["seeds"] = {"model_init": spec["seed"], "norm_and_bias_perturbation": spec["seed"] + 1,
                     "prefix_encoder_init": spec["seed"] + 2, "batch_and_gen_prompt": spec["seed"] + 3}
    info["weights"] = {"init": "transformers init with initializer_range=0.1, then every RMSNorm weight "
                               "1+0.1*randn and every bias 0.05*randn",
                       "stored": spec["storage"]}
    info["expected_safetensors"] = st_names(os.path.join(out, "expected.safetensors"))[0]
    info["loss"] = loss.item()
    info["loss_base"] = loss_base.item()
    info["train"] = train_info
    info["notes"] = notes
    return info


def llama_main(args, versions):
    os.makedirs(args.out, exist_ok=True)
    for spec in LLAMA_MODELS:
        if args.only and spec["name"] != args.only:
            continue
        info = make_llama(spec, args.out)
        doc = {"versions": versions, "generator": "tools/make_fixtures.py --llama",
               "expected_notes": "as for the GPT-2 fixtures (tools/README.md); half.* are fp16.* and bf16.* "
                                 "(logits, logits_base, loss) of the base model in that dtype",
               **info}
        with open(os.path.join(args.out, spec["name"], "versions.json"), "w") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")
        for dirpath, _dirs, files in os.walk(os.path.join(args.out, spec["name"])):
            for fn in files:
                os.chmod(os.path.join(dirpath, fn), 0o644)
        print(f"{spec['name']}: ok, loss {info['loss']:.6f}; min gen gap {info['gen']['min_gap']:.4g} "
              f"(base {info['gen']['min_gap_base']:.4g})")
    return 0


# ----------------------------------------------------------------------------------------------
# decoding references (--decoding): greedy and beam search through PEFT, sampling warpers
# ----------------------------------------------------------------------------------------------

DECODING_CASES = [
    # name, adapter?, num_beams, length_penalty, eos ("model" = the model's, or the index of the
    # adapter's greedy token to use as the stop id, so that beams finish early), max_new_tokens
    dict(name="greedy", adapter=True, num_beams=1, length_penalty=1.0, eos="model", max_new=10),
    dict(name="beam3", adapter=True, num_beams=3, length_penalty=1.0, eos="model", max_new=8),
    dict(name="beam4_lp0.5_stop", adapter=True, num_beams=4, length_penalty=0.5, eos=1, max_new=8),
    dict(name="beam2_lp2_stop", adapter=True, num_beams=2, length_penalty=2.0, eos=2, max_new=9),
    dict(name="beam3_base", adapter=False, num_beams=3, length_penalty=1.0, eos="model", max_new=8),
]
WARPER_CASES = [
    dict(temperature=1.0, top_k=None, top_p=1.0),
    dict(temperature=0.7, top_k=None, top_p=1.0),
    dict(temperature=1.0, top_k=5, top_p=1.0),
    dict(temperature=1.3, top_k=None, top_p=0.9),
    dict(temperature=0.8, top_k=20, top_p=0.8),
    dict(temperature=2.0, top_k=3, top_p=0.5),
    dict(temperature=0.5, top_k=1, top_p=1.0),
    dict(temperature=1.0, top_k=None, top_p=0.05),
]


def make_decoding(root):
    """decoding.json per committed model (the models and adapters on disk are inputs, untouched)
    and decoding/warpers.json. Every generate call is use_cache=False: the cached generate of
    these versions drops the prefix."""
    from transformers import GPT2LMHeadModel, LogitsProcessorList, TemperatureLogitsWarper, \
        TopKLogitsWarper, TopPLogitsWarper
    from peft import PeftModel
    for spec in MODELS:
        d = os.path.join(root, spec["name"])
        info = json.load(open(os.path.join(d, "versions.json")))
        base = GPT2LMHeadModel.from_pretrained(os.path.join(d, "model"), dtype=torch.float64).eval()
        pm = PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(os.path.join(d, "model"), dtype=torch.float64).eval(),
            os.path.join(d, "adapter")).eval()
        g = torch.Generator().manual_seed(spec["seed"] + 7)
        V = base.config.vocab_size
        prompts = [info["gen_prompt_ids"],
                   [int(i) for i in torch.randint(1, V, (6,), generator=g)]]
        model_eos = info["eos_token_id"]
        cases = []
        for prompt in prompts:
            greedy_ids = None
            for c in DECODING_CASES:
                m = pm if c["adapter"] else base
                ids = torch.tensor([prompt])
                if c["eos"] == "model":
                    eos = model_eos
                else:
                    eos = greedy_ids[c["eos"]]
                with torch.no_grad():
                    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                                     do_sample=False, num_beams=c["num_beams"],
                                     length_penalty=c["length_penalty"], max_new_tokens=c["max_new"],
                                     min_new_tokens=0, early_stopping=False, eos_token_id=eos,
                                     pad_token_id=eos, num_return_sequences=1,
                                     output_scores=False, return_dict_in_generate=False)
                new = out[0, len(prompt):].tolist()
                if c["name"] == "greedy":
                    ref, _gaps = greedy(lambda x: m(input_ids=x, attention_mask=torch.ones_like(x),
                                                    use_cache=False).logits, prompt, eos, c["max_new"])
                    assert new == ref, (new, ref)
                    greedy_ids = new
                # generate pads finished beams with pad = eos: cut after the first eos
                if eos in new:
                    new = new[:new.index(eos) + 1]
                cases.append(dict(case=c["name"], adapter=c["adapter"], prompt=prompt,
                                  num_beams=c["num_beams"], length_penalty=c["length_penalty"],
                                  eos_token_id=eos, max_new_tokens=c["max_new"], ids=new,
                                  finish_reason="stop" if new and new[-1] == eos else "length"))
        doc = {"generator": "tools/make_fixtures.py --decoding",
               "what": "model.generate(use_cache=False, do_sample=False, early_stopping=False, "
                       "num_return_sequences=1) of the f64 model (adapter: PeftModel.from_pretrained"
                       "(adapter/)); ids are the new tokens, cut after the first eos",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__},
               "cases": cases}
        with open(os.path.join(d, "decoding.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"{spec['name']}: decoding.json, {len(cases)} cases")

    g = torch.Generator().manual_seed(20261202)
    rows = []
    for c in WARPER_CASES:
        for n in (7, 64):
            logits = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(torch.float32)
            procs = LogitsProcessorList([TemperatureLogitsWarper(c["temperature"])])
            if c["top_k"] is not None:
                procs.append(TopKLogitsWarper(c["top_k"]))
            if c["top_p"] < 1.0:
                procs.append(TopPLogitsWarper(c["top_p"]))
            warped = procs(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
            probs = torch.softmax(warped.double(), -1)
            rows.append(dict(**c, logits=logits.tolist(), probs=probs.tolist()))
    wd = os.path.join(os.path.dirname(os.path.normpath(root)), "decoding")
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "warpers.json"), "w") as f:
        json.dump({"generator": "tools/make_fixtures.py --decoding",
                   "what": "softmax (f64) of transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> "
                           "TopPLogitsWarper applied to f32 logits, the order generate() uses",
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                   "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"decoding/warpers.json: {len(rows)} rows")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="tests/fixtures/gpt2 (tests/fixtures/llama with --llama)")
    ap.add_argument("--only", default=None, help="build just this model (tiny-a, tiny-b or tiny-c)")
    ap.add_argument("--llama", action="store_true",
                    help="build the Llama-family fixtures (LLAMA_MODELS) instead, into --out "
                         "(default tests/fixtures/llama)")
    ap.add_argument("--decoding", action="store_true",
                    help="write only decoding.json of each committed model and decoding/warpers.json")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
    for k, want in PINNED.items():
        got = versions[k].split("+")[0]
        if got != want:
            print(f"warning: {k} {got} != pinned {want}; fixtures may differ", file=sys.stderr)

    if args.out is None:
        args.out = "tests/fixtures/llama" if args.llama else "tests/fixtures/gpt2"
    if args.decoding:
        make_decoding(args.out)
        return 0
    if args.llama:
        return llama_main(args, versions)
    os.makedirs(args.out, exist_ok=True)
    for spec in MODELS:
        if args.only and spec["name"] != args.only:
            continue
        info = make_one(spec, args.out)
        doc = {
            "versions": versions,
            "generator": "tools/make_fixtures.py",
            "peft_past_key_values": (
                "PeftModel.get_prompt (peft 0.21.2): out = PrefixEncoder(arange(P) expanded to [B,P]) "
                "-> [B, P, L*2*C]; .view(B, P, L*2, H, D).permute(2, 0, 3, 1, 4) -> [L*2, B, H, P, D]; "
                ".split(2) -> L tensors [2, B, H, P, D]; DynamicCache(that tuple): layer l key = t[0], "
                "value = t[1]. So per sequence the prefix is [P, L, 2 (key, value), H, D]. "
                "PeftModelForCausalLM.forward prepends ones(B, P) to attention_mask; position_ids are "
                "left to GPT-2, which uses arange(T) + cache.get_seq_length() = P..P+T-1."
            ),
            "expected_notes": (
                "logits/logits_base at padded positions (attention_mask == 0) are whatever HF computes "
                "there (padded query rows still attend to the real keys before them); compare only "
                "positions with attention_mask == 1. grad.prefix is d loss / d prefix summed over the "
                "batch (each sequence uses the same prefix). gen.* come from a greedy loop that re-runs "
                "the whole prefixed forward (use_cache=False) each step and stops after eos."
            ),
            **info,
        }
        with open(os.path.join(args.out, spec["name"], "versions.json"), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False, ensure_ascii=False)
            f.write("\n")
        for dirpath, _dirs, files in os.walk(os.path.join(args.out, spec["name"])):
            for fn in files:
                os.chmod(os.path.join(dirpath, fn), 0o644)  # safetensors writes 0600
        print(f"{spec['name']}: ok, loss {info['loss']:.6f}; min gen gap {info['gen']['min_gap']:.4g} "
              f"(base {info['gen']['min_gap_base']:.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
