//! Batch-generation request files: JSON Lines, one request a line.
//!
//! ```text
//! {"prompt": "name : The Eagle |"}
//! {"input_ids": [15, 27, 9], "adapter": "e2e", "max_new_tokens": 20, "seed": 7}
//! {"prompt": "plain model", "adapter": null}
//! ```
//! `prompt` (text) or `input_ids` (exactly one); `adapter`: a name, `null` for the bare model,
//! absent for the only adapter given; optional `max_new_tokens` and `seed`. Other fields are
//! errors (a misspelt field would otherwise be ignored silently). Blank lines are skipped; the
//! request index counts requests, not lines.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A request's prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptSpec {
    /// Text, to be tokenized.
    Text(String),
    /// Token ids as they are.
    Ids(Vec<u32>),
}

/// Which adapter a request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The field was absent: the only adapter given (or none if none was given).
    Default,
    /// `null`: the bare model.
    Bare,
    /// An adapter by name.
    Named(String),
}

/// One parsed request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLine {
    /// Request number (0-based, blank lines not counted).
    pub index: usize,
    /// Line number in the file (1-based), for messages.
    pub line: usize,
    /// The prompt.
    pub prompt: PromptSpec,
    /// The adapter.
    pub adapter: AdapterChoice,
    /// Per-request `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
    /// Per-request seed.
    pub seed: Option<u64>,
}

const FIELDS: [&str; 5] = ["prompt", "input_ids", "adapter", "max_new_tokens", "seed"];

/// Parses a request file's text (`path` names it in errors).
pub fn parse_requests(path: &Path, text: &str) -> Result<Vec<RequestLine>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let err = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg: format!("line {line}: {msg}"),
        };
        let v: Value = serde_json::from_str(raw).map_err(|e| err(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(err(format!(
                "unknown field {k:?} (expected {})",
                FIELDS.join(", ")
            )));
        }
        let prompt = match (obj.get("prompt"), obj.get("input_ids")) {
            (Some(_), Some(_)) => {
                return Err(err("give \"prompt\" or \"input_ids\", not both".into()))
            }
            (Some(Value::String(s)), None) if !s.is_empty() => PromptSpec::Text(s.clone()),
            (Some(_), None) => return Err(err("\"prompt\" must be a non-empty string".into())),
            (None, Some(Value::Array(a))) if !a.is_empty() => {
                let ids = a
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .filter(|&n| n <= u32::MAX as u64)
                            .map(|n| n as u32)
                    })
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(
                        || err("\"input_ids\" must hold token ids (integers ≥ 0)".into()),
                    )?;
                PromptSpec::Ids(ids)
            }
            (None, Some(_)) => {
                return Err(err(
                    "\"input_ids\" must be a non-empty list of token ids".into()
                ))
            }
            (None, None) => return Err(err("needs \"prompt\" (text) or \"input_ids\"".into())),
        };
        let adapter = match obj.get("adapter") {
            None => AdapterChoice::Default,
            Some(Value::Null) => AdapterChoice::Bare,
            Some(Value::String(s)) if !s.is_empty() => AdapterChoice::Named(s.clone()),
            Some(_) => {
                return Err(err(
                    "\"adapter\" must be an adapter name or null (the bare model)".into(),
                ))
            }
        };
        let uint = |k: &str| -> Result<Option<u64>> {
            match obj.get(k) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| err(format!("{k:?} must be an integer ≥ 0"))),
            }
        };
        out.push(RequestLine {
            index: out.len(),
            line,
            prompt,
            adapter,
            max_new_tokens: uint("max_new_tokens")?.map(|n| n as usize),
            seed: uint("seed")?,
        });
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "no requests (one JSON object a line)".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let text = "{\"prompt\": \"hi\"}\n\n{\"input_ids\": [1, 2], \"adapter\": \"a\", \
                    \"max_new_tokens\": 5, \"seed\": 9}\n{\"prompt\": \"x\", \"adapter\": null}\n";
        let r = parse_requests(Path::new("r.jsonl"), text).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].prompt, PromptSpec::Text("hi".into()));
        assert_eq!(r[0].adapter, AdapterChoice::Default);
        assert_eq!(
            (r[1].index, r[1].line, &r[1].prompt, &r[1].adapter),
            (
                1,
                3,
                &PromptSpec::Ids(vec![1, 2]),
                &AdapterChoice::Named("a".into())
            )
        );
        assert_eq!((r[1].max_new_tokens, r[1].seed), (Some(5), Some(9)));
        assert_eq!(r[2].adapter, AdapterChoice::Bare);
    }

    #[test]
    fn bad_lines_name_the_line_and_field() {
        let cases = [
            ("{\"prompt\": \"a\"}\nnope", "line 2: not JSON"),
            ("[1]", "expected a JSON object"),
            ("{\"promt\": \"a\"}", "unknown field \"promt\""),
            ("{\"prompt\": \"a\", \"input_ids\": [1]}", "not both"),
            ("{\"prompt\": 3}", "non-empty string"),
            ("{\"input_ids\": [1, -2]}", "token ids"),
            ("{\"input_ids\": []}", "non-empty list"),
            ("{}", "needs \"prompt\""),
            (
                "{\"prompt\": \"a\", \"adapter\": 1}",
                "adapter name or null",
            ),
            (
                "{\"prompt\": \"a\", \"seed\": -1}",
                "\"seed\" must be an integer",
            ),
            (
                "{\"prompt\": \"a\", \"max_new_tokens\": 1.5}",
                "\"max_new_tokens\"",
            ),
            ("\n\n", "no requests"),
        ];
        for (text, want) in cases {
            let e = parse_requests(Path::new("req.jsonl"), text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("req.jsonl: ") && e.contains(want),
                "{e} (wanted {want})"
            );
        }
    }
}
