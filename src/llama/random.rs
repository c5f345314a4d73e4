//! Random Llama-family models in Hugging Face's folder layout, for tests (no model hub is
//! needed).

use super::config::LlamaConfig;
use super::weights::expected_tensors;
use crate::error::{Error, Result};
use crate::io::{write_atomic, write_safetensors_f32};
use crate::rng::Rng;
use std::path::Path;

/// The random value of weight `name`: normal with standard deviation `std`, except norm
/// weights `1 + 0.1·N(0,1)` and biases `0.05·N(0,1)`, so none is trivially 1 or 0. Each
/// tensor has its own seed stream.
pub fn random_weight(name: &str, shape: &[usize], seed: u64, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; shape.iter().product()];
    random_weight_into(name, seed, std, &mut v);
    v
}

/// [`random_weight`] written into `out` (its elements in order).
pub fn random_weight_into(name: &str, seed: u64, std: f32, out: &mut [f32]) {
    let (mean, sd) = if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.05)
    } else {
        (0.0, std)
    };
    Rng::for_name(seed, name).fill_normal(out, mean, sd);
}

/// Writes `config.json` and `model.safetensors` (f32) of a model with the weights of
/// [`random_weight`].
pub fn write_random_model(dir: &Path, cfg: &LlamaConfig, seed: u64, std: f32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = expected_tensors(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let data = random_weight(&name, &shape, seed, std);
            (name, shape, data)
        })
        .collect();
    let entries: Vec<(&str, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice()))
        .collect();
    write_safetensors_f32(&dir.join("model.safetensors"), &entries)?;
    let text = serde_json::to_string_pretty(&cfg.to_json()).unwrap_or_default();
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// A small config of `model_type` (`llama`, `qwen2` or `mistral`): `layers` layers, `heads`
/// query heads sharing `kv_heads` key/value heads of width `head_dim`, MLP width `2·C + 8`,
/// vocabulary `vocab`, RoPE base 500 and eps 1e-5 (not the defaults); Qwen2 ties its head.
pub fn small_config(
    model_type: &'static str,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    max_positions: usize,
) -> LlamaConfig {
    let c = heads * head_dim;
    LlamaConfig {
        model_type,
        vocab_size: vocab,
        hidden_size: c,
        intermediate_size: 2 * c + 8,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: max_positions,
        rms_norm_eps: 1e-5,
        rope_theta: 500.0,
        qkv_bias: model_type == "qwen2",
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: model_type == "qwen2",
        eos_token_id: Some(vocab as u32 - 1),
    }
}

/// A model with the weights of [`random_weight`], built in memory (no files), in the compute
/// dtype of `backend` ([`crate::lm::dtype_for`]).
pub fn random_model(
    cfg: &LlamaConfig,
    seed: u64,
    std: f32,
    backend: &dyn crate::device::Backend,
) -> Result<super::Llama> {
    let dtype = crate::lm::dtype_for(backend);
    let weights =
        super::weights::Weights::assemble(cfg, backend, dtype, &mut |name, _shape, out| {
            random_weight_into(name, seed, std, out);
            Ok(())
        })?;
    Ok(super::Llama {
        config: cfg.clone(),
        weights,
        dtype,
        dir: std::path::PathBuf::new(),
        packed: crate::lm::PackedWeights::new(),
    })
}
