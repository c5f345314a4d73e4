//! The engine on the committed tiny GPT-2s: continuous batching over the paged cache with
//! mixed adapters, greedy, sampled and beam-search requests in one batch, against
//! transformers + PEFT `generate` (fixtures of `tools/make_fixtures.py --decoding`), against
//! the contiguous-cache greedy decoder, and against the same requests run one at a time.

mod common;

use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::engine::model::ModelStep;
use prefix_attn::engine::scheduler::{Completion, Decoding, Request, Scheduler, SchedulerConfig};
use prefix_attn::engine::SamplingParams;
use prefix_attn::gpt2::Gpt2;
use prefix_attn::lm::generate;
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt2")
        .join(name)
}

/// The fixture's adapter prefix `[P, L·2·C]` as f32 values and its shape.
fn adapter_prefix(name: &str) -> (Vec<usize>, Vec<f32>) {
    let ad = PrefixAdapter::load(&fixture(name).join("adapter")).unwrap();
    let p = ad.config.num_virtual_tokens;
    (
        vec![p, ad.prompt_embeddings.len() / p],
        ad.prompt_embeddings,
    )
}

fn run(
    model: &Gpt2,
    be: &dyn Backend,
    adapters: &[(String, Tensor)],
    reqs: &[Request],
    cfg: SchedulerConfig,
) -> Vec<Completion> {
    // The table is as long as the longest adapter; shorter ones are masked.
    let p = adapters.iter().map(|a| a.1.dims()[0]).max().unwrap_or(1);
    let mut step = ModelStep::new(model, be, cfg.num_pages, cfg.page_size, 8, p).unwrap();
    for (n, t) in adapters {
        step.add_adapter(n, t).unwrap();
    }
    let mut s = Scheduler::new(cfg).unwrap();
    let ids: Vec<u64> = reqs
        .iter()
        .map(|r| s.submit(&step, r.clone(), None).unwrap())
        .collect();
    let mut done = s.run_to_completion(&mut step).unwrap();
    assert_eq!(s.pool().used_pages(), 0);
    done.sort_by_key(|c| ids.iter().position(|&i| i == c.id).unwrap());
    done
}

const CFG: SchedulerConfig = SchedulerConfig {
    num_pages: 128,
    page_size: 4,
    max_batch: 32,
};

#[test]
fn batched_greedy_and_beam_requests_match_transformers_generate() {
    let be = CpuBackend;
    for name in ["tiny-a", "tiny-b", "tiny-c"] {
        let model = Gpt2::load(&fixture(name).join("model"), &be).unwrap();
        let (shape, vals) = adapter_prefix(name);
        let adapters = vec![(
            "fx".to_string(),
            Tensor::from_f32(&shape, &vals, DType::F32).unwrap(),
        )];
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("decoding.json")).unwrap(),
        )
        .unwrap();
        let cases = doc["cases"].as_array().unwrap();
        let u32s = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let reqs: Vec<Request> = cases
            .iter()
            .map(|c| {
                let beams = c["num_beams"].as_u64().unwrap() as usize;
                Request {
                    prompt: u32s(&c["prompt"]),
                    adapter: c["adapter"].as_bool().unwrap().then_some(0),
                    max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
                    stop_ids: vec![c["eos_token_id"].as_u64().unwrap() as u32],
                    decoding: if beams == 1 {
                        Decoding::Greedy
                    } else {
                        Decoding::Beam {
                            num_beams: beams,
                            length_penalty: c["length_penalty"].as_f64().unwrap(),
                        }
                    },
                }
            })
            .collect();
        let done = run(&model, &be, &adapters, &reqs, CFG);
        for (c, got) in cases.iter().zip(&done) {
            assert_eq!(got.ids, u32s(&c["ids"]), "{name} {}", c["case"]);
            assert_eq!(got.finish.as_str(), c["finish_reason"].as_str().unwrap());
        }
    }
}

#[test]
fn mixed_adapters_in_one_batch_equal_one_request_at_a_time() {
    let be = CpuBackend;
    let name = "tiny-a";
    let model = Gpt2::load(&fixture(name).join("model"), &be).unwrap();
    let (shape, vals) = adapter_prefix(name);
    let mut rng = Rng::new(42);
    // Four adapters: the fixture's and three perturbed copies, of 5, 4, 3 and 5 virtual
    // tokens (the first rows of each): adapters of different lengths in one prefix table.
    let adapters: Vec<(String, Tensor)> = (0..4)
        .map(|i| {
            let rows = shape[0] - [0, 1, 2, 0][i];
            let v: Vec<f32> = vals[..rows * shape[1]]
                .iter()
                .map(|&x| {
                    if i == 0 {
                        x
                    } else {
                        x + 0.5 * rng.normal() as f32
                    }
                })
                .collect();
            (
                format!("a{i}"),
                Tensor::from_f32(&[rows, shape[1]], &v, DType::F32).unwrap(),
            )
        })
        .collect();
    assert_eq!(shape[0], 5);
    let v = model.config.vocab_size as u64;
    // Prompts of 1 to 24 tokens: those over 16 take the prefill path (one attention call
    // per run of equal prefix lengths), the others the decode kernel (per-slot lengths).
    let reqs: Vec<Request> = (0..14)
        .map(|i| Request {
            prompt: (0..1 + rng.below(24))
                .map(|_| rng.below(v) as u32)
                .collect(),
            adapter: if i % 5 == 4 {
                None
            } else {
                Some((i % 4) as u32)
            },
            max_new_tokens: 3 + rng.below(10) as usize,
            stop_ids: vec![],
            decoding: match i % 3 {
                0 => Decoding::Greedy,
                1 => Decoding::Sample(SamplingParams {
                    temperature: 0.9,
                    top_k: Some(40),
                    top_p: 0.9,
                    seed: 1000 + i,
                }),
                _ => Decoding::Beam {
                    num_beams: 3,
                    length_penalty: 1.0,
                },
            },
        })
        .collect();
    let long = |r: &&Request| r.prompt.len() > 16 && r.adapter.is_some();
    let long_lens: std::collections::BTreeSet<usize> = reqs
        .iter()
        .filter(long)
        .map(|r| adapters[r.adapter.unwrap() as usize].1.dims()[0])
        .collect();
    assert!(
        long_lens.len() >= 2,
        "prefill prompts with two prefix lengths at least"
    );
    let batched = run(&model, &be, &adapters, &reqs, CFG);
    for (r, got) in reqs.iter().zip(&batched) {
        let alone = run(&model, &be, &adapters, std::slice::from_ref(r), CFG);
        assert_eq!(got.ids, alone[0].ids, "{r:?}");
        if r.decoding == Decoding::Greedy {
            // The contiguous-cache decoder (an independent path) agrees.
            let pre = r
                .adapter
                .map(|a| be.upload(&adapters[a as usize].1).unwrap());
            let want = generate::greedy_until(
                &model,
                &be,
                pre.as_ref(),
                &r.prompt,
                r.max_new_tokens,
                None,
            )
            .unwrap()
            .ids;
            assert_eq!(got.ids, want, "{r:?}");
        }
    }
    // A pool too small for everyone at once: preemption, same results.
    let tight = SchedulerConfig {
        num_pages: 40,
        page_size: 2,
        max_batch: 32,
    };
    let squeezed = run(&model, &be, &adapters, &reqs, tight);
    assert!(squeezed.iter().any(|c| c.preemptions > 0));
    for (a, b) in batched.iter().zip(&squeezed) {
        assert_eq!(a.ids, b.ids);
    }
}

/// The CUDA kernels (on the emulator, fp16) serve the fp16 tiny model's greedy and beam
/// requests, batched with the bare model's, as transformers does in f64 (the cases' margins
/// are far above fp16's error), and as the cpu engine does.
#[test]
fn emu_kernels_serve_the_same_tokens() {
    let emu = prefix_attn::device::emu::EmuBackend;
    let cpu = CpuBackend;
    let name = "tiny-c";
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("decoding.json")).unwrap(),
    )
    .unwrap();
    let u32s = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (shape, vals) = adapter_prefix(name);
    let adapters = vec![(
        "fx".to_string(),
        Tensor::from_f32(&shape, &vals, DType::F32).unwrap(),
    )];
    let cases: Vec<&Value> = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| ["greedy", "beam3", "beam3_base"].contains(&c["case"].as_str().unwrap()))
        .collect();
    let reqs: Vec<Request> = cases
        .iter()
        .map(|c| {
            let beams = c["num_beams"].as_u64().unwrap() as usize;
            Request {
                prompt: u32s(&c["prompt"]),
                adapter: c["adapter"].as_bool().unwrap().then_some(0),
                max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
                stop_ids: vec![c["eos_token_id"].as_u64().unwrap() as u32],
                decoding: if beams == 1 {
                    Decoding::Greedy
                } else {
                    Decoding::Beam {
                        num_beams: beams,
                        length_penalty: 1.0,
                    }
                },
            }
        })
        .collect();
    let m_emu = Gpt2::load(&fixture(name).join("model"), &emu).unwrap();
    let m_cpu = Gpt2::load(&fixture(name).join("model"), &cpu).unwrap();
    let on_emu = run(&m_emu, &emu, &adapters, &reqs, CFG);
    let on_cpu = run(&m_cpu, &cpu, &adapters, &reqs, CFG);
    for ((c, e), k) in cases.iter().zip(&on_emu).zip(&on_cpu) {
        assert_eq!(e.ids, u32s(&c["ids"]), "emu {}", c["case"]);
        assert_eq!(e.ids, k.ids);
    }
}

/// The naive method (each sequence's cache holds a copy of its adapter's prefix, attention
/// without a prefix table) decodes the same tokens: the benchmark compares like with like.
#[test]
fn prefix_copied_into_the_cache_gives_the_same_tokens() {
    use prefix_attn::lm::paged::PrefixMode;
    let be = CpuBackend;
    let name = "tiny-a";
    let model = Gpt2::load(&fixture(name).join("model"), &be).unwrap();
    let (shape, vals) = adapter_prefix(name);
    let p = shape[0];
    let prefix = Tensor::from_f32(&shape, &vals, DType::F32).unwrap();
    let mut rng = Rng::new(9);
    let v = model.config.vocab_size as u64;
    let reqs: Vec<Request> = (0..6)
        .map(|i| Request {
            prompt: (0..1 + rng.below(8)).map(|_| rng.below(v) as u32).collect(),
            adapter: Some(0),
            max_new_tokens: 8,
            stop_ids: vec![],
            decoding: if i % 2 == 0 {
                Decoding::Greedy
            } else {
                Decoding::Beam {
                    num_beams: 2,
                    length_penalty: 1.0,
                }
            },
        })
        .collect();
    let ours = run(&model, &be, &[("a".into(), prefix.clone())], &reqs, CFG);
    let mut step = ModelStep::new(&model, &be, CFG.num_pages, CFG.page_size, 1, p)
        .unwrap()
        .with_prefix_mode(PrefixMode::CopiedIntoCache);
    step.add_adapter("a", &prefix).unwrap();
    let mut s = Scheduler::new(CFG).unwrap();
    let ids: Vec<u64> = reqs
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.prompt.splice(0..0, std::iter::repeat_n(0, p));
            s.submit(&step, r, None).unwrap()
        })
        .collect();
    let mut naive = s.run_to_completion(&mut step).unwrap();
    naive.sort_by_key(|c| ids.iter().position(|&i| i == c.id).unwrap());
    for (a, b) in ours.iter().zip(&naive) {
        assert_eq!(a.ids, b.ids);
    }
}

/// Adapters of different lengths share the prefix table (tests/common/paged.rs).
#[test]
fn adapters_of_different_lengths_share_the_prefix_table() {
    let be = CpuBackend;
    let model = Gpt2::load(&fixture("tiny-a").join("model"), &be).unwrap();
    let (shape, vals) = adapter_prefix("tiny-a");
    common::paged::adapters_of_different_lengths(&model, &be, &vals[..5 * shape[1]]);
}

/// With packed weights (the cpu engine packs them; AVX-512) every product sums each output
/// element in one order whatever the batch, and attention runs per sequence: a request's
/// logits are the same bits alone as batched with requests of other adapters, lengths and
/// phases (prefill next to decode). They also agree, to f32 rounding, with the contiguous-
/// cache decoder of a model that was never packed (an independent path).
#[test]
fn packed_weights_make_a_requests_logits_independent_of_its_batch() {
    use prefix_attn::engine::scheduler::{PagedSeq, StepModel};
    use prefix_attn::lm::PrefixLm;
    let be = CpuBackend;
    let name = "tiny-a";
    let model = Gpt2::load(&fixture(name).join("model"), &be).unwrap();
    let unpacked = Gpt2::load(&fixture(name).join("model"), &be).unwrap();
    let (shape, vals) = adapter_prefix(name);
    let mut rng = Rng::new(77);
    let adapters: Vec<Tensor> = (0..2)
        .map(|i| {
            let v: Vec<f32> = vals
                .iter()
                .map(|&x| x + i as f32 * 0.3 * rng.normal() as f32)
                .collect();
            Tensor::from_f32(&shape, &v, DType::F32).unwrap()
        })
        .collect();
    let vocab = model.config.vocab_size as u64;
    // (prompt length, adapter): short prompts take the decode kernel, long ones prefill.
    let shapes = [
        (7usize, Some(0u32)),
        (20, Some(1)),
        (3, None),
        (18, Some(0)),
    ];
    let mut tokens: Vec<Vec<u32>> = shapes
        .iter()
        .map(|&(n, _)| (0..n).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let pages: Vec<Vec<u32>> = (0..shapes.len() as u32)
        .map(|i| (i * 8..i * 8 + 8).collect())
        .collect();
    let engine = |which: &[usize]| {
        let mut step = ModelStep::new(&model, &be, 64, 4, 2, shape[0]).unwrap();
        for (i, a) in adapters.iter().enumerate() {
            step.add_adapter(&format!("a{i}"), a).unwrap();
        }
        let packed = model.packed.len();
        (step, which.to_vec(), packed)
    };
    let feed = |step: &mut ModelStep, which: &[usize], tokens: &[Vec<u32>], cached: &[usize]| {
        let seqs: Vec<PagedSeq> = which
            .iter()
            .map(|&i| PagedSeq {
                tokens: &tokens[i],
                cached: cached[i],
                pages: &pages[i],
                adapter: shapes[i].1,
            })
            .collect();
        step.step(&seqs).unwrap()
    };
    let (mut all, all_idx, packed) = engine(&[0, 1, 2, 3]);
    if packed == 0 {
        eprintln!("no packed weights on this CPU (no AVX-512): batch invariance not promised");
        return;
    }
    let mut alone: Vec<_> = (0..shapes.len()).map(|i| engine(&[i])).collect();
    // Prefill, then two decode steps.
    let mut cached = vec![0usize; shapes.len()];
    for round in 0..3 {
        let batched = feed(&mut all, &all_idx, &tokens, &cached);
        for (i, (step, idx, _)) in alone.iter_mut().enumerate() {
            let one = feed(step, idx, &tokens, &cached);
            let same = one[0]
                .iter()
                .zip(&batched[i])
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "round {round}: request {i}'s logits differ alone and batched"
            );
        }
        if round == 0 {
            // The independent check, on the prompts.
            for (i, row) in batched.iter().enumerate() {
                let pre = shapes[i].1.map(|a| adapters[a as usize].clone());
                let mut cache = unpacked.new_cache(&be, 64).unwrap();
                let want = unpacked
                    .decode(&be, &tokens[i], pre.as_ref(), &mut cache)
                    .unwrap();
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (g, w) in row.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * scale, "request {i}: {g} vs {w}");
                }
            }
        }
        for (i, t) in tokens.iter_mut().enumerate() {
            cached[i] = t.len();
            let next = generate::argmax(&batched[i]);
            t.push(next);
        }
    }
    assert_eq!(unpacked.packed.len(), 0);
}
