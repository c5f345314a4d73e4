//! `config.json` of the Llama family (model types `llama`, `qwen2`, `mistral`) as Hugging
//! Face transformers writes it, with every option this implementation does not compute
//! refused by name.

use crate::error::{Error, Result};
use crate::lm::Geometry;
use serde_json::{Map, Value};
use std::path::Path;

/// The model types of the family.
pub const LLAMA_MODEL_TYPES: [&str; 3] = ["llama", "qwen2", "mistral"];

/// The configuration fields the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `model_type`: one of [`LLAMA_MODEL_TYPES`].
    pub model_type: &'static str,
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `C` (`hidden_size`).
    pub hidden_size: usize,
    /// MLP width `F` (`intermediate_size`).
    pub intermediate_size: usize,
    /// Layers `L`.
    pub num_hidden_layers: usize,
    /// Query heads `Hq`.
    pub num_attention_heads: usize,
    /// Key/value heads `Hkv` (`Hq` is a multiple of it).
    pub num_key_value_heads: usize,
    /// Head dimension `D` (`head_dim`, or `C / Hq` when the config has none).
    pub head_dim: usize,
    /// Positions the model takes, the prefix included.
    pub max_position_embeddings: usize,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base `θ`.
    pub rope_theta: f64,
    /// Biases on the q, k and v projections (Qwen2 always; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// The LM head is the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// End-of-sequence token, if the config names one (the first of a list).
    pub eos_token_id: Option<u32>,
}

/// A config field: `None` when absent or null.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

impl LlamaConfig {
    /// Parses a `config.json` text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<LlamaConfig> {
        let fmt = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| fmt(format!("not a config.json: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| fmt("not a JSON object".into()))?;
        let model_type = match field(obj, "model_type").and_then(Value::as_str) {
            Some(t) => LLAMA_MODEL_TYPES
                .iter()
                .copied()
                .find(|k| *k == t)
                .ok_or_else(|| {
                    fmt(format!(
                        "model_type {t:?} is not of the Llama family {LLAMA_MODEL_TYPES:?}"
                    ))
                })?,
            None => {
                return Err(fmt(
                    "no model_type (expected llama, qwen2 or mistral)".into()
                ))
            }
        };
        let usize_field = |name: &str, default: Option<usize>| -> Result<usize> {
            match field(obj, name) {
                None => default.ok_or_else(|| fmt(format!("{model_type} config: missing {name}"))),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| fmt(format!("{name} = {v}, expected a positive integer"))),
            }
        };
        let f64_field = |name: &str, default: f64| -> Result<f64> {
            match field(obj, name) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| fmt(format!("{name} = {v}, expected a positive number"))),
            }
        };
        let bool_field = |name: &str, default: bool| -> Result<bool> {
            match field(obj, name) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| fmt(format!("{name} = {v}, expected true or false"))),
            }
        };
        let unsupported =
            |what: String| fmt(format!("{what} is not supported by this implementation"));

        let hidden_size = usize_field("hidden_size", None)?;
        let heads = usize_field("num_attention_heads", None)?;
        let kv_heads = usize_field("num_key_value_heads", Some(heads))?;
        if heads % kv_heads != 0 {
            return Err(fmt(format!(
                "num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
            )));
        }
        let head_dim = match field(obj, "head_dim") {
            Some(_) => usize_field("head_dim", None)?,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(fmt(format!(
                    "hidden_size = {hidden_size} is not a multiple of num_attention_heads = {heads} and there is no head_dim"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(fmt(format!(
                "head_dim = {head_dim}: rotary embeddings need an even head dimension"
            )));
        }
        let max_positions = usize_field("max_position_embeddings", None)?;

        match field(obj, "hidden_act").and_then(Value::as_str) {
            None | Some("silu") | Some("swish") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "hidden_act {other:?} (only \"silu\", the SwiGLU MLP)"
                )))
            }
        }

        // RoPE: transformers 5 writes `rope_parameters` {rope_type, rope_theta}; older files
        // a top-level `rope_theta` and `rope_scaling`. Only the default (unscaled) kind.
        let mut rope_theta = f64_field("rope_theta", 10000.0)?;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(rp) = field(obj, key) else { continue };
            let Some(rp) = rp.as_object() else {
                return Err(fmt(format!("{key} = {rp}, expected an object")));
            };
            let kind = field(rp, "rope_type")
                .or_else(|| field(rp, "type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(unsupported(format!(
                    "{key} with rope_type {kind:?} (only unscaled \"default\" RoPE)"
                )));
            }
            if let Some(theta) = field(rp, "rope_theta") {
                rope_theta = theta
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| {
                        fmt(format!(
                            "{key}.rope_theta = {theta}, expected a positive number"
                        ))
                    })?;
            }
            if let Some(f) = field(rp, "partial_rotary_factor") {
                if f.as_f64() != Some(1.0) {
                    return Err(unsupported(format!("{key}.partial_rotary_factor = {f}")));
                }
            }
        }
        if let Some(f) = field(obj, "partial_rotary_factor") {
            if f.as_f64() != Some(1.0) {
                return Err(unsupported(format!("partial_rotary_factor = {f}")));
            }
        }

        // Sliding-window attention changes the result only when the window is shorter than
        // the context and in use.
        // MistralConfig's default window is 4096 (absent means 4096, null means none).
        let window = match field(obj, "sliding_window") {
            None if model_type == "mistral" && !obj.contains_key("sliding_window") => Some(4096),
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| fmt(format!("sliding_window = {v}, expected an integer")))?
                    as usize,
            ),
        };
        let window_in_use = match model_type {
            "qwen2" => {
                bool_field("use_sliding_window", false)?
                    || field(obj, "layer_types")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|t| t.as_str() == Some("sliding_attention")))
            }
            "mistral" => true,
            _ => window.is_some(),
        };
        if let Some(w) = window {
            if window_in_use && w < max_positions {
                return Err(unsupported(format!(
                    "sliding_window = {w} (shorter than max_position_embeddings = {max_positions}, and in use)"
                )));
            }
        }

        let (qkv_bias, o_bias) = match model_type {
            "qwen2" => (true, false),
            "mistral" => (false, false),
            _ => {
                let b = bool_field("attention_bias", false)?;
                (b, b)
            }
        };
        let mlp_bias = if model_type == "llama" {
            bool_field("mlp_bias", false)?
        } else {
            false
        };
        if let Some(tp) = field(obj, "pretraining_tp") {
            if tp.as_u64() != Some(1) {
                return Err(unsupported(format!("pretraining_tp = {tp}")));
            }
        }
        let rms_norm_eps = f64_field("rms_norm_eps", 1e-6)? as f32;
        let eos_token_id = match field(obj, "eos_token_id") {
            None => None,
            Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
            Some(other) => return Err(fmt(format!("eos_token_id {other}, expected an integer"))),
        };
        Ok(LlamaConfig {
            model_type,
            vocab_size: usize_field("vocab_size", None)?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size", None)?,
            num_hidden_layers: usize_field("num_hidden_layers", None)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: max_positions,
            rms_norm_eps,
            rope_theta,
            qkv_bias,
            o_bias,
            mlp_bias,
            // transformers' default for all three is false.
            tie_word_embeddings: bool_field("tie_word_embeddings", false)?,
            eos_token_id,
        })
    }

    /// Reads `config.json` from a file.
    pub fn load(path: &Path) -> Result<LlamaConfig> {
        let text = crate::io::read_text(path)?;
        LlamaConfig::from_json(&text, path)
    }

    /// Width of the queries `Hq · D`.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the keys (or values) `Hkv · D`.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The prefix geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            max_positions: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        }
    }

    /// The config as JSON in Hugging Face's format (for models this crate writes).
    pub fn to_json(&self) -> Value {
        let arch = match self.model_type {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "model_type": self.model_type,
            "architectures": [arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if self.model_type == "llama" {
            v["attention_bias"] = Value::Bool(self.qkv_bias);
            v["mlp_bias"] = Value::Bool(self.mlp_bias);
        }
        v
    }

    /// The cosines and sines `[T, D/2]` of the rotary angles at positions `start ..
    /// start + T`, computed as transformers computes them in an f32 model: the inverse
    /// frequencies `1 / θ^(2i/D)` rounded to f32, the angle `pos · inv_freq` multiplied in
    /// f32, its cosine and sine rounded to f32 (computed in f64).
    pub fn rope_tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let d = self.head_dim as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let expo = (2 * i) as f32 / d;
                let denom = (self.rope_theta as f32 as f64).powf(expo as f64) as f32;
                1.0 / denom
            })
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for f in &inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

impl From<&LlamaConfig> for Geometry {
    fn from(c: &LlamaConfig) -> Geometry {
        c.geometry()
    }
}
