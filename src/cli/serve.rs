//! `prefix-attn serve`: the OpenAI-compatible server (`prefix_attn::server`).

use super::common::{adapter_specs, backend_for, DEVICE_HELP};
use prefix_attn::server::engine::EngineConfig;
use prefix_attn::server::{serve, ServeConfig};
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

// The arguments of `serve`.
#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// Hugging Face model folder (the frozen base model).
    #[arg(long)]
    model: PathBuf,
    /// PEFT prefix-tuning adapter as NAME=DIR (or DIR, named after its folder); repeatable.
    /// Requests name it in "model".
    #[arg(long)]
    adapter: Vec<String>,
    /// A directory of adapter folders (it may hold thousands): each is served under its
    /// folder name, read on first use into the device prefix table.
    #[arg(long)]
    adapters_dir: Option<PathBuf>,
    /// The base model's name in "model" (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences per engine step (beams count one each).
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Sequences that may wait beyond the running ones; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// The largest max_tokens accepted (default: the model's context).
    #[arg(long)]
    max_tokens_limit: Option<usize>,
    /// KV-cache pages of 16 tokens (default: 8 per sequence of --max-batch, and at least one
    /// full context).
    #[arg(long)]
    num_pages: Option<usize>,
    /// Adapters held in the device prefix table at once; others are read from disk when
    /// asked for, evicting the least recently used idle one.
    #[arg(long, default_value_t = 64)]
    max_adapters: usize,
    /// Rows of the prefix table: the most virtual tokens an adapter may have (shorter ones
    /// are served beside longer ones). Default: the longest adapter of --adapter and
    /// --adapters-dir (their adapter_config.json files are read at start).
    #[arg(long)]
    prefix_len: Option<usize>,
    /// Seconds the requests in flight get to finish after SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    grace_period: f64,
    /// Milliseconds to pause after every engine step (for tests: keeps a request running).
    #[arg(long, default_value_t = 0, hide = true)]
    step_delay_ms: u64,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    device: String,
}

/// Runs `serve` until SIGTERM or Ctrl-C.
pub(super) fn run(args: ServeArgs) -> Result<ExitCode> {
    let adapters = adapter_specs(&args.adapter)?;
    if args.max_batch == 0 {
        return Err(Error::index("--max-batch", "0: expected at least 1"));
    }
    if !(args.grace_period.is_finite() && args.grace_period >= 0.0) {
        return Err(Error::index(
            "--grace-period",
            format!("{}: expected seconds ≥ 0", args.grace_period),
        ));
    }
    if args.prefix_len == Some(0) {
        return Err(Error::index("--prefix-len", "0: expected at least 1"));
    }
    let device = args.device.clone();
    serve(ServeConfig {
        engine: EngineConfig {
            model_dir: args.model,
            backend: Box::new(move || backend_for(&device)),
            max_batch: args.max_batch,
            num_pages: args.num_pages,
            page_size: 16,
            adapter_slots: args.max_adapters,
            prefix_len: args.prefix_len,
            preload: Vec::new(),
            step_delay: Duration::from_millis(args.step_delay_ms),
        },
        adapters,
        adapters_dir: args.adapters_dir,
        served_model_name: args.served_model_name,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_queue: args.max_queue,
        max_tokens_limit: args.max_tokens_limit,
        grace: Duration::from_secs_f64(args.grace_period),
    })?;
    Ok(ExitCode::SUCCESS)
}
