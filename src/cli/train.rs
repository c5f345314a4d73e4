//! `prefix-attn train`.

use super::common::{backend_for, truncation, Progress, DEVICE_HELP};
use prefix_attn::device::Backend;
use prefix_attn::train::optim::OptimizerKind;
use prefix_attn::train::trainer::{train_observed, Interrupt};
use prefix_attn::train::{Length, TrainConfig, TrainReport};
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `train`.
#[derive(clap::Args, Clone)]
pub(super) struct TrainArgs {
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

/// Runs `train` and prints its summary as one JSON object.
pub(super) fn run(args: &TrainArgs) -> Result<ExitCode> {
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
