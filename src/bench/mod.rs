//! The benchmarks. `prefix-attn bench step` times full prefix-tuning training steps (encoder
//! forward, model forward and backward, encoder backward, AdamW) on a random-weight model,
//! after warm-up; `tools/bench_step_torch.py` is the PyTorch + PEFT counterpart with the same
//! shapes, and `scripts/bench-step-compare.sh` runs both. `prefix-attn bench attn` times fused
//! attention against [`naive`] (the naive-concat baseline, on any backend) beside the
//! [`ceilings`] measured on the spot. `prefix-attn bench serve` ([`serve`]) drives real
//! server processes over HTTP at several concurrency levels and adapter counts.

pub mod ceilings;
pub mod naive;
pub mod serve;

use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::gpt2::random::{random_model, small_config};
use crate::lm::{Batch, PrefixLm};
use crate::prefix::encoder::{EncoderDims, PrefixEncoder};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::trainer::Stepper;
pub use ceilings::{cpu_ceilings, Ceilings};
use naive::NaiveConcat;
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
    /// tokens), `gpt2-small` (12 layers, 12 heads, 768 wide, vocab 50257, P=10, MLP 512,
    /// 4 × 128 tokens) and `qwen2-0.5b` (Qwen2-0.5B's shape: 24 layers, 896 wide, 14 query
    /// heads over 2 KV heads of 64, MLP 4864, vocab 151,936, tied head, q/k/v biases; P=10,
    /// MLP 512, 4 × 128 tokens).
    pub fn named(shape: &str) -> Result<StepBench> {
        let (batch, seq, prefix_len, mid_dim, steps) = match shape {
            "tiny" => (8, 64, 7, 48, 20),
            "gpt2-small" => (4, 128, 10, 512, 5),
            "qwen2-0.5b" => (4, 128, 10, 512, 3),
            _ => {
                return Err(Error::Unsupported(format!(
                    "--shape {shape}: expected tiny, gpt2-small or qwen2-0.5b"
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

/// Qwen2-0.5B's configuration (24 layers, 896 wide, 14 query heads over 2 KV heads of 64,
/// MLP 4864, vocab 151,936, tied head, q/k/v biases, RoPE base 10⁶), for random-weight
/// benchmark models.
pub fn qwen2_05b_config() -> crate::llama::LlamaConfig {
    crate::llama::LlamaConfig {
        intermediate_size: 4864,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        eos_token_id: Some(151_643),
        ..crate::llama::random::small_config("qwen2", 24, 14, 2, 64, 151_936, 32_768)
    }
}

/// Runs the benchmark.
pub fn bench_step(s: &StepBench, be: &dyn Backend) -> Result<StepReport> {
    // The kernel devices need head dim 64 or 128: `tiny` is for the cpu.
    let (_, rss_before) = rss_mb();
    let model: Box<dyn PrefixLm> = match s.shape.as_str() {
        "tiny" => Box::new(random_model(
            &small_config(3, 4, 16, 503, 128),
            0,
            0.02,
            be,
        )?),
        "gpt2-small" => {
            let mut c = small_config(12, 12, 64, 50257, 1024);
            c.eos_token_id = Some(50256);
            Box::new(random_model(&c, 0, 0.02, be)?)
        }
        "qwen2-0.5b" => Box::new(crate::llama::random::random_model(
            &qwen2_05b_config(),
            0,
            0.02,
            be,
        )?),
        other => return Err(Error::Unsupported(format!("--shape {other}"))),
    };
    let g = model.geometry();
    if s.prefix_len + s.seq > g.max_positions || s.batch == 0 || s.seq < 2 || s.steps == 0 {
        return Err(Error::index(
            "bench step",
            format!(
                "batch {} × seq {} with prefix {} and {} steps does not fit n_positions {}",
                s.batch, s.seq, s.prefix_len, s.steps, g.max_positions
            ),
        ));
    }
    let dims = EncoderDims::for_model(&g, s.prefix_len, s.mid_dim, true);
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
    let mut stepper = Stepper::new(model.as_ref(), enc, opt, be)?;
    let mut rng = Rng::new(1);
    let seqs: Vec<Vec<u32>> = (0..s.batch)
        .map(|_| {
            (0..s.seq)
                .map(|_| rng.below(g.vocab_size as u64) as u32)
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
/// with FLOP and byte counts as docs/ARCHITECTURE.md §6 defines them.
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

impl AttnBenchRow {
    /// The row of shape `s` (f16 inputs) from its median times, ms: fused forward, fused
    /// backward, naive forward, naive backward; the counts follow from the shape.
    fn new(s: crate::attn::shapes::NamedShape, [fwd, bwd, naive_fwd, naive_bwd]: [f64; 4]) -> Self {
        let (fwd_bytes, bwd_bytes) = attn_bytes(s);
        let fwd_flops = s.fwd_flops();
        AttnBenchRow {
            shape: s,
            fwd_ms: fwd,
            bwd_ms: bwd,
            naive_fwd_ms: naive_fwd,
            naive_bwd_ms: naive_bwd,
            fwd_flops,
            bwd_flops: 2.5 * fwd_flops,
            fwd_bytes,
            bwd_bytes,
            naive_extra_bytes: naive::extra_bytes(&s.problem(DType::F16), true) as f64,
        }
    }
}

/// Median wall time of `reps` calls of `f` after a warm-up one, ms.
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

/// The random-problem setting of a named shape, in `dtype`.
pub fn shape_spec(
    s: crate::attn::shapes::NamedShape,
    dtype: DType,
) -> crate::attn::testing::ProblemSpec {
    let mut p = crate::attn::testing::ProblemSpec::new(
        s.batch,
        s.tq,
        s.tk,
        s.heads_q,
        s.heads_kv,
        s.head_dim,
        s.prefix_len,
        s.causal,
    );
    p.dtype = dtype;
    p
}

/// Times fused and naive attention, forward and backward, on a named shape (f16 inputs) on
/// the CPU.
pub fn bench_attn_cpu(shape: crate::attn::shapes::NamedShape, reps: usize) -> Result<AttnBenchRow> {
    use crate::attn::cpu;
    use crate::attn::testing::{FwdBuffers, GradBuffers, RandomProblem};
    use crate::device::cpu::CpuBackend;
    let s = shape;
    let pb = RandomProblem::new(shape_spec(s, DType::F16), &mut Rng::new(0))?;
    let args = pb.args()?;
    let pr = args.check()?;
    let mut f = FwdBuffers::poisoned(&pb.spec)?;
    let mut nc = NaiveConcat::new(&CpuBackend, &pr)?;
    let fwd_ms = median_ms(|| cpu::forward(&args, f.out()), reps)?;
    let naive_fwd_ms = median_ms(|| nc.forward(&CpuBackend, &args, f.out()), reps)?;
    cpu::forward(&args, f.out())?;
    let mut g = GradBuffers::poisoned(&pb.spec)?;
    let bargs = pb.bwd_args(&f.o, &f.lse, false)?;
    let bwd_ms = median_ms(|| cpu::backward(&bargs, g.grads(true, false)), reps)?;
    let naive_bwd_ms = median_ms(
        || nc.backward(&CpuBackend, &bargs, g.grads(true, false)),
        reps,
    )?;
    Ok(AttnBenchRow::new(
        s,
        [fwd_ms, bwd_ms, naive_fwd_ms, naive_bwd_ms],
    ))
}

/// Inputs of one attention problem on a device.
struct DeviceAttnSet {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kp: Tensor,
    vp: Tensor,
    d_o: Tensor,
}

/// A device attention benchmark row, with the agreement of the two methods on the same
/// inputs (a benchmark of a wrong baseline would be meaningless).
#[derive(Clone, Debug)]
pub struct DeviceAttnReport {
    /// Timings and counts.
    pub row: AttnBenchRow,
    /// Max |o_fused - o_naive|.
    pub o_diff: f64,
    /// Max |dK_pre fused - naive| relative to max |dK_pre|.
    pub dk_pre_rel_diff: f64,
    /// Input sets rotated through (so that L2 does not hold the inputs between reps).
    pub sets: usize,
}

/// What [`DeviceAttnBench::time`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnMethod {
    /// Our forward kernel with the prefix table.
    FusedFwd,
    /// Concatenation kernels, then our forward kernel without a prefix.
    NaiveFwd,
    /// Our backward kernels (dQ, dK, dV, and dK_pre/dV_pre summed over the batch).
    FusedBwd,
    /// Our backward kernels on the concatenation, then the split of its gradient: the
    /// sequence part copied out, the prefix part reduced over the batch.
    NaiveBwd,
}

/// Fused attention and the naive concat on a kernel device (`cuda`; `emu` runs it too, for
/// tests), f16. The naive method is [`NaiveConcat`] on the same device, built from its
/// kernels: the prefix broadcast and the sequence K/V copied into `[B, P + Tk, Hkv, D]`
/// buffers (strided copy kernel), our attention kernel without a prefix on them
/// (bottom-right causal alignment makes that the same attention). Inputs rotate over enough sets to exceed the rotation size
/// (≥ 2× the GPU's L2), and every time is the device time of one call (CUDA events on a GPU).
pub struct DeviceAttnBench<'b> {
    be: &'b dyn Backend,
    /// The shape.
    pub shape: crate::attn::shapes::NamedShape,
    data: Vec<DeviceAttnSet>,
    o: Tensor,
    lse: Tensor,
    o_naive: Tensor,
    lse_naive: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dk_pre: Tensor,
    dv_pre: Tensor,
    dk_pre_naive: Tensor,
    dv_pre_naive: Tensor,
    naive: NaiveConcat,
    lens_q: Vec<i32>,
    lens_k: Vec<i32>,
}

/// The fused call's arguments on input set `i` (a macro rather than a method, so that they
/// borrow only the inputs and the lengths, not the output buffers beside them).
macro_rules! fused_args {
    ($bench:expr, $i:expr) => {{
        let x = &$bench.data[$i % $bench.data.len()];
        AttnFwdArgs::new(x.q.view(), x.k.view(), x.v.view())
            .prefix(x.kp.view(), x.vp.view())
            .seqlens(&$bench.lens_q, &$bench.lens_k)
            .causal($bench.shape.causal)
            .scale(1.0 / ($bench.shape.head_dim as f32).sqrt())
    }};
}

impl<'b> DeviceAttnBench<'b> {
    /// Random f16 inputs (enough sets to exceed `rotate_bytes`, at most 16) and every buffer,
    /// on `be`.
    pub fn new(
        be: &'b dyn Backend,
        s: crate::attn::shapes::NamedShape,
        rotate_bytes: usize,
    ) -> Result<DeviceAttnBench<'b>> {
        let dt = DType::F16;
        let pr = s.problem(dt);
        let (q_dims, kv_dims, pre_dims) = (pr.q_dims(), pr.k_dims(), pr.prefix_dims());
        let numel = |d: &[usize]| d.iter().product::<usize>();
        // q and dO, k and v, the two prefix tensors: 2 bytes each.
        let set_bytes = 2 * (2 * numel(&q_dims) + 2 * numel(&kv_dims) + 2 * numel(&pre_dims));
        let sets = rotate_bytes.div_ceil(set_bytes.max(1)).clamp(1, 16);
        let mut rng = Rng::new(7);
        let mut up = |dims: &[usize]| -> Result<Tensor> {
            be.upload(&Tensor::from_f32(
                dims,
                &rng.normal_vec(numel(dims), 1.0),
                dt,
            )?)
        };
        let mut data = vec![];
        for _ in 0..sets {
            data.push(DeviceAttnSet {
                q: up(&q_dims)?,
                k: up(&kv_dims)?,
                v: up(&kv_dims)?,
                kp: up(&pre_dims)?,
                vp: up(&pre_dims)?,
                d_o: up(&q_dims)?,
            });
        }
        Ok(DeviceAttnBench {
            be,
            shape: s,
            data,
            o: be.zeros(&q_dims, dt)?,
            lse: be.zeros(&pr.lse_dims(), DType::F32)?,
            o_naive: be.zeros(&q_dims, dt)?,
            lse_naive: be.zeros(&pr.lse_dims(), DType::F32)?,
            dq: be.zeros(&q_dims, dt)?,
            dk: be.zeros(&kv_dims, dt)?,
            dv: be.zeros(&kv_dims, dt)?,
            dk_pre: be.zeros(&pre_dims, DType::F32)?,
            dv_pre: be.zeros(&pre_dims, DType::F32)?,
            dk_pre_naive: be.zeros(&pre_dims, DType::F32)?,
            dv_pre_naive: be.zeros(&pre_dims, DType::F32)?,
            naive: NaiveConcat::new(be, &pr)?,
            lens_q: vec![s.tq as i32; s.batch],
            lens_k: vec![s.tk as i32; s.batch],
        })
    }

    /// Input sets rotated through.
    pub fn sets(&self) -> usize {
        self.data.len()
    }

    fn fwd(&mut self, naive: bool, i: usize) -> Result<()> {
        let args = fused_args!(self, i);
        let (o, lse) = match naive {
            true => (&mut self.o_naive, &mut self.lse_naive),
            false => (&mut self.o, &mut self.lse),
        };
        let out = AttnFwdOut {
            o: o.view_mut(),
            lse: Some(lse.view_mut()),
        };
        match naive {
            true => self.naive.forward(self.be, &args, out),
            false => self.be.attn_fwd(&args, out),
        }
    }

    fn bwd(&mut self, naive: bool, i: usize) -> Result<()> {
        let fwd = fused_args!(self, i);
        let (o, lse, dk_pre, dv_pre) = match naive {
            true => (
                &self.o_naive,
                &self.lse_naive,
                &mut self.dk_pre_naive,
                &mut self.dv_pre_naive,
            ),
            false => (&self.o, &self.lse, &mut self.dk_pre, &mut self.dv_pre),
        };
        let args = AttnBwdArgs {
            fwd,
            o: o.view(),
            lse: lse.view(),
            d_o: self.data[i % self.data.len()].d_o.view(),
            prefix_only: false,
        };
        let grads = AttnGrads {
            dq: Some(self.dq.view_mut()),
            dk: Some(self.dk.view_mut()),
            dv: Some(self.dv.view_mut()),
            dk_pre: Some(dk_pre.view_mut()),
            dv_pre: Some(dv_pre.view_mut()),
        };
        match naive {
            true => self.naive.backward(self.be, &args, grads),
            false => self.be.attn_bwd(&args, grads),
        }
    }

    /// Device milliseconds per call of `m`, from `calls` calls issued back to back between two
    /// events, so that the host work of a call (its plan, its launches) overlaps the device work
    /// of the one before instead of being timed. A forward rotates the input sets from set
    /// `i · calls`; a backward runs its method's forward on set `i` first, untimed, then its
    /// `calls` backward calls on that set.
    pub fn time(&mut self, m: AttnMethod, i: usize, calls: usize) -> Result<f64> {
        let be = self.be;
        let calls = calls.max(1);
        let first = i * calls;
        let total = match m {
            AttnMethod::FusedFwd | AttnMethod::NaiveFwd => {
                let naive = m == AttnMethod::NaiveFwd;
                be.time_ms(&mut || (first..first + calls).try_for_each(|j| self.fwd(naive, j)))?
            }
            AttnMethod::FusedBwd | AttnMethod::NaiveBwd => {
                let naive = m == AttnMethod::NaiveBwd;
                self.fwd(naive, i)?;
                be.time_ms(&mut || (0..calls).try_for_each(|_| self.bwd(naive, i)))?
            }
        };
        Ok(total / calls as f64)
    }

    /// Runs both methods, forward and backward, on set 0 and returns max |o_fused - o_naive|
    /// and the max difference of dK_pre relative to its largest entry.
    pub fn agreement(&mut self) -> Result<(f64, f64)> {
        for m in [AttnMethod::FusedBwd, AttnMethod::NaiveBwd] {
            self.time(m, 0, 1)?;
        }
        let be = self.be;
        let host = |t: &Tensor| -> Result<Vec<f32>> { be.download(t)?.try_to_f32_vec() };
        let max_diff = |a: &[f32], c: &[f32]| {
            a.iter()
                .zip(c)
                .fold(0f64, |m, (x, y)| m.max(((x - y) as f64).abs()))
        };
        let o_diff = max_diff(&host(&self.o)?, &host(&self.o_naive)?);
        let (f, n) = (host(&self.dk_pre)?, host(&self.dk_pre_naive)?);
        let top = f
            .iter()
            .fold(0f64, |m, x| m.max((*x as f64).abs()))
            .max(1e-30);
        Ok((o_diff, max_diff(&f, &n) / top))
    }
}

/// Device time a timed sample should span at least: shorter samples are made of several calls
/// back to back, so that launch gaps and host work are amortised rather than measured.
const DEVICE_SAMPLE_MS: f64 = 1.0;
/// At most this many calls make one sample.
const DEVICE_MAX_CALLS: usize = 64;

/// Times fused attention against the naive concat on a kernel device ([`DeviceAttnBench`]):
/// after a warm-up call (which also uploads the metadata and sizes the scratch, reused by the
/// timed calls), medians over `reps` samples of back-to-back calls, each sample spanning about
/// [`DEVICE_SAMPLE_MS`]; and the two methods' agreement.
pub fn bench_attn_device(
    be: &dyn Backend,
    s: crate::attn::shapes::NamedShape,
    reps: usize,
    rotate_bytes: usize,
) -> Result<DeviceAttnReport> {
    let mut bench = DeviceAttnBench::new(be, s, rotate_bytes)?;
    let mut med = |m: AttnMethod| -> Result<f64> {
        let one = bench.time(m, 0, 1)?; // warm-up
        let calls = ((DEVICE_SAMPLE_MS / one.max(1e-6)).ceil() as usize).clamp(1, DEVICE_MAX_CALLS);
        let mut t = (1..=reps.max(1))
            .map(|i| bench.time(m, i, calls))
            .collect::<Result<Vec<f64>>>()?;
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let (fwd_ms, naive_fwd_ms) = (med(AttnMethod::FusedFwd)?, med(AttnMethod::NaiveFwd)?);
    let (bwd_ms, naive_bwd_ms) = (med(AttnMethod::FusedBwd)?, med(AttnMethod::NaiveBwd)?);
    let (o_diff, dk_pre_rel_diff) = bench.agreement()?;
    Ok(DeviceAttnReport {
        row: AttnBenchRow::new(s, [fwd_ms, bwd_ms, naive_fwd_ms, naive_bwd_ms]),
        o_diff,
        dk_pre_rel_diff,
        sets: bench.sets(),
    })
}

/// Forward and backward bytes of a shape with f16 inputs (each input read once, each output
/// written once; the backward reads q, k, v, prefix, o, dO, lse and writes dq, dk, dv in
/// 16 bits and the prefix gradients in f32).
fn attn_bytes(s: crate::attn::shapes::NamedShape) -> (f64, f64) {
    let e = 2.0;
    let (q, kv, pre) = (
        (s.batch * s.tq * s.heads_q * s.head_dim) as f64,
        (s.batch * s.tk * s.heads_kv * s.head_dim) as f64,
        (s.prefix_len * s.heads_kv * s.head_dim) as f64,
    );
    let lse = (s.batch * s.heads_q * s.tq) as f64 * 4.0;
    let fwd = (q + 2.0 * kv + 2.0 * pre) * e + q * e + lse;
    let bwd = (q + 2.0 * kv + 2.0 * pre + 2.0 * q) * e + lse + (q + 2.0 * kv) * e + 2.0 * pre * 4.0;
    (fwd, bwd)
}
