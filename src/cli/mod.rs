//! The `prefix-attn` command line: the schema here, one file per command, the shared flags
//! and loading in `common`.

mod bench;
mod check_attn;
mod common;
mod demo;
mod eval;
mod generate;
mod listings;
mod serve;
mod tokenize;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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

#[derive(Subcommand)]
enum Cmd {
    /// Train a prefix (PEFT prefix tuning) on a frozen GPT-2 and write a PEFT adapter to
    /// --out. The model runs in eval form: no dropout. Ctrl-C (or SIGTERM) writes a
    /// checkpoint and stops; --resume continues.
    Train(Box<train::TrainArgs>),
    /// Evaluate a GPT-2 (with an optional prefix adapter) on a JSONL file and print one
    /// JSON object: loss (token-weighted mean over every counted target), tokens, perplexity.
    Eval(eval::EvalArgs),
    /// Greedy generation with a KV cache that keeps the prefix; stops at EOS, after
    /// --max-new-tokens, or at the end of the model's context.
    Generate(generate::GenerateArgs),
    /// An OpenAI-compatible HTTP server (POST /v1/completions, GET /v1/models, ...) that
    /// serves the base model and many prefix adapters in one continuous batch; "model" names
    /// the adapter. Stops on SIGTERM after the requests in flight finish.
    Serve(Box<serve::ServeArgs>),
    /// The main job on an embedded default: build a small random GPT-2 and a table-to-text
    /// data set, train a prefix, and show held-out loss and generations (no download).
    Demo(demo::DemoArgs),
    /// Print the token ids of a text with a model folder's tokenizer (what --input-ids takes).
    Tokenize(tokenize::TokenizeArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
    /// Run prefix attention on random inputs and print its error against the f64 oracle and
    /// the naive concat, as one JSON object.
    CheckAttn(check_attn::CheckAttnArgs),
    /// List the named attention shapes of the benchmarks with their FLOPs.
    Shapes,
    /// List every CUDA kernel's launch geometry (threads per block, dynamic shared memory)
    /// as the planners compute it; `scripts/kernel-report.sh` reads `--json`.
    Kernels(listings::KernelsArgs),
}

/// Parses the command line, runs the command, and prints an error as `error: ...`.
pub fn main() -> ExitCode {
    let done = match Cli::parse().cmd {
        Cmd::Train(args) => train::run(&args),
        Cmd::Eval(args) => eval::run(args),
        Cmd::Generate(args) => generate::run(args),
        Cmd::Serve(args) => serve::run(*args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Tokenize(args) => tokenize::run(args),
        Cmd::Bench { what } => bench::run(what).map(|()| ExitCode::SUCCESS),
        Cmd::CheckAttn(args) => check_attn::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Shapes => listings::shapes().map(|()| ExitCode::SUCCESS),
        Cmd::Kernels(args) => listings::kernels(args).map(|()| ExitCode::SUCCESS),
    };
    match done {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
