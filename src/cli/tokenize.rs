//! `prefix-attn tokenize`.

use prefix_attn::tokenizer::Tokenizer;
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

// The arguments of `tokenize`.
#[derive(clap::Args)]
pub(super) struct TokenizeArgs {
    /// Hugging Face model folder (tokenizer.json, or vocab.json + merges.txt).
    #[arg(long)]
    pub(super) model: PathBuf,
    /// The text.
    pub(super) text: String,
    /// Print {"ids", "tokens"} as JSON.
    #[arg(long)]
    pub(super) json: bool,
}

/// Runs `tokenize`: the ids (and with `--json` the tokens) of the text.
pub(super) fn run(args: TokenizeArgs) -> Result<ExitCode> {
    let TokenizeArgs { model, text, json } = args;
    let vocab_size = prefix_attn::lm::geometry(&model)?.vocab_size;
    let tok = Tokenizer::for_model(&model, vocab_size)?.ok_or_else(|| {
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
