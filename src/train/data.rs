//! JSONL data: one example per line, either token ids
//! `{"input_ids": [...], "labels": [...]}` (labels optional, default = input_ids, `-100`
//! ignored) or text `{"prompt": "...", "completion": "..."}`: prompt and completion are
//! tokenized separately, concatenated, and the EOS id appended; labels are `-100` on the
//! prompt (DESIGN.md §2).

use crate::error::{Error, Result};
use crate::gpt2::model::{Batch, IGNORE};
use crate::gpt2::tokenizer::Tokenizer;
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

/// What the data must fit.
#[derive(Clone, Copy, Debug)]
pub struct DataLimits {
    /// Vocabulary size: every id and label must be below it.
    pub vocab_size: usize,
    /// Longest allowed example (`n_positions - P`).
    pub max_len: usize,
}

/// Reads a JSONL file; `tokenizer` and `eos` are needed for prompt/completion lines.
pub fn load_jsonl(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    eos: Option<u32>,
    limits: DataLimits,
) -> Result<Vec<Example>> {
    let text = crate::io::read_text(path)?;
    let mut out = vec![];
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
        let ex = parse_example(&v, tokenizer, eos).map_err(err)?;
        if ex.input_ids.is_empty() {
            return Err(err("the example has no tokens".into()));
        }
        if ex.input_ids.len() > limits.max_len {
            return Err(err(format!(
                "{} tokens, but at most {} fit (n_positions minus the prefix length)",
                ex.input_ids.len(),
                limits.max_len
            )));
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
    Ok(out)
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
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(p), Some(c)) => {
            let (p, c) = (
                p.as_str().ok_or("\"prompt\" must be a string")?,
                c.as_str().ok_or("\"completion\" must be a string")?,
            );
            let tok = tokenizer
                .ok_or("a prompt/completion example needs a tokenizer.json in the model folder")?;
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
        _ => Err(
            "expected \"input_ids\" (and optional \"labels\") or \"prompt\" and \"completion\""
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
