//! GPT-2 `config.json` as Hugging Face transformers writes it.

use crate::error::{Error, Result};
use crate::lm::Geometry;
use serde::Deserialize;
use std::path::Path;

/// The configuration fields the model uses. Options this implementation does not support
/// are rejected at load time with a clear error rather than computed wrongly.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Maximum number of positions (prefix included).
    pub n_positions: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Number of layers `L`.
    pub n_layer: usize,
    /// Number of heads `H`.
    pub n_head: usize,
    /// MLP width (`4C` when the file says null).
    pub n_inner: usize,
    /// Layer-norm epsilon.
    pub layer_norm_epsilon: f32,
    /// End-of-sequence token, if the config names one.
    pub eos_token_id: Option<u32>,
    /// Divide attention scores by `sqrt(D)`.
    pub scale_attn_weights: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f32,
    #[serde(default = "default_activation")]
    activation_function: String,
    eos_token_id: Option<serde_json::Value>,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    #[serde(default)]
    add_cross_attention: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    /// Parses a `config.json` text; `path` names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Gpt2Config> {
        let fmt = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| fmt(format!("not a GPT-2 config: {e}")))?;
        // The model type first: another architecture's config (a Llama's, say) lacks GPT-2's
        // fields, and "missing field n_positions" would hide what is really wrong.
        match value.get("model_type") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(t)) if t == "gpt2" => {}
            Some(t) => {
                return Err(fmt(format!(
                    "model_type {t}: only GPT-2 models (model_type \"gpt2\") are supported"
                )))
            }
        }
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|e| fmt(format!("not a GPT-2 config: {e}")))?;
        let unsupported =
            |what: &str| fmt(format!("{what} is not supported by this implementation"));
        match raw.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" => {}
            other => {
                return Err(unsupported(&format!(
                    "activation_function {other:?} (only the tanh GELU \"gelu_new\")"
                )))
            }
        }
        if raw.scale_attn_by_inverse_layer_idx {
            return Err(unsupported("scale_attn_by_inverse_layer_idx = true"));
        }
        if raw.reorder_and_upcast_attn {
            return Err(unsupported("reorder_and_upcast_attn = true"));
        }
        if raw.add_cross_attention {
            return Err(unsupported("add_cross_attention = true"));
        }
        if !raw.tie_word_embeddings {
            return Err(unsupported(
                "tie_word_embeddings = false (a separate lm_head)",
            ));
        }
        if raw.n_head == 0 || raw.n_embd == 0 || raw.n_embd % raw.n_head != 0 {
            return Err(fmt(format!(
                "n_embd = {} must be a positive multiple of n_head = {}",
                raw.n_embd, raw.n_head
            )));
        }
        if raw.vocab_size == 0 || raw.n_positions == 0 || raw.n_layer == 0 {
            return Err(fmt(
                "vocab_size, n_positions and n_layer must be positive".into()
            ));
        }
        if raw.layer_norm_epsilon.is_nan() || raw.layer_norm_epsilon <= 0.0 {
            return Err(fmt(format!(
                "layer_norm_epsilon = {}, expected a positive number",
                raw.layer_norm_epsilon
            )));
        }
        let eos_token_id = match raw.eos_token_id {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|v| v.as_u64()).map(|v| v as u32)
            }
            Some(other) => return Err(fmt(format!("eos_token_id {other}, expected an integer"))),
        };
        Ok(Gpt2Config {
            vocab_size: raw.vocab_size,
            n_positions: raw.n_positions,
            n_embd: raw.n_embd,
            n_layer: raw.n_layer,
            n_head: raw.n_head,
            n_inner: raw.n_inner.unwrap_or(4 * raw.n_embd),
            layer_norm_epsilon: raw.layer_norm_epsilon,
            eos_token_id,
            scale_attn_weights: raw.scale_attn_weights,
        })
    }

    /// Reads `config.json` from a file.
    pub fn load(path: &Path) -> Result<Gpt2Config> {
        let text = crate::io::read_text(path)?;
        Gpt2Config::from_json(&text, path)
    }

    /// Head dimension `D = C / H`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The prefix geometry: GPT-2 has as many key/value heads as query heads.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            layers: self.n_layer,
            heads: self.n_head,
            kv_heads: self.n_head,
            head_dim: self.head_dim(),
            max_positions: self.n_positions,
            vocab_size: self.vocab_size,
        }
    }

    /// The config as JSON in Hugging Face's format (for models this crate writes).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": self.scale_attn_weights,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": true,
        })
    }
}

impl From<&Gpt2Config> for Geometry {
    fn from(c: &Gpt2Config) -> Geometry {
        c.geometry()
    }
}
