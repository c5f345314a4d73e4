//! `bench decode`: tokens per second of batched generation over many adapters, against the
//! same requests one at a time, one adapter, no prefix, and the naive method (each sequence's
//! cache holding its own copy of its prefix). All in one process, on one random model, so
//! the ratios compare like with like.

use super::model::ModelStep;
use super::scheduler::{Decoding, Request, Scheduler, SchedulerConfig};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::gpt2::random::{random_model, small_config};
use crate::lm::paged::PrefixMode;
use crate::lm::PrefixLm;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct DecodeBench {
    /// `tiny` (3 layers, 4 heads of 16), `gpt2-small` (12 layers, 12 heads of 64, vocab
    /// 50,257) or `qwen2-0.5b` (Qwen2-0.5B's shape: 24 layers, 14 query heads over 2 KV heads
    /// of 64, vocab 151,936).
    pub shape: String,
    /// Concurrent requests.
    pub requests: usize,
    /// Adapters the requests are spread over (request `i` uses adapter `i mod K`).
    pub adapters: usize,
    /// Prompt tokens per request.
    pub prompt_len: usize,
    /// New tokens per request (no stop id: every request generates all of them).
    pub new_tokens: usize,
    /// Virtual tokens per adapter.
    pub prefix_len: usize,
    /// Tokens per cache page.
    pub page_size: usize,
    /// Timed runs per configuration (the median is reported).
    pub reps: usize,
}

impl DecodeBench {
    /// The configuration at `shape`: 16 requests over 8 adapters, 16-token prompts,
    /// 32 new tokens, P = 10, pages of 16.
    pub fn named(shape: &str) -> Result<DecodeBench> {
        match shape {
            "tiny" | "gpt2-small" | "qwen2-0.5b" => Ok(DecodeBench {
                shape: shape.to_string(),
                requests: 16,
                adapters: 8,
                prompt_len: 16,
                new_tokens: 32,
                prefix_len: 10,
                page_size: 16,
                reps: 3,
            }),
            other => Err(Error::index(
                "--shape",
                format!("{other}: expected tiny, gpt2-small or qwen2-0.5b"),
            )),
        }
    }
}

/// One measured configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeRow {
    /// What ran.
    pub method: String,
    /// Requests.
    pub requests: usize,
    /// Adapters in use.
    pub adapters: usize,
    /// New tokens generated in all.
    pub tokens: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_s: f64,
    /// Bytes of the model's packed weight copies ([`PrefixLm::prepare_inference`]; 0: the
    /// weights were multiplied in place).
    pub packed_weight_bytes: usize,
    /// What packing the weights did, in words ([`crate::lm::PackReport`]).
    pub packing: String,
}

/// Runs every configuration `reps` times (after one warm-up) and returns the median rows:
/// `batched`, `batched-1-adapter`, `batched-no-prefix`, `one-at-a-time`, `naive-copied-prefix`.
pub fn bench_decode(b: &DecodeBench, be: &dyn Backend) -> Result<Vec<DecodeRow>> {
    if b.requests == 0 || b.adapters == 0 || b.prompt_len == 0 || b.new_tokens == 0 {
        return Err(Error::index(
            "bench decode",
            "requests, adapters, prompt length and new tokens must be at least 1",
        ));
    }
    let model = bench_model(&b.shape, be)?;
    let model = model.as_ref();
    let geom = model.geometry();
    let mut rng = Rng::new(17);
    let width = geom.prefix_width();
    let adapters: Vec<Tensor> = (0..b.adapters)
        .map(|_| {
            let v: Vec<f32> = (0..b.prefix_len * width)
                .map(|_| rng.normal() as f32 * 0.5)
                .collect();
            Tensor::from_f32(&[b.prefix_len, width], &v, DType::F32)
        })
        .collect::<Result<_>>()?;
    let v = geom.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..b.requests)
        .map(|_| (0..b.prompt_len).map(|_| rng.below(v) as u32).collect())
        .collect();
    let seq_tokens = b.prefix_len + b.prompt_len + b.new_tokens;
    let pages = b.requests * seq_tokens.div_ceil(b.page_size) + 1;
    let sched = SchedulerConfig {
        num_pages: pages,
        page_size: b.page_size,
        max_batch: b.requests,
    };
    let run_once = |label: &str,
                    reqs: Vec<Request>,
                    one_at_a_time: bool,
                    mode: PrefixMode,
                    k: usize|
     -> Result<DecodeRow> {
        let mut step = ModelStep::new(model, be, pages, b.page_size, b.adapters, b.prefix_len)?
            .with_prefix_mode(mode);
        let (packed_weight_bytes, packing) = (step.packing().bytes, step.packing().to_string());
        for (i, a) in adapters.iter().enumerate() {
            step.add_adapter(&format!("a{i}"), a)?;
        }
        be.synchronize()?;
        let t0 = Instant::now();
        let mut tokens = 0;
        let batches: Vec<Vec<Request>> = if one_at_a_time {
            reqs.into_iter().map(|r| vec![r]).collect()
        } else {
            vec![reqs]
        };
        for batch in batches {
            let mut s = Scheduler::new(sched)?;
            for r in batch {
                s.submit(&step, r, None)?;
            }
            tokens += s
                .run_to_completion(&mut step)?
                .iter()
                .map(|c| c.ids.len())
                .sum::<usize>();
        }
        be.synchronize()?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(DecodeRow {
            method: label.to_string(),
            requests: b.requests,
            adapters: k,
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds,
            packed_weight_bytes,
            packing,
        })
    };
    let reqs = |k: Option<usize>, placeholders: bool| -> Vec<Request> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let adapter = k.map(|k| (i % k) as u32);
                let mut prompt = p.clone();
                if placeholders && adapter.is_some() {
                    prompt.splice(0..0, std::iter::repeat_n(0, b.prefix_len));
                }
                Request {
                    prompt,
                    adapter,
                    max_new_tokens: b.new_tokens,
                    stop_ids: vec![],
                    decoding: Decoding::Greedy,
                }
            })
            .collect()
    };
    // The median of `reps` timed runs.
    let run = |label: &str,
               reqs: Vec<Request>,
               one_at_a_time: bool,
               mode: PrefixMode,
               k: usize|
     -> Result<DecodeRow> {
        let mut rows = (0..b.reps.max(1))
            .map(|_| run_once(label, reqs.clone(), one_at_a_time, mode, k))
            .collect::<Result<Vec<_>>>()?;
        rows.sort_by(|x, y| x.seconds.total_cmp(&y.seconds));
        Ok(rows.swap_remove(rows.len() / 2))
    };
    let k = b.adapters;
    // Warm-up: caches, page faults, allocator.
    run_once("warm-up", reqs(Some(k), false), false, PrefixMode::Table, k)?;
    Ok(vec![
        run("batched", reqs(Some(k), false), false, PrefixMode::Table, k)?,
        run(
            "batched-1-adapter",
            reqs(Some(1), false),
            false,
            PrefixMode::Table,
            1,
        )?,
        run(
            "batched-no-prefix",
            reqs(None, false),
            false,
            PrefixMode::Table,
            0,
        )?,
        run(
            "one-at-a-time",
            reqs(Some(k), false),
            true,
            PrefixMode::Table,
            k,
        )?,
        run(
            "naive-copied-prefix",
            reqs(Some(k), true),
            false,
            PrefixMode::CopiedIntoCache,
            k,
        )?,
    ])
}

/// The model the benchmark builds, for callers that want to reuse it.
pub fn bench_model(shape: &str, be: &dyn Backend) -> Result<Box<dyn PrefixLm>> {
    let cfg = match shape {
        "tiny" => small_config(3, 4, 16, 503, 256),
        "gpt2-small" => small_config(12, 12, 64, 50257, 1024),
        "qwen2-0.5b" => {
            let c = crate::bench::qwen2_05b_config();
            return Ok(Box::new(crate::llama::random::random_model(
                &c, 0x5eed, 0.02, be,
            )?));
        }
        other => return Err(Error::Unsupported(format!("--shape {other}"))),
    };
    Ok(Box::new(random_model(&cfg, 0x5eed, 0.02, be)?))
}
