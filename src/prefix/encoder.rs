//! The prefix encoder of prefix-tuning, as PEFT's `PrefixEncoder`. With
//! `prefix_projection=True` (the paper's reparameterisation) it is an MLP,
//! `prefix [P, L·2·C] = tanh(embedding [P, C] · W0ᵀ + b0) · W2ᵀ + b2`; without (PEFT's
//! default) the prefix is itself the one parameter, `embedding [P, L·2·C]`. The prefix is
//! laid out `[P][layer][key=0 / value=1][head][head_dim]`, computed once per step (it is the
//! same for every sequence), and its backward yields the gradients of every parameter.
//! Parameters, gradients and optimiser state are f32.

use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::io::{write_safetensors_f32, SafetensorsFile};
use crate::lm::Geometry;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use std::path::Path;

/// PEFT's state-dict names of the MLP encoder, in the order of [`PrefixEncoder::params`].
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
    /// The key/value width of one layer `Hkv · D` (PEFT `token_dim`, which PEFT sets to
    /// `head_dim · num_key_value_heads`; for GPT-2, `Hkv = H` and this is the model width).
    pub token_dim: usize,
    /// MLP width `E` (PEFT `encoder_hidden_size`; unused without the projection).
    pub hidden: usize,
    /// Model layers `L`.
    pub num_layers: usize,
    /// Whether the prefix goes through the MLP (PEFT `prefix_projection`); without it the
    /// prefix `[P, L·2·C]` is trained directly.
    pub projection: bool,
}

impl EncoderDims {
    /// The dimensions of an encoder for a model of `geometry`: `token_dim` is its KV width
    /// and `num_layers` its layers, as PEFT derives them from the base model's config.
    pub fn for_model(
        geometry: &Geometry,
        prefix_len: usize,
        hidden: usize,
        projection: bool,
    ) -> EncoderDims {
        EncoderDims {
            prefix_len,
            token_dim: geometry.kv_width(),
            hidden,
            num_layers: geometry.layers,
            projection,
        }
    }

    /// `L·2·C`, the width of the prefix.
    pub fn out_dim(&self) -> usize {
        self.num_layers * 2 * self.token_dim
    }
    /// PEFT's names of the parameters: the five of [`PARAM_NAMES`] with the projection,
    /// `embedding.weight` alone without.
    pub fn param_names(&self) -> &'static [&'static str] {
        if self.projection {
            &PARAM_NAMES
        } else {
            &PARAM_NAMES[..1]
        }
    }
    /// Shapes of the parameters, in [`EncoderDims::param_names`] order.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        let (p, c, e, o) = (self.prefix_len, self.token_dim, self.hidden, self.out_dim());
        if self.projection {
            vec![vec![p, c], vec![e, c], vec![e], vec![o, e], vec![o]]
        } else {
            vec![vec![p, o]]
        }
    }
}

/// The encoder's parameters (or, with the same layout, their gradients).
#[derive(Debug)]
pub struct PrefixEncoder {
    /// Sizes.
    pub dims: EncoderDims,
    /// `[embedding [P,C], W0 [E,C], b0 [E], W2 [O,E], b2 [O]]` with the projection,
    /// `[embedding [P, O]]` without; f32.
    pub params: Vec<Tensor>,
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
        let params = dims
            .shapes()
            .iter()
            .map(|s| be.zeros(s, DType::F32))
            .collect::<Result<_>>()?;
        Ok(PrefixEncoder { dims, params })
    }

    /// A seeded initialisation with torch's defaults: embedding `N(0, 1)`, each `Linear`
    /// weight and bias `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn init(dims: EncoderDims, seed: u64, be: &dyn Backend) -> Result<PrefixEncoder> {
        let s = dims.shapes();
        if !dims.projection {
            let n = s[0].iter().product::<usize>();
            let data = Rng::new(seed ^ 0x5eed).normal_vec(n, 1.0);
            let emb = be.upload(&Tensor::from_f32(&s[0], &data, DType::F32)?)?;
            return Ok(PrefixEncoder {
                dims,
                params: vec![emb],
            });
        }
        let mut rng = Rng::new(seed);
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
        let params = (0..5)
            .map(|i| be.upload(&Tensor::from_f32(&s[i], &data[i], DType::F32)?))
            .collect::<Result<_>>()?;
        Ok(PrefixEncoder { dims, params })
    }

    /// Loads PEFT-named parameters from a safetensors file (e.g. `--init`), checking every
    /// shape against `dims`. Without the projection, the prefix may also come from an
    /// adapter's `adapter_model.safetensors` (`prompt_embeddings`).
    pub fn load(path: &Path, dims: EncoderDims, be: &dyn Backend) -> Result<PrefixEncoder> {
        let file = SafetensorsFile::open(path)?;
        let shapes = dims.shapes();
        let names = dims.param_names();
        let mut params = Vec::with_capacity(names.len());
        for (name, shape) in names.iter().zip(&shapes) {
            // PEFT saves the encoder under `prompt_encoder.default.` in some contexts.
            let mut candidates = vec![name.to_string(), format!("prompt_encoder.default.{name}")];
            if !dims.projection {
                candidates.push("prompt_embeddings".into());
            }
            let stored = candidates
                .into_iter()
                .find(|n| file.shape(n).is_ok())
                .ok_or_else(|| Error::Format {
                    path: path.to_path_buf(),
                    msg: if dims.projection {
                        format!(
                            "tensor {name:?} is missing; a prefix encoder with the MLP needs {}",
                            PARAM_NAMES.join(", ")
                        )
                    } else {
                        format!(
                            "tensor {name:?} (or an adapter's \"prompt_embeddings\") is missing; a prefix without the MLP (--no-prefix-projection) needs it as [P, L*2*C]"
                        )
                    },
                })?;
            let (got, data) = file.f32(&stored)?;
            if &got != shape {
                let sizes = if dims.projection {
                    format!(
                        "P={}, C={}, E={}, L={}",
                        dims.prefix_len, dims.token_dim, dims.hidden, dims.num_layers
                    )
                } else {
                    format!("P={}, L*2*C={} (no MLP)", dims.prefix_len, dims.out_dim())
                };
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor {stored:?} has shape {got:?}, expected {shape:?} for {sizes}"
                    ),
                });
            }
            params.push(be.upload(&Tensor::from_f32(shape, &data, DType::F32)?)?);
        }
        Ok(PrefixEncoder { dims, params })
    }

    /// Reads the sizes of the MLP encoder stored in `path` (P, C and E from the shapes; `L`
    /// from the output width).
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
                projection: true,
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
        let entries: Vec<(&str, Vec<usize>, &[f32])> = self
            .dims
            .param_names()
            .iter()
            .zip(&shapes)
            .zip(&host)
            .map(|((n, s), h)| (*n, s.clone(), h.as_slice()))
            .collect();
        write_safetensors_f32(path, &entries)
    }

    /// Buffers for [`PrefixEncoder::forward`] and [`PrefixEncoder::backward`].
    pub fn acts(&self, be: &dyn Backend) -> Result<EncoderActs> {
        let d = self.dims;
        if !d.projection {
            // No MLP: only the prefix and its scaled gradient are needed.
            let one = || be.zeros(&[1], DType::F32);
            return Ok(EncoderActs {
                hidden: one()?,
                d_scaled: be.zeros(&[d.prefix_len, d.out_dim()], DType::F32)?,
                d_hidden: one()?,
                d_pre: one()?,
                prefix: be.zeros(&[d.prefix_len, d.out_dim()], DType::F32)?,
            });
        }
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
        let [emb, w0, b0, w2, b2] = &self.params[..] else {
            // No MLP: the prefix is the parameter.
            return be.copy(&self.params[0].view(), &mut acts.prefix.view_mut());
        };
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
        if grads.params.len() != self.params.len() {
            return Err(Error::shape(
                "grads",
                format!("{} tensors like the encoder", self.params.len()),
                &[grads.params.len()],
            ));
        }
        let [emb, w0, _b0, w2, _b2] = &self.params[..] else {
            // No MLP: the gradient of the prefix is the parameter's.
            let g = &mut grads.params[0];
            be.copy(&d_prefix.view(), &mut g.view_mut())?;
            return be.scale(&mut g.view_mut(), scale);
        };
        let [g_emb, g_w0, g_b0, g_w2, g_b2] = &mut grads.params[..] else {
            return Err(Error::shape("grads", "5 tensors", &[grads.params.len()]));
        };
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
