//! The MLP prefix encoder of prefix-tuning, as PEFT's `PrefixEncoder` with
//! `prefix_projection=True`:
//! `prefix [P, L·2·C] = tanh(embedding [P, C] · W0ᵀ + b0) · W2ᵀ + b2`,
//! laid out `[P][layer][key=0 / value=1][head][head_dim]`. The prefix is computed once per
//! step (it is the same for every sequence), and its backward yields the gradients of all
//! five parameters. Parameters, gradients and optimiser state are f32.

use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::io::{write_safetensors_f32, SafetensorsFile};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use std::path::Path;

/// PEFT's state-dict names, in the order of [`PrefixEncoder::params`].
pub const PARAM_NAMES: [&str; 5] = [
    "embedding.weight",
    "transform.0.weight",
    "transform.0.bias",
    "transform.2.weight",
    "transform.2.bias",
];

/// Sizes of a prefix encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderDims {
    /// Prefix length `P` (PEFT `num_virtual_tokens`).
    pub prefix_len: usize,
    /// Model width `C` (PEFT `token_dim`).
    pub token_dim: usize,
    /// MLP width `E` (PEFT `encoder_hidden_size`).
    pub hidden: usize,
    /// Model layers `L`.
    pub num_layers: usize,
}

impl EncoderDims {
    /// `L·2·C`, the width of the prefix.
    pub fn out_dim(&self) -> usize {
        self.num_layers * 2 * self.token_dim
    }
    /// Shapes of the five parameters, in [`PARAM_NAMES`] order.
    pub fn shapes(&self) -> [Vec<usize>; 5] {
        let (p, c, e, o) = (self.prefix_len, self.token_dim, self.hidden, self.out_dim());
        [vec![p, c], vec![e, c], vec![e], vec![o, e], vec![o]]
    }
}

/// The encoder's parameters (or, with the same layout, their gradients).
#[derive(Debug)]
pub struct PrefixEncoder {
    /// Sizes.
    pub dims: EncoderDims,
    /// `[embedding [P,C], W0 [E,C], b0 [E], W2 [O,E], b2 [O]]`, f32.
    pub params: [Tensor; 5],
}

/// Intermediate values of one encoder forward, kept for its backward.
#[derive(Debug)]
pub struct EncoderActs {
    hidden: Tensor,
    d_scaled: Tensor,
    d_hidden: Tensor,
    d_pre: Tensor,
    /// The prefix `[P, L·2·C]`, f32.
    pub prefix: Tensor,
}

impl PrefixEncoder {
    /// Zero-filled parameters (e.g. gradient buffers).
    pub fn zeros(dims: EncoderDims, be: &dyn Backend) -> Result<PrefixEncoder> {
        let s = dims.shapes();
        let z = |i: usize| be.zeros(&s[i], DType::F32);
        Ok(PrefixEncoder {
            dims,
            params: [z(0)?, z(1)?, z(2)?, z(3)?, z(4)?],
        })
    }

    /// A seeded initialisation with torch's defaults: embedding `N(0, 1)`, each `Linear`
    /// weight and bias `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn init(dims: EncoderDims, seed: u64, be: &dyn Backend) -> Result<PrefixEncoder> {
        let mut rng = Rng::new(seed);
        let s = dims.shapes();
        let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
            let b = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32)
                .collect()
        };
        let n = |i: usize| s[i].iter().product::<usize>();
        let data = [
            Rng::new(seed ^ 0x5eed).normal_vec(n(0), 1.0),
            uniform(n(1), dims.token_dim),
            uniform(n(2), dims.token_dim),
            uniform(n(3), dims.hidden),
            uniform(n(4), dims.hidden),
        ];
        let up = |i: usize| be.upload(&Tensor::from_f32(&s[i], &data[i], DType::F32)?);
        Ok(PrefixEncoder {
            dims,
            params: [up(0)?, up(1)?, up(2)?, up(3)?, up(4)?],
        })
    }

    /// Loads PEFT-named parameters from a safetensors file (e.g. `--init`), checking every
    /// shape against `dims`.
    pub fn load(path: &Path, dims: EncoderDims, be: &dyn Backend) -> Result<PrefixEncoder> {
        let file = SafetensorsFile::open(path)?;
        let shapes = dims.shapes();
        let mut params = Vec::with_capacity(5);
        for (name, shape) in PARAM_NAMES.iter().zip(&shapes) {
            // PEFT saves the encoder under `prompt_encoder.default.` in some contexts.
            let stored = [name.to_string(), format!("prompt_encoder.default.{name}")]
                .into_iter()
                .find(|n| file.shape(n).is_ok())
                .ok_or_else(|| Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor {name:?} is missing; a prefix encoder needs {}",
                        PARAM_NAMES.join(", ")
                    ),
                })?;
            let (got, data) = file.f32(&stored)?;
            if &got != shape {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor {stored:?} has shape {got:?}, expected {shape:?} for P={}, C={}, E={}, L={}",
                        dims.prefix_len, dims.token_dim, dims.hidden, dims.num_layers
                    ),
                });
            }
            params.push(be.upload(&Tensor::from_f32(shape, &data, DType::F32)?)?);
        }
        let params: [Tensor; 5] = params.try_into().map_err(|_| Error::Format {
            path: path.to_path_buf(),
            msg: "expected five tensors".into(),
        })?;
        Ok(PrefixEncoder { dims, params })
    }

    /// Reads the sizes of the encoder stored in `path` (P, C and E from the shapes; `L` from
    /// the output width).
    pub fn dims_in(path: &Path) -> Result<EncoderDims> {
        let file = SafetensorsFile::open(path)?;
        let emb = file.shape(PARAM_NAMES[0])?;
        let w2 = file.shape(PARAM_NAMES[3])?;
        match (emb.as_slice(), w2.as_slice()) {
            ([p, c], [o, e]) if *c > 0 && o % (2 * c) == 0 => Ok(EncoderDims {
                prefix_len: *p,
                token_dim: *c,
                hidden: *e,
                num_layers: o / (2 * c),
            }),
            _ => Err(Error::Format {
                path: path.to_path_buf(),
                msg: format!("embedding.weight {emb:?} and transform.2.weight {w2:?} do not form a prefix encoder"),
            }),
        }
    }

    /// Writes the parameters with PEFT's names (f32), atomically.
    pub fn save(&self, path: &Path, be: &dyn Backend) -> Result<()> {
        let host: Vec<Vec<f32>> = self
            .params
            .iter()
            .map(|t| be.download(t).map(|t| t.to_f32_vec()))
            .collect::<Result<_>>()?;
        let shapes = self.dims.shapes();
        let entries: Vec<(&str, Vec<usize>, &[f32])> = (0..5)
            .map(|i| (PARAM_NAMES[i], shapes[i].clone(), host[i].as_slice()))
            .collect();
        write_safetensors_f32(path, &entries)
    }

    /// Buffers for [`PrefixEncoder::forward`] and [`PrefixEncoder::backward`].
    pub fn acts(&self, be: &dyn Backend) -> Result<EncoderActs> {
        let d = self.dims;
        Ok(EncoderActs {
            hidden: be.zeros(&[d.prefix_len, d.hidden], DType::F32)?,
            d_scaled: be.zeros(&[d.prefix_len, d.out_dim()], DType::F32)?,
            d_hidden: be.zeros(&[d.prefix_len, d.hidden], DType::F32)?,
            d_pre: be.zeros(&[d.prefix_len, d.hidden], DType::F32)?,
            prefix: be.zeros(&[d.prefix_len, d.out_dim()], DType::F32)?,
        })
    }

    /// Computes `acts.prefix`.
    pub fn forward(&self, be: &dyn Backend, acts: &mut EncoderActs) -> Result<()> {
        let [emb, w0, b0, w2, b2] = &self.params;
        be.matmul(
            &emb.view(),
            &w0.view(),
            Some(&b0.view()),
            &mut acts.d_pre.view_mut(),
            MatmulOpts::nt(),
        )?;
        be.tanh(&acts.d_pre.view(), &mut acts.hidden.view_mut())?;
        be.matmul(
            &acts.hidden.view(),
            &w2.view(),
            Some(&b2.view()),
            &mut acts.prefix.view_mut(),
            MatmulOpts::nt(),
        )
    }

    /// Gradients of every parameter, given the gradient `d_prefix [P, L·2·C]` scaled by
    /// `scale` (e.g. `1 / token count` to turn a summed loss into a mean). Overwrites `grads`.
    pub fn backward(
        &self,
        be: &dyn Backend,
        acts: &mut EncoderActs,
        d_prefix: &Tensor,
        scale: f32,
        grads: &mut PrefixEncoder,
    ) -> Result<()> {
        let [emb, w0, _b0, w2, _b2] = &self.params;
        let [g_emb, g_w0, g_b0, g_w2, g_b2] = &mut grads.params;
        be.copy(&d_prefix.view(), &mut acts.d_scaled.view_mut())?;
        be.scale(&mut acts.d_scaled.view_mut(), scale)?;
        let dp = acts.d_scaled.view();
        // prefix = hidden · W2ᵀ + b2
        be.matmul(
            &dp,
            &acts.hidden.view(),
            None,
            &mut g_w2.view_mut(),
            MatmulOpts::tn(),
        )?;
        be.sum_rows(&dp, &mut g_b2.view_mut(), false)?;
        be.matmul(
            &dp,
            &w2.view(),
            None,
            &mut acts.d_hidden.view_mut(),
            MatmulOpts::default(),
        )?;
        // hidden = tanh(pre), pre = emb · W0ᵀ + b0
        be.tanh_bwd(
            &acts.hidden.view(),
            &acts.d_hidden.view(),
            &mut acts.d_pre.view_mut(),
        )?;
        let dz = acts.d_pre.view();
        be.matmul(
            &dz,
            &emb.view(),
            None,
            &mut g_w0.view_mut(),
            MatmulOpts::tn(),
        )?;
        be.sum_rows(&dz, &mut g_b0.view_mut(), false)?;
        be.matmul(
            &dz,
            &w0.view(),
            None,
            &mut g_emb.view_mut(),
            MatmulOpts::default(),
        )
    }
}
