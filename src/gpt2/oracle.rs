//! An f64 GPT-2 with prefix, in plain loops: one sequence at a time, no padding, no cache,
//! written to be obviously right. Tests compare the model against it and take finite
//! differences of its loss.

use super::model::Gpt2;
use crate::device::Backend;
use crate::error::Result;
use crate::lm::IGNORE;
use crate::tensor::Tensor;

struct Layer {
    ln1_w: Vec<f64>,
    ln1_b: Vec<f64>,
    attn_w: Vec<f64>,
    attn_b: Vec<f64>,
    proj_w: Vec<f64>,
    proj_b: Vec<f64>,
    ln2_w: Vec<f64>,
    ln2_b: Vec<f64>,
    fc_w: Vec<f64>,
    fc_b: Vec<f64>,
    fc_proj_w: Vec<f64>,
    fc_proj_b: Vec<f64>,
}

/// The model's weights in f64.
pub struct Gpt2Oracle {
    v: usize,
    c: usize,
    h: usize,
    inner: usize,
    eps: f64,
    scale_attn: bool,
    wte: Vec<f64>,
    wpe: Vec<f64>,
    layers: Vec<Layer>,
    lnf_w: Vec<f64>,
    lnf_b: Vec<f64>,
}

fn host(be: &dyn Backend, t: &Tensor) -> Result<Vec<f64>> {
    Ok(be
        .download(t)?
        .to_f32_vec()
        .into_iter()
        .map(f64::from)
        .collect())
}

/// `y [n] = x [k] · W [k, n] + b`.
fn affine(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut y = b.to_vec();
    for (i, xi) in x.iter().enumerate() {
        for j in 0..n {
            y[j] += xi * w[i * n + j];
        }
    }
    y
}

fn layernorm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter()
        .enumerate()
        .map(|(j, v)| (v - mu) * r * w[j] + b[j])
        .collect()
}

fn gelu_new(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

impl Gpt2Oracle {
    /// Copies the model's weights to f64.
    pub fn new(model: &Gpt2, be: &dyn Backend) -> Result<Gpt2Oracle> {
        let c = &model.config;
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    ln1_w: host(be, &l.ln1_w)?,
                    ln1_b: host(be, &l.ln1_b)?,
                    attn_w: host(be, &l.attn_w)?,
                    attn_b: host(be, &l.attn_b)?,
                    proj_w: host(be, &l.proj_w)?,
                    proj_b: host(be, &l.proj_b)?,
                    ln2_w: host(be, &l.ln2_w)?,
                    ln2_b: host(be, &l.ln2_b)?,
                    fc_w: host(be, &l.fc_w)?,
                    fc_b: host(be, &l.fc_b)?,
                    fc_proj_w: host(be, &l.fc_proj_w)?,
                    fc_proj_b: host(be, &l.fc_proj_b)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2Oracle {
            v: c.vocab_size,
            c: c.n_embd,
            h: c.n_head,
            inner: c.n_inner,
            eps: c.layer_norm_epsilon as f64,
            scale_attn: c.scale_attn_weights,
            wte: host(be, &w.wte)?,
            wpe: host(be, &w.wpe)?,
            layers,
            lnf_w: host(be, &w.lnf_w)?,
            lnf_b: host(be, &w.lnf_b)?,
        })
    }

    /// Logits `[T, V]` of one sequence with an optional prefix `[P, L·2·C]` (laid out
    /// `[P][layer][k/v][head][d]`); real tokens sit at positions `P..P+T-1`.
    pub fn logits(&self, ids: &[u32], prefix: Option<&[f64]>) -> Vec<f64> {
        let (c, h) = (self.c, self.h);
        let d = c / h;
        let nl = self.layers.len();
        let p = prefix.map_or(0, |pre| pre.len() / (nl * 2 * c));
        let t_len = ids.len();
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                (0..c)
                    .map(|j| self.wte[id as usize * c + j] + self.wpe[(p + t) * c + j])
                    .collect()
            })
            .collect();
        let scale = if self.scale_attn {
            1.0 / (d as f64).sqrt()
        } else {
            1.0
        };
        for (l, lw) in self.layers.iter().enumerate() {
            let qkv: Vec<Vec<f64>> = x
                .iter()
                .map(|xt| {
                    affine(
                        &layernorm(xt, &lw.ln1_w, &lw.ln1_b, self.eps),
                        &lw.attn_w,
                        &lw.attn_b,
                    )
                })
                .collect();
            // Prefix key/value j of head hh: prefix[j][l][kv][hh][:]
            let pre = |j: usize, kv: usize, hh: usize| -> &[f64] {
                let base = j * nl * 2 * c + (l * 2 + kv) * c + hh * d;
                &prefix.unwrap_or(&[])[base..base + d]
            };
            let mut mid = x.clone();
            for t in 0..t_len {
                let mut att = vec![0.0; c];
                for hh in 0..h {
                    let q = &qkv[t][hh * d..(hh + 1) * d];
                    let mut keys: Vec<(&[f64], &[f64])> =
                        (0..p).map(|j| (pre(j, 0, hh), pre(j, 1, hh))).collect();
                    for s in 0..=t {
                        keys.push((
                            &qkv[s][c + hh * d..c + (hh + 1) * d],
                            &qkv[s][2 * c + hh * d..2 * c + (hh + 1) * d],
                        ));
                    }
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|(k, _)| scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for ((_, v), s) in keys.iter().zip(&scores) {
                        let pr = (s - m).exp() / z;
                        for j in 0..d {
                            att[hh * d + j] += pr * v[j];
                        }
                    }
                }
                let proj = affine(&att, &lw.proj_w, &lw.proj_b);
                for j in 0..c {
                    mid[t][j] += proj[j];
                }
            }
            for t in 0..t_len {
                let hdn: Vec<f64> = affine(
                    &layernorm(&mid[t], &lw.ln2_w, &lw.ln2_b, self.eps),
                    &lw.fc_w,
                    &lw.fc_b,
                )
                .into_iter()
                .map(gelu_new)
                .collect();
                debug_assert_eq!(hdn.len(), self.inner);
                let out = affine(&hdn, &lw.fc_proj_w, &lw.fc_proj_b);
                for j in 0..c {
                    x[t][j] = mid[t][j] + out[j];
                }
            }
        }
        let mut logits = vec![0.0; t_len * self.v];
        for t in 0..t_len {
            let f = layernorm(&x[t], &self.lnf_w, &self.lnf_b, self.eps);
            for tok in 0..self.v {
                logits[t * self.v + tok] = (0..c).map(|j| f[j] * self.wte[tok * c + j]).sum();
            }
        }
        logits
    }

    /// Summed loss and count over examples `(input_ids, labels)` with HF's shift and `-100`.
    pub fn loss_sum(&self, examples: &[(&[u32], &[i32])], prefix: Option<&[f64]>) -> (f64, usize) {
        let mut sum = 0.0;
        let mut count = 0;
        for (ids, labels) in examples {
            let lg = self.logits(ids, prefix);
            for t in 0..ids.len().saturating_sub(1) {
                let target = labels[t + 1];
                if target == IGNORE {
                    continue;
                }
                let row = &lg[t * self.v..(t + 1) * self.v];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                sum += lse - row[target as usize];
                count += 1;
            }
        }
        (sum, count)
    }
}
