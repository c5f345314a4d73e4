//! The half-precision training path (a kernel device: emu or cuda) against the Hugging Face +
//! PEFT fixture `tiny-c` (head dim 64), whose references were computed in f64, and whose
//! `fp16.*` keys hold the same quantities from an fp16 run of the reference stack. The
//! tolerance of every quantity is a multiple of that fp16 run's own error against f64 (plus a
//! small floor): our fp16 path must be about as accurate as PyTorch's fp16 path.
//! Returns a report line per quantity; `Err` names the first quantity out of tolerance.
#![allow(dead_code)]

use prefix_attn::device::Backend;
use prefix_attn::gpt2::{Activations, Gpt2, Gradients};
use prefix_attn::io::SafetensorsFile;
use prefix_attn::lm::{generate, Batch};
use prefix_attn::prefix::encoder::{PrefixEncoder, PARAM_NAMES};
use prefix_attn::tensor::DType;
use prefix_attn::train::optim::{Optimizer, OptimizerKind};
use prefix_attn::train::trainer::Stepper;

/// Multiple of the PyTorch fp16 run's error that ours may have.
pub const FP16_FACTOR: f64 = 3.0;

struct Fx {
    st: SafetensorsFile,
}

impl Fx {
    fn f64(&self, name: &str) -> Result<Vec<f64>, String> {
        self.st
            .f64(name)
            .map(|x| x.1)
            .map_err(|e| format!("{name}: {e}"))
    }
    fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), String> {
        self.st.i64(name).map_err(|e| format!("{name}: {e}"))
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// Checks `ours` against the f64 reference `key`, with the tolerance from `fp16.key`.
fn check(
    fx: &Fx,
    key: &str,
    ours: &[f64],
    floor: f64,
    report: &mut Vec<String>,
) -> Result<(), String> {
    let want = fx.f64(key)?;
    let theirs = fx.f64(&format!("fp16.{key}"))?;
    if ours.len() != want.len() {
        return Err(format!(
            "{key}: {} values, reference has {}",
            ours.len(),
            want.len()
        ));
    }
    let e_ours = max_abs_diff(ours, &want);
    let e_torch = max_abs_diff(&theirs, &want);
    // Plus one fp16 unit roundoff at the reference's scale: a single sample of rounding noise
    // (torch's) is a noisy yardstick.
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let tol = FP16_FACTOR * e_torch + floor + scale / 2048.0;
    report.push(format!(
        "{key}: ours {e_ours:.3e}, torch fp16 {e_torch:.3e} (max |ref| {scale:.3e}), tolerance {tol:.3e}"
    ));
    if e_ours > tol {
        return Err(format!(
            "{key}: error {e_ours:.3e} vs f64 exceeds {tol:.3e} ({FP16_FACTOR}× torch fp16's {e_torch:.3e} + floors)"
        ));
    }
    Ok(())
}

/// Runs the whole comparison on `be` (which must compute in f16).
pub fn tiny_c_fp16_parity(be: &dyn Backend) -> Result<Vec<String>, String> {
    let dir = super::files::fixture("tiny-c");
    let fx = Fx {
        st: SafetensorsFile::open(&dir.join("expected.safetensors")).map_err(|e| e.to_string())?,
    };
    let mut report = vec![];
    let s = |e: prefix_attn::error::Error| e.to_string();
    let model = Gpt2::load(&dir.join("model"), be).map_err(s)?;
    if model.dtype != DType::F16 {
        return Err(format!(
            "{} computes in {}, expected f16",
            be.device(),
            model.dtype
        ));
    }
    let c = model.config.clone();
    let enc_path = dir.join("prefix_encoder.safetensors");
    let dims = PrefixEncoder::dims_in(&enc_path).map_err(s)?;
    let enc = PrefixEncoder::load(&enc_path, dims, be).map_err(s)?;

    // The batch.
    let (shape, ids) = fx.i64("input_ids")?;
    let (_, mask) = fx.i64("attention_mask")?;
    let (_, labels) = fx.i64("labels")?;
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
        .map(|(a, l)| (a.as_slice(), l.as_slice()))
        .collect();
    let batch = Batch::new(&refs).map_err(s)?;
    let v = c.vocab_size;

    // Logits and loss, with and without the prefix (inference forward: logits kept).
    let mut eacts = enc.acts(be).map_err(s)?;
    enc.forward(be, &mut eacts).map_err(s)?;
    let mut prefix16 = be
        .zeros(&[dims.prefix_len, dims.out_dim()], DType::F16)
        .map_err(s)?;
    be.copy(&eacts.prefix.view(), &mut prefix16.view_mut())
        .map_err(s)?;
    for (with_prefix, lkey, losskey) in [
        (true, "logits", "loss"),
        (false, "logits_base", "loss_base"),
    ] {
        let mut acts =
            Activations::new(&model, be, batch.batch_size, batch.seq_len, false).map_err(s)?;
        let loss = model
            .forward(
                be,
                &batch,
                with_prefix.then_some(&prefix16),
                &mut acts,
                None,
            )
            .map_err(s)?;
        let got = be
            .download(acts.logits())
            .map_err(s)?
            .try_to_f32_vec()
            .map_err(s)?;
        // Real positions only (the fixture's logits at padding are meaningless).
        let want_all = fx.f64(lkey)?;
        let theirs_all = fx.f64(&format!("fp16.{lkey}"))?;
        let (mut g, mut w, mut th) = (vec![], vec![], vec![]);
        for (bi, (ids, _)) in examples.iter().enumerate() {
            for ti in 0..ids.len() {
                let row = (bi * batch.seq_len + ti) * v;
                g.extend(got[row..row + v].iter().map(|&x| x as f64));
                w.extend(&want_all[row..row + v]);
                th.extend(&theirs_all[row..row + v]);
            }
        }
        let (e_ours, e_torch) = (max_abs_diff(&g, &w), max_abs_diff(&th, &w));
        let tol = FP16_FACTOR * e_torch + 1e-3;
        report.push(format!(
            "{lkey} (real positions): ours {e_ours:.3e}, torch fp16 {e_torch:.3e}, tolerance {tol:.3e}"
        ));
        if e_ours > tol {
            return Err(format!("{lkey}: error {e_ours:.3e} exceeds {tol:.3e}"));
        }
        check(&fx, losskey, &[loss.mean()], 1e-4, &mut report)?;
    }

    // Gradients of the mean loss (summed-loss backward through fp16, divided in f32).
    let mut acts =
        Activations::new(&model, be, batch.batch_size, batch.seq_len, true).map_err(s)?;
    let loss = model
        .forward(be, &batch, Some(&prefix16), &mut acts, None)
        .map_err(s)?;
    let mut grads =
        Gradients::new(&model, be, batch.batch_size, batch.seq_len, dims.prefix_len).map_err(s)?;
    model
        .backward(be, &batch, &prefix16, &acts, &mut grads)
        .map_err(s)?;
    let inv = 1.0 / loss.count as f64;
    let gp: Vec<f64> = be
        .download(&grads.d_prefix)
        .map_err(s)?
        .to_f32_vec()
        .iter()
        .map(|&x| x as f64 * inv)
        .collect();
    check(&fx, "grad.prefix", &gp, 1e-7, &mut report)?;
    let mut eg = PrefixEncoder::zeros(dims, be).map_err(s)?;
    enc.backward(be, &mut eacts, &grads.d_prefix, inv as f32, &mut eg)
        .map_err(s)?;
    for (i, pname) in PARAM_NAMES.iter().enumerate() {
        let got: Vec<f64> = be
            .download(&eg.params[i])
            .map_err(s)?
            .to_f32_vec()
            .iter()
            .map(|&x| x as f64)
            .collect();
        check(&fx, &format!("grad.{pname}"), &got, 1e-7, &mut report)?;
    }

    // Three AdamW steps (the trainer's own step), as the fixture's `train.adamw` run.
    let lrs = fx.f64("train.adamw.lrs")?;
    let opt = Optimizer::new(
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        &dims.shapes(),
        be,
    )
    .map_err(s)?;
    let enc = PrefixEncoder::load(&enc_path, dims, be).map_err(s)?;
    let mut stepper = Stepper::new(&model, enc, opt, be).map_err(s)?;
    let mut losses = vec![];
    for &lr in &lrs {
        losses.push(stepper.step(be, &batch, lr).map_err(s)?.mean());
    }
    check(&fx, "train.adamw.losses", &losses, 1e-4, &mut report)?;
    // AdamW's first steps move each entry by about lr · sign(gradient): entries whose
    // gradient is near zero may go either way in fp16 (the fixture's own fp16 run flips a
    // few). Compare the resulting prefix as a whole, and bound every entry by the largest
    // possible flip (2 · lr per step).
    let pre: Vec<f64> = stepper
        .prefix(be)
        .map_err(s)?
        .iter()
        .map(|&x| x as f64)
        .collect();
    let want = fx.f64("train.adamw.prefix")?;
    let flip_bound = 2.0 * lrs.iter().sum::<f64>();
    let worst = max_abs_diff(&pre, &want);
    let rms = (pre
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / want.len() as f64)
        .sqrt();
    let theirs = fx.f64("fp16.train.adamw.prefix")?;
    let rms_torch = (theirs
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / want.len() as f64)
        .sqrt();
    report.push(format!(
        "train.adamw.prefix: max {worst:.3e} (bound {flip_bound:.3e}), rms {rms:.3e} (torch fp16 rms {rms_torch:.3e})"
    ));
    if worst > flip_bound || rms > FP16_FACTOR * rms_torch + 1e-4 {
        return Err(format!(
            "train.adamw.prefix: max {worst:.3e} (bound {flip_bound:.3e}), rms {rms:.3e} vs torch fp16 {rms_torch:.3e}"
        ));
    }

    // Greedy generation (the fixture checks that the top-1/top-2 gaps are safe for fp16).
    let (_, prompt) = fx.i64("gen.prompt_ids")?;
    let prompt: Vec<u32> = prompt.iter().map(|&x| x as u32).collect();
    for (pre, key) in [(Some(&prefix16), "gen.ids"), (None, "gen.ids_base")] {
        let (_, want) = fx.i64(key)?;
        let want: Vec<u32> = want.iter().map(|&x| x as u32).collect();
        let got = generate::greedy_until(&model, be, pre, &prompt, want.len(), c.eos_token_id)
            .map(|g| g.ids)
            .map_err(s)?;
        report.push(format!("{key}: {got:?}"));
        if got != want {
            return Err(format!("{key}: generated {got:?}, reference {want:?}"));
        }
    }
    Ok(report)
}
