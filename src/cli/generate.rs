//! `prefix-attn generate`: one prompt, or a file of requests decoded together in one
//! continuous batch over several adapters (greedy, seeded sampling or beam search).

use super::common::{adapter_specs, backend_for, load, parse_ids, DEVICE_HELP};
use prefix_attn::device::Backend;
use prefix_attn::engine::jsonl::{parse_requests, AdapterChoice, PromptSpec};
use prefix_attn::engine::model::{run_batch, ModelStep};
use prefix_attn::engine::sampling::request_seed;
use prefix_attn::engine::scheduler::{Completion, SchedulerConfig, StopFn};
use prefix_attn::engine::text::{completion_text, stop_fn};
use prefix_attn::engine::{Decoding, Request, SamplingParams};
use prefix_attn::lm::generate::{self, Finish};
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::tensor::Tensor;
use prefix_attn::tokenizer::Tokenizer;
use prefix_attn::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Pages of the engine's KV cache: 16 tokens, as vLLM and FlashInfer.
const PAGE_SIZE: usize = 16;

// The arguments of `generate`.
#[derive(clap::Args)]
pub(super) struct GenerateArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub(super) model: PathBuf,
    /// PEFT prefix-tuning adapter folder, or NAME=DIR; repeat to serve several adapters
    /// together (--data lines pick one by "adapter": NAME; a bare DIR is named after its
    /// folder).
    #[arg(long)]
    pub(super) adapter: Vec<String>,
    /// Prompt text (needs the model folder's tokenizer).
    #[arg(long, conflicts_with_all = ["input_ids", "data"], required_unless_present_any = ["input_ids", "data"])]
    pub(super) prompt: Option<String>,
    /// Prompt token ids, separated by commas and/or spaces ("1,2", "1, 2", "[1, 2]").
    #[arg(long, allow_hyphen_values = true, conflicts_with = "data")]
    pub(super) input_ids: Option<String>,
    /// Requests, one JSON object a line: {"prompt": TEXT} or {"input_ids": [...]}, optional
    /// "adapter": NAME (null: no prefix; absent: the only adapter given), "max_new_tokens"
    /// and "seed". Prints one JSON line per request, in input order.
    #[arg(long)]
    pub(super) data: Option<PathBuf>,
    /// Most new tokens (fewer when the context ends first).
    #[arg(long, default_value_t = 20)]
    pub(super) max_new_tokens: usize,
    /// Beam search with this many beams (1: no beam search).
    #[arg(long, default_value_t = 1)]
    pub(super) num_beams: usize,
    /// Beam search: a finished hypothesis scores sum(log p) / length^length_penalty.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub(super) length_penalty: f64,
    /// Sample at this temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub(super) temperature: f32,
    /// Sampling: keep the k most likely tokens.
    #[arg(long)]
    pub(super) top_k: Option<usize>,
    /// Sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub(super) top_p: f32,
    /// Sampling seed: request i (without a seed of its own) draws from a generator seeded by
    /// (seed, i), whatever else shares the batch.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Stop when the new text contains TEXT (repeatable); the printed text ends before it,
    /// the ids keep the tokens that completed it. Needs the model folder's tokenizer.
    #[arg(long)]
    pub(super) stop: Vec<String>,
    /// Write the output to this file (atomically; an existing file is an error) instead of
    /// stdout.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Print {"ids", "text", "finish_reason"} instead of the text (single prompt).
    #[arg(long)]
    pub(super) json: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub(super) device: String,
}

impl GenerateArgs {
    /// The decoding mode the flags ask for, for request `index` with its own `seed`.
    fn decoding(&self, index: usize, seed: Option<u64>) -> Result<Decoding> {
        let sampling = self.temperature != 0.0;
        if !sampling && (self.top_k.is_some() || self.top_p != 1.0) {
            return Err(Error::index(
                "--top-k/--top-p",
                "sampling filters need --temperature > 0 (0 is greedy)",
            ));
        }
        if self.num_beams == 0 {
            return Err(Error::index("--num-beams", "0: expected at least 1"));
        }
        if self.num_beams > 1 {
            if sampling {
                return Err(Error::index(
                    "--num-beams",
                    "beam search is deterministic: drop --temperature/--top-k/--top-p",
                ));
            }
            return Ok(Decoding::Beam {
                num_beams: self.num_beams,
                length_penalty: self.length_penalty,
            });
        }
        if !sampling {
            return Ok(Decoding::Greedy);
        }
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: seed.unwrap_or_else(|| request_seed(self.seed, index as u64)),
        };
        p.check()?;
        Ok(Decoding::Sample(p))
    }
}

fn tokenize(tok: Option<&Tokenizer>, model: &Path, arg: &str, text: &str) -> Result<Vec<u32>> {
    let ids = tok
        .ok_or_else(|| Error::Format {
            path: model.join("tokenizer.json"),
            msg: format!("missing: {arg} text needs a tokenizer (tokenizer.json, or vocab.json + merges.txt; or give token ids)"),
        })?
        .encode(text)?;
    if ids.is_empty() {
        return Err(Error::index(arg, format!("{text:?} gives no tokens")));
    }
    Ok(ids)
}

/// Prints to stdout or writes `--out` atomically (never over an existing file).
fn emit(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(p) => {
            if p.exists() {
                return Err(Error::index(
                    "--out",
                    format!("{} exists; not overwriting it", p.display()),
                ));
            }
            prefix_attn::io::write_atomic(p, text.as_bytes())
        }
    }
}

/// Runs `generate`.
pub(super) fn run(args: GenerateArgs) -> Result<ExitCode> {
    let specs = adapter_specs(&args.adapter)?;
    let be = backend_for(&args.device)?;
    let single_greedy = args.data.is_none()
        && args.stop.is_empty()
        && specs.len() <= 1
        && matches!(args.decoding(0, None)?, Decoding::Greedy);
    if single_greedy {
        return single(&args, specs.first().map(|s| s.1.as_path()), be.as_ref());
    }
    let mut m = load(&args.model, None, be.as_ref())?;
    if !args.stop.is_empty() && m.tokenizer.is_none() {
        return Err(Error::Format {
            path: args.model.join("tokenizer.json"),
            msg: "missing: --stop needs a tokenizer (tokenizer.json, or vocab.json + merges.txt)"
                .into(),
        });
    }
    if args.stop.iter().any(|s| s.is_empty()) {
        return Err(Error::index("--stop", "an empty stop string"));
    }
    let mut prefixes: Vec<(String, Tensor)> = Vec::new();
    for (name, dir) in &specs {
        prefixes.push((
            name.clone(),
            PrefixAdapter::load_for(dir, m.model.as_ref(), be.as_ref())?,
        ));
    }
    let shared_tok = m.tokenizer.take().map(std::sync::Arc::new);
    let tok = shared_tok.as_deref();
    // The requests: one from --prompt/--input-ids, or the file's.
    let lines = match &args.data {
        Some(path) => parse_requests(path, &prefix_attn::io::read_text(path)?)?,
        None => {
            let prompt = match (&args.prompt, &args.input_ids) {
                (Some(t), _) => PromptSpec::Text(t.clone()),
                (None, Some(ids)) => PromptSpec::Ids(parse_ids(ids)?),
                (None, None) => {
                    return Err(Error::index(
                        "--prompt",
                        "give --prompt, --input-ids or --data",
                    ))
                }
            };
            vec![prefix_attn::engine::jsonl::RequestLine {
                index: 0,
                line: 0,
                prompt,
                adapter: AdapterChoice::Default,
                max_new_tokens: None,
                seed: None,
            }]
        }
    };
    let from = |l: &prefix_attn::engine::jsonl::RequestLine| match &args.data {
        Some(p) => format!("{}: line {}", p.display(), l.line),
        None => "--prompt".to_string(),
    };
    let mut reqs = Vec::with_capacity(lines.len());
    let mut names = Vec::with_capacity(lines.len());
    for l in &lines {
        let prompt = match &l.prompt {
            PromptSpec::Text(t) => tokenize(tok, &args.model, &from(l), t)?,
            PromptSpec::Ids(ids) => ids.clone(),
        };
        let adapter = match &l.adapter {
            AdapterChoice::Bare => None,
            AdapterChoice::Default => match prefixes.len() {
                0 => None,
                1 => Some(0),
                n => {
                    return Err(Error::index(
                        &from(l),
                        format!(
                            "{n} adapters given: say which one with \"adapter\" (or null for none)"
                        ),
                    ))
                }
            },
            AdapterChoice::Named(n) => Some(
                prefixes
                    .iter()
                    .position(|(name, _)| name == n)
                    .ok_or_else(|| {
                        Error::index(
                            &from(l),
                            format!(
                                "adapter {n:?} was not given (--adapter NAME=DIR; given: {:?})",
                                prefixes.iter().map(|p| &p.0).collect::<Vec<_>>()
                            ),
                        )
                    })?,
            ),
        };
        names.push(adapter.map(|a| prefixes[a].0.clone()));
        reqs.push(Request {
            prompt,
            adapter: adapter.map(|a| a as u32),
            max_new_tokens: l.max_new_tokens.unwrap_or(args.max_new_tokens),
            stop_ids: m.eos.into_iter().collect(),
            decoding: args.decoding(l.index, l.seed)?,
        });
    }
    // The prefix table is as long as the longest adapter; shorter ones are masked.
    let p = prefixes.iter().map(|(_, t)| t.dims()[0]).max().unwrap_or(1);
    let cfg = SchedulerConfig::for_requests(&reqs, PAGE_SIZE, 0);
    let mut step = ModelStep::new(
        m.model.as_ref(),
        be.as_ref(),
        cfg.num_pages,
        PAGE_SIZE,
        prefixes.len().max(1),
        p,
    )?;
    if let Some(why) = &step.packing().skipped {
        eprintln!("prefix-attn generate: weights not packed ({why}); decoding runs slower");
    }
    for (name, t) in &prefixes {
        step.add_adapter(name, t)?;
    }
    // Stop strings: each request's new text, decoded after every token.
    let stops: Vec<Option<StopFn>> = (0..reqs.len())
        .map(|_| shared_tok.as_ref().and_then(|t| stop_fn(t, &args.stop)))
        .collect();
    let done: Vec<Completion> = run_batch(&mut step, reqs, stops, cfg)?;
    let mut text = String::new();
    for ((l, c), name) in lines.iter().zip(&done).zip(&names) {
        let t = completion_text(tok, &c.ids, m.eos, &args.stop)?;
        let row = if args.data.is_some() {
            serde_json::json!({
                "index": l.index, "adapter": name, "ids": c.ids, "text": t,
                "finish_reason": c.finish.as_str(),
            })
        } else if args.json {
            serde_json::json!({ "ids": c.ids, "text": t, "finish_reason": c.finish.as_str() })
        } else {
            text.push_str(&match t {
                Some(t) => t,
                None => ids_text(&c.ids),
            });
            text.push('\n');
            continue;
        };
        text.push_str(&row.to_string());
        text.push('\n');
    }
    emit(args.out.as_deref(), &text)?;
    Ok(ExitCode::SUCCESS)
}

fn ids_text(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One prompt, greedy: the contiguous-cache decoder, as before the engine.
fn single(args: &GenerateArgs, adapter: Option<&Path>, be: &dyn Backend) -> Result<ExitCode> {
    let m = load(&args.model, adapter, be)?;
    let g = m.model.geometry();
    let ids = match (&args.prompt, &args.input_ids) {
        (Some(text), _) => tokenize(m.tokenizer.as_ref(), &args.model, "--prompt", text)?,
        (None, Some(ids)) => parse_ids(ids)?,
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
        be,
        m.prefix.as_ref(),
        &ids,
        args.max_new_tokens,
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
    let eos = (g.finish == Finish::Eos).then_some(m.eos).flatten();
    let text = completion_text(m.tokenizer.as_ref(), &g.ids, eos, &[])?;
    let out = if args.json {
        serde_json::json!({ "ids": g.ids, "text": text, "finish_reason": g.finish.as_str() })
            .to_string()
    } else {
        let shown = if g.finish == Finish::Eos && !g.ids.is_empty() {
            &g.ids[..g.ids.len() - 1]
        } else {
            &g.ids[..]
        };
        text.unwrap_or_else(|| ids_text(shown))
    };
    emit(args.out.as_deref(), &format!("{out}\n"))?;
    Ok(ExitCode::SUCCESS)
}
