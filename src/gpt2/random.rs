//! Random GPT-2 models in Hugging Face's folder layout, for tests, benchmarks and the demo
//! (no model hub is needed).

use super::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::io::{write_atomic, write_safetensors_f32};
use crate::rng::Rng;
use std::path::Path;

/// Writes `config.json` and `model.safetensors` (f32, names with the `transformer.` prefix)
/// of a GPT-2 with normal weights of standard deviation `std`; layer-norm weights are
/// `1 + 0.1·N(0,1)` and every bias `0.05·N(0,1)`, so none is trivially 1 or 0.
pub fn write_random_model(dir: &Path, cfg: &Gpt2Config, seed: u64, std: f32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut rng = Rng::new(seed);
    let (c, v, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_inner);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    let mut add = |name: String, shape: Vec<usize>, kind: u8, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let data = match kind {
            b'w' => rng.normal_vec(n, std),
            b'l' => rng
                .normal_vec(n, 0.1)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect(),
            _ => rng.normal_vec(n, 0.05),
        };
        tensors.push((name, shape, data));
    };
    add("transformer.wte.weight".into(), vec![v, c], b'w', &mut rng);
    add(
        "transformer.wpe.weight".into(),
        vec![cfg.n_positions, c],
        b'w',
        &mut rng,
    );
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        add(p("ln_1.weight"), vec![c], b'l', &mut rng);
        add(p("ln_1.bias"), vec![c], b'b', &mut rng);
        add(p("attn.c_attn.weight"), vec![c, 3 * c], b'w', &mut rng);
        add(p("attn.c_attn.bias"), vec![3 * c], b'b', &mut rng);
        add(p("attn.c_proj.weight"), vec![c, c], b'w', &mut rng);
        add(p("attn.c_proj.bias"), vec![c], b'b', &mut rng);
        add(p("ln_2.weight"), vec![c], b'l', &mut rng);
        add(p("ln_2.bias"), vec![c], b'b', &mut rng);
        add(p("mlp.c_fc.weight"), vec![c, inner], b'w', &mut rng);
        add(p("mlp.c_fc.bias"), vec![inner], b'b', &mut rng);
        add(p("mlp.c_proj.weight"), vec![inner, c], b'w', &mut rng);
        add(p("mlp.c_proj.bias"), vec![c], b'b', &mut rng);
    }
    add("transformer.ln_f.weight".into(), vec![c], b'l', &mut rng);
    add("transformer.ln_f.bias".into(), vec![c], b'b', &mut rng);
    let entries: Vec<(&str, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice()))
        .collect();
    write_safetensors_f32(&dir.join("model.safetensors"), &entries)?;
    let text = serde_json::to_string_pretty(&cfg.to_json()).unwrap_or_default();
    write_atomic(&dir.join("config.json"), text.as_bytes())
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
