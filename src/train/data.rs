//! JSONL data: one example per line, one of
//!
//! - token ids `{"input_ids": [...], "labels": [...]}` (labels optional, default =
//!   input_ids, `-100` ignored);
//! - `{"prompt": "...", "completion": "..."}`: prompt and completion are tokenized
//!   separately, concatenated, and the EOS id appended; labels are `-100` on the prompt
//!   (docs/ARCHITECTURE.md §2);
//! - `{"text": "..."}`: tokenized, the EOS id appended, every token counted.
//!
//! Examples longer than the limit are an error unless a [`Truncation`] is chosen.

use crate::error::{Error, Result};
use crate::lm::{Batch, Geometry, IGNORE};
use crate::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::Path;

/// One training or evaluation example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (`-100`: not counted).
    pub labels: Vec<i32>,
}

/// What to do with an example longer than [`DataLimits::max_len`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    /// It is an error (the default: nothing is dropped silently).
    #[default]
    Error,
    /// Drop tokens from the start: of the prompt while it has any (the tokens labelled
    /// `-100` at the start of the example), else of the whole example.
    Left,
    /// Drop tokens from the end: of the prompt while it has any, else of the whole example.
    Right,
}

impl std::str::FromStr for Truncation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Truncation> {
        match s {
            "left" => Ok(Truncation::Left),
            "right" => Ok(Truncation::Right),
            _ => Err(Error::index(
                "--truncate",
                format!("{s:?}: expected left or right"),
            )),
        }
    }
}

/// What the data must fit.
#[derive(Clone, Copy, Debug)]
pub struct DataLimits {
    /// Vocabulary size: every id and label must be below it.
    pub vocab_size: usize,
    /// Longest allowed example (at most `n_positions - P`).
    pub max_len: usize,
    /// What to do with longer examples.
    pub truncation: Truncation,
}

impl DataLimits {
    /// Limits with longer examples an error.
    pub fn new(vocab_size: usize, max_len: usize) -> DataLimits {
        DataLimits {
            vocab_size,
            max_len,
            truncation: Truncation::Error,
        }
    }

    /// The limits of a model of `geometry` behind a prefix of `prefix_len` (below its
    /// positions): examples of at most `max_length` tokens (default: every position after
    /// the prefix; more is an error naming `--max-length`), longer ones treated by
    /// `truncation`.
    pub fn for_model(
        geometry: &Geometry,
        prefix_len: usize,
        max_length: Option<usize>,
        truncation: Truncation,
    ) -> Result<DataLimits> {
        let room = geometry.max_positions.saturating_sub(prefix_len);
        let max_len = match max_length {
            Some(m) if m > room => {
                return Err(Error::index(
                    "--max-length",
                    format!(
                        "{m}, but only {room} tokens fit after a prefix of {prefix_len} (n_positions = {})",
                        geometry.max_positions
                    ),
                ))
            }
            Some(m) => m,
            None => room,
        };
        Ok(DataLimits {
            vocab_size: geometry.vocab_size,
            max_len,
            truncation,
        })
    }
}

/// What loading did to the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Examples read.
    pub examples: usize,
    /// Examples that were truncated.
    pub truncated: usize,
    /// Tokens dropped by truncation, in all.
    pub tokens_dropped: usize,
}

/// Shortens `ex` to `max_len` tokens: the prompt (the leading tokens labelled `-100`) loses
/// tokens first, from the side `how` names; once it is gone, the rest of the excess is cut
/// from the end of the example (so a completion keeps its beginning). An example without a
/// prompt is cut from the side `how` names.
pub fn truncate(ex: &mut Example, max_len: usize, how: Truncation) {
    let n = ex.input_ids.len();
    if n <= max_len || how == Truncation::Error {
        return;
    }
    let excess = n - max_len;
    let prompt = ex.labels.iter().take_while(|&&l| l == IGNORE).count();
    let cut = |ex: &mut Example, range: std::ops::Range<usize>| {
        ex.input_ids.drain(range.clone());
        ex.labels.drain(range);
    };
    if prompt == 0 || prompt == n {
        match how {
            Truncation::Left => cut(ex, 0..excess),
            _ => cut(ex, max_len..n),
        }
        return;
    }
    let from_prompt = excess.min(prompt);
    match how {
        Truncation::Left => cut(ex, 0..from_prompt),
        _ => cut(ex, prompt - from_prompt..prompt),
    }
    let rest = excess - from_prompt;
    let len = ex.input_ids.len();
    cut(ex, len - rest..len);
}

/// Reads a JSONL file; `tokenizer` and `eos` are needed for text lines.
pub fn load_jsonl(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    eos: Option<u32>,
    limits: DataLimits,
) -> Result<Vec<Example>> {
    load_jsonl_stats(path, tokenizer, eos, limits).map(|(ex, _)| ex)
}

/// [`load_jsonl`], also saying how many examples were truncated.
pub fn load_jsonl_stats(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    eos: Option<u32>,
    limits: DataLimits,
) -> Result<(Vec<Example>, DataStats)> {
    let text = crate::io::read_text(path)?;
    let mut out = vec![];
    let mut stats = DataStats::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg: format!("line {n}: {msg}"),
        };
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let mut ex = parse_example(&v, tokenizer, eos).map_err(err)?;
        if ex.input_ids.is_empty() {
            return Err(err("the example has no tokens".into()));
        }
        if ex.input_ids.len() > limits.max_len {
            if limits.truncation == Truncation::Error {
                return Err(err(format!(
                    "{} tokens, but at most {} fit (n_positions minus the prefix length); \
                     --max-length N or --truncate left|right shortens long examples instead",
                    ex.input_ids.len(),
                    limits.max_len
                )));
            }
            stats.truncated += 1;
            stats.tokens_dropped += ex.input_ids.len() - limits.max_len;
            truncate(&mut ex, limits.max_len, limits.truncation);
        }
        if let Some(id) = ex
            .input_ids
            .iter()
            .find(|&&id| id as usize >= limits.vocab_size)
        {
            return Err(err(format!(
                "token id {id} is outside the vocabulary 0..{}",
                limits.vocab_size
            )));
        }
        if let Some(l) = ex
            .labels
            .iter()
            .find(|&&l| l != IGNORE && (l < 0 || l as usize >= limits.vocab_size))
        {
            return Err(err(format!(
                "label {l} is neither -100 nor in the vocabulary 0..{}",
                limits.vocab_size
            )));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "no examples (the file is empty)".into(),
        });
    }
    stats.examples = out.len();
    Ok((out, stats))
}

fn parse_example(
    v: &Value,
    tokenizer: Option<&Tokenizer>,
    eos: Option<u32>,
) -> Result<Example, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    if let Some(ids) = obj.get("input_ids") {
        let input_ids: Vec<u32> = ids
            .as_array()
            .ok_or("\"input_ids\" must be an array of token ids")?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or("\"input_ids\" must hold non-negative integers")?;
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => input_ids.iter().map(|&x| x as i32).collect(),
            Some(l) => {
                let labels: Vec<i32> = l
                    .as_array()
                    .ok_or("\"labels\" must be an array")?
                    .iter()
                    .map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok()))
                    .collect::<Option<_>>()
                    .ok_or("\"labels\" must hold integers")?;
                if labels.len() != input_ids.len() {
                    return Err(format!(
                        "{} labels for {} input_ids (they must align)",
                        labels.len(),
                        input_ids.len()
                    ));
                }
                labels
            }
        };
        return Ok(Example { input_ids, labels });
    }
    if let Some(t) = obj.get("text") {
        if obj.contains_key("prompt") || obj.contains_key("completion") {
            return Err("give \"text\" or \"prompt\" and \"completion\", not both".into());
        }
        let t = t.as_str().ok_or("\"text\" must be a string")?;
        let tok =
            tokenizer.ok_or("a text example needs a tokenizer (tokenizer.json, or vocab.json + merges.txt, in the model folder)")?;
        let eos = eos.ok_or("no EOS id: neither config.json nor the tokenizer names one")?;
        let mut input_ids = tok.encode(t).map_err(|e| e.to_string())?;
        input_ids.push(eos);
        let labels = input_ids.iter().map(|&x| x as i32).collect();
        return Ok(Example { input_ids, labels });
    }
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(p), Some(c)) => {
            let (p, c) = (
                p.as_str().ok_or("\"prompt\" must be a string")?,
                c.as_str().ok_or("\"completion\" must be a string")?,
            );
            let tok = tokenizer.ok_or(
                "a prompt/completion example needs a tokenizer (tokenizer.json, or vocab.json + merges.txt, in the model folder)",
            )?;
            let eos = eos.ok_or("no EOS id: neither config.json nor the tokenizer names one")?;
            let pi = tok.encode(p).map_err(|e| e.to_string())?;
            let ci = tok.encode(c).map_err(|e| e.to_string())?;
            let mut input_ids = pi.clone();
            input_ids.extend(&ci);
            input_ids.push(eos);
            let mut labels = vec![IGNORE; pi.len()];
            labels.extend(ci.iter().map(|&x| x as i32));
            labels.push(eos as i32);
            Ok(Example { input_ids, labels })
        }
        (Some(_), None) => Err("\"prompt\" without \"completion\"".into()),
        (None, Some(_)) => Err("\"completion\" without \"prompt\"".into()),
        _ => Err(
            "expected \"input_ids\" (and optional \"labels\"), \"text\", or \"prompt\" and \"completion\""
                .into(),
        ),
    }
}

/// Builds a right-padded batch from examples.
pub fn batch_of(examples: &[&Example]) -> Result<Batch> {
    let pairs: Vec<(&[u32], &[i32])> = examples
        .iter()
        .map(|e| (e.input_ids.as_slice(), e.labels.as_slice()))
        .collect();
    Batch::new(&pairs)
}
