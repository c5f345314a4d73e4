//! The Llama family (Llama with GQA, Qwen2 with q/k/v biases and a tied head) on the CPU
//! backend against the f64 oracle model: logits, loss, the prefix gradient by central finite
//! differences, cached decoding against full recomputation; config refusals; the kernel
//! devices' clear error.

mod common;

use common::files::tmp_dir;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::emu::EmuBackend;
use prefix_attn::llama::oracle::LlamaOracle;
use prefix_attn::llama::random::{small_config, write_random_model};
use prefix_attn::llama::{Activations, GradScratch, Llama, LlamaConfig};
use prefix_attn::lm::{self, generate, Batch, PrefixLm, Workspace};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use std::path::Path;

struct Setup {
    model: Llama,
    oracle: LlamaOracle,
    prefix: Tensor,
    examples: Vec<(Vec<u32>, Vec<i32>)>,
    _dir: common::files::TmpPath,
}

const VOCAB: usize = 37;

/// A random model of `model_type` (Llama: 4 query heads over 2 KV heads, untied head; Qwen2:
/// 4 over 1, q/k/v biases, tied head), a random prefix of `prefix_len` rows and three
/// sequences of random tokens with some labels ignored.
fn setup(model_type: &'static str, seed: u64, prefix_len: usize) -> Setup {
    let kv = if model_type == "qwen2" { 1 } else { 2 };
    let cfg = small_config(model_type, 2, 4, kv, 8, VOCAB, 32);
    let dir = tmp_dir(&format!("{model_type}-{seed}"));
    write_random_model(&dir, &cfg, seed, 0.3).unwrap();
    let be = CpuBackend;
    let model = Llama::load(&dir, &be).unwrap();
    assert_eq!(model.config, cfg, "config.json round trip");
    let oracle = LlamaOracle::new(&model, &be).unwrap();
    let mut rng = Rng::new(seed + 1);
    let width = cfg.geometry().prefix_width();
    let prefix = Tensor::from_f32(
        &[prefix_len, width],
        &rng.normal_vec(prefix_len * width, 1.0),
        DType::F32,
    )
    .unwrap();
    let examples = [9usize, 6, 3]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| rng.below(VOCAB as u64) as u32).collect();
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
        _dir: dir,
    }
}

fn refs(ex: &[(Vec<u32>, Vec<i32>)]) -> Vec<(&[u32], &[i32])> {
    ex.iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

#[test]
fn forward_matches_f64_oracle() {
    for (model_type, p, seed) in [("llama", 3usize, 1u64), ("llama", 0, 2), ("qwen2", 2, 3)] {
        let s = setup(model_type, seed, p.max(1));
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
        let pf = f64s(&s.prefix);
        let pref = (p > 0).then_some(pf.as_slice());
        let logits = acts.logits().to_f32_vec();
        let (mut max_err, mut scale) = (0f64, 0f64);
        for (b, (ids, _)) in ex.iter().enumerate() {
            let want = s.oracle.logits(ids, pref);
            for t in 0..ids.len() {
                for j in 0..VOCAB {
                    let got = logits[(b * batch.seq_len + t) * VOCAB + j] as f64;
                    let w = want[t * VOCAB + j];
                    max_err = max_err.max((got - w).abs());
                    scale = scale.max(w.abs());
                }
            }
        }
        eprintln!("{model_type} P={p}: logits max err {max_err:.2e} (scale {scale:.2})");
        assert!(scale > 0.5, "logits should not be trivially small: {scale}");
        assert!(
            max_err < 1e-5 * scale,
            "{model_type} P={p}: logits differ from the oracle by {max_err}"
        );
        let (sum, count) = s.oracle.loss_sum(&ex, pref);
        assert_eq!(count, loss.count);
        let rel = (loss.mean() - sum / count as f64).abs() / (sum / count as f64);
        assert!(
            rel < 1e-6,
            "{model_type} P={p}: loss {} vs oracle {} (rel {rel})",
            loss.mean(),
            sum / count as f64
        );
    }
}

/// The prefix changes the logits (so the tests above see it), and the prefix keys are not
/// rotated: the oracle with them rotated would disagree.
#[test]
fn prefix_matters() {
    let s = setup("llama", 21, 3);
    let pf = f64s(&s.prefix);
    let ids = &s.examples[0].0;
    let with = s.oracle.logits(ids, Some(&pf));
    let without = s.oracle.logits(ids, None);
    let d = with
        .iter()
        .zip(&without)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(d > 1e-2, "the prefix changes the logits by only {d}");
}

#[test]
fn prefix_gradient_matches_finite_differences() {
    for (model_type, seed) in [("llama", 7u64), ("qwen2", 8)] {
        let s = setup(model_type, seed, 3);
        let be = CpuBackend;
        let ex = refs(&s.examples);
        let batch = Batch::new(&ex).unwrap();
        let m = batch.batch_size * batch.seq_len;
        let mut acts = Activations::with_rows(&s.model, &be, m, true).unwrap();
        let loss = s
            .model
            .forward(&be, &batch, Some(&s.prefix), &mut acts, None)
            .unwrap();
        let mut scratch = GradScratch::new(&s.model, &be, m).unwrap();
        let mut d_prefix = Tensor::zeros(s.prefix.dims(), DType::F32).unwrap();
        s.model
            .backward(&be, &batch, &s.prefix, &acts, &mut scratch, &mut d_prefix)
            .unwrap();
        let g: Vec<f64> = f64s(&d_prefix)
            .iter()
            .map(|x| x / loss.count as f64)
            .collect();
        let gmax = g.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(gmax > 1e-3, "gradient should not vanish: {gmax}");
        let base = f64s(&s.prefix);
        let mean = |p: &[f64]| {
            let (sum, n) = s.oracle.loss_sum(&ex, Some(p));
            sum / n as f64
        };
        let mut rng = Rng::new(seed + 99);
        // Every layer (layer 0 uses the prefix-only attention backward), keys and values, and
        // every prefix row.
        let width = base.len() / 3;
        let mut idx: Vec<usize> = (0..30)
            .map(|_| rng.below(base.len() as u64) as usize)
            .collect();
        idx.extend([0, width / 4 + 1, width / 2 + 2, width - 1, 2 * width + 5]);
        let h = 1e-5;
        let mut worst = 0f64;
        for i in idx {
            let mut pp = base.clone();
            pp[i] += h;
            let mut pm = base.clone();
            pm[i] -= h;
            let fd = (mean(&pp) - mean(&pm)) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs() / gmax);
            assert!(
                (fd - g[i]).abs() <= 1e-4 * gmax + 1e-4 * fd.abs(),
                "{model_type} d_prefix[{i}]: finite difference {fd} vs backward {}",
                g[i]
            );
        }
        eprintln!("{model_type}: prefix gradient vs finite differences: max err {worst:.2e} of max |g| {gmax:.2e}");
    }
}

/// The loss and prefix gradient of the forward that keeps every row's logits and its
/// backward, and the gradient buffers it used.
fn whole_logits_step(s: &Setup, batch: &Batch) -> (lm::LossSum, Tensor, GradScratch) {
    let be = CpuBackend;
    let m = batch.batch_size * batch.seq_len;
    let mut acts = Activations::with_rows(&s.model, &be, m, true).unwrap();
    let loss = s
        .model
        .forward(&be, batch, Some(&s.prefix), &mut acts, None)
        .unwrap();
    let mut scratch = GradScratch::new(&s.model, &be, m).unwrap();
    let mut grad = Tensor::zeros(s.prefix.dims(), DType::F32).unwrap();
    s.model
        .backward(&be, batch, &s.prefix, &acts, &mut scratch, &mut grad)
        .unwrap();
    (loss, grad, scratch)
}

/// The seam's `loss_and_grad` (counted rows only, workspace reused for a smaller batch)
/// gives the loss and gradient of the full forward and backward.
#[test]
fn loss_and_grad_through_the_seam() {
    let s = setup("qwen2", 31, 2);
    let be = CpuBackend;
    let ex = refs(&s.examples);
    let batch = Batch::new(&ex).unwrap();
    let (want_loss, want, _) = whole_logits_step(&s, &batch);
    let mut ws = Workspace::new();
    let model: &dyn PrefixLm = &s.model;
    for _ in 0..2 {
        let mut got = Tensor::zeros(s.prefix.dims(), DType::F32).unwrap();
        let loss = model
            .loss_and_grad(&be, &batch, &s.prefix, &mut ws, &mut got)
            .unwrap();
        assert_eq!(loss.count, want_loss.count);
        assert!((loss.sum - want_loss.sum).abs() < 1e-9 * want_loss.sum.abs());
        let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
        let gmax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-6 * gmax, "{a} vs {b}");
        }
    }
    // A smaller batch in the same (larger) workspace.
    let small = Batch::new(&ex[1..]).unwrap();
    let mut got = Tensor::zeros(s.prefix.dims(), DType::F32).unwrap();
    let l = model
        .loss_and_grad(&be, &small, &s.prefix, &mut ws, &mut got)
        .unwrap();
    let pf = f64s(&s.prefix);
    let (sum, n) = s.oracle.loss_sum(&ex[1..], Some(&pf));
    assert_eq!(l.count, n);
    assert!((l.sum - sum).abs() < 1e-5 * sum.abs(), "{} vs {sum}", l.sum);
    let lo = model.loss(&be, &small, Some(&s.prefix), &mut ws).unwrap();
    assert!((lo.sum - l.sum).abs() < 1e-6 * sum.abs());
}

/// The streamed head (logits, loss and the head's backward a few rows at a time, no logits
/// kept) gives the loss and prefix gradient of the whole-logits forward and backward, for
/// chunks of one row, of sizes that do and do not divide the counted rows, and of more rows
/// than there are; with and without a prefix-only loss.
#[test]
fn streamed_head_equals_whole_logits() {
    let s = setup("llama", 41, 3);
    let be = CpuBackend;
    let ex = refs(&s.examples);
    let batch = Batch::new(&ex).unwrap();
    let m = batch.batch_size * batch.seq_len;
    let (want_loss, want, mut scratch) = whole_logits_step(&s, &batch);
    let w = want.to_f32_vec();
    let gmax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(gmax > 1e-3, "gradient should not vanish: {gmax}");
    let counted = ex
        .iter()
        .flat_map(|(_, l)| l.iter())
        .filter(|&&t| t != -100);
    let counted = counted.count();
    assert!(counted % 4 != 0, "a chunk of 4 should leave a remainder");
    for chunk in [Some(1), Some(4), Some(5), Some(m + 7), None] {
        for with_grad in [true, false] {
            let mut acts = Activations::streamed(&s.model, &be, m, with_grad, chunk).unwrap();
            let loss = s
                .model
                .forward(&be, &batch, Some(&s.prefix), &mut acts, None)
                .unwrap();
            assert_eq!(loss.count, want_loss.count);
            assert!(
                (loss.sum - want_loss.sum).abs() < 1e-5 * want_loss.sum.abs(),
                "chunk {chunk:?}: loss {} vs {}",
                loss.sum,
                want_loss.sum
            );
            let mut got = Tensor::zeros(s.prefix.dims(), DType::F32).unwrap();
            let r = s
                .model
                .backward(&be, &batch, &s.prefix, &acts, &mut scratch, &mut got);
            if !with_grad {
                let e = r.expect_err("a loss-only forward has no gradient to go back from");
                assert!(e.to_string().contains("with_grad"), "{e}");
                continue;
            }
            r.unwrap();
            for (i, (a, b)) in got.to_f32_vec().iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * gmax,
                    "chunk {chunk:?}: d_prefix[{i}] {a} vs {b}"
                );
            }
        }
    }
    let e = Activations::streamed(&s.model, &be, m, true, Some(0)).unwrap_err();
    assert!(e.to_string().contains("head chunk"), "{e}");
}

#[test]
fn cached_generation_equals_full_recompute() {
    for (model_type, p) in [("llama", 0usize), ("llama", 3), ("qwen2", 2)] {
        let s = setup(model_type, 11, p.max(1));
        let be = CpuBackend;
        let prefix = (p > 0).then_some(&s.prefix);
        let prompt: Vec<u32> = vec![5, 17, 2, 30];
        let got = generate::greedy_until(&s.model, &be, prefix, &prompt, 10, None)
            .unwrap()
            .ids;
        let pf = f64s(&s.prefix);
        let mut seq = prompt.clone();
        let mut want = vec![];
        for _ in 0..10 {
            let lg = s.oracle.logits(&seq, (p > 0).then_some(pf.as_slice()));
            let last = &lg[(seq.len() - 1) * VOCAB..];
            let best = (0..VOCAB)
                .max_by(|&a, &b| last[a].partial_cmp(&last[b]).unwrap())
                .unwrap() as u32;
            want.push(best);
            seq.push(best);
        }
        assert_eq!(got, want, "{model_type} P={p}");
        // Decoding step by step: each step's logits equal the full forward's last row.
        let mut cache = s.model.new_cache(&be, 16).unwrap();
        let first = s.model.decode(&be, &prompt, prefix, &mut cache).unwrap();
        let second = s.model.decode(&be, &want[..1], prefix, &mut cache).unwrap();
        let mut full = prompt.clone();
        for (k, logits) in [first, second].iter().enumerate() {
            let lg = s.oracle.logits(&full, (p > 0).then_some(pf.as_slice()));
            let last = &lg[(full.len() - 1) * VOCAB..];
            let err = logits
                .iter()
                .zip(last)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(err < 1e-4, "{model_type} P={p} step {k}: {err}");
            full.push(want[k]);
        }
    }
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let cfg = small_config("llama", 2, 4, 2, 8, VOCAB, 32);
    let mut v = cfg.to_json();
    edit(&mut v);
    LlamaConfig::from_json(&v.to_string(), Path::new("config.json"))
        .unwrap_err()
        .to_string()
}

#[test]
fn unsupported_options_are_refused_by_name() {
    let e = config_error(|v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    });
    assert!(e.contains("rope_scaling") && e.contains("llama3"), "{e}");
    let e = config_error(|v| {
        v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4});
    });
    assert!(e.contains("rope_parameters") && e.contains("yarn"), "{e}");
    let e = config_error(|v| v["hidden_act"] = "gelu".into());
    assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
    let e = config_error(|v| {
        v["model_type"] = "mistral".into();
        v["sliding_window"] = 16.into();
    });
    assert!(e.contains("sliding_window = 16"), "{e}");
    let e = config_error(|v| {
        v["model_type"] = "qwen2".into();
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 8.into();
    });
    assert!(e.contains("sliding_window = 8"), "{e}");
    let e = config_error(|v| v["num_key_value_heads"] = 3.into());
    assert!(e.contains("num_key_value_heads = 3"), "{e}");
    let e = config_error(|v| v["head_dim"] = 7.into());
    assert!(e.contains("head_dim = 7"), "{e}");
    // What is accepted: a Qwen2 window that is not used, a Mistral window as long as the
    // context, the default rope kind with its theta, and Llama's biases.
    let ok = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = small_config("llama", 2, 4, 2, 8, VOCAB, 32).to_json();
        edit(&mut v);
        LlamaConfig::from_json(&v.to_string(), Path::new("config.json")).unwrap()
    };
    let c = ok(&|v| {
        v["model_type"] = "qwen2".into();
        v["use_sliding_window"] = false.into();
        v["sliding_window"] = 8.into();
        v["tie_word_embeddings"] = true.into();
    });
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    // Defaults as transformers': an untied head; Mistral's window is 4096 when absent
    // (refused under a longer context), none when null.
    let c = ok(&|v| {
        v["model_type"] = "qwen2".into();
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
    });
    assert!(!c.tie_word_embeddings);
    let e = config_error(|v| {
        v["model_type"] = "mistral".into();
        v["max_position_embeddings"] = 32768.into();
    });
    assert!(e.contains("sliding_window = 4096"), "{e}");
    ok(&|v| {
        v["model_type"] = "mistral".into();
        v["max_position_embeddings"] = 32768.into();
        v["sliding_window"] = serde_json::Value::Null;
    });
    let c = ok(&|v| {
        v["model_type"] = "mistral".into();
        v["sliding_window"] = 32.into();
        v["tie_word_embeddings"] = false.into();
    });
    assert!(!c.qkv_bias && !c.tie_word_embeddings);
    let c = ok(&|v| {
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1234.0});
        v["attention_bias"] = true.into();
    });
    assert_eq!(c.rope_theta, 1234.0);
    assert!(c.qkv_bias && c.o_bias);
}

#[test]
fn weights_that_disagree_with_the_config_are_named() {
    let cfg = small_config("llama", 2, 4, 2, 8, VOCAB, 32);
    let dir = tmp_dir("llama-bad");
    write_random_model(&dir, &cfg, 5, 0.3).unwrap();
    // The config claims a tied head: lm_head.weight is then ignored, but q/k/v biases are
    // missing when the config asks for them.
    let mut v = cfg.to_json();
    v["attention_bias"] = true.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = Llama::load(&dir, &CpuBackend).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("missing"),
        "{e}"
    );
    let mut v = cfg.to_json();
    v["intermediate_size"] = 10.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = Llama::load(&dir, &CpuBackend).unwrap_err().to_string();
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[10, 32]"),
        "{e}"
    );
}

/// `lm::load` picks the family by model_type; a backend without the family's operations
/// says which one it lacks.
#[test]
fn seam_dispatch_and_missing_operations() {
    let cfg = small_config("mistral", 1, 2, 1, 8, VOCAB, 32);
    let dir = tmp_dir("mistral");
    write_random_model(&dir, &cfg, 9, 0.3).unwrap();
    let model = lm::load(&dir, &CpuBackend).unwrap();
    assert_eq!(model.model_type(), "mistral");
    assert_eq!(lm::geometry(&dir).unwrap(), cfg.geometry());
    let e = prefix_attn::device::missing_op(prefix_attn::device::Device::Emu, "rope").to_string();
    assert!(e.contains("Backend::rope") && e.contains("emu"), "{e}");
    // On emu the family loads in f16; the attention kernels take head dims 64 and 128 only,
    // which the error names.
    let emu = lm::load(&dir, &EmuBackend).unwrap();
    assert_eq!(emu.dtype(), DType::F16);
    let labels = [-100, 3, 4];
    let batch = Batch::new(&[(&[1u32, 3, 4][..], &labels[..])]).unwrap();
    let e = emu
        .loss(&EmuBackend, &batch, None, &mut Workspace::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("64"), "{e}");
}

/// The serving step (paged cache, continuous batching, per-sequence positions and adapters,
/// prompts long enough for the prefill path and one-token decode steps) gives the tokens of
/// the contiguous-cache greedy decoder; the naive prefix-in-cache mode gives the same.
#[test]
fn paged_engine_equals_the_contiguous_decoder() {
    use prefix_attn::engine::model::ModelStep;
    use prefix_attn::engine::scheduler::{Decoding, Request, Scheduler, SchedulerConfig};
    use prefix_attn::lm::paged::PrefixMode;
    let s = setup("llama", 41, 3);
    let be = CpuBackend;
    let mut rng = Rng::new(5);
    let other: Vec<f32> = s
        .prefix
        .to_f32_vec()
        .iter()
        .map(|&x| x + 0.5 * rng.normal() as f32)
        .collect();
    let adapters = [
        s.prefix.clone(),
        Tensor::from_f32(s.prefix.dims(), &other, DType::F32).unwrap(),
    ];
    let reqs: Vec<Request> = (0..6)
        .map(|i| Request {
            prompt: (0..[3, 18, 1, 7, 17, 2][i])
                .map(|_| rng.below(VOCAB as u64) as u32)
                .collect(),
            adapter: [Some(0), Some(1), None, Some(1), Some(0), None][i],
            max_new_tokens: 6,
            stop_ids: vec![],
            decoding: Decoding::Greedy,
        })
        .collect();
    let cfg = SchedulerConfig {
        num_pages: 64,
        page_size: 4,
        max_batch: 8,
    };
    let run = |mode: PrefixMode| {
        let mut step = ModelStep::new(&s.model, &be, cfg.num_pages, cfg.page_size, 2, 3)
            .unwrap()
            .with_prefix_mode(mode);
        step.add_adapter("a", &adapters[0]).unwrap();
        step.add_adapter("b", &adapters[1]).unwrap();
        let mut sched = Scheduler::new(cfg).unwrap();
        let ids: Vec<u64> = reqs
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if mode == PrefixMode::CopiedIntoCache && r.adapter.is_some() {
                    r.prompt.splice(0..0, std::iter::repeat_n(0, 3));
                }
                sched.submit(&step, r, None).unwrap()
            })
            .collect();
        let mut done = sched.run_to_completion(&mut step).unwrap();
        done.sort_by_key(|c| ids.iter().position(|&i| i == c.id).unwrap());
        done.into_iter().map(|c| c.ids).collect::<Vec<_>>()
    };
    let paged = run(PrefixMode::Table);
    for (r, got) in reqs.iter().zip(&paged) {
        let pre = r.adapter.map(|a| &adapters[a as usize]);
        let want = generate::greedy_until(&s.model, &be, pre, &r.prompt, r.max_new_tokens, None)
            .unwrap()
            .ids;
        assert_eq!(got, &want, "{r:?}");
    }
    assert_eq!(run(PrefixMode::CopiedIntoCache), paged);
}

/// Adapters of different lengths share the prefix table: the paged step's logits equal the
/// contiguous decoder's, rotary positions after each adapter's own length
/// (tests/common/paged.rs).
#[test]
fn adapters_of_different_lengths_share_the_prefix_table() {
    for model_type in ["llama", "qwen2"] {
        let s = setup(model_type, 43, 5);
        common::paged::adapters_of_different_lengths(&s.model, &CpuBackend, &s.prefix.to_f32_vec());
    }
}
