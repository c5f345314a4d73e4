//! The `prefix-attn` command line.

use clap::{Parser, Subcommand};
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::shapes::{self, NamedShape};
use prefix_attn::attn::testing::{
    random_spec, FwdBuffers, GradBuffers, ProblemSpec, RandomProblem,
};
use prefix_attn::attn::{cpu, naive};
use prefix_attn::bench::{bench_attn_cpu, bench_attn_device, bench_step, cpu_ceilings, StepBench};
use prefix_attn::demo::{default_out, run_demo, DemoOptions};
use prefix_attn::device::{Backend, Device};
use prefix_attn::gpt2::generate::{self, Finish};
use prefix_attn::gpt2::tokenizer::Tokenizer;
use prefix_attn::gpt2::Gpt2;
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::DType;
use prefix_attn::tensor::Tensor;
use prefix_attn::train::data::{load_jsonl_stats, DataLimits, DataStats, Truncation};
use prefix_attn::train::optim::OptimizerKind;
use prefix_attn::train::trainer::{
    evaluate, train_observed, EvalInfo, Interrupt, RunStart, TrainObserver,
};
use prefix_attn::train::{Length, StepInfo, TrainConfig, TrainReport};
use prefix_attn::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Prefix-tuning of a frozen GPT-2, and the fused prefix-attention kernels it runs on.
///
/// Trains prefixes (PEFT prefix tuning, with or without the MLP reparameterisation) on a
/// Hugging Face GPT-2 folder, evaluates and generates with them, and reads and writes PEFT
/// adapter folders (`PeftModel.from_pretrained` loads ours, ours load theirs). Runs on the CPU
/// (f32, the reference), on CUDA GPUs (fp16, our kernels) and on a CPU emulator of those
/// kernels. The frozen model runs in eval form: no dropout.
///
/// Start with `prefix-attn demo` (no download), then `train`, `eval`, `generate`.
#[derive(Parser)]
#[command(name = "prefix-attn", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The device flag's help, shared by every command that runs the model.
const DEVICE_HELP: &str =
    "Device: cpu, cuda[:N], emu (the CUDA kernels on the CPU emulator; slow) or auto";

#[derive(Subcommand)]
enum Cmd {
    /// Train a prefix (PEFT prefix tuning) on a frozen GPT-2 and write a PEFT adapter to
    /// --out. The model runs in eval form: no dropout. Ctrl-C (or SIGTERM) writes a
    /// checkpoint and stops; --resume continues.
    Train(Box<TrainArgs>),
    /// Evaluate a GPT-2 (with an optional prefix adapter) on a JSONL file and print one
    /// JSON object: loss (token-weighted mean over every counted target), tokens, perplexity.
    Eval {
        /// Hugging Face model folder (config.json, model.safetensors or its shards, and a
        /// tokenizer for text data).
        #[arg(long)]
        model: PathBuf,
        /// PEFT prefix-tuning adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL data: {"input_ids", "labels"}, {"prompt", "completion"} or {"text"} per line.
        #[arg(long)]
        data: PathBuf,
        /// Sequences per forward pass (memory, not results).
        #[arg(long, default_value_t = 10)]
        batch_size: usize,
        /// Longest example in tokens (default: n_positions minus the prefix length); longer
        /// ones are truncated (see --truncate).
        #[arg(long)]
        max_length: Option<usize>,
        /// Truncate long examples: left or right (the prompt first, from that side; then the
        /// end of the completion). Default right when --max-length is given; without either,
        /// a long example is an error.
        #[arg(long)]
        truncate: Option<String>,
        #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
        device: String,
    },
    /// Greedy generation with a KV cache that keeps the prefix; stops at EOS, after
    /// --max-new-tokens, or at the end of the model's context.
    Generate {
        /// Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// PEFT prefix-tuning adapter folder.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Prompt text (needs the model folder's tokenizer).
        #[arg(
            long,
            conflicts_with = "input_ids",
            required_unless_present = "input_ids"
        )]
        prompt: Option<String>,
        /// Prompt token ids, separated by commas and/or spaces ("1,2", "1, 2", "[1, 2]").
        #[arg(long, allow_hyphen_values = true)]
        input_ids: Option<String>,
        /// Most new tokens (fewer when the context ends first).
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Print {"ids", "text", "finish_reason"} instead of the text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
        device: String,
    },
    /// The main job on an embedded default: build a small random GPT-2 and a table-to-text
    /// data set, train a prefix, and show held-out loss and generations (no download).
    Demo {
        /// Output folder (an earlier demo there is replaced) [default: target/prefix-attn-demo
        /// in a cargo checkout, else prefix-attn-demo in the temporary folder].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Training steps.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
        device: String,
    },
    /// Print the token ids of a text with a model folder's tokenizer (what --input-ids takes).
    Tokenize {
        /// Hugging Face model folder (tokenizer.json, or vocab.json + merges.txt).
        #[arg(long)]
        model: PathBuf,
        /// The text.
        text: String,
        /// Print {"ids", "tokens"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
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
        #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
        device: String,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List the named attention shapes of the benchmarks with their FLOPs.
    Shapes,
    /// List every CUDA kernel's launch geometry (threads per block, dynamic shared memory)
    /// as the planners compute it; `scripts/kernel-report.sh` reads `--json`.
    Kernels {
        /// Print one JSON object: {"launches": [{entry, threads, smem_bytes, planner, problem}]}.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `train`.
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Hugging Face model folder (frozen during training): config.json, model.safetensors
    /// (or model.safetensors.index.json and its shards), and a tokenizer for text data.
    #[arg(long)]
    model: PathBuf,
    /// JSONL training data: {"input_ids", "labels"}, {"prompt", "completion"} or {"text"}
    /// per line.
    #[arg(long)]
    data: PathBuf,
    /// Output folder (new, empty, or a run of ours): adapter, prefix_encoder.safetensors,
    /// checkpoint, log.jsonl, loss.svg, best/.
    #[arg(long)]
    out: PathBuf,
    /// Initial encoder weights: a PEFT PrefixEncoder state dict (safetensors); without the
    /// MLP also an adapter_model.safetensors.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Prefix length P (PEFT num_virtual_tokens).
    #[arg(long, default_value_t = 10)]
    prefix_len: usize,
    /// Width of the reparameterisation MLP (PEFT encoder_hidden_size).
    #[arg(long, default_value_t = 512, conflicts_with = "no_prefix_projection")]
    mid_dim: usize,
    /// Train the prefix itself, without the MLP (PEFT prefix_projection=False, PEFT's
    /// default; the paper's method is the MLP).
    #[arg(long)]
    no_prefix_projection: bool,
    /// Optimiser steps [default: as many as --epochs take].
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the data.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Sequences per forward pass; a step takes --batch-size × --grad-accum of them.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation): the same step as one batch
    /// --grad-accum times larger, in less memory.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
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
    /// Checkpoint every N steps (and always at the end and at Ctrl-C); 0: only then.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Held-out JSONL data: its loss every --eval-every steps goes to log.jsonl and
    /// loss.svg, and the adapter of the best one to OUT/best/.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Evaluate --eval-data every N steps (and at the end); 0: only at the end.
    #[arg(long, default_value_t = 100, requires = "eval_data")]
    eval_every: usize,
    /// Longest example in tokens (default: n_positions minus the prefix length); longer
    /// ones are truncated (see --truncate).
    #[arg(long)]
    max_length: Option<usize>,
    /// Truncate long examples: left or right (the prompt first, from that side; then the
    /// end of the completion). Default right when --max-length is given; without either, a
    /// long example is an error.
    #[arg(long)]
    truncate: Option<String>,
    /// base_model_name_or_path for adapter_config.json [default: --model as given].
    #[arg(long)]
    base_model_name: Option<String>,
    /// Log file (default OUT/log.jsonl): one JSON line per step and per evaluation.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (same settings; the data, model
    /// and init files are checked by content).
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    device: String,
}

/// `--truncate` and `--max-length` as the data loader takes them.
fn truncation(truncate: Option<&str>, max_length: Option<usize>) -> Result<Truncation> {
    match (truncate, max_length) {
        (Some(t), _) => t.parse(),
        (None, Some(_)) => Ok(Truncation::Right),
        (None, None) => Ok(Truncation::Error),
    }
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
                return Err(Error::index(
                    "--optimizer",
                    format!("{o:?}: expected adamw or sgd"),
                ))
            }
        };
        let length = match self.steps {
            Some(0) => return Err(Error::index("--steps", "must be at least 1")),
            Some(s) => Length::Steps(s),
            None if self.epochs == 0 => return Err(Error::index("--epochs", "must be at least 1")),
            None => Length::Epochs(self.epochs),
        };
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::index(
                "--weight-decay",
                format!("{}, expected a non-negative number", self.weight_decay),
            ));
        }
        Ok(TrainConfig {
            init: self.init.clone(),
            prefix_len: self.prefix_len,
            mid_dim: self.mid_dim,
            prefix_projection: !self.no_prefix_projection,
            length,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            schedule: self.lr_schedule.parse()?,
            warmup_steps: self.warmup_steps,
            optimizer,
            seed: self.seed,
            save_every: self.save_every,
            log: self.log.clone(),
            resume: self.resume,
            max_length: self.max_length,
            truncation: truncation(self.truncate.as_deref(), self.max_length)?,
            eval_data: self.eval_data.clone(),
            eval_every: self.eval_every,
            base_model_name: self.base_model_name.clone(),
            interrupt: None,
            ..TrainConfig::new(self.model.clone(), self.data.clone(), self.out.clone())
        })
    }
}

/// What the command line shows of a run: a progress bar on a terminal (plain lines
/// otherwise), the resume point, truncation, evaluations.
struct Progress {
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    fn say(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Leaves the bar as it is and moves what follows to a line of its own.
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
            eprintln!();
        }
    }
}

fn say_truncated(what: &str, s: &DataStats, max_length: usize) {
    if s.truncated > 0 {
        eprintln!(
            "{what}: {} of {} examples truncated to {max_length} tokens ({} tokens dropped)",
            s.truncated, s.examples, s.tokens_dropped
        );
    }
}

impl TrainObserver for Progress {
    fn start(&mut self, s: &RunStart) {
        say_truncated("--data", &s.data, s.max_length);
        if let Some(e) = &s.eval_data {
            say_truncated("--eval-data", e, s.max_length);
        }
        if s.resumed {
            eprintln!("resuming at step {} of {}", s.step, s.total);
        }
        if self.tty && s.total > 0 {
            let b = indicatif::ProgressBar::new(s.total as u64).with_position(s.step as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len}  {msg}  eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            // The estimator has seen the jump to the resume point; it starts from here.
            b.tick();
            b.reset_eta();
            self.bar = Some(b);
        }
    }

    fn step(&mut self, s: &StepInfo) -> bool {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.4}  {:.0} tok/s", s.loss, s.tokens_per_s));
            b.set_position(s.step as u64);
        } else if s.step == s.total
            || s.step % (s.total / 20).max(1) == 0
            || s.step == s.start_step + 1
        {
            eprintln!(
                "step {}/{}  loss {:.4}  lr {:.3e}  {:.0} tok/s",
                s.step, s.total, s.loss, s.lr, s.tokens_per_s
            );
        }
        true
    }

    fn eval(&mut self, e: &EvalInfo) {
        self.say(&format!(
            "step {}: held-out loss {:.4} over {} tokens{}",
            e.step,
            e.loss,
            e.tokens,
            if e.best { " (best so far: best/)" } else { "" }
        ));
    }
}

/// The name of a signal for messages.
fn signal_name(sig: Option<i32>) -> &'static str {
    match sig {
        Some(2) => "SIGINT (Ctrl-C)",
        Some(15) => "SIGTERM",
        Some(_) => "a signal",
        None => "a stop request",
    }
}

/// Runs training with the progress display and Ctrl-C / SIGTERM handling; returns the exit
/// status (128 + the signal after an interrupt).
fn run_training(mut cfg: TrainConfig, be: &dyn Backend) -> Result<(TrainReport, ExitCode)> {
    #[cfg(unix)]
    {
        cfg.interrupt = Some(Interrupt::on_signals()?);
    }
    #[cfg(not(unix))]
    let _ = &mut cfg;
    let mut progress = Progress::new();
    let r = train_observed(&cfg, be, &mut progress);
    progress.finish();
    let r = r?;
    if r.interrupted {
        let saved = match r.checkpoint_step {
            Some(s) if s == r.steps && r.steps_run > 0 => format!(
                "checkpoint of step {s} written to {}",
                cfg.out
                    .join(prefix_attn::train::trainer::CHECKPOINT)
                    .display()
            ),
            Some(s) => format!("nothing new to save; the checkpoint of step {s} stays"),
            None => "no step was done, so there is nothing to save".to_string(),
        };
        eprintln!(
            "interrupted by {} at step {} of {}: {saved}. Run the same command with --resume to continue.",
            signal_name(r.signal),
            r.steps,
            r.total
        );
        let code = r.signal.map_or(130, |s| 128 + s).clamp(1, 255) as u8;
        return Ok((r, ExitCode::from(code)));
    }
    Ok((r, ExitCode::SUCCESS))
}

/// What to benchmark.
#[derive(Subcommand)]
enum BenchCmd {
    /// Time fused prefix attention against the naive concat on the named shapes (CPU-scaled
    /// on the CPU) with FLOP/s, GB/s and the fraction of the measured roofline.
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
        /// Device: cpu (CPU-scaled shapes), cuda[:N] (full shapes) or auto; never the emulator.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Time full training steps (forward, backward, AdamW) on a random-weight model.
    Step {
        /// tiny or gpt2-small.
        #[arg(long, default_value = "tiny")]
        shape: String,
        /// Sequences per step [default: the shape's].
        #[arg(long, alias = "batch")]
        batch_size: Option<usize>,
        /// Tokens per sequence [default: the shape's].
        #[arg(long)]
        seq: Option<usize>,
        /// Prefix length [default: the shape's].
        #[arg(long)]
        prefix_len: Option<usize>,
        /// Encoder MLP width [default: the shape's].
        #[arg(long)]
        mid_dim: Option<usize>,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps [default: 20 for tiny, 5 for gpt2-small].
        #[arg(long)]
        steps: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
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
    prefix_attn::device::backend(parse_device(device)?)
}

/// A `--device` value (`auto` is handled by [`backend_for`]).
fn parse_device(device: &str) -> Result<Device> {
    device.parse().map_err(|_| {
        Error::index(
            "--device",
            format!("{device:?}: expected cpu, cuda, cuda:N, emu or auto"),
        )
    })
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
    let tokenizer = Tokenizer::for_model(model_dir, model.config.vocab_size)?;
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

/// Token ids from `--input-ids`: integers separated by commas and/or whitespace, optionally
/// in brackets.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let inner = s.trim();
    let inner = inner
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(inner);
    let ids = inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().map_err(|_| {
                Error::index(
                    "--input-ids",
                    format!("{t:?} is not a token id (expected non-negative integers separated by commas or spaces)"),
                )
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        return Err(Error::index("--input-ids", "no token ids given"));
    }
    Ok(ids)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Train(args) => {
            let cfg = args.config()?;
            let be = backend_for(&args.device)?;
            let (r, code) = run_training(cfg, be.as_ref())?;
            println!(
                "{}",
                serde_json::json!({
                    "steps": r.steps,
                    "total_steps": r.total,
                    "steps_run": r.steps_run,
                    "completed": r.completed,
                    "first_loss": r.first_loss,
                    "last_loss": r.last_loss,
                    "best_eval": r.best_eval.map(|(s, l)| serde_json::json!({"step": s, "loss": l})),
                    "out": r.out.to_string_lossy(),
                })
            );
            Ok(code)
        }
        Cmd::Eval {
            model,
            adapter,
            data,
            batch_size,
            max_length,
            truncate,
            device,
        } => {
            if batch_size == 0 {
                return Err(Error::index("--batch-size", "must be at least 1"));
            }
            if max_length == Some(0) {
                return Err(Error::index("--max-length", "must be at least 1"));
            }
            let how = truncation(truncate.as_deref(), max_length)?;
            let be = backend_for(&device)?;
            let m = load(&model, adapter.as_deref(), be.as_ref())?;
            let p = m.prefix.as_ref().map_or(0, |t| t.dims()[0]);
            let room = m.model.config.n_positions - p;
            if max_length.is_some_and(|l| l > room) {
                return Err(Error::index(
                    "--max-length",
                    format!(
                        "{}, but only {room} tokens fit after a prefix of {p} (n_positions = {})",
                        max_length.unwrap_or(0),
                        m.model.config.n_positions
                    ),
                ));
            }
            let max_len = max_length.unwrap_or(room);
            let limits = DataLimits {
                vocab_size: m.model.config.vocab_size,
                max_len,
                truncation: how,
            };
            let (examples, stats) = load_jsonl_stats(&data, m.tokenizer.as_ref(), m.eos, limits)?;
            say_truncated("--data", &stats, max_len);
            let total = evaluate(
                &m.model,
                be.as_ref(),
                m.prefix.as_ref(),
                &examples,
                batch_size,
            )?;
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
                    "truncated": stats.truncated,
                    "device": be.device().to_string(),
                })
            );
            Ok(ExitCode::SUCCESS)
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
            let ids_arg = input_ids.as_deref().map(parse_ids).transpose()?;
            let be = backend_for(&device)?;
            let m = load(&model, adapter.as_deref(), be.as_ref())?;
            let ids = match (prompt, ids_arg) {
                (Some(text), _) => {
                    let ids = m
                        .tokenizer
                        .as_ref()
                        .ok_or_else(|| Error::Format {
                            path: model.join("tokenizer.json"),
                            msg: "missing: --prompt needs a tokenizer (tokenizer.json, or vocab.json + merges.txt; or pass --input-ids)".into(),
                        })?
                        .encode(&text)?;
                    if ids.is_empty() {
                        return Err(Error::index(
                            "--prompt",
                            format!("{text:?} gives no tokens"),
                        ));
                    }
                    ids
                }
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
            let p = m.prefix.as_ref().map_or(0, |t| t.dims()[0]);
            let npos = m.model.config.n_positions;
            if p + ids.len() > npos {
                return Err(Error::index(
                    "--prompt",
                    format!(
                        "{} prompt tokens after a prefix of {p} exceed n_positions = {npos} (at most {} fit)",
                        ids.len(),
                        npos - p
                    ),
                ));
            }
            let g = generate::greedy_until(
                &m.model,
                be.as_ref(),
                m.prefix.as_ref(),
                &ids,
                max_new_tokens,
                m.eos,
            )?;
            if g.finish == Finish::Context {
                eprintln!(
                    "stopped at the end of the context after {} new tokens (n_positions = {npos}, prefix {p}, prompt {})",
                    g.ids.len(),
                    ids.len()
                );
            }
            // The text leaves out the EOS token (the ids keep it).
            let shown = match (g.finish, g.ids.last()) {
                (Finish::Eos, Some(_)) => &g.ids[..g.ids.len() - 1],
                _ => &g.ids[..],
            };
            let text = match &m.tokenizer {
                Some(t) => Some(t.decode(shown)?),
                None => None,
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ids": g.ids, "text": text, "finish_reason": g.finish.as_str() })
                );
            } else {
                match text {
                    Some(t) => println!("{t}"),
                    None => println!(
                        "{}",
                        shown
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            out,
            steps,
            seed,
            device,
        } => {
            if steps == 0 {
                return Err(Error::index("--steps", "must be at least 1"));
            }
            let be = backend_for(&device)?;
            let opts = DemoOptions {
                out: out.unwrap_or_else(default_out),
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
            let mut progress = Progress::new();
            let r = run_demo(&opts, be.as_ref(), &mut progress);
            progress.finish();
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
                 and tokenizer.json), from this checkout:\n  \
                 cargo run --release -- train --model path/to/gpt2 --data train.jsonl --out run1 \
                 --prefix-len 10 --mid-dim 512 --epochs 5 --lr 5e-5\n  \
                 cargo run --release -- generate --model path/to/gpt2 --adapter run1 \
                 --prompt \"name : The Eagle | food : French ||\"\n\
                 (or `cargo install --path .` once, then `prefix-attn train ...`)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tokenize { model, text, json } => {
            let cfg = prefix_attn::gpt2::Gpt2Config::load(&model.join("config.json"))?;
            let tok = Tokenizer::for_model(&model, cfg.vocab_size)?.ok_or_else(|| {
                Error::Format {
                    path: model.join("tokenizer.json"),
                    msg: "missing: the model folder has no tokenizer (tokenizer.json, or vocab.json + merges.txt)".into(),
                }
            })?;
            let ids = tok.encode(&text)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ids": ids, "tokens": tok.tokens(&ids)})
                );
            } else {
                println!(
                    "{}",
                    ids.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => run_tools(other).map(|()| ExitCode::SUCCESS),
    }
}

/// The benchmark and kernel-check commands.
fn run_tools(cmd: Cmd) -> Result<()> {
    match cmd {
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
                other => match parse_device(other)? {
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
                    batch_size,
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
            s.batch = batch_size.unwrap_or(s.batch);
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
            let device: Device = parse_device(&device)?;
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
        _ => Err(Error::Unsupported(
            "internal: a model command reached the tools dispatcher".into(),
        )),
    }
}
