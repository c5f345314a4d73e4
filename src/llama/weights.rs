//! Llama-family weights from a Hugging Face folder (one `model.safetensors` or shards; f32,
//! f16 or bf16). Projections are torch `Linear` weights `[out, in]` (`y = x Wᵀ + b`).

use super::config::LlamaConfig;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::hf::WeightFiles;
use crate::io::SafetensorsFile;
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// A torch `Linear`: `weight [out, in]` and an optional `bias [out]`.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`, when the config has this bias.
    pub bias: Option<Tensor>,
}

/// Weights of one decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    /// `input_layernorm.weight [C]`
    pub input_norm: Tensor,
    /// `self_attn.q_proj [Hq·D, C]`
    pub q: Linear,
    /// `self_attn.k_proj [Hkv·D, C]`
    pub k: Linear,
    /// `self_attn.v_proj [Hkv·D, C]`
    pub v: Linear,
    /// `self_attn.o_proj [C, Hq·D]`
    pub o: Linear,
    /// `post_attention_layernorm.weight [C]`
    pub post_norm: Tensor,
    /// `mlp.gate_proj [F, C]`
    pub gate: Linear,
    /// `mlp.up_proj [F, C]`
    pub up: Linear,
    /// `mlp.down_proj [C, F]`
    pub down: Linear,
}

/// All weights, in the backend's memory and compute dtype.
#[derive(Debug)]
pub struct Weights {
    /// `model.embed_tokens.weight [V, C]`
    pub embed: Tensor,
    /// The layers.
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight [C]`
    pub norm: Tensor,
    /// `lm_head.weight [V, C]`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// The LM head `[V, C]`: `lm_head`, or the embedding when tied.
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Stored names and shapes of every weight of `cfg`, in file order.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (qw, kw) = (cfg.q_width(), cfg.kv_width());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        out.push((p("input_layernorm.weight"), vec![c]));
        let linears = [
            ("self_attn.q_proj", qw, c, cfg.qkv_bias),
            ("self_attn.k_proj", kw, c, cfg.qkv_bias),
            ("self_attn.v_proj", kw, c, cfg.qkv_bias),
            ("self_attn.o_proj", c, qw, cfg.o_bias),
            ("mlp.gate_proj", f, c, cfg.mlp_bias),
            ("mlp.up_proj", f, c, cfg.mlp_bias),
            ("mlp.down_proj", c, f, cfg.mlp_bias),
        ];
        for (name, o, inp, bias) in linears {
            out.push((p(&format!("{name}.weight")), vec![o, inp]));
            if bias {
                out.push((p(&format!("{name}.bias")), vec![o]));
            }
        }
        out.push((p("post_attention_layernorm.weight"), vec![c]));
    }
    out.push(("model.norm.weight".to_string(), vec![c]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, c]));
    }
    out
}

pub use crate::lm::WeightSource;

impl Weights {
    /// Builds the weights of `cfg` from `get`, converting to `dtype` on `backend`.
    pub fn assemble(
        cfg: &LlamaConfig,
        backend: &dyn Backend,
        dtype: DType,
        get: &mut WeightSource,
    ) -> Result<Weights> {
        let mut t = |name: &str, shape: &[usize]| -> Result<Tensor> {
            crate::lm::frozen_weight(backend, dtype, name, shape, get)
        };
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qw, kw) = (cfg.q_width(), cfg.kv_width());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                Ok(Linear {
                    weight: t(&p(&format!("{name}.weight")), &[out, inp])?,
                    bias: if bias {
                        Some(t(&p(&format!("{name}.bias")), &[out])?)
                    } else {
                        None
                    },
                })
            };
            let q = lin("self_attn.q_proj", qw, c, cfg.qkv_bias)?;
            let k = lin("self_attn.k_proj", kw, c, cfg.qkv_bias)?;
            let vv = lin("self_attn.v_proj", kw, c, cfg.qkv_bias)?;
            let o = lin("self_attn.o_proj", c, qw, cfg.o_bias)?;
            let gate = lin("mlp.gate_proj", f, c, cfg.mlp_bias)?;
            let up = lin("mlp.up_proj", f, c, cfg.mlp_bias)?;
            let down = lin("mlp.down_proj", c, f, cfg.mlp_bias)?;
            layers.push(LayerWeights {
                input_norm: t(&p("input_layernorm.weight"), &[c])?,
                q,
                k,
                v: vv,
                o,
                post_norm: t(&p("post_attention_layernorm.weight"), &[c])?,
                gate,
                up,
                down,
            });
        }
        Ok(Weights {
            embed: t("model.embed_tokens.weight", &[v, c])?,
            norm: t("model.norm.weight", &[c])?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(t("lm_head.weight", &[v, c])?)
            },
            layers,
        })
    }

    /// Loads the weights of a model folder (`model.safetensors`, or the shards that
    /// `model.safetensors.index.json` names).
    pub fn load_dir(
        dir: &Path,
        cfg: &LlamaConfig,
        backend: &dyn Backend,
        dtype: DType,
    ) -> Result<Weights> {
        let found = WeightFiles::find(dir)?;
        let files = found.open()?;
        Weights::load_files(&files, found.what(), cfg, backend, dtype)
    }

    fn load_files(
        files: &[SafetensorsFile],
        what: &Path,
        cfg: &LlamaConfig,
        backend: &dyn Backend,
        dtype: DType,
    ) -> Result<Weights> {
        let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
        for (fi, file) in files.iter().enumerate() {
            for stored in file.names()? {
                // Rotary tables some converters store; recomputed from the config here.
                if stored.ends_with(".rotary_emb.inv_freq") {
                    continue;
                }
                // A tied model saved with its head: the copy is ignored.
                if cfg.tie_word_embeddings && stored == "lm_head.weight" {
                    continue;
                }
                if let Some(other) = by_name.insert(stored.clone(), fi) {
                    return Err(Error::Format {
                        path: file.path().to_path_buf(),
                        msg: format!(
                            "tensor {stored:?} is also stored in {}",
                            files[other].path().display()
                        ),
                    });
                }
            }
        }
        let expected = expected_tensors(cfg);
        let extra: Vec<&String> = by_name
            .keys()
            .filter(|k| !expected.iter().any(|(n, _)| n == *k))
            .collect();
        if !extra.is_empty() {
            return Err(Error::Format {
                path: what.to_path_buf(),
                msg: format!(
                    "unexpected tensors for a {}-layer {} model: {extra:?} (does config.json match the weights? biases: q/k/v {}, o {}, mlp {}; tied head {})",
                    cfg.num_hidden_layers, cfg.model_type, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias,
                    cfg.tie_word_embeddings
                ),
            });
        }
        Weights::assemble(cfg, backend, dtype, &mut |name, shape, out| {
            let fi = by_name.get(name).ok_or_else(|| Error::Format {
                path: what.to_path_buf(),
                msg: format!("tensor {name:?} is missing"),
            })?;
            crate::lm::read_weight(&files[*fi], name, shape, out)
        })
    }
}
