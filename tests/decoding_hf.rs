//! Token choice against transformers 5.24 + PEFT 0.21 (fixtures of `tools/make_fixtures.py
//! --decoding`): the sampling warpers' distributions, and greedy / beam-search `generate`
//! (full recompute, `use_cache=False`) of the committed tiny models with and without their
//! adapter, driven here by the same full-recompute forward.

use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::engine::beam::log_softmax;
use prefix_attn::engine::sampling::filtered_probs;
use prefix_attn::engine::{BeamParams, BeamSearch, SamplingParams};
use prefix_attn::gpt2::{Activations, Gpt2};
use prefix_attn::lm::{Batch, IGNORE};
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::tensor::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn warped_distributions_match_transformers() {
    let doc = json(&fixtures().join("decoding/warpers.json"));
    let rows = doc["rows"].as_array().unwrap();
    assert!(rows.len() >= 16);
    for (r, row) in rows.iter().enumerate() {
        let logits: Vec<f32> = row["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want: Vec<f64> = row["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let p = SamplingParams {
            temperature: row["temperature"].as_f64().unwrap() as f32,
            top_k: row["top_k"].as_u64().map(|k| k as usize),
            top_p: row["top_p"].as_f64().unwrap() as f32,
            seed: 0,
        };
        let got = filtered_probs(&logits, &p);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // transformers works in f32; the kept set must be the same and the
            // probabilities agree to f32 rounding.
            assert_eq!(
                *g == 0.0,
                *w == 0.0,
                "row {r} ({p:?}) token {i}: kept set differs"
            );
            assert!(
                (g - w).abs() < 1e-6,
                "row {r} ({p:?}) token {i}: {g} vs {w}"
            );
        }
    }
}

/// The committed model and its adapter's prefix, on the CPU.
struct Model {
    gpt2: Gpt2,
    prefix: Tensor,
}

impl Model {
    fn load(name: &str) -> Model {
        let dir = fixtures().join("gpt2").join(name);
        let be = CpuBackend;
        let gpt2 = Gpt2::load(&dir.join("model"), &be).unwrap();
        let ad = PrefixAdapter::load(&dir.join("adapter")).unwrap();
        let width = ad.prompt_embeddings.len() / ad.config.num_virtual_tokens;
        let host = Tensor::from_f32(
            &[ad.config.num_virtual_tokens, width],
            &ad.prompt_embeddings,
            gpt2.dtype,
        )
        .unwrap();
        let prefix = be.upload(&host).unwrap();
        Model { gpt2, prefix }
    }

    /// Last-position logits of each sequence (all of one length), full recompute.
    fn last_logits(&self, seqs: &[Vec<u32>], with_prefix: bool) -> Vec<Vec<f32>> {
        let be = CpuBackend;
        let t = seqs[0].len();
        let labels = vec![IGNORE; t];
        let ex: Vec<(&[u32], &[i32])> = seqs.iter().map(|s| (&s[..], &labels[..])).collect();
        let batch = Batch::new(&ex).unwrap();
        let mut acts = Activations::new(&self.gpt2, &be, seqs.len(), t, false).unwrap();
        let pre = with_prefix.then_some(&self.prefix);
        self.gpt2
            .forward(&be, &batch, pre, &mut acts, None)
            .unwrap();
        let v = self.gpt2.config.vocab_size;
        let all = be.download(acts.logits()).unwrap().to_f32_vec();
        (0..seqs.len())
            .map(|b| all[(b * t + t - 1) * v..(b * t + t) * v].to_vec())
            .collect()
    }
}

#[test]
fn greedy_and_beam_search_match_transformers_generate() {
    let mut checked = 0;
    for name in ["tiny-a", "tiny-b", "tiny-c"] {
        let m = Model::load(name);
        let doc = json(&fixtures().join("gpt2").join(name).join("decoding.json"));
        for case in doc["cases"].as_array().unwrap() {
            let ids = |k: &str| -> Vec<u32> {
                case[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            let prompt = ids("prompt");
            let want = ids("ids");
            let with_prefix = case["adapter"].as_bool().unwrap();
            let mut bs = BeamSearch::new(BeamParams {
                num_beams: case["num_beams"].as_u64().unwrap() as usize,
                length_penalty: case["length_penalty"].as_f64().unwrap(),
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                stop_ids: vec![case["eos_token_id"].as_u64().unwrap() as u32],
            })
            .unwrap();
            while !bs.is_done() {
                let seqs: Vec<Vec<u32>> = bs
                    .running()
                    .iter()
                    .map(|b| prompt.iter().chain(&b.tokens).copied().collect())
                    .collect();
                let lp: Vec<Vec<f64>> = m
                    .last_logits(&seqs, with_prefix)
                    .iter()
                    .map(|l| log_softmax(l))
                    .collect();
                bs.step(&lp, |_| false).unwrap();
            }
            let (got, stopped) = bs.best();
            let label = format!("{name} {} prompt {prompt:?}", case["case"]);
            assert_eq!(got, &want[..], "{label}");
            let reason = if stopped { "stop" } else { "length" };
            assert_eq!(reason, case["finish_reason"].as_str().unwrap(), "{label}");
            checked += 1;
        }
    }
    assert_eq!(checked, 30);
}
