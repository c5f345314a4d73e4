//! `prefix-attn generate`.

use super::common::{backend_for, load, parse_ids, DEVICE_HELP};
use prefix_attn::lm::generate::{self, Finish};
use prefix_attn::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

// The arguments of `generate`.
#[derive(clap::Args)]
pub(super) struct GenerateArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub(super) model: PathBuf,
    /// PEFT prefix-tuning adapter folder.
    #[arg(long)]
    pub(super) adapter: Option<PathBuf>,
    /// Prompt text (needs the model folder's tokenizer).
    #[arg(
        long,
        conflicts_with = "input_ids",
        required_unless_present = "input_ids"
    )]
    pub(super) prompt: Option<String>,
    /// Prompt token ids, separated by commas and/or spaces ("1,2", "1, 2", "[1, 2]").
    #[arg(long, allow_hyphen_values = true)]
    pub(super) input_ids: Option<String>,
    /// Most new tokens (fewer when the context ends first).
    #[arg(long, default_value_t = 20)]
    pub(super) max_new_tokens: usize,
    /// Print {"ids", "text", "finish_reason"} instead of the text.
    #[arg(long)]
    pub(super) json: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub(super) device: String,
}

/// Runs `generate`: greedy continuation of the prompt, printed as text or JSON.
pub(super) fn run(args: GenerateArgs) -> Result<ExitCode> {
    let GenerateArgs {
        model,
        adapter,
        prompt,
        input_ids,
        max_new_tokens,
        json,
        device,
    } = args;
    let ids_arg = input_ids.as_deref().map(parse_ids).transpose()?;
    let be = backend_for(&device)?;
    let m = load(&model, adapter.as_deref(), be.as_ref())?;
    let g = m.model.geometry();
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
        (None, None) => return Err(Error::index("--prompt", "give --prompt or --input-ids")),
    };
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= g.vocab_size) {
        return Err(Error::index(
            "--input-ids",
            format!(
                "token id {bad} is outside the vocabulary 0..{}",
                g.vocab_size
            ),
        ));
    }
    let p = m.prefix.as_ref().map_or(0, |t| t.dims()[0]);
    let npos = g.max_positions;
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
        m.model.as_ref(),
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
