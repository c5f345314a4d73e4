//! `prefix-attn eval`.

use super::common::{backend_for, load, say_truncated, truncation, DEVICE_HELP};
use prefix_attn::train::data::{load_jsonl_stats, DataLimits};
use prefix_attn::train::trainer::evaluate;
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

// The arguments of `eval` (the command's help is the doc comment of its `Cmd` variant).
#[derive(clap::Args)]
pub(super) struct EvalArgs {
    /// Hugging Face model folder (config.json, model.safetensors or its shards, and a
    /// tokenizer for text data).
    #[arg(long)]
    pub(super) model: PathBuf,
    /// PEFT prefix-tuning adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub(super) adapter: Option<PathBuf>,
    /// JSONL data: {"input_ids", "labels"}, {"prompt", "completion"} or {"text"} per line.
    #[arg(long)]
    pub(super) data: PathBuf,
    /// Sequences per forward pass (memory, not results).
    #[arg(long, default_value_t = 10)]
    pub(super) batch_size: usize,
    /// Longest example in tokens (default: n_positions minus the prefix length); longer
    /// ones are truncated (see --truncate).
    #[arg(long)]
    pub(super) max_length: Option<usize>,
    /// Truncate long examples: left or right (the prompt first, from that side; then the
    /// end of the completion). Default right when --max-length is given; without either,
    /// a long example is an error.
    #[arg(long)]
    pub(super) truncate: Option<String>,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub(super) device: String,
}

/// Runs `eval`: the token-weighted mean loss of `--data`, as one JSON object.
pub(super) fn run(args: EvalArgs) -> Result<ExitCode> {
    if args.batch_size == 0 {
        return Err(Error::index("--batch-size", "must be at least 1"));
    }
    if args.max_length == Some(0) {
        return Err(Error::index("--max-length", "must be at least 1"));
    }
    let how = truncation(args.truncate.as_deref(), args.max_length)?;
    let be = backend_for(&args.device)?;
    let m = load(&args.model, args.adapter.as_deref(), be.as_ref())?;
    let g = m.model.geometry();
    let p = m.prefix.as_ref().map_or(0, |t| t.dims()[0]);
    let limits = DataLimits::for_model(&g, p, args.max_length, how)?;
    let max_len = limits.max_len;
    let (examples, stats) = load_jsonl_stats(&args.data, m.tokenizer.as_ref(), m.eos, limits)?;
    say_truncated("--data", &stats, max_len);
    let total = evaluate(
        m.model.as_ref(),
        be.as_ref(),
        m.prefix.as_ref(),
        &examples,
        args.batch_size,
    )?;
    if total.count == 0 {
        return Err(Error::Format {
            path: args.data,
            msg: "no counted targets (every label is -100 or every example has one token)".into(),
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
