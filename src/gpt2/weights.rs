//! GPT-2 weights from a Hugging Face `model.safetensors`.

use super::config::Gpt2Config;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::hf::WeightFiles;
use crate::io::SafetensorsFile;
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Weights of one transformer block. Conv1D weights are `[in, out]` (`y = x W + b`).
#[derive(Debug)]
pub struct LayerWeights {
    /// `ln_1.weight [C]`
    pub ln1_w: Tensor,
    /// `ln_1.bias [C]`
    pub ln1_b: Tensor,
    /// `attn.c_attn.weight [C, 3C]` (output split q | k | v, each `[H, D]`)
    pub attn_w: Tensor,
    /// `attn.c_attn.bias [3C]`
    pub attn_b: Tensor,
    /// `attn.c_proj.weight [C, C]`
    pub proj_w: Tensor,
    /// `attn.c_proj.bias [C]`
    pub proj_b: Tensor,
    /// `ln_2.weight [C]`
    pub ln2_w: Tensor,
    /// `ln_2.bias [C]`
    pub ln2_b: Tensor,
    /// `mlp.c_fc.weight [C, 4C]`
    pub fc_w: Tensor,
    /// `mlp.c_fc.bias [4C]`
    pub fc_b: Tensor,
    /// `mlp.c_proj.weight [4C, C]`
    pub fc_proj_w: Tensor,
    /// `mlp.c_proj.bias [C]`
    pub fc_proj_b: Tensor,
}

/// All weights, in the backend's memory and compute dtype.
#[derive(Debug)]
pub struct Weights {
    /// `wte [V, C]` (also the tied LM head)
    pub wte: Tensor,
    /// `wpe [n_positions, C]`
    pub wpe: Tensor,
    /// The blocks.
    pub layers: Vec<LayerWeights>,
    /// `ln_f.weight [C]`
    pub lnf_w: Tensor,
    /// `ln_f.bias [C]`
    pub lnf_b: Tensor,
}

/// Whether a stored name is a buffer to ignore (causal-mask buffers, the tied head).
fn ignored(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight"
}

/// Names (without `transformer.`) and shapes of every weight of `cfg`, in file order.
pub fn expected_tensors(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let (c, v, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_inner);
    let mut out = vec![
        ("wte.weight".to_string(), vec![v, c]),
        ("wpe.weight".to_string(), vec![cfg.n_positions, c]),
    ];
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("h.{i}.{s}");
        out.extend([
            (p("ln_1.weight"), vec![c]),
            (p("ln_1.bias"), vec![c]),
            (p("attn.c_attn.weight"), vec![c, 3 * c]),
            (p("attn.c_attn.bias"), vec![3 * c]),
            (p("attn.c_proj.weight"), vec![c, c]),
            (p("attn.c_proj.bias"), vec![c]),
            (p("ln_2.weight"), vec![c]),
            (p("ln_2.bias"), vec![c]),
            (p("mlp.c_fc.weight"), vec![c, inner]),
            (p("mlp.c_fc.bias"), vec![inner]),
            (p("mlp.c_proj.weight"), vec![inner, c]),
            (p("mlp.c_proj.bias"), vec![c]),
        ]);
    }
    out.push(("ln_f.weight".to_string(), vec![c]));
    out.push(("ln_f.bias".to_string(), vec![c]));
    out
}

pub use crate::lm::WeightSource;

impl Weights {
    /// Builds the weights of `cfg` from `get`, converting to `dtype` on `backend`.
    pub fn assemble(
        cfg: &Gpt2Config,
        backend: &dyn Backend,
        dtype: DType,
        get: &mut WeightSource,
    ) -> Result<Weights> {
        let mut t = |name: &str, shape: &[usize]| -> Result<Tensor> {
            crate::lm::frozen_weight(backend, dtype, name, shape, get)
        };
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            layers.push(LayerWeights {
                ln1_w: t(&p("ln_1.weight"), &[c])?,
                ln1_b: t(&p("ln_1.bias"), &[c])?,
                attn_w: t(&p("attn.c_attn.weight"), &[c, 3 * c])?,
                attn_b: t(&p("attn.c_attn.bias"), &[3 * c])?,
                proj_w: t(&p("attn.c_proj.weight"), &[c, c])?,
                proj_b: t(&p("attn.c_proj.bias"), &[c])?,
                ln2_w: t(&p("ln_2.weight"), &[c])?,
                ln2_b: t(&p("ln_2.bias"), &[c])?,
                fc_w: t(&p("mlp.c_fc.weight"), &[c, cfg.n_inner])?,
                fc_b: t(&p("mlp.c_fc.bias"), &[cfg.n_inner])?,
                fc_proj_w: t(&p("mlp.c_proj.weight"), &[cfg.n_inner, c])?,
                fc_proj_b: t(&p("mlp.c_proj.bias"), &[c])?,
            });
        }
        Ok(Weights {
            wte: t("wte.weight", &[v, c])?,
            wpe: t("wpe.weight", &[cfg.n_positions, c])?,
            lnf_w: t("ln_f.weight", &[c])?,
            lnf_b: t("ln_f.bias", &[c])?,
            layers,
        })
    }

    /// Loads the weights of a model folder: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` names (as `save_pretrained` writes large models).
    pub fn load_dir(
        dir: &Path,
        cfg: &Gpt2Config,
        backend: &dyn Backend,
        dtype: DType,
    ) -> Result<Weights> {
        let found = WeightFiles::find(dir)?;
        let files = found.open()?;
        Weights::load_files(&files, found.what(), cfg, backend, dtype)
    }

    /// Loads the weights of `cfg` from one or more files (`what` names them in errors).
    fn load_files(
        files: &[SafetensorsFile],
        what: &Path,
        cfg: &Gpt2Config,
        backend: &dyn Backend,
        dtype: DType,
    ) -> Result<Weights> {
        // Names with or without the `transformer.` prefix: short name -> (file, stored name).
        let mut by_name: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for (fi, file) in files.iter().enumerate() {
            for stored in file.names()? {
                if ignored(&stored) {
                    continue;
                }
                let short = stored
                    .strip_prefix("transformer.")
                    .unwrap_or(&stored)
                    .to_string();
                if let Some((other, _)) = by_name.insert(short.clone(), (fi, stored.clone())) {
                    return Err(Error::Format {
                        path: file.path().to_path_buf(),
                        msg: if other == fi {
                            format!(
                                "tensor {short:?} is stored twice (with and without `transformer.`)"
                            )
                        } else {
                            format!(
                                "tensor {short:?} is also stored in {}",
                                files[other].path().display()
                            )
                        },
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
                    "unexpected tensors for a {}-layer GPT-2: {extra:?} (does config.json match the weights?)",
                    cfg.n_layer
                ),
            });
        }
        Weights::assemble(cfg, backend, dtype, &mut |name, shape, out| {
            let (fi, stored) = by_name.get(name).ok_or_else(|| Error::Format {
                path: what.to_path_buf(),
                msg: format!("tensor {name:?} (or \"transformer.{name}\") is missing"),
            })?;
            crate::lm::read_weight(&files[*fi], stored, shape, out)
        })
    }
}
