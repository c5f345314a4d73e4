#!/usr/bin/env python3
"""PEFT interoperability of prefix-attn's training: references for prefixes trained without the
MLP, and a check that PEFT (``PeftModel`` and ``AutoPeftModelForCausalLM``) loads what
``prefix-attn train`` writes and gets the loss ``prefix-attn eval`` reports.

Two commands (run from the repository root, with the venv of tools/README.md):

  fixtures   writes tests/fixtures/gpt2/<m>/noproj_init.safetensors and
             tests/fixtures/gpt2/<m>/noproj.safetensors for tiny-a and tiny-b, from the committed
             model folders and eval batches (nothing else there is touched):

             * noproj_init.safetensors: a PEFT PrefixEncoder state dict for
               prefix_projection=False, `embedding.weight [P, L*2*C]` (f32): the f32-rounded MLP
               output `prefix` of expected.safetensors, i.e. a prefix of visible scale;
             * noproj.safetensors (f64): for each run R of make_fixtures.TRAIN_RUNS (adamw, sgd with
               a warm-up, adamw_linear), three torch.optim steps of PEFT prefix tuning with
               prefix_projection=False on the f64 model and the whole eval batch:
               `train.R.losses [3]` (loss before each update), `train.R.lrs [3]`,
               `train.R.prefix [P, L*2*C]` (get_prompt_embedding_to_save after the 3 steps), and
               `grad.prefix` (d mean loss / d embedding at the init).
             Each run is reproduced by a hand-built path (the prefix as a leaf, hand-built
             past_key_values, textbook AdamW/SGD) and the script asserts agreement to 1e-10.

  check      trains with the prefix-attn binary (--bin) on tiny-a, once with the MLP and once
             with --no-prefix-projection, evaluates each adapter with `prefix-attn eval`, then
             loads each adapter folder with PeftModel.from_pretrained(base, dir) and with
             AutoPeftModelForCausalLM.from_pretrained(dir) (which finds the base model through
             base_model_name_or_path) and computes the same loss (token-weighted mean over the
             counted targets) in float64. It prints the three losses per adapter and fails if
             they differ by more than 1e-5 (relative).

    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/peft_interop.py fixtures --out tests/fixtures/gpt2
    cargo build --release && HF_HUB_OFFLINE=1 /work/venv-hf/bin/python tools/peft_interop.py check \\
        --bin target/release/prefix-attn
"""

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (sets the offline environment, imports torch/peft)

import torch  # noqa: E402
from peft import AutoPeftModelForCausalLM, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup  # noqa: E402

MODELS = ["tiny-a", "tiny-b"]


def read_batch(path):
    """eval.jsonl ({"input_ids", "labels"} rows) as right-padded tensors (pad id 0, mask 0, label -100)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(r.get("labels", r["input_ids"]))
    return ids, mask, labels


def noproj_config(P):
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=False)


def hand_train_noproj(run, m64, init, ids, mask, labels):
    """The run with no PEFT and no torch.optim: the prefix is the one parameter."""
    w = init.clone()
    kw = run["kwargs"]
    b1, b2 = kw.get("betas", (0.9, 0.999))
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    losses, lrs = [], []
    for k in range(mf.TRAIN_STEPS):
        lr = kw["lr"] if run["schedule"] is None else kw["lr"] * mf.linear_lambda(k, **run["schedule"])
        leaf = w.clone().requires_grad_(True)
        loss = mf.lm_loss(mf.hand_forward(m64, leaf, ids, mask).logits, labels)
        (g,) = torch.autograd.grad(loss, [leaf])
        losses.append(loss.item())
        lrs.append(lr)
        t = k + 1
        if run["optimizer"] == "SGD":
            w = w - lr * g
            continue
        w = w * (1.0 - lr * kw["weight_decay"])
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        w = w - lr * (m / (1.0 - b1 ** t)) / (torch.sqrt(v) / math.sqrt(1.0 - b2 ** t) + kw["eps"])
    return losses, lrs, w


def fixtures(root):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in MODELS:
        d = os.path.join(root, name)
        m64 = GPT2LMHeadModel.from_pretrained(os.path.join(d, "model"), attn_implementation="eager",
                                              dtype=torch.float32).to(torch.float64).eval()
        for p_ in m64.parameters():
            p_.requires_grad_(False)
        expected = load_file(os.path.join(d, "expected.safetensors"))
        ids, mask, labels = read_batch(os.path.join(d, "eval.jsonl"))
        assert torch.equal(ids, expected["input_ids"].long()) and torch.equal(labels, expected["labels"].long())
        P = expected["prefix"].shape[0]
        init32 = expected["prefix"].to(torch.float32).contiguous()
        save_file({"embedding.weight": init32}, os.path.join(d, "noproj_init.safetensors"))
        init = init32.to(torch.float64)
        out = {}
        notes = []
        for run in mf.TRAIN_RUNS:
            rn = run["name"]
            with torch.random.fork_rng(devices=[]):
                pm = get_peft_model(copy.deepcopy(m64), noproj_config(P)).eval()
            enc = pm.prompt_encoder["default"]
            assert [k for k, _ in enc.named_parameters()] == ["embedding.weight"]
            enc.load_state_dict({"embedding.weight": init.clone()}, strict=True)
            enc.to(torch.float64)
            params = [enc.embedding.weight]
            opt = getattr(torch.optim, run["optimizer"])(params, **run["kwargs"])
            sched = None if run["schedule"] is None else get_linear_schedule_with_warmup(opt, **run["schedule"])
            losses, lrs = [], []
            for k in range(mf.TRAIN_STEPS):
                opt.zero_grad(set_to_none=True)
                loss = mf.lm_loss(pm(input_ids=ids, attention_mask=mask).logits, labels)
                loss.backward()
                if k == 0 and rn == "adamw":
                    out["grad.prefix"] = params[0].grad.detach().clone()
                losses.append(loss.item())
                lrs.append(float(opt.param_groups[0]["lr"]))
                opt.step()
                if sched is not None:
                    sched.step()
            with torch.no_grad():
                saved = pm.get_prompt_embedding_to_save("default").to(torch.float64)
            assert torch.equal(saved, enc.embedding.weight.detach()), "prompt_embeddings != embedding"
            h_losses, h_lrs, h_w = hand_train_noproj(run, m64, init, ids, mask, labels)
            assert h_lrs == lrs, (rn, h_lrs, lrs)
            for a, b in zip(h_losses, losses):
                mf.close(torch.tensor(a), torch.tensor(b), 1e-10, f"{name} {rn} hand loss")
            err = mf.close(h_w, saved, 1e-10, f"{name} {rn} hand prefix")
            out[f"train.{rn}.losses"] = torch.tensor(losses, dtype=torch.float64)
            out[f"train.{rn}.lrs"] = torch.tensor(lrs, dtype=torch.float64)
            out[f"train.{rn}.prefix"] = saved.contiguous()
            notes.append(f"{rn}: losses {losses}, hand path max diff {err:.1e}")
        # The first loss is the fixture's loss up to the f32 rounding of the init.
        mf.close(out["train.adamw.losses"][0], expected["loss"].to(torch.float64), 1e-6, "first loss vs loss")
        save_file(dict(sorted(out.items())), os.path.join(d, "noproj.safetensors"),
                  metadata={"generator": "tools/peft_interop.py fixtures",
                            "versions": json.dumps({"torch": torch.__version__,
                                                    "peft": __import__("peft").__version__,
                                                    "transformers": __import__("transformers").__version__}),
                            "notes": "; ".join(notes)})
        for f in ["noproj.safetensors", "noproj_init.safetensors"]:
            os.chmod(os.path.join(d, f), 0o644)
        print(f"{name}: " + "; ".join(notes))
    return 0


def token_mean_loss(model, ids, mask, labels):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.to(torch.float64)
    return mf.lm_loss(logits, labels).item()


def check(binary, root):
    model_dir = os.path.abspath(os.path.join(root, "tiny-a", "model"))
    data = os.path.abspath(os.path.join(root, "tiny-a", "eval.jsonl"))
    ids, mask, labels = read_batch(data)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind, extra in [("mlp", ["--mid-dim", "16"]), ("no-projection", ["--no-prefix-projection"])]:
            out = os.path.join(tmp, kind)
            cmd = [binary, "train", "--model", model_dir, "--data", data, "--out", out, "--prefix-len", "5",
                   "--steps", "5", "--batch-size", "2", "--lr", "1e-2", "--seed", "3"] + extra
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ev = subprocess.run([binary, "eval", "--model", model_dir, "--adapter", out, "--data", data],
                                check=True, capture_output=True, text=True)
            ours = json.loads(ev.stdout)["loss"]
            with open(os.path.join(out, "adapter_config.json")) as f:
                cfg = json.load(f)
            base = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float64).eval()
            peft_model = PeftModel.from_pretrained(base, out).eval()
            via_peft = token_mean_loss(peft_model, ids, mask, labels)
            auto = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
            via_auto = token_mean_loss(auto, ids, mask, labels)
            rel = max(abs(ours - via_peft), abs(ours - via_auto)) / max(1.0, abs(via_peft))
            ok = rel <= 1e-5
            failures += not ok
            print(f"{kind}: prefix_projection={cfg['prefix_projection']}, base_model_name_or_path="
                  f"{cfg['base_model_name_or_path']!r}; loss: prefix-attn eval {ours:.10f}, "
                  f"PeftModel.from_pretrained {via_peft:.10f}, AutoPeftModelForCausalLM {via_auto:.10f}; "
                  f"max rel diff {rel:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("--out", default="tests/fixtures/gpt2")
    c = sub.add_parser("check")
    c.add_argument("--bin", default="target/release/prefix-attn")
    c.add_argument("--fixtures", default="tests/fixtures/gpt2")
    args = ap.parse_args()
    if args.cmd == "fixtures":
        return fixtures(args.out)
    return check(args.bin, args.fixtures)


if __name__ == "__main__":
    sys.exit(main())
