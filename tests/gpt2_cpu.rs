//! GPT-2 on the CPU backend against the f64 oracle model: logits, loss, the prefix gradient
//! by finite differences, the encoder's backward, cached generation; adapter files.

mod common;

use common::files::tmp_dir;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::gpt2::oracle::Gpt2Oracle;
use prefix_attn::gpt2::random::{small_config, write_random_model};
use prefix_attn::gpt2::{Activations, Gpt2, Gradients};
use prefix_attn::lm::{generate, Batch};
use prefix_attn::prefix::encoder::{EncoderDims, PrefixEncoder};
use prefix_attn::prefix::{AdapterConfig, PrefixAdapter};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

struct Setup {
    model: Gpt2,
    oracle: Gpt2Oracle,
    prefix: Tensor,
    examples: Vec<(Vec<u32>, Vec<i32>)>,
}

fn setup(name: &str, seed: u64, prefix_len: usize) -> Setup {
    let cfg = small_config(2, 2, 8, 37, 32);
    let dir = tmp_dir(name);
    write_random_model(&dir, &cfg, seed, 0.3).unwrap();
    let be = CpuBackend;
    let model = Gpt2::load(&dir, &be).unwrap();
    let oracle = Gpt2Oracle::new(&model, &be).unwrap();
    let mut rng = Rng::new(seed + 1);
    let width = cfg.n_layer * 2 * cfg.n_embd;
    let prefix = Tensor::from_f32(
        &[prefix_len, width],
        &rng.normal_vec(prefix_len * width, 1.0),
        DType::F32,
    )
    .unwrap();
    let examples = [9usize, 6, 3]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| rng.below(37) as u32).collect();
            let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            labels[0] = -100;
            if n > 4 {
                labels[2] = -100;
            }
            (ids, labels)
        })
        .collect();
    Setup {
        model,
        oracle,
        prefix,
        examples,
    }
}

fn refs(ex: &[(Vec<u32>, Vec<i32>)]) -> Vec<(&[u32], &[i32])> {
    ex.iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect()
}

fn prefix_f64(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

#[test]
fn forward_matches_f64_oracle() {
    for (p, seed) in [(3usize, 1u64), (0, 2), (1, 3)] {
        let s = setup(&format!("fwd{p}"), seed, p.max(1));
        let be = CpuBackend;
        let ex = refs(&s.examples);
        let batch = Batch::new(&ex).unwrap();
        let mut acts =
            Activations::new(&s.model, &be, batch.batch_size, batch.seq_len, false).unwrap();
        let prefix = (p > 0).then_some(&s.prefix);
        let loss = s
            .model
            .forward(&be, &batch, prefix, &mut acts, None)
            .unwrap();
        let pf = prefix_f64(&s.prefix);
        let pref = (p > 0).then_some(pf.as_slice());
        let logits = acts.logits().to_f32_vec();
        let v = s.model.config.vocab_size;
        let mut max_err = 0f64;
        for (b, (ids, _)) in ex.iter().enumerate() {
            let want = s.oracle.logits(ids, pref);
            for t in 0..ids.len() {
                for j in 0..v {
                    let got = logits[(b * batch.seq_len + t) * v + j] as f64;
                    max_err = max_err.max((got - want[t * v + j]).abs());
                }
            }
        }
        assert!(
            max_err < 2e-5,
            "P={p}: logits differ from the oracle by {max_err}"
        );
        let (sum, count) = s.oracle.loss_sum(&ex, pref);
        assert_eq!(count, loss.count);
        let rel = (loss.mean() - sum / count as f64).abs() / (sum / count as f64);
        assert!(
            rel < 1e-6,
            "P={p}: loss {} vs oracle {} (rel {rel})",
            loss.mean(),
            sum / count as f64
        );
    }
}

#[test]
fn prefix_gradient_matches_finite_differences() {
    let s = setup("grad", 7, 3);
    let be = CpuBackend;
    let ex = refs(&s.examples);
    let batch = Batch::new(&ex).unwrap();
    let mut acts = Activations::new(&s.model, &be, batch.batch_size, batch.seq_len, true).unwrap();
    let loss = s
        .model
        .forward(&be, &batch, Some(&s.prefix), &mut acts, None)
        .unwrap();
    let mut grads = Gradients::new(&s.model, &be, batch.batch_size, batch.seq_len, 3).unwrap();
    s.model
        .backward(&be, &batch, &s.prefix, &acts, &mut grads)
        .unwrap();
    let g: Vec<f64> = grads
        .d_prefix
        .to_f32_vec()
        .iter()
        .map(|&x| x as f64 / loss.count as f64)
        .collect();
    let gmax = g.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(gmax > 1e-3, "gradient should not vanish: {gmax}");
    let base = prefix_f64(&s.prefix);
    let mean = |p: &[f64]| {
        let (sum, n) = s.oracle.loss_sum(&ex, Some(p));
        sum / n as f64
    };
    let mut rng = Rng::new(99);
    // Every layer (layer 0 uses the prefix-only attention backward), keys and values.
    let width = base.len() / 3;
    let mut idx: Vec<usize> = (0..40)
        .map(|_| rng.below(base.len() as u64) as usize)
        .collect();
    idx.extend([0, width / 4 + 1, width / 2 + 2, width - 1, 2 * width + 5]);
    let h = 1e-5;
    for i in idx {
        let mut pp = base.clone();
        pp[i] += h;
        let mut pm = base.clone();
        pm[i] -= h;
        let fd = (mean(&pp) - mean(&pm)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-4 * gmax + 1e-4 * fd.abs(),
            "d_prefix[{i}]: finite difference {fd} vs backward {}",
            g[i]
        );
    }
}

/// The encoder's backward against finite differences of an f64 encoder forward, through a
/// linear surrogate loss `sum(prefix ∘ R)`.
#[test]
fn encoder_backward_matches_finite_differences() {
    let be = CpuBackend;
    let dims = EncoderDims {
        prefix_len: 3,
        token_dim: 6,
        hidden: 5,
        num_layers: 2,
        projection: true,
    };
    let enc = PrefixEncoder::init(dims, 3, &be).unwrap();
    let mut acts = enc.acts(&be).unwrap();
    enc.forward(&be, &mut acts).unwrap();
    let o = dims.out_dim();
    let r = Rng::new(4).normal_vec(3 * o, 1.0);
    let rt = Tensor::from_f32(&[3, o], &r, DType::F32).unwrap();
    let mut grads = PrefixEncoder::zeros(dims, &be).unwrap();
    enc.backward(&be, &mut acts, &rt, 0.5, &mut grads).unwrap();
    let params: Vec<Vec<f64>> = enc.params.iter().map(prefix_f64).collect();
    let f = |ps: &[Vec<f64>]| -> f64 {
        let (emb, w0, b0, w2, b2) = (&ps[0], &ps[1], &ps[2], &ps[3], &ps[4]);
        let (c, e) = (6, 5);
        let mut total = 0.0;
        for p in 0..3 {
            let hid: Vec<f64> = (0..e)
                .map(|i| {
                    (b0[i] + (0..c).map(|j| emb[p * c + j] * w0[i * c + j]).sum::<f64>()).tanh()
                })
                .collect();
            for k in 0..o {
                let y = b2[k] + (0..e).map(|i| hid[i] * w2[k * e + i]).sum::<f64>();
                total += 0.5 * y * r[p * o + k] as f64;
            }
        }
        total
    };
    // The encoder's own forward agrees with the f64 one.
    let pre = acts.prefix.to_f32_vec();
    assert!(
        (pre.iter()
            .zip(&r)
            .map(|(a, b)| 0.5 * *a as f64 * *b as f64)
            .sum::<f64>()
            - f(&params))
        .abs()
            < 1e-4
    );
    for (pi, g) in grads.params.iter().enumerate() {
        let g = g.to_f32_vec();
        for i in 0..g.len() {
            let mut pp = params.clone();
            pp[pi][i] += 1e-6;
            let mut pm = params.clone();
            pm[pi][i] -= 1e-6;
            let fd = (f(&pp) - f(&pm)) / 2e-6;
            assert!(
                (fd - g[i] as f64).abs() < 1e-4 * (1.0 + fd.abs()),
                "param {pi}[{i}]: fd {fd} vs {}",
                g[i]
            );
        }
    }
}

#[test]
fn cached_generation_equals_full_recompute() {
    for p in [0usize, 3] {
        let s = setup(&format!("gen{p}"), 11, 3);
        let be = CpuBackend;
        let prefix = (p > 0).then_some(&s.prefix);
        let prompt: Vec<u32> = vec![5, 17, 2, 30];
        let got = generate::greedy_until(&s.model, &be, prefix, &prompt, 10, None)
            .unwrap()
            .ids;
        let pf = prefix_f64(&s.prefix);
        let mut seq = prompt.clone();
        let v = s.model.config.vocab_size;
        let mut want = vec![];
        for _ in 0..10 {
            let lg = s.oracle.logits(&seq, (p > 0).then_some(pf.as_slice()));
            let last = &lg[(seq.len() - 1) * v..];
            let best = (0..v)
                .max_by(|&a, &b| last[a].partial_cmp(&last[b]).unwrap())
                .unwrap() as u32;
            want.push(best);
            seq.push(best);
        }
        assert_eq!(got, want, "P={p}");
        // Stops at EOS (take the third token as EOS).
        let stop = generate::greedy_until(&s.model, &be, prefix, &prompt, 10, Some(want[2]))
            .unwrap()
            .ids;
        assert_eq!(
            stop,
            want[..=want.iter().position(|&t| t == want[2]).unwrap()].to_vec()
        );
    }
}

#[test]
fn adapter_round_trip_and_mismatch() {
    let s = setup("adapter", 5, 3);
    let dir = tmp_dir("adapter-out");
    let cfg = AdapterConfig::for_model(&s.model.config, 3, 16);
    let ad = PrefixAdapter {
        config: cfg.clone(),
        prompt_embeddings: s.prefix.to_f32_vec(),
    };
    ad.save(&dir).unwrap();
    let back = PrefixAdapter::load(&dir).unwrap();
    assert_eq!(back.config, cfg);
    assert_eq!(back.prompt_embeddings, ad.prompt_embeddings);
    back.config.check_model(&s.model.config, &dir).unwrap();
    let other = small_config(3, 2, 8, 37, 32);
    let e = back
        .config
        .check_model(&other, &dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_layers 2 vs n_layer 3"), "{e}");
}

/// Projecting only the counted rows to the vocabulary, or streaming them through the head a
/// chunk at a time (chunks of 1, 4 and 7 rows, and more rows than there are), changes nothing
/// but the work done and the memory held.
#[test]
fn counted_rows_only_gives_the_same_loss_and_gradient() {
    let s = setup("counted", 13, 3);
    let be = CpuBackend;
    let ex = refs(&s.examples);
    let batch = Batch::new(&ex).unwrap();
    assert!(
        batch.count() < batch.ids.len(),
        "the batch has uncounted rows"
    );
    let m = batch.batch_size * batch.seq_len;
    let run = |compact: bool, chunk: Option<usize>| {
        let mut acts = match chunk {
            Some(c) => Activations::streamed(&s.model, &be, m, true, Some(c)).unwrap(),
            None => Activations::with_rows(&s.model, &be, m, true).unwrap(),
        };
        if compact {
            acts = acts.counted_only();
        }
        let loss = s
            .model
            .forward(&be, &batch, Some(&s.prefix), &mut acts, None)
            .unwrap();
        let mut grads = Gradients::new(&s.model, &be, batch.batch_size, batch.seq_len, 3).unwrap();
        s.model
            .backward(&be, &batch, &s.prefix, &acts, &mut grads)
            .unwrap();
        (loss, grads.d_prefix.to_f32_vec())
    };
    let (la, ga) = run(false, None);
    let gmax = ga.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(gmax > 1e-4, "gradient should not vanish: {gmax}");
    assert!(
        batch.count() % 4 != 0,
        "a chunk of 4 should leave a remainder"
    );
    for (compact, chunk) in [
        (true, None),
        (true, Some(1)),
        (true, Some(4)),
        (true, Some(7)),
        (true, Some(m + 3)),
    ] {
        let (lb, gb) = run(compact, chunk);
        assert_eq!(la.count, lb.count);
        assert!(
            (la.sum - lb.sum).abs() < 1e-6 * la.sum.abs(),
            "chunk {chunk:?}: loss {} vs {}",
            lb.sum,
            la.sum
        );
        for (a, b) in ga.iter().zip(&gb) {
            assert!((a - b).abs() <= 1e-5 * gmax, "chunk {chunk:?}: {b} vs {a}");
        }
    }
}
