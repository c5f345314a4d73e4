//! The OpenAI wire format of `POST /v1/completions`: the request read field by field (so an
//! error names the field and what it expected), the error object, and the response bodies.

use crate::engine::sampling::request_seed;
use crate::engine::{Decoding, SamplingParams};
use serde_json::{json, Map, Value};

/// An error answer: HTTP status and OpenAI's error object
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }
    /// 400 about field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(400, "invalid_request_error", message)
        }
    }
    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }
    /// 404: no such model (base or adapter).
    pub fn model_not_found(name: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                404,
                "invalid_request_error",
                format!("The model `{name}` does not exist."),
            )
        }
    }
    /// 404 of another kind.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "invalid_request_error", message)
    }
    /// 401: no or a wrong API key.
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                401,
                "authentication_error",
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            )
        }
    }
    /// 429: full; retry after a second.
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
            ..ApiError::new(429, "rate_limit_error", message)
        }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, "invalid_request_error", message)
    }
    /// 503: shutting down.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(503, "server_error", message)
        }
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "server_error", message)
    }
    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// One prompt as sent.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptIn {
    /// Text, tokenized by the server.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// A parsed `POST /v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// The base model's served name or an adapter name.
    pub model: String,
    /// One or more prompts.
    pub prompts: Vec<PromptIn>,
    /// New tokens per choice (default 16).
    pub max_tokens: usize,
    /// Sampling temperature as given (`None`: OpenAI's default, 1).
    pub temperature: Option<f32>,
    /// Nucleus mass as given (`None`: 1).
    pub top_p: Option<f32>,
    /// Top-k as given (`None`, 0 or -1: off).
    pub top_k: Option<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with the usage.
    pub include_usage: bool,
    /// Beam search with this many beams (1: off).
    pub num_beams: usize,
    /// Beam search's length penalty.
    pub length_penalty: f64,
    /// Extension (as vLLM): the choices carry `token_ids` and `prompt_token_ids`.
    pub return_token_ids: bool,
}

/// The JSON type of a value, for messages.
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of a JSON object body, each read at most once.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The body's object, or a 400 naming what it is instead.
    pub fn of(body: &[u8], allowed: &[&str]) -> Result<(Value, Vec<String>), ApiError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(obj) = &v else {
            return Err(ApiError::bad_request(format!(
                "the body must be a JSON object, not {}",
                type_of(&v)
            )));
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::invalid(k, format!("unknown field `{k}`")));
        }
        let keys = obj.keys().cloned().collect();
        Ok((v, keys))
    }

    /// Fields of `v` (an object).
    pub fn new(v: &'a Value) -> Fields<'a> {
        Fields {
            obj: v.as_object().expect("checked to be an object"),
        }
    }

    /// The value of `name`, `None` when absent or null.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    /// A string field.
    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a string, not {}", type_of(v)),
            )),
        }
    }

    /// A required string field.
    pub fn required_string(&self, name: &str) -> Result<&'a str, ApiError> {
        self.string(name)?
            .ok_or_else(|| ApiError::invalid(name, format!("`{name}` is required")))
    }

    /// A boolean field.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a boolean, not {}", type_of(v)),
            )),
        }
    }

    /// An integer field in `lo..=hi`.
    pub fn integer(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let i = v.as_i64().or_else(|| {
            // 3.0 is an integer too; 3.5 is not.
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        });
        match i {
            Some(i) if (lo..=hi).contains(&i) => Ok(Some(i)),
            Some(i) => Err(ApiError::invalid(
                name,
                format!("`{name}` = {i} is out of range: expected {lo}..={hi}"),
            )),
            None => Err(ApiError::invalid(
                name,
                format!("`{name}` must be an integer, not {}", describe(v)),
            )),
        }
    }

    /// A finite number field in `lo..=hi`.
    pub fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(
                name,
                format!("`{name}` = {x} is out of range: expected {lo}..={hi}"),
            )),
            None => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a number, not {}", describe(v)),
            )),
        }
    }
}

/// A value for a message: its type, and itself when short.
fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 40 {
        format!("{} ({s})", type_of(v))
    } else {
        type_of(v).to_string()
    }
}

/// Every field `POST /v1/completions` takes.
const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "top_k",
    "num_beams",
    "length_penalty",
    "return_token_ids",
    "user",
    "echo",
    "logprobs",
    "best_of",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
];

fn token_ids(v: &[Value], what: &str) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&t| t <= u32::MAX as u64)
                .map(|t| t as u32)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        format!(
                            "{what}: {} is not a token id (a non-negative integer)",
                            describe(x)
                        ),
                    )
                })
        })
        .collect()
}

fn prompts(v: Option<&Value>) -> Result<Vec<PromptIn>, ApiError> {
    let shape = "`prompt` must be a string, a list of token ids, or a list of strings or of \
                 token-id lists";
    let Some(v) = v else {
        return Err(ApiError::invalid("prompt", "`prompt` is required"));
    };
    match v {
        Value::String(s) => Ok(vec![PromptIn::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid("prompt", "`prompt` is an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Ok(vec![PromptIn::Ids(token_ids(items, "prompt")?)])
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| match it {
                Value::String(s) => Ok(PromptIn::Text(s.clone())),
                Value::Array(ids) => Ok(PromptIn::Ids(token_ids(ids, &format!("prompt[{i}]"))?)),
                other => Err(ApiError::invalid(
                    "prompt",
                    format!("prompt[{i}] is {}: {shape}", type_of(other)),
                )),
            })
            .collect(),
        other => Err(ApiError::invalid(
            "prompt",
            format!("`prompt` is {}: {shape}", type_of(other)),
        )),
    }
}

fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match v {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(
                        "stop",
                        format!("`stop` entries must be strings, not {}", type_of(x)),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings, not {}",
                    type_of(other)
                ),
            ))
        }
    };
    if list.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` has {} strings: at most 4", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` holds an empty string"));
    }
    Ok(list)
}

/// Reads a `POST /v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let (v, _) = Fields::of(body, COMPLETION_FIELDS)?;
    let f = Fields::new(&v);
    let model = f.required_string("model")?.to_string();
    let prompts = prompts(f.get("prompt"))?;
    // What this server does not do is refused, never silently ignored.
    if f.boolean("echo")? == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if f.get("logprobs").is_some() {
        return Err(ApiError::invalid("logprobs", "`logprobs` is not supported"));
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    for p in ["presence_penalty", "frequency_penalty"] {
        if f.number(p, -2.0, 2.0)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::invalid(
                p,
                format!("`{p}` is not supported (only 0)"),
            ));
        }
    }
    match f.get("logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "`logit_bias` is not supported",
            ))
        }
    }
    f.string("user")?;
    let n = f.integer("n", 1, 128)?.unwrap_or(1) as usize;
    if let Some(b) = f.integer("best_of", 1, 128)? {
        if b as usize != n {
            return Err(ApiError::invalid(
                "best_of",
                format!("`best_of` = {b} is not supported (only best_of = n = {n})"),
            ));
        }
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(o @ Value::Object(_)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "`stream_options` needs `stream: true`",
                ));
            }
            if let Some(k) = o
                .as_object()
                .and_then(|m| m.keys().find(|k| *k != "include_usage"))
            {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("unknown field `stream_options.{k}`"),
                ));
            }
            Fields::new(o).boolean("include_usage")?.unwrap_or(false)
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, not {}", type_of(other)),
            ))
        }
    };
    let top_k = match f.integer("top_k", -1, u32::MAX as i64)? {
        None | Some(-1) | Some(0) => None,
        Some(k) => Some(k as usize),
    };
    Ok(CompletionRequest {
        model,
        prompts,
        max_tokens: f.integer("max_tokens", 0, u32::MAX as i64)?.unwrap_or(16) as usize,
        temperature: f.number("temperature", 0.0, 100.0)?.map(|t| t as f32),
        top_p: f.number("top_p", 0.0, 1.0)?.map(|t| t as f32),
        top_k,
        n,
        stop: stops(f.get("stop"))?,
        // Any integer: negative seeds wrap, as two's complement.
        seed: f.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        stream,
        include_usage,
        num_beams: f.integer("num_beams", 1, 64)?.unwrap_or(1) as usize,
        length_penalty: f.number("length_penalty", -1e6, 1e6)?.unwrap_or(1.0),
        return_token_ids: f.boolean("return_token_ids")?.unwrap_or(false),
    })
}

impl CompletionRequest {
    /// Choices in all: prompts × `n`.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }

    /// Sequences the choices occupy at once (beams count one each).
    pub fn sequences(&self) -> usize {
        self.choices() * self.num_beams
    }

    /// The decoding of every choice, in choice order (`prompt index · n + j`). Sampled choice
    /// `c` draws from a generator seeded by (`seed`, `c`), as `generate --seed` seeds request
    /// `c` of a `--data` file; without a seed, `base_seed` (random) takes its place.
    pub fn decodings(&self, base_seed: u64) -> Result<Vec<Decoding>, ApiError> {
        let k = self.choices();
        if self.num_beams > 1 {
            if self.n > 1 {
                return Err(ApiError::invalid(
                    "n",
                    "`n` > 1 with `num_beams` is not supported: beam search returns its best \
                     hypothesis",
                ));
            }
            if self.temperature.is_some_and(|t| t > 0.0) {
                return Err(ApiError::invalid(
                    "temperature",
                    "beam search is deterministic: leave `temperature` out or set it to 0",
                ));
            }
            if self.top_p.is_some_and(|p| p != 1.0) || self.top_k.is_some() {
                return Err(ApiError::invalid(
                    if self.top_k.is_some() {
                        "top_k"
                    } else {
                        "top_p"
                    },
                    "beam search does not sample: leave `top_p` and `top_k` out",
                ));
            }
            return Ok(vec![
                Decoding::Beam {
                    num_beams: self.num_beams,
                    length_penalty: self.length_penalty,
                };
                k
            ]);
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if temperature == 0.0 {
            return Ok(vec![Decoding::Greedy; k]);
        }
        let seed = self.seed.unwrap_or(base_seed);
        (0..k)
            .map(|c| {
                let p = SamplingParams {
                    temperature,
                    top_k: self.top_k,
                    top_p: self.top_p.unwrap_or(1.0),
                    seed: request_seed(seed, c as u64),
                };
                p.check().map_err(|e| match e {
                    crate::Error::Index { arg, msg } => {
                        ApiError::invalid(&arg, format!("`{arg}` = {msg}"))
                    }
                    e => ApiError::bad_request(e.to_string()),
                })?;
                Ok(Decoding::Sample(p))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<CompletionRequest, ApiError> {
        parse_completion(s.as_bytes())
    }

    #[test]
    fn defaults_are_openais() {
        let r = parse(r#"{"model": "m", "prompt": "hi"}"#).unwrap();
        assert_eq!(r.max_tokens, 16);
        assert_eq!(r.n, 1);
        assert_eq!(r.prompts, [PromptIn::Text("hi".into())]);
        assert!(!r.stream);
        // temperature 1 by default: sampling.
        assert!(matches!(r.decodings(7).unwrap()[0], Decoding::Sample(p) if p.temperature == 1.0));
        let r = parse(r#"{"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": null}"#)
            .unwrap();
        assert_eq!(r.decodings(7).unwrap(), [Decoding::Greedy]);
        assert_eq!(r.max_tokens, 16);
    }

    #[test]
    fn every_prompt_form_is_read() {
        let r = parse(r#"{"model": "m", "prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(r.prompts, [PromptIn::Ids(vec![1, 2, 3])]);
        let r = parse(r#"{"model": "m", "prompt": ["a", "b"], "n": 2}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(r.choices(), 4);
        let r = parse(r#"{"model": "m", "prompt": [[1], [2, 3]]}"#).unwrap();
        assert_eq!(
            r.prompts,
            [PromptIn::Ids(vec![1]), PromptIn::Ids(vec![2, 3])]
        );
        for bad in [
            r#"{"model": "m", "prompt": []}"#,
            r#"{"model": "m", "prompt": [1, -2]}"#,
            r#"{"model": "m", "prompt": [1.5]}"#,
            r#"{"model": "m", "prompt": [{"a": 1}]}"#,
            r#"{"model": "m", "prompt": 5}"#,
            r#"{"model": "m"}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some("prompt")),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_wrong_field_is_named() {
        for (body, param) in [
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": "10"}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": -1}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "prompt": "x", "temperature": "hot"}"#,
                "temperature",
            ),
            (r#"{"model": "m", "prompt": "x", "top_p": 1.5}"#, "top_p"),
            (r#"{"model": "m", "prompt": "x", "n": 0}"#, "n"),
            (
                r#"{"model": "m", "prompt": "x", "stream": "yes"}"#,
                "stream",
            ),
            (r#"{"model": "m", "prompt": "x", "stop": 3}"#, "stop"),
            (
                r#"{"model": "m", "prompt": "x", "stop": ["a", ""]}"#,
                "stop",
            ),
            (r#"{"model": "m", "prompt": "x", "seed": 1.5}"#, "seed"),
            (r#"{"model": "m", "prompt": "x", "echo": true}"#, "echo"),
            (
                r#"{"model": "m", "prompt": "x", "logprobs": 2}"#,
                "logprobs",
            ),
            (r#"{"model": "m", "prompt": "x", "best_of": 3}"#, "best_of"),
            (r#"{"model": "m", "prompt": "x", "bogus": 1}"#, "bogus"),
            (r#"{"model": 3, "prompt": "x"}"#, "model"),
            (
                r#"{"model": "m", "prompt": "x", "stream_options": {"include_usage": true}}"#,
                "stream_options",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.contains(param), "{body}: {}", e.message);
        }
        for bad in ["{", "[1]", "\"x\"", ""] {
            let e = parse(bad).unwrap_err();
            assert_eq!((e.status, e.param), (400, None), "{bad}");
        }
    }

    #[test]
    fn seeds_follow_the_choice_index_and_beams_refuse_sampling() {
        let r = parse(r#"{"model": "m", "prompt": "x", "n": 3, "seed": 5, "temperature": 0.7}"#)
            .unwrap();
        let d = r.decodings(99).unwrap();
        for (c, d) in d.iter().enumerate() {
            let Decoding::Sample(p) = d else { panic!() };
            assert_eq!(p.seed, request_seed(5, c as u64));
        }
        let r = parse(r#"{"model": "m", "prompt": "x", "num_beams": 3}"#).unwrap();
        assert!(matches!(
            r.decodings(0).unwrap()[0],
            Decoding::Beam { num_beams: 3, .. }
        ));
        let r =
            parse(r#"{"model": "m", "prompt": "x", "num_beams": 3, "temperature": 0.5}"#).unwrap();
        assert_eq!(
            r.decodings(0).unwrap_err().param.as_deref(),
            Some("temperature")
        );
        let r = parse(r#"{"model": "m", "prompt": "x", "num_beams": 2, "n": 2}"#).unwrap();
        assert_eq!(r.decodings(0).unwrap_err().param.as_deref(), Some("n"));
    }
}
