//! An f64 Llama-family model with prefix, in plain loops: one sequence at a time, no
//! padding, no cache, written to be obviously right. Tests compare the model against it and
//! take finite differences of its loss. The rotary angles are the model's own f32 tables
//! ([`LlamaConfig::rope_tables`]), as transformers computes them even in an f64 model.

use super::config::LlamaConfig;
use super::model::Llama;
use super::weights::Linear;
use crate::device::Backend;
use crate::error::Result;
use crate::lm::IGNORE;
use crate::tensor::Tensor;

/// A torch `Linear` in f64: `weight [out, in]`, `bias [out]` (zeros when absent).
struct Lin {
    w: Vec<f64>,
    b: Vec<f64>,
}

impl Lin {
    /// `y [out] = W x + b`.
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let n = x.len();
        self.b
            .iter()
            .enumerate()
            .map(|(o, b)| b + (0..n).map(|i| self.w[o * n + i] * x[i]).sum::<f64>())
            .collect()
    }
}

struct Layer {
    input_norm: Vec<f64>,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    post_norm: Vec<f64>,
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// The model's weights in f64.
pub struct LlamaOracle {
    config: LlamaConfig,
    embed: Vec<f64>,
    head: Vec<f64>,
    layers: Vec<Layer>,
    norm: Vec<f64>,
}

fn host(be: &dyn Backend, t: &Tensor) -> Result<Vec<f64>> {
    Ok(be
        .download(t)?
        .to_f32_vec()
        .into_iter()
        .map(f64::from)
        .collect())
}

fn lin(be: &dyn Backend, l: &Linear) -> Result<Lin> {
    let w = host(be, &l.weight)?;
    let out = l.weight.dims()[0];
    let b = match &l.bias {
        Some(b) => host(be, b)?,
        None => vec![0.0; out],
    };
    Ok(Lin { w, b })
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

impl LlamaOracle {
    /// Copies the model's weights to f64.
    pub fn new(model: &Llama, be: &dyn Backend) -> Result<LlamaOracle> {
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: host(be, &l.input_norm)?,
                    q: lin(be, &l.q)?,
                    k: lin(be, &l.k)?,
                    v: lin(be, &l.v)?,
                    o: lin(be, &l.o)?,
                    post_norm: host(be, &l.post_norm)?,
                    gate: lin(be, &l.gate)?,
                    up: lin(be, &l.up)?,
                    down: lin(be, &l.down)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(LlamaOracle {
            config: model.config.clone(),
            embed: host(be, &w.embed)?,
            head: host(be, w.head())?,
            layers,
            norm: host(be, &w.norm)?,
        })
    }

    /// Logits `[T, V]` of one sequence with an optional prefix `[P, L·2·Hkv·D]` (laid out
    /// `[P][layer][k/v][kv head][d]`); real tokens sit at positions `P..P+T-1`, and only
    /// their queries and keys are rotated.
    pub fn logits(&self, ids: &[u32], prefix: Option<&[f64]>) -> Vec<f64> {
        let cfg = &self.config;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let (hq, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let group = hq / hkv;
        let nl = self.layers.len();
        let kvw = hkv * d;
        let p = prefix.map_or(0, |pre| pre.len() / (nl * 2 * kvw));
        let t_len = ids.len();
        let eps = cfg.rms_norm_eps as f64;
        let half = d / 2;
        let (cos, sin) = cfg.rope_tables(p, t_len);
        // Rotate-half RoPE of one head vector at sequence index t.
        let rotate = |x: &mut [f64], t: usize| {
            for j in 0..half {
                let (cj, sj) = (cos[t * half + j] as f64, sin[t * half + j] as f64);
                let (a, b) = (x[j], x[j + half]);
                x[j] = a * cj - b * sj;
                x[j + half] = b * cj + a * sj;
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&id| self.embed[id as usize * c..(id as usize + 1) * c].to_vec())
            .collect();
        for (l, lw) in self.layers.iter().enumerate() {
            let mut qs = vec![];
            let mut ks = vec![];
            let mut vs = vec![];
            for (t, xt) in x.iter().enumerate() {
                let n = rmsnorm(xt, &lw.input_norm, eps);
                let mut q = lw.q.apply(&n);
                let mut k = lw.k.apply(&n);
                for hh in 0..hq {
                    rotate(&mut q[hh * d..(hh + 1) * d], t);
                }
                for hh in 0..hkv {
                    rotate(&mut k[hh * d..(hh + 1) * d], t);
                }
                qs.push(q);
                ks.push(k);
                vs.push(lw.v.apply(&n));
            }
            let pre = |j: usize, kv: usize, hh: usize| -> &[f64] {
                let base = j * nl * 2 * kvw + (l * 2 + kv) * kvw + hh * d;
                &prefix.unwrap_or(&[])[base..base + d]
            };
            for t in 0..t_len {
                let mut att = vec![0.0; hq * d];
                for hh in 0..hq {
                    let g = hh / group;
                    let q = &qs[t][hh * d..(hh + 1) * d];
                    let mut keys: Vec<(&[f64], &[f64])> =
                        (0..p).map(|j| (pre(j, 0, g), pre(j, 1, g))).collect();
                    for s in 0..=t {
                        keys.push((&ks[s][g * d..(g + 1) * d], &vs[s][g * d..(g + 1) * d]));
                    }
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|(k, _)| scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                    for ((_, vv), s) in keys.iter().zip(&scores) {
                        let pr = (s - mx).exp() / z;
                        for j in 0..d {
                            att[hh * d + j] += pr * vv[j];
                        }
                    }
                }
                let o = lw.o.apply(&att);
                let h: Vec<f64> = x[t].iter().zip(&o).map(|(a, b)| a + b).collect();
                let n = rmsnorm(&h, &lw.post_norm, eps);
                let act: Vec<f64> = lw
                    .gate
                    .apply(&n)
                    .iter()
                    .zip(lw.up.apply(&n))
                    .map(|(g, u)| silu(*g) * u)
                    .collect();
                let down = lw.down.apply(&act);
                // Later tokens of this layer read only qs/ks/vs, so x[t] can be replaced.
                x[t] = h.iter().zip(&down).map(|(a, b)| a + b).collect();
            }
        }
        let mut logits = vec![0.0; t_len * v];
        for t in 0..t_len {
            let f = rmsnorm(&x[t], &self.norm, eps);
            for tok in 0..v {
                logits[t * v + tok] = (0..c).map(|j| f[j] * self.head[tok * c + j]).sum();
            }
        }
        logits
    }

    /// Summed loss and count over examples `(input_ids, labels)` with HF's shift and `-100`.
    pub fn loss_sum(&self, examples: &[(&[u32], &[i32])], prefix: Option<&[f64]>) -> (f64, usize) {
        let v = self.config.vocab_size;
        let mut sum = 0.0;
        let mut count = 0;
        for (ids, labels) in examples {
            let lg = self.logits(ids, prefix);
            for t in 0..ids.len().saturating_sub(1) {
                let target = labels[t + 1];
                if target == IGNORE {
                    continue;
                }
                let row = &lg[t * v..(t + 1) * v];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                sum += lse - row[target as usize];
                count += 1;
            }
        }
        (sum, count)
    }
}
