//! The Llama family's half-precision path (a kernel device: emu or cuda) against the
//! transformers + PEFT fixture `llama-gqa` (GQA 4/2, head dim 64), whose references were
//! computed in f64 and whose `fp16.*` keys hold the prefixed forward of PyTorch's fp16 model:
//! logits and loss within [`FP16_FACTOR`] × that run's error, the prefix gradient and 3 AdamW
//! steps of the trainer near the f64 ones, greedy generation equal (the fixture's top-1/top-2
//! gaps, ≥ 0.07, are far above fp16 error). One body for `tests/parity_llama.rs` (emu) and
//! `tests/gpu.rs` (cuda). Returns a report line per quantity; `Err` names the first quantity
//! out of tolerance.
#![allow(dead_code)]

use super::files::{llama_fixture, tmp_out};
use super::rel_err;
use prefix_attn::device::Backend;
use prefix_attn::io::SafetensorsFile;
use prefix_attn::llama::{Activations, Llama};
use prefix_attn::lm::{generate, Batch, PrefixLm, Workspace};
use prefix_attn::prefix::encoder::PrefixEncoder;
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::tensor::DType;
use prefix_attn::train::optim::{OptimizerKind, Schedule};
use prefix_attn::train::{train, Length, TrainConfig};

/// Multiple of the PyTorch fp16 run's error that ours may have.
pub const FP16_FACTOR: f64 = 3.0;

/// The fixture `llama-gqa` on `be` (a kernel device).
pub fn llama_gqa_fp16_parity(be: &dyn Backend) -> Result<Vec<String>, String> {
    let name = "llama-gqa";
    let dir = llama_fixture(name);
    let st = SafetensorsFile::open(&dir.join("expected.safetensors")).map_err(|e| e.to_string())?;
    let f64s = |k: &str| st.f64(k).map(|x| x.1).map_err(|e| format!("{k}: {e}"));
    let i64s = |k: &str| st.i64(k).map_err(|e| format!("{k}: {e}"));
    let err = |e: prefix_attn::Error| e.to_string();
    let mut report = vec![];

    let model = Llama::load(&dir.join("model"), be).map_err(err)?;
    if model.dtype() != DType::F16 {
        return Err(format!(
            "{name}: model in {:?}, expected f16",
            model.dtype()
        ));
    }
    let prefix = PrefixAdapter::load_for(&dir.join("adapter"), &model, be).map_err(err)?;
    // The batch's real tokens (right-padded in the fixture).
    let (shape, ids) = i64s("input_ids")?;
    let (_, mask) = i64s("attention_mask")?;
    let (_, labels) = i64s("labels")?;
    let (b, t) = (shape[0], shape[1]);
    let examples: Vec<(Vec<u32>, Vec<i32>)> = (0..b)
        .map(|i| {
            let n = (0..t).filter(|&j| mask[i * t + j] == 1).count();
            (
                (0..n).map(|j| ids[i * t + j] as u32).collect(),
                (0..n).map(|j| labels[i * t + j] as i32).collect(),
            )
        })
        .collect();
    let refs: Vec<(&[u32], &[i32])> = examples
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = Batch::new(&refs).map_err(err)?;
    let v = model.geometry().vocab_size;
    let m = batch.batch_size * batch.seq_len;

    // Logits and loss against f64, relative to PyTorch fp16's own error.
    let mut acts = Activations::with_rows(&model, be, m, false).map_err(err)?;
    let loss = model
        .forward(be, &batch, Some(&prefix), &mut acts, None)
        .map_err(err)?;
    let got = be.download(acts.logits()).map_err(err)?.to_f32_vec();
    let (want, torch16) = (f64s("logits")?, f64s("fp16.logits")?);
    let (mut g, mut w, mut tt) = (vec![], vec![], vec![]);
    for (bi, (ids, _)) in examples.iter().enumerate() {
        let row = bi * batch.seq_len * v;
        let end = row + ids.len() * v;
        g.extend(got[row..end].iter().map(|&x| x as f64));
        w.extend(&want[row..end]);
        tt.extend(&torch16[row..end]);
    }
    let (e, e16) = (rel_err(&g, &w), rel_err(&tt, &w));
    report.push(format!(
        "{name}: logits rel err {e:.2e} (torch fp16 {e16:.2e})"
    ));
    if e > FP16_FACTOR * e16 {
        return Err(format!(
            "{name}: logits rel err {e:.2e} > {FP16_FACTOR} × torch fp16 {e16:.2e}"
        ));
    }
    let (want_loss, loss16) = (f64s("loss")?[0], f64s("fp16.loss")?[0]);
    let (le, le16) = ((loss.mean() - want_loss).abs(), (loss16 - want_loss).abs());
    report.push(format!(
        "{name}: loss {} vs {want_loss} (|d| {le:.2e}, torch fp16 {le16:.2e})",
        loss.mean()
    ));
    if le > FP16_FACTOR * le16 + 1e-4 {
        return Err(format!(
            "{name}: loss off by {le:.2e} (torch fp16 {le16:.2e})"
        ));
    }

    // The prefix gradient through the seam (summed-loss backward in f16, f32 prefix grads).
    let mut ws = Workspace::new();
    let dims = [prefix.dims()[0], model.geometry().prefix_width()];
    let mut d_prefix = be.zeros(&dims, DType::F32).map_err(err)?;
    let l = model
        .loss_and_grad(be, &batch, &prefix, &mut ws, &mut d_prefix)
        .map_err(err)?;
    let gp: Vec<f64> = be
        .download(&d_prefix)
        .map_err(err)?
        .to_f32_vec()
        .iter()
        .map(|&x| x as f64 / l.count as f64)
        .collect();
    let e = rel_err(&gp, &f64s("grad.prefix")?);
    report.push(format!("{name}: grad.prefix rel err {e:.2e}"));
    if e > 2e-2 {
        return Err(format!("{name}: grad.prefix rel err {e:.2e} > 2e-2"));
    }

    // Greedy generation with the cache.
    let prompt: Vec<u32> = i64s("gen.prompt_ids")?
        .1
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want: Vec<u32> = i64s("gen.ids")?.1.iter().map(|&x| x as u32).collect();
    let ids = generate::greedy_until(
        &model,
        be,
        Some(&prefix),
        &prompt,
        want.len(),
        model.eos_token_id(),
    )
    .map_err(err)?
    .ids;
    if ids != want {
        return Err(format!("{name}: greedy ids {ids:?}, transformers {want:?}"));
    }
    report.push(format!("{name}: greedy ids equal ({} tokens)", ids.len()));

    // 3 AdamW steps of the trainer (the fixture's `adamw` run).
    let enc = PrefixEncoder::dims_in(&dir.join("prefix_encoder.safetensors")).map_err(err)?;
    let out = tmp_out(&format!("{name}-adamw-{}", be.device()));
    let cfg = TrainConfig {
        init: Some(dir.join("prefix_encoder.safetensors")),
        prefix_len: enc.prefix_len,
        mid_dim: enc.hidden,
        length: Length::Steps(3),
        batch_size: 8,
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        optimizer: OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        seed: 0,
        save_every: 0,
        ..TrainConfig::new(dir.join("model"), dir.join("eval.jsonl"), out.to_path_buf())
    };
    let r = train(&cfg, be, &mut |_| true).map_err(err)?;
    let want = f64s("train.adamw.losses")?;
    for (k, (g, w)) in r.losses.iter().zip(&want).enumerate() {
        report.push(format!("{name}: AdamW step {k}: loss {g} vs {w}"));
        if (g - w).abs() > FP16_FACTOR * le16 + 1e-4 {
            return Err(format!(
                "{name}: AdamW step {k}: loss {g} vs {w} (torch fp16 off by {le16:.2e} at step 0)"
            ));
        }
    }
    let ad = PrefixAdapter::load(&out).map_err(err)?;
    let pe: Vec<f64> = ad.prompt_embeddings.iter().map(|&x| x as f64).collect();
    let e = rel_err(&pe, &f64s("train.adamw.prefix")?);
    report.push(format!(
        "{name}: adapter after 3 AdamW steps rel err {e:.2e}"
    ));
    // AdamW's first steps move every parameter by about lr whatever the size of its gradient
    // (m / sqrt(v) = ±1 at step 1), so a parameter whose gradient is within fp16 error of
    // zero may move either way: the adapter is looser than the losses (emu: 8.8e-3).
    if e > 2e-2 {
        return Err(format!(
            "{name}: adapter after 3 AdamW steps rel err {e:.2e} > 2e-2"
        ));
    }
    Ok(report)
}
