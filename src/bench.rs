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
    /// Peak device memory held during the timed steps (model, buffers, scratch), MB; `None`
    /// on host devices.
    pub peak_device_mb: Option<f64>,
    /// Device memory held after the model was built, MB.
    pub model_device_mb: Option<f64>,
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
    // The kernel devices need head dim 64 or 128: `tiny` is for the cpu.
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
    let mb = |b: usize| b as f64 / (1u64 << 20) as f64;
    let model_device_mb = be.memory().map(|(now, _)| mb(now));
    be.reset_peak_memory();
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
        peak_device_mb: be.memory().map(|(_, peak)| mb(peak)),
        model_device_mb,
    })
}

/// One row of `prefix-attn bench attn`: fused and naive-concat timings of one named shape,
/// with FLOP and byte counts as DESIGN.md §6 defines them.
#[derive(Clone, Debug)]
pub struct AttnBenchRow {
    /// The shape as run (CPU-scaled on the CPU).
    pub shape: crate::attn::shapes::NamedShape,
    /// Median forward time, ms.
    pub fwd_ms: f64,
    /// Median backward time, ms.
    pub bwd_ms: f64,
    /// Median naive-concat forward time, ms.
    pub naive_fwd_ms: f64,
    /// Median naive-concat backward time, ms.
    pub naive_bwd_ms: f64,
    /// Forward FLOPs (`4·D` per visible pair).
    pub fwd_flops: f64,
    /// Backward FLOPs (2.5 × forward).
    pub bwd_flops: f64,
    /// Forward bytes (each input read once, each output written once).
    pub fwd_bytes: f64,
    /// Backward bytes.
    pub bwd_bytes: f64,
    /// Extra bytes the naive method allocates in the backward (expanded K/V and gradients).
    pub naive_extra_bytes: f64,
}

/// Ceilings measured on the spot: a large f32 matmul (FLOP/s) and a large copy (bytes/s).
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// FLOP/s of a 1024³ f32 matmul through the CPU backend.
    pub flops: f64,
    /// Bytes/s of a 256 MiB copy (read + write counted).
    pub bytes: f64,
}

fn median_ms(mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Measures the CPU ceilings.
pub fn cpu_ceilings() -> Result<Ceilings> {
    use crate::device::{cpu::CpuBackend, MatmulOpts};
    use crate::tensor::{DType, Tensor};
    let n = 1024;
    let be = CpuBackend;
    let a = Tensor::from_f32(&[n, n], &Rng::new(1).normal_vec(n * n, 1.0), DType::F32)?;
    let mut c = Tensor::zeros(&[n, n], DType::F32)?;
    let ms = median_ms(
        || {
            be.matmul(
                &a.view(),
                &a.view(),
                None,
                &mut c.view_mut(),
                MatmulOpts::default(),
            )
        },
        5,
    )?;
    let flops = 2.0 * (n * n * n) as f64 / (ms / 1e3);
    let len = 64 << 20; // f32 elements: 256 MiB
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    let ms = median_ms(
        || {
            dst.copy_from_slice(&src);
            Ok(())
        },
        5,
    )?;
    std::hint::black_box(&dst);
    Ok(Ceilings {
        flops,
        bytes: 2.0 * (len * 4) as f64 / (ms / 1e3),
    })
}

/// Times fused and naive attention, forward and backward, on a named shape (f16 inputs) on
/// the CPU.
pub fn bench_attn_cpu(shape: crate::attn::shapes::NamedShape, reps: usize) -> Result<AttnBenchRow> {
    use crate::attn::testing::{FwdBuffers, GradBuffers, ProblemSpec, RandomProblem};
    use crate::attn::{cpu, naive};
    use crate::tensor::DType;
    let s = shape;
    let mut spec = ProblemSpec::new(
        s.batch,
        s.tq,
        s.tk,
        s.heads_q,
        s.heads_kv,
        s.head_dim,
        s.prefix_len,
        s.causal,
    );
    spec.dtype = DType::F16;
    let pb = RandomProblem::new(spec, &mut Rng::new(0))?;
    let args = pb.args()?;
    let pr = args.check()?;
    let mut f = FwdBuffers::poisoned(&pb.spec)?;
    let fwd_ms = median_ms(|| cpu::forward(&args, f.out()), reps)?;
    let naive_fwd_ms = median_ms(|| naive::forward(&args, f.out()), reps)?;
    cpu::forward(&args, f.out())?;
    let mut g = GradBuffers::poisoned(&pb.spec)?;
    let bargs = pb.bwd_args(&f.o, &f.lse, false)?;
    let bwd_ms = median_ms(|| cpu::backward(&bargs, g.grads(true, false)), reps)?;
    let naive_bwd_ms = median_ms(|| naive::backward(&bargs, g.grads(true, false)), reps)?;
    let e = 2.0; // bytes per f16 element
    let (q, kv, pre) = (
        (s.batch * s.tq * s.heads_q * s.head_dim) as f64,
        (s.batch * s.tk * s.heads_kv * s.head_dim) as f64,
        (s.prefix_len * s.heads_kv * s.head_dim) as f64,
    );
    let lse = (s.batch * s.heads_q * s.tq) as f64 * 4.0;
    let fwd_bytes = (q + 2.0 * kv + 2.0 * pre) * e + q * e + lse;
    // Reads q, k, v, prefix, o, dO, lse; writes dq, dk, dv (16-bit) and the prefix grads (f32).
    let bwd_bytes =
        (q + 2.0 * kv + 2.0 * pre + 2.0 * q) * e + lse + (q + 2.0 * kv) * e + 2.0 * pre * 4.0;
    let fwd_flops = s.fwd_flops();
    Ok(AttnBenchRow {
        shape: s,
        fwd_ms,
        bwd_ms,
        naive_fwd_ms,
        naive_bwd_ms,
        fwd_flops,
        bwd_flops: 2.5 * fwd_flops,
        fwd_bytes,
        bwd_bytes,
        naive_extra_bytes: crate::attn::naive::extra_bytes(&pr, true) as f64,
    })
}
