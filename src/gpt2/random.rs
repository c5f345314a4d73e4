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
    // FNV-1a of the name, mixed into the seed.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng::new(seed ^ h);
    let n: usize = shape.iter().product();
    if name.contains(".ln_") || name.starts_with("ln_f") {
        if name.ends_with(".weight") {
            return rng
                .normal_vec(n, 0.1)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect();
        }
        return rng.normal_vec(n, 0.05);
    }
    if name.ends_with(".bias") {
        return rng.normal_vec(n, 0.05);
    }
    rng.normal_vec(n, std)
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
    let weights = Weights::assemble(cfg, backend, dtype, &mut |name, shape| {
        Ok(random_weight(name, shape, seed, std))
    })?;
    Ok(Gpt2 {
        config: cfg.clone(),
        weights,
        dtype,
        dir: std::path::PathBuf::new(),
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
