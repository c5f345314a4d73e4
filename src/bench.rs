//! `prefix-attn bench step`: times full prefix-tuning training steps (encoder forward, model
//! forward and backward, encoder backward, AdamW) on a random-weight model, after warm-up.
//! `tools/bench_step_torch.py` is the PyTorch + PEFT counterpart with the same shapes, and
//! `scripts/bench-step-compare.sh` runs both.

use crate::device::Backend;
use crate::error::{Error, Result};
use crate::gpt2::random::{random_model, small_config};
use crate::gpt2::Batch;
use crate::prefix::encoder::{EncoderDims, PrefixEncoder};
use crate::rng::Rng;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::trainer::Stepper;
use std::time::Instant;

/// A step-benchmark setting.
#[derive(Clone, Debug, PartialEq)]
pub struct StepBench {
    /// `tiny` or `gpt2-small`.
    pub shape: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (all labelled).
    pub seq: usize,
    /// Prefix length.
    pub prefix_len: usize,
    /// Encoder MLP width.
    pub mid_dim: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
}

impl StepBench {
    /// The named shapes: `tiny` (3 layers, 4 heads, 64 wide, vocab 503, P=7, MLP 48, 8 × 64
    /// tokens) and `gpt2-small` (12 layers, 12 heads, 768 wide, vocab 50257, P=10, MLP 512,
    /// 4 × 128 tokens).
    pub fn named(shape: &str) -> Result<StepBench> {
        let (batch, seq, prefix_len, mid_dim, steps) = match shape {
            "tiny" => (8, 64, 7, 48, 20),
            "gpt2-small" => (4, 128, 10, 512, 5),
            _ => {
                return Err(Error::Unsupported(format!(
                    "--shape {shape}: expected tiny or gpt2-small"
                )))
            }
        };
        Ok(StepBench {
            shape: shape.into(),
            batch,
            seq,
            prefix_len,
            mid_dim,
            warmup: 3,
            steps,
        })
    }
}

/// Results of a step benchmark.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The setting.
    pub setting: StepBench,
    /// Per-step times, milliseconds.
    pub times_ms: Vec<f64>,
    /// Median step time.
    pub median_ms: f64,
    /// Fastest step.
    pub min_ms: f64,
    /// Slowest step.
    pub max_ms: f64,
    /// Trained tokens per second at the median.
    pub tokens_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MB.
    pub peak_rss_mb: f64,
    /// Resident memory before the model was built, MB.
    pub rss_before_model_mb: f64,
    /// Threads the CPU backend used.
    pub threads: usize,
}

/// Peak and current resident memory in MB, from /proc/self/status (0 where unavailable).
pub fn rss_mb() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Runs the benchmark.
pub fn bench_step(s: &StepBench, be: &dyn Backend) -> Result<StepReport> {
    let cfg = match s.shape.as_str() {
        "tiny" => small_config(3, 4, 16, 503, 128),
        "gpt2-small" => {
            let mut c = small_config(12, 12, 64, 50257, 1024);
            c.eos_token_id = Some(50256);
            c
        }
        other => return Err(Error::Unsupported(format!("--shape {other}"))),
    };
    if s.prefix_len + s.seq > cfg.n_positions || s.batch == 0 || s.seq < 2 || s.steps == 0 {
        return Err(Error::index(
            "bench step",
            format!(
                "batch {} × seq {} with prefix {} and {} steps does not fit n_positions {}",
                s.batch, s.seq, s.prefix_len, s.steps, cfg.n_positions
            ),
        ));
    }
    let (_, rss_before) = rss_mb();
    let model = random_model(&cfg, 0, 0.02, be)?;
    let dims = EncoderDims {
        prefix_len: s.prefix_len,
        token_dim: cfg.n_embd,
        hidden: s.mid_dim,
        num_layers: cfg.n_layer,
    };
    let enc = PrefixEncoder::init(dims, 0, be)?;
    let opt = Optimizer::new(
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &dims.shapes(),
        be,
    )?;
    let mut stepper = Stepper::new(&model, enc, opt, be)?;
    let mut rng = Rng::new(1);
    let seqs: Vec<Vec<u32>> = (0..s.batch)
        .map(|_| {
            (0..s.seq)
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    let labels: Vec<Vec<i32>> = seqs
        .iter()
        .map(|v| v.iter().map(|&x| x as i32).collect())
        .collect();
    let pairs: Vec<(&[u32], &[i32])> = seqs
        .iter()
        .zip(&labels)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = Batch::new(&pairs)?;
    let mut times = vec![];
    for i in 0..s.warmup + s.steps {
        let t0 = Instant::now();
        stepper.step(be, &batch, 5e-5)?;
        be.synchronize()?;
        if i >= s.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    let (peak, _) = rss_mb();
    Ok(StepReport {
        setting: s.clone(),
        median_ms: median,
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        tokens_per_s: (s.batch * s.seq) as f64 / (median / 1e3),
        peak_rss_mb: peak,
        rss_before_model_mb: rss_before,
        threads: rayon::current_num_threads(),
        times_ms: times,
    })
}
