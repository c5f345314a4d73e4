//! `prefix-attn demo`.

use super::common::{backend_for, Progress, DEVICE_HELP};
use prefix_attn::demo::{default_out, run_demo, DemoOptions};
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

// The arguments of `demo`.
#[derive(clap::Args)]
pub(super) struct DemoArgs {
    /// Output folder (an earlier demo there is replaced) [default: target/prefix-attn-demo
    /// in a cargo checkout, else prefix-attn-demo in the temporary folder].
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    pub(super) steps: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub(super) device: String,
}

/// Runs the demo and prints what it measured.
pub(super) fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.steps == 0 {
        return Err(Error::index("--steps", "must be at least 1"));
    }
    let be = backend_for(&args.device)?;
    let opts = DemoOptions {
        out: args.out.unwrap_or_else(default_out),
        steps: args.steps,
        seed: args.seed,
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
