//! Random GPT-2 models in Hugging Face's folder layout, for tests, benchmarks and the demo
//! (no model hub is needed).

use super::config::Gpt2Config;
use super::model::Gpt2;
use super::weights::{expected_tensors, Weights};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::io::{write_atomic, write_safetensors_f32};
use crate::rng::Rng;
use std::path::Path;

/// The random value of weight `name` (short name, without `transformer.`): normal with
/// standard deviation `std`, except layer-norm weights `1 + 0.1·N(0,1)` and biases
/// `0.05·N(0,1)`, so none is trivially 1 or 0. Each tensor has its own seed stream, so a model
/// can be generated tensor by tensor, in any order, with the same result.
pub fn random_weight(name: &str, shape: &[usize], seed: u64, std: f32) -> Vec<f32> {
    let mut v = vec![0.0; shape.iter().product()];
    random_weight_into(name, seed, std, &mut v);
    v
}

/// [`random_weight`] written into `out` (its elements in order).
pub fn random_weight_into(name: &str, seed: u64, std: f32, out: &mut [f32]) {
    let norm = name.contains(".ln_") || name.starts_with("ln_f");
    let (mean, sd) = if norm && name.ends_with(".weight") {
        (1.0, 0.1)
    } else if norm || name.ends_with(".bias") {
        (0.0, 0.05)
    } else {
        (0.0, std)
    };
    Rng::for_name(seed, name).fill_normal(out, mean, sd);
}

/// Writes `config.json` and `model.safetensors` (f32, names with the `transformer.` prefix)
/// of a GPT-2 with the weights of [`random_weight`].
pub fn write_random_model(dir: &Path, cfg: &Gpt2Config, seed: u64, std: f32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = expected_tensors(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let data = random_weight(&name, &shape, seed, std);
            (format!("transformer.{name}"), shape, data)
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

/// A GPT-2 with the weights of [`random_weight`], built in memory (no files).
/// In the compute dtype of `backend` ([`Gpt2::dtype_for`]).
pub fn random_model(cfg: &Gpt2Config, seed: u64, std: f32, backend: &dyn Backend) -> Result<Gpt2> {
    let dtype = Gpt2::dtype_for(backend);
    let weights = Weights::assemble(cfg, backend, dtype, &mut |name, _shape, out| {
        random_weight_into(name, seed, std, out);
        Ok(())
    })?;
    Ok(Gpt2 {
        config: cfg.clone(),
        weights,
        dtype,
        dir: std::path::PathBuf::new(),
        packed: crate::lm::PackedWeights::new(),
    })
}

/// A small config: `n_layer` layers, `n_head` heads of width `head_dim`, vocabulary `vocab`.
pub fn small_config(
    n_layer: usize,
    n_head: usize,
    head_dim: usize,
    vocab: usize,
    n_positions: usize,
) -> Gpt2Config {
    Gpt2Config {
        vocab_size: vocab,
        n_positions,
        n_embd: n_head * head_dim,
        n_layer,
        n_head,
        n_inner: 4 * n_head * head_dim,
        layer_norm_epsilon: 1e-5,
        eos_token_id: Some(vocab as u32 - 1),
        scale_attn_weights: true,
    }
}
