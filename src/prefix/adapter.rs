//! PEFT prefix-tuning adapter folders: `adapter_config.json` and
//! `adapter_model.safetensors` holding `prompt_embeddings [P, L·2·C]` (f32): the encoder's
//! output, since PEFT drops the MLP at save time. Folders written here load with
//! `PeftModel.from_pretrained`, and adapters trained in Python serve here.

use crate::device::Backend;
use crate::error::{Error, Result};
use crate::io::{read_text, write_atomic, write_safetensors_f32, SafetensorsFile};
use crate::lm::{Geometry, PrefixLm};
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::path::Path;

/// The fields of `adapter_config.json` this crate uses.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Prefix length `P`.
    pub num_virtual_tokens: usize,
    /// The key/value width of a layer `Hkv · D` (for GPT-2 the model width `C`).
    pub token_dim: usize,
    /// Model layers `L`.
    pub num_layers: usize,
    /// Key/value heads `Hkv` (PEFT writes `num_key_value_heads` here; for GPT-2 the heads).
    pub num_attention_heads: usize,
    /// Whether the prefix was trained through the MLP.
    pub prefix_projection: bool,
    /// MLP width `E` (0: none recorded).
    pub encoder_hidden_size: usize,
    /// The base model, if recorded.
    pub base_model_name_or_path: Option<String>,
}

/// The PEFT version whose file layout this crate writes.
pub const PEFT_VERSION: &str = "0.21.2";

/// A prefix adapter: its config and the prefix `[P, L·2·C]`.
#[derive(Clone, Debug)]
pub struct PrefixAdapter {
    /// The config.
    pub config: AdapterConfig,
    /// `prompt_embeddings`, row-major `[P, L·2·C]`.
    pub prompt_embeddings: Vec<f32>,
}

impl AdapterConfig {
    /// A config for `model` with a prefix of `prefix_len` trained through an MLP of `hidden`
    /// (PEFT `prefix_projection=True`); [`AdapterConfig::without_projection`] for the other
    /// kind, [`AdapterConfig::base_model`] to record the base model.
    pub fn for_model(
        model: impl Into<Geometry>,
        prefix_len: usize,
        hidden: usize,
    ) -> AdapterConfig {
        let g: Geometry = model.into();
        AdapterConfig {
            num_virtual_tokens: prefix_len,
            token_dim: g.kv_width(),
            num_layers: g.layers,
            num_attention_heads: g.kv_heads,
            prefix_projection: true,
            encoder_hidden_size: hidden,
            base_model_name_or_path: None,
        }
    }

    /// The same config for a prefix trained directly (PEFT `prefix_projection=False`, no
    /// `encoder_hidden_size`).
    pub fn without_projection(mut self) -> AdapterConfig {
        self.prefix_projection = false;
        self.encoder_hidden_size = 0;
        self
    }

    /// The same config naming its base model (`base_model_name_or_path`: a hub name or a
    /// folder, which `AutoPeftModelForCausalLM.from_pretrained(adapter)` loads).
    pub fn base_model(mut self, name_or_path: Option<String>) -> AdapterConfig {
        self.base_model_name_or_path = name_or_path;
        self
    }

    /// Width of the prefix, `L·2·C`.
    pub fn out_dim(&self) -> usize {
        self.num_layers * 2 * self.token_dim
    }

    /// Checks that the adapter fits `model`; `path` names the adapter in the error.
    pub fn check_model(&self, model: impl Into<Geometry>, path: &Path) -> Result<()> {
        let g: Geometry = model.into();
        let mut bad = vec![];
        if self.num_layers != g.layers {
            bad.push(format!(
                "num_layers {} vs n_layer {}",
                self.num_layers, g.layers
            ));
        }
        if self.token_dim != g.kv_width() {
            bad.push(format!(
                "token_dim {} vs the key/value width {} (heads × head_dim)",
                self.token_dim,
                g.kv_width()
            ));
        }
        if self.num_attention_heads != g.kv_heads {
            bad.push(format!(
                "num_attention_heads {} vs {} key/value heads",
                self.num_attention_heads, g.kv_heads
            ));
        }
        if self.num_virtual_tokens >= g.max_positions {
            bad.push(format!(
                "num_virtual_tokens {} leaves no position of n_positions {}",
                self.num_virtual_tokens, g.max_positions
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Format {
                path: path.to_path_buf(),
                msg: format!("adapter does not fit the model: {}", bad.join("; ")),
            })
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            // PEFT leaves it null unless the MLP is used (its default is None).
            "encoder_hidden_size": if self.prefix_projection || self.encoder_hidden_size > 0 {
                Value::from(self.encoder_hidden_size)
            } else {
                Value::Null
            },
            "inference_mode": true,
            "init_weights": null,
            "modules_to_save": null,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING",
            "peft_version": PEFT_VERSION,
            "prefix_projection": self.prefix_projection,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": self.token_dim,
        })
    }

    /// Reads the `adapter_config.json` of the adapter folder `dir` (only the config: what an
    /// adapter is, without reading its weights).
    pub fn read(dir: &Path) -> Result<AdapterConfig> {
        let cfg_path = dir.join("adapter_config.json");
        let text = read_text(&cfg_path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: cfg_path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        AdapterConfig::from_json(&v, &cfg_path)
    }

    fn from_json(v: &Value, path: &Path) -> Result<AdapterConfig> {
        let fmt = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        match v.get("peft_type").and_then(Value::as_str) {
            Some("PREFIX_TUNING") => {}
            other => {
                return Err(fmt(format!(
                    "peft_type {other:?}, expected \"PREFIX_TUNING\" (only prefix-tuning adapters are supported)"
                )))
            }
        }
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    fmt(format!(
                        "field {k:?} is missing or not a non-negative integer"
                    ))
                })
        };
        if let Some(n) = v.get("num_transformer_submodules").and_then(Value::as_u64) {
            if n != 1 {
                return Err(fmt(format!(
                    "num_transformer_submodules = {n}, expected 1 (a decoder-only model)"
                )));
            }
        }
        Ok(AdapterConfig {
            num_virtual_tokens: num("num_virtual_tokens")?,
            token_dim: num("token_dim")?,
            num_layers: num("num_layers")?,
            num_attention_heads: num("num_attention_heads")?,
            prefix_projection: v
                .get("prefix_projection")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            encoder_hidden_size: v
                .get("encoder_hidden_size")
                .and_then(Value::as_u64)
                .map_or(0, |x| x as usize),
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }
}

impl PrefixAdapter {
    /// Reads an adapter folder.
    pub fn load(dir: &Path) -> Result<PrefixAdapter> {
        let config = AdapterConfig::read(dir)?;
        let st_path = dir.join("adapter_model.safetensors");
        let file = SafetensorsFile::open(&st_path)?;
        let (shape, data) = file.f32("prompt_embeddings")?;
        let want = [config.num_virtual_tokens, config.out_dim()];
        if shape != want {
            return Err(Error::Format {
                path: st_path,
                msg: format!(
                    "prompt_embeddings has shape {shape:?}, adapter_config.json implies {want:?} \
                     (num_virtual_tokens, num_layers*2*token_dim)"
                ),
            });
        }
        Ok(PrefixAdapter {
            config,
            prompt_embeddings: data,
        })
    }

    /// Reads the adapter folder `dir`, checks it against `model` and returns its prefix
    /// `[P, L·2·Hkv·D]` in the model's dtype on `be`: what evaluation and generation attend
    /// over.
    pub fn load_for(dir: &Path, model: &dyn PrefixLm, be: &dyn Backend) -> Result<Tensor> {
        let ad = PrefixAdapter::load(dir)?;
        ad.config
            .check_model(model.geometry(), &dir.join("adapter_config.json"))?;
        let dims = [ad.config.num_virtual_tokens, ad.config.out_dim()];
        be.upload(&Tensor::from_f32(
            &dims,
            &ad.prompt_embeddings,
            model.dtype(),
        )?)
    }

    /// Writes an adapter folder (created if needed); each file is written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let want = self.config.num_virtual_tokens * self.config.out_dim();
        if self.prompt_embeddings.len() != want {
            return Err(Error::shape(
                "prompt_embeddings",
                format!("{want} values"),
                &[self.prompt_embeddings.len()],
            ));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_safetensors_f32(
            &dir.join("adapter_model.safetensors"),
            &[(
                "prompt_embeddings",
                vec![self.config.num_virtual_tokens, self.config.out_dim()],
                &self.prompt_embeddings,
            )],
        )?;
        let text = serde_json::to_string_pretty(&self.config.to_json()).unwrap_or_default();
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }
}
