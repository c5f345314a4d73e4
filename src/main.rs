//! The `prefix-attn` command line.

use clap::{Parser, Subcommand};
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::shapes::{self, NamedShape};
use prefix_attn::attn::testing::{
    random_spec, FwdBuffers, GradBuffers, ProblemSpec, RandomProblem,
};
use prefix_attn::attn::{cpu, naive};
use prefix_attn::bench::{bench_attn_cpu, bench_attn_device, bench_step, cpu_ceilings, StepBench};
use prefix_attn::demo::{run_demo, DemoOptions};
use prefix_attn::device::{Backend, Device};
use prefix_attn::gpt2::tokenizer::Tokenizer;
use prefix_attn::gpt2::{generate, Activations, Gpt2, LossSum};
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::DType;
use prefix_attn::tensor::Tensor;
use prefix_attn::train::data::{batch_of, load_jsonl, DataLimits, Example};
use prefix_attn::train::optim::OptimizerKind;
use prefix_attn::train::{train, Length, StepInfo, TrainConfig, TrainReport};
use prefix_attn::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Fused prefix attention (prefix-tuning) kernels and tools.
///
/// What exists so far: evaluation and greedy generation with a GPT-2 (Hugging Face folder)
/// and an optional PEFT prefix-tuning adapter, on the CPU; the CPU prefix attention with
/// its f64 oracle and the naive-concat baseline. The frozen model runs in eval form: no
/// dropout. Training and the CUDA kernels are being built.
#[derive(Parser)]
#[command(name = "prefix-attn", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run prefix attention on random inputs and print its error against the f64 oracle and
    /// the naive concat, as one JSON object.
    CheckAttn {
        /// A named shape (see `shapes`), CPU-scaled; without it, random small shapes.
        #[arg(long)]
        shape: Option<String>,
        /// Number of random shapes when no `--shape` is given.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Element type: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Device: cpu, cuda[:N], emu (the kernels on the CPU emulator; slow) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List the named attention shapes of the benchmarks (DESIGN.md §6) with their FLOPs.
    Shapes,
    /// List every CUDA kernel's launch geometry (threads per block, dynamic shared memory)
    /// as the planners compute it; `scripts/kernel-report.sh` reads `--json`.
    Kernels {
        /// Print one JSON object: {"launches": [{entry, threads, smem_bytes, planner, problem}]}.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a GPT-2 (with an optional prefix adapter) on a JSONL file and print one
    /// JSON object: loss (token-weighted mean over every counted target), tokens, perplexity.
    Eval {
        /// Hugging Face model folder (config.json, model.safetensors, optional tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// PEFT prefix-tuning adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL data: {"input_ids": [...], "labels": [...]} or {"prompt": ..., "completion": ...} per line.
        #[arg(long)]
        data: PathBuf,
        /// Sequences per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Device: cpu, cuda[:N], emu (the kernels on the CPU emulator; slow) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The main job on an embedded default: build a small random GPT-2 and a table-to-text
    /// data set, train a prefix, and show held-out loss and generations (no download).
    Demo {
        /// Output folder (an earlier demo there is replaced).
        #[arg(long, default_value = "prefix-attn-demo")]
        out: PathBuf,
        /// Training steps.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Device: cpu, cuda[:N], emu (the kernels on the CPU emulator; slow) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Train a prefix (MLP-reparameterised, PEFT prefix tuning) on a frozen GPT-2. The model
    /// runs in eval form: no dropout. Writes a PEFT adapter to --out.
    Train(TrainArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Greedy generation with a KV cache that keeps the prefix; stops at EOS.
    Generate {
        /// Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// PEFT prefix-tuning adapter folder.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Prompt text (needs tokenizer.json in the model folder).
        #[arg(
            long,
            conflicts_with = "input_ids",
            required_unless_present = "input_ids"
        )]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        input_ids: Option<Vec<u32>>,
        /// Most new tokens.
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Print {"ids": [...new tokens...], "text": ...} instead of the text.
        #[arg(long)]
        json: bool,
        /// Device: cpu, cuda[:N], emu (the kernels on the CPU emulator; slow) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Arguments of `train`.
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Hugging Face model folder (frozen during training).
    #[arg(long)]
    model: PathBuf,
    /// JSONL training data ({"input_ids", "labels"} or {"prompt", "completion"} per line).
    #[arg(long)]
    data: PathBuf,
    /// Output folder: adapter, prefix_encoder.safetensors, checkpoint, log.jsonl, loss.svg.
    #[arg(long)]
    out: PathBuf,
    /// Initial prefix-encoder weights (safetensors with PEFT PrefixEncoder names).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Prefix length P (PEFT num_virtual_tokens).
    #[arg(long, default_value_t = 10)]
    prefix_len: usize,
    /// Width of the reparameterisation MLP (PEFT encoder_hidden_size).
    #[arg(long, default_value_t = 512)]
    mid_dim: usize,
    /// Optimiser steps (overrides --epochs).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per step.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Learning-rate schedule: constant or linear (decay to 0).
    #[arg(long, default_value = "linear")]
    lr_schedule: String,
    /// Warm-up steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Optimiser: adamw (torch.optim.AdamW, betas 0.9/0.999, eps 1e-8) or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Weight decay (decoupled for AdamW, L2 for SGD). The paper uses 0.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and always at the end); 0: only at the end.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Log file (default OUT/log.jsonl): one JSON line per step.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Device: cpu, cuda[:N], emu (the kernels on the CPU emulator; slow) or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let optimizer = match self.optimizer.as_str() {
            "adamw" => OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay,
            },
            "sgd" => OptimizerKind::Sgd {
                weight_decay: self.weight_decay,
            },
            o => {
                return Err(Error::Unsupported(format!(
                    "--optimizer {o}: expected adamw or sgd"
                )))
            }
        };
        Ok(TrainConfig {
            model: self.model.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            init: self.init.clone(),
            prefix_len: self.prefix_len,
            mid_dim: self.mid_dim,
            length: match (self.steps, self.epochs) {
                (Some(s), _) => Length::Steps(s),
                (None, Some(e)) => Length::Epochs(e),
                (None, None) => Length::Epochs(5),
            },
            batch_size: self.batch_size,
            lr: self.lr,
            schedule: self.lr_schedule.parse()?,
            warmup_steps: self.warmup_steps,
            optimizer,
            seed: self.seed,
            save_every: self.save_every,
            log: self.log.clone(),
            resume: self.resume,
        })
    }
}

/// A per-step reporter: a progress bar on a terminal, plain lines otherwise.
fn progress() -> (
    impl FnMut(&StepInfo) -> bool,
    std::rc::Rc<std::cell::RefCell<Option<indicatif::ProgressBar>>>,
) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = std::rc::Rc::new(std::cell::RefCell::new(None::<indicatif::ProgressBar>));
    let handle = bar.clone();
    let on_step = move |s: &StepInfo| {
        if tty {
            let mut slot = bar.borrow_mut();
            let b = slot.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(s.total as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} step {pos}/{len}  {msg}  eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_position(s.step as u64 - 1);
                b
            });
            b.set_message(format!("loss {:.4}  {:.0} tok/s", s.loss, s.tokens_per_s));
            b.set_position(s.step as u64);
        } else if s.step == s.total || s.step % (s.total / 20).max(1) == 0 || s.step == 1 {
            eprintln!(
                "step {}/{}  loss {:.4}  lr {:.3e}  {:.0} tok/s",
                s.step, s.total, s.loss, s.lr, s.tokens_per_s
            );
        }
        true
    };
    (on_step, handle)
}

/// Runs training with a progress bar on a terminal, plain lines otherwise.
fn run_training(cfg: &TrainConfig, be: &dyn Backend) -> Result<TrainReport> {
    let (mut on_step, bar) = progress();
    let r = train(cfg, be, &mut on_step);
    if let Some(b) = bar.borrow_mut().take() {
        b.finish();
    }
    r
}

/// What to benchmark.
#[derive(Subcommand)]
enum BenchCmd {
    /// Time fused prefix attention against the naive concat on the named shapes (DESIGN.md
    /// §6; CPU-scaled on the CPU) with FLOP/s, GB/s and the fraction of the measured roofline.
    Attn {
        /// A named shape (see `shapes`), or all of them.
        #[arg(long, default_value = "all")]
        shape: String,
        /// Timed repetitions per measurement (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Device: cpu (CPU-scaled shapes), cuda[:N] (full shapes) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Time full training steps (forward, backward, AdamW) on a random-weight model.
    Step {
        /// tiny or gpt2-small.
        #[arg(long, default_value = "tiny")]
        shape: String,
        /// Sequences per step (default: the shape's).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per sequence (default: the shape's).
        #[arg(long)]
        seq: Option<usize>,
        /// Prefix length (default: the shape's).
        #[arg(long)]
        prefix_len: Option<usize>,
        /// Encoder MLP width (default: the shape's).
        #[arg(long)]
        mid_dim: Option<usize>,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps (default: 20 for tiny, 5 for gpt2-small).
        #[arg(long)]
        steps: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Device: cpu.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// A backend for a `--device` value: `cpu`, `cuda`/`cuda:N`, `emu` (the CUDA kernels on the
/// CPU emulator: a test instrument, slow) or `auto` (CUDA when a device is usable, else the
/// CPU; it says which on stderr).
fn backend_for(device: &str) -> Result<Box<dyn Backend>> {
    if device == "auto" {
        if prefix_attn::device::cuda::device_count() > 0 {
            match prefix_attn::device::cuda::CudaBackend::new(0) {
                Ok(be) => {
                    eprintln!("device auto: {}", be.describe());
                    return Ok(Box::new(be));
                }
                Err(e) => eprintln!("device auto: CUDA not usable ({e}); using the cpu"),
            }
        } else {
            eprintln!("device auto: no CUDA device; using the cpu");
        }
        return prefix_attn::device::backend(Device::Cpu);
    }
    prefix_attn::device::backend(device.parse()?)
}

/// The model, its tokenizer and the adapter's prefix, loaded and checked against each other.
struct Loaded {
    model: Gpt2,
    tokenizer: Option<Tokenizer>,
    prefix: Option<Tensor>,
    eos: Option<u32>,
}

fn load(model_dir: &Path, adapter: Option<&Path>, be: &dyn Backend) -> Result<Loaded> {
    let model = Gpt2::load(model_dir, be)?;
    let tokenizer = Tokenizer::load_optional(model_dir)?;
    let prefix = match adapter {
        Some(dir) => {
            let ad = PrefixAdapter::load(dir)?;
            ad.config
                .check_model(&model.config, &dir.join("adapter_config.json"))?;
            let dims = [ad.config.num_virtual_tokens, ad.config.out_dim()];
            Some(be.upload(&Tensor::from_f32(
                &dims,
                &ad.prompt_embeddings,
                model.dtype,
            )?)?)
        }
        None => None,
    };
    let eos = model
        .config
        .eos_token_id
        .or_else(|| tokenizer.as_ref().and_then(|t| t.token_id("<|endoftext|>")));
    Ok(Loaded {
        model,
        tokenizer,
        prefix,
        eos,
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(Error::Unsupported(format!(
            "--dtype {s}: expected f32, f16 or bf16"
        ))),
    }
}

fn spec_of(s: NamedShape, dtype: DType) -> ProblemSpec {
    let mut p = ProblemSpec::new(
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

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Bench {
            what:
                BenchCmd::Attn {
                    shape,
                    reps,
                    json,
                    device,
                },
        } => {
            let shapes: Vec<NamedShape> = if shape == "all" {
                shapes::SHAPES.to_vec()
            } else {
                vec![shapes::by_name(&shape).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "--shape {shape}: expected all or one of {}",
                        shapes::SHAPES.map(|s| s.name).join(", ")
                    ))
                })?]
            };
            // cpu: CPU-scaled shapes, wall time; cuda: full shapes, CUDA events, inputs
            // rotated through 256 MiB (> 2× an H200's L2). Never the emulator.
            let cuda = match device.as_str() {
                "cpu" => None,
                "emu" => {
                    return Err(Error::Unsupported(
                        "bench attn --device emu: the emulator is a test instrument, never benchmarked (use cpu or cuda)".into(),
                    ))
                }
                "auto" => match prefix_attn::device::cuda::device_count() {
                    0 => None,
                    _ => Some(prefix_attn::device::cuda::CudaBackend::new(0)?),
                },
                other => match other.parse::<Device>()? {
                    Device::Cuda(n) => Some(prefix_attn::device::cuda::CudaBackend::new(n)?),
                    _ => None,
                },
            };
            let (label, ceil, rows, checks) = match &cuda {
                None => {
                    let ceil = cpu_ceilings()?;
                    let mut rows = vec![];
                    for s in shapes {
                        rows.push(bench_attn_cpu(s.cpu_scaled(), reps)?);
                    }
                    let label = format!(
                        "cpu, f16 inputs, CPU-scaled shapes; ceilings measured now: {:.0} GFLOP/s (f32 matmul), {:.1} GB/s (copy)",
                        ceil.flops / 1e9,
                        ceil.bytes / 1e9
                    );
                    (label, ceil, rows, vec![])
                }
                Some(be) => {
                    let (flops, bytes) = be.ceilings()?;
                    let ceil = prefix_attn::bench::Ceilings { flops, bytes };
                    let mut rows = vec![];
                    let mut checks = vec![];
                    for s in shapes {
                        let r = bench_attn_device(be, s, reps, 256 << 20)?;
                        checks.push(serde_json::json!({
                            "o_max_diff": r.o_diff, "dk_pre_rel_diff": r.dk_pre_rel_diff, "input_sets": r.sets,
                        }));
                        rows.push(r.row);
                    }
                    let label = format!(
                        "{}, f16, CUDA events, inputs rotated over 256 MiB; ceilings measured now: {:.0} TFLOP/s (cuBLAS fp16 8192³), {:.0} GB/s (1 GiB device copy); naive = concat kernels + our kernel without a prefix",
                        be.describe(),
                        ceil.flops / 1e12,
                        ceil.bytes / 1e9
                    );
                    (label, ceil, rows, checks)
                }
            };
            let roof = |flops: f64, bytes: f64, ms: f64| {
                (flops / ceil.flops).max(bytes / ceil.bytes) / (ms / 1e3)
            };
            if json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let mut row = serde_json::json!({
                            "shape": r.shape.name, "batch": r.shape.batch, "tq": r.shape.tq, "tk": r.shape.tk,
                            "heads_q": r.shape.heads_q, "heads_kv": r.shape.heads_kv,
                            "prefix_len": r.shape.prefix_len, "head_dim": r.shape.head_dim,
                            "fwd_ms": r.fwd_ms, "bwd_ms": r.bwd_ms,
                            "naive_fwd_ms": r.naive_fwd_ms, "naive_bwd_ms": r.naive_bwd_ms,
                            "fwd_gflops": r.fwd_flops / r.fwd_ms / 1e6, "bwd_gflops": r.bwd_flops / r.bwd_ms / 1e6,
                            "fwd_gbs": r.fwd_bytes / r.fwd_ms / 1e6, "bwd_gbs": r.bwd_bytes / r.bwd_ms / 1e6,
                            "fwd_roofline": roof(r.fwd_flops, r.fwd_bytes, r.fwd_ms),
                            "bwd_roofline": roof(r.bwd_flops, r.bwd_bytes, r.bwd_ms),
                            "speedup_fwd": r.naive_fwd_ms / r.fwd_ms, "speedup_bwd": r.naive_bwd_ms / r.bwd_ms,
                            "naive_extra_mb": r.naive_extra_bytes / 1e6,
                        });
                        if let (Some(c), Some(obj)) = (checks.get(i), row.as_object_mut()) {
                            obj.insert("check".into(), c.clone());
                        }
                        row
                    })
                    .collect();
                let dev = cuda
                    .as_ref()
                    .map_or("cpu".to_string(), |b| b.device().to_string());
                println!(
                    "{}",
                    serde_json::json!({"device": dev, "ceiling_gflops": ceil.flops / 1e9, "ceiling_gbs": ceil.bytes / 1e9, "rows": v})
                );
            } else {
                println!("{label}");
                println!(
                    "{:<18} {:>9} {:>8} {:>7} {:>6} {:>9} {:>8} {:>6} {:>9} {:>9} {:>10}",
                    "shape",
                    "fwd ms",
                    "GFLOP/s",
                    "GB/s",
                    "roof",
                    "bwd ms",
                    "GFLOP/s",
                    "roof",
                    "×naive fwd",
                    "×naive bwd",
                    "naive +MB"
                );
                for r in &rows {
                    println!(
                        "{:<18} {:>9.3} {:>8.1} {:>7.1} {:>5.0}% {:>9.3} {:>8.1} {:>5.0}% {:>9.2}x {:>9.2}x {:>10.1}",
                        r.shape.name,
                        r.fwd_ms,
                        r.fwd_flops / r.fwd_ms / 1e6,
                        r.fwd_bytes / r.fwd_ms / 1e6,
                        100.0 * roof(r.fwd_flops, r.fwd_bytes, r.fwd_ms),
                        r.bwd_ms,
                        r.bwd_flops / r.bwd_ms / 1e6,
                        100.0 * roof(r.bwd_flops, r.bwd_bytes, r.bwd_ms),
                        r.naive_fwd_ms / r.fwd_ms,
                        r.naive_bwd_ms / r.bwd_ms,
                        r.naive_extra_bytes / 1e6
                    );
                }
                for (r, c) in rows.iter().zip(&checks) {
                    println!("{}: fused vs naive {c}", r.shape.name);
                }
            }
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Step {
                    shape,
                    batch,
                    seq,
                    prefix_len,
                    mid_dim,
                    warmup,
                    steps,
                    json,
                    device,
                },
        } => {
            let be = backend_for(&device)?;
            let mut s = StepBench::named(&shape)?;
            s.batch = batch.unwrap_or(s.batch);
            s.seq = seq.unwrap_or(s.seq);
            s.prefix_len = prefix_len.unwrap_or(s.prefix_len);
            s.mid_dim = mid_dim.unwrap_or(s.mid_dim);
            s.warmup = warmup;
            s.steps = steps.unwrap_or(s.steps);
            let r = bench_step(&s, be.as_ref())?;
            let v = serde_json::json!({
                "impl": "prefix-attn",
                "device": be.device().to_string(),
                "shape": s.shape,
                "batch": s.batch,
                "seq": s.seq,
                "prefix_len": s.prefix_len,
                "mid_dim": s.mid_dim,
                "threads": r.threads,
                "warmup": s.warmup,
                "steps": s.steps,
                "median_ms": r.median_ms,
                "min_ms": r.min_ms,
                "max_ms": r.max_ms,
                "tokens_per_s": r.tokens_per_s,
                "peak_rss_mb": r.peak_rss_mb,
                "peak_device_mb": r.peak_device_mb,
                "model_device_mb": r.model_device_mb,
                "rss_before_model_mb": r.rss_before_model_mb,
            });
            if json {
                println!("{v}");
            } else {
                let dev = r
                    .peak_device_mb
                    .map(|p| format!(", peak device memory {p:.0} MB"))
                    .unwrap_or_default();
                println!(
                    "{} on {} (batch {} × {} tokens, P={}, MLP {}), {} threads: median {:.2} ms (min {:.2}, max {:.2}), {:.0} tokens/s, peak RSS {:.0} MB{dev}",
                    s.shape, be.device(), s.batch, s.seq, s.prefix_len, s.mid_dim, r.threads, r.median_ms, r.min_ms, r.max_ms, r.tokens_per_s, r.peak_rss_mb
                );
            }
            Ok(())
        }
        Cmd::Demo {
            out,
            steps,
            seed,
            device,
        } => {
            let be = backend_for(&device)?;
            let opts = DemoOptions {
                out,
                steps,
                seed,
                ..Default::default()
            };
            println!(
                "prefix-attn demo: prefix-tuning a small GPT-2 whose weights are RANDOM (seeded), \
                 built here with its tokenizer and a table-to-text data set; nothing is downloaded."
            );
            println!(
                "  {} training and {} held-out records in {}",
                opts.train_examples,
                opts.eval_examples,
                opts.out.display()
            );
            let (mut on_step, bar) = progress();
            let r = run_demo(&opts, be.as_ref(), &mut on_step);
            if let Some(b) = bar.borrow_mut().take() {
                b.finish();
            }
            let r = r?;
            println!(
                "held-out loss: {:.3} without a prefix, {:.3} with the untrained prefix, {:.3} after training",
                r.loss_no_prefix, r.loss_before, r.loss_after
            );
            for (p, g, want) in &r.samples {
                println!("  prompt:    {p}\n  generated: {g}\n  reference: {want}");
            }
            let run = r.out.join("run");
            println!(
                "adapter (PEFT format): {}\nloss picture: {}\nlog: {}",
                run.display(),
                run.join("loss.svg").display(),
                run.join("log.jsonl").display()
            );
            println!(
                "The model is random, so the prefix learns the format and words of the task, not \
                 language. On a real GPT-2 (a Hugging Face folder with config.json, model.safetensors \
                 and tokenizer.json):\n  prefix-attn train --model gpt2 --data train.jsonl --out run \
                 --prefix-len 10 --mid-dim 512 --epochs 5 --lr 5e-5\n  prefix-attn generate --model gpt2 \
                 --adapter run --prompt \"name : The Eagle | food : French ||\""
            );
            Ok(())
        }
        Cmd::Train(args) => {
            let be = backend_for(&args.device)?;
            let cfg = args.config()?;
            let r = run_training(&cfg, be.as_ref())?;
            println!(
                "{}",
                serde_json::json!({
                    "steps": r.steps,
                    "steps_run": r.steps_run,
                    "first_loss": r.first_loss,
                    "last_loss": r.last_loss,
                    "out": r.out.to_string_lossy(),
                })
            );
            Ok(())
        }
        Cmd::Eval {
            model,
            adapter,
            data,
            batch_size,
            device,
        } => {
            let be = backend_for(&device)?;
            let m = load(&model, adapter.as_deref(), be.as_ref())?;
            if batch_size == 0 {
                return Err(Error::index("--batch-size", "must be at least 1"));
            }
            let p = m.prefix.as_ref().map_or(0, |t| t.dims()[0]);
            let limits = DataLimits {
                vocab_size: m.model.config.vocab_size,
                max_len: m.model.config.n_positions - p,
            };
            let examples = load_jsonl(&data, m.tokenizer.as_ref(), m.eos, limits)?;
            let mut total = LossSum { sum: 0.0, count: 0 };
            for chunk in examples.chunks(batch_size) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let batch = batch_of(&refs)?;
                let mut acts = Activations::new(
                    &m.model,
                    be.as_ref(),
                    batch.batch_size,
                    batch.seq_len,
                    false,
                )?
                .counted_only();
                let l = m
                    .model
                    .forward(be.as_ref(), &batch, m.prefix.as_ref(), &mut acts, None)?;
                total.sum += l.sum;
                total.count += l.count;
            }
            if total.count == 0 {
                return Err(Error::Format {
                    path: data,
                    msg: "no counted targets (every label is -100 or every example has one token)"
                        .into(),
                });
            }
            let loss = total.mean();
            println!(
                "{}",
                serde_json::json!({
                    "loss": loss,
                    "tokens": total.count,
                    "perplexity": loss.exp(),
                    "examples": examples.len(),
                    "device": be.device().to_string(),
                })
            );
            Ok(())
        }
        Cmd::Generate {
            model,
            adapter,
            prompt,
            input_ids,
            max_new_tokens,
            json,
            device,
        } => {
            let be = backend_for(&device)?;
            let m = load(&model, adapter.as_deref(), be.as_ref())?;
            let ids = match (prompt, input_ids) {
                (Some(text), _) => m
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| Error::Format {
                        path: model.join("tokenizer.json"),
                        msg: "missing: --prompt needs a tokenizer (or pass --input-ids)".into(),
                    })?
                    .encode(&text)?,
                (None, Some(ids)) => ids,
                (None, None) => {
                    return Err(Error::index("--prompt", "give --prompt or --input-ids"))
                }
            };
            if let Some(&bad) = ids
                .iter()
                .find(|&&i| i as usize >= m.model.config.vocab_size)
            {
                return Err(Error::index(
                    "--input-ids",
                    format!(
                        "token id {bad} is outside the vocabulary 0..{}",
                        m.model.config.vocab_size
                    ),
                ));
            }
            let new = generate::greedy(
                &m.model,
                be.as_ref(),
                m.prefix.as_ref(),
                &ids,
                max_new_tokens,
                m.eos,
            )?;
            let text = match &m.tokenizer {
                Some(t) => Some(t.decode(&new)?),
                None => None,
            };
            if json {
                println!("{}", serde_json::json!({ "ids": new, "text": text }));
            } else {
                match text {
                    Some(t) => println!("{t}"),
                    None => println!(
                        "{}",
                        new.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                }
            }
            Ok(())
        }
        Cmd::Shapes => {
            for s in shapes::SHAPES {
                println!(
                    "{:<18} B={:<3} Hq/Hkv={}/{:<3} Tq={:<5} Tk={:<5} P={:<4} D={:<4} causal={}  fwd {:.3} GFLOP",
                    s.name,
                    s.batch,
                    s.heads_q,
                    s.heads_kv,
                    s.tq,
                    s.tk,
                    s.prefix_len,
                    s.head_dim,
                    s.causal,
                    s.fwd_flops() / 1e9
                );
            }
            Ok(())
        }
        Cmd::Kernels { json } => {
            let rows = prefix_attn::device::launch_table::launch_table()?;
            if json {
                println!("{}", serde_json::json!({ "launches": rows }));
            } else {
                for r in rows {
                    println!(
                        "{:<36} threads {:<4} dynamic smem {:>6} B  ({}, {})",
                        r.entry, r.threads, r.smem_bytes, r.planner, r.problem
                    );
                }
            }
            Ok(())
        }
        Cmd::CheckAttn {
            shape,
            count,
            dtype,
            device,
            seed,
        } => {
            let device: Device = device.parse()?;
            if device != Device::Cpu {
                prefix_attn::device::backend(device)?;
            }
            let dtype = parse_dtype(&dtype)?;
            let mut rng = Rng::new(seed);
            let specs: Vec<ProblemSpec> = match shape {
                Some(name) => {
                    let s = shapes::by_name(&name).ok_or_else(|| {
                        Error::Unsupported(format!(
                            "--shape {name}: expected one of {}",
                            shapes::SHAPES.map(|s| s.name).join(", ")
                        ))
                    })?;
                    vec![spec_of(s.cpu_scaled(), dtype)]
                }
                None => (0..count).map(|_| random_spec(&mut rng, dtype)).collect(),
            };
            let mut worst = [0f64; 4];
            let mut fused_s = 0f64;
            let mut naive_s = 0f64;
            for spec in specs {
                let pb = RandomProblem::new(spec, &mut rng)?;
                let args = pb.args()?;
                let x = Dense::from_args(&args)?;
                let exact = x.forward(Precision::Exact);
                let mut f = FwdBuffers::poisoned(&pb.spec)?;
                let t = Instant::now();
                cpu::forward(&args, f.out())?;
                fused_s += t.elapsed().as_secs_f64();
                let mut n = FwdBuffers::poisoned(&pb.spec)?;
                let t = Instant::now();
                naive::forward(&args, n.out())?;
                naive_s += t.elapsed().as_secs_f64();
                let d_o: Vec<f64> = pb.d_o.to_f32_vec().into_iter().map(f64::from).collect();
                let eg = x.backward(&d_o, Precision::Exact);
                let mut g = GradBuffers::poisoned(&pb.spec)?;
                cpu::backward(
                    &pb.bwd_args(&f.o, &f.lse, false)?,
                    g.grads(args.prefix.is_some(), false),
                )?;
                let err = |got: Vec<f32>, want: &[f64]| {
                    got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
                        if g as f64 == w {
                            m
                        } else {
                            m.max((g as f64 - w).abs())
                        }
                    })
                };
                worst[0] = worst[0].max(err(f.o.to_f32_vec(), &exact.o));
                worst[1] = worst[1].max(err(n.o.to_f32_vec(), &exact.o));
                worst[2] = worst[2].max(err(g.dq.to_f32_vec(), &eg.dq));
                if args.prefix.is_some() {
                    worst[3] = worst[3].max(err(g.dk_pre.to_f32_vec(), &eg.dk_pre));
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "device": device.to_string(),
                    "dtype": dtype.name(),
                    "max_err_o_fused": worst[0],
                    "max_err_o_naive": worst[1],
                    "max_err_dq": worst[2],
                    "max_err_dk_pre": worst[3],
                    "fused_fwd_seconds": fused_s,
                    "naive_fwd_seconds": naive_s,
                })
            );
            Ok(())
        }
    }
}
