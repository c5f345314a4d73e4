//! The GPT-2 forward pass with prefix K/V in every layer, and its manual backward that
//! computes activation gradients and the prefix gradient only (the model is frozen: no
//! weight gradient is ever computed). Written once against [`Backend`].

use super::config::Gpt2Config;
use super::weights::Weights;
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};
use std::path::{Path, PathBuf};

/// A frozen GPT-2.
#[derive(Debug)]
pub struct Gpt2 {
    /// The configuration.
    pub config: Gpt2Config,
    /// The weights, in the backend's memory.
    pub weights: Weights,
    /// The compute dtype of weights and activations.
    pub dtype: DType,
    /// The model folder it was loaded from.
    pub dir: PathBuf,
}

/// The label value that is not counted.
pub const IGNORE: i32 = -100;

/// A right-padded batch of token sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Token ids `[B, T]` (padding = 0).
    pub ids: Vec<i32>,
    /// Next-token targets `[B, T]`: `targets[b, t]` is the label of token `t + 1` (HF's
    /// in-model shift), `-100` where nothing is counted.
    pub targets: Vec<i32>,
    /// Valid tokens of each sequence.
    pub lens: Vec<usize>,
    /// `B`.
    pub batch_size: usize,
    /// `T` (the longest sequence).
    pub seq_len: usize,
}

impl Batch {
    /// Builds a batch from `(input_ids, labels)` pairs (labels aligned with the inputs, as
    /// Hugging Face expects them; `-100` ignored).
    pub fn new(examples: &[(&[u32], &[i32])]) -> Result<Batch> {
        let batch_size = examples.len();
        let seq_len = examples.iter().map(|e| e.0.len()).max().unwrap_or(0);
        if batch_size == 0 || seq_len == 0 {
            return Err(Error::index(
                "batch",
                "needs at least one non-empty sequence",
            ));
        }
        let mut ids = vec![0i32; batch_size * seq_len];
        let mut targets = vec![IGNORE; batch_size * seq_len];
        let mut lens = Vec::with_capacity(batch_size);
        for (b, (inp, lab)) in examples.iter().enumerate() {
            if inp.len() != lab.len() {
                return Err(Error::shape(
                    "labels",
                    format!("{} labels, one per input id", inp.len()),
                    &[lab.len()],
                ));
            }
            if inp.is_empty() {
                return Err(Error::index("batch", format!("sequence {b} is empty")));
            }
            for (t, &id) in inp.iter().enumerate() {
                ids[b * seq_len + t] = i32::try_from(id)
                    .map_err(|_| Error::index("input_ids", format!("token id {id} too large")))?;
                if t + 1 < inp.len() {
                    targets[b * seq_len + t] = lab[t + 1];
                }
            }
            lens.push(inp.len());
        }
        Ok(Batch {
            ids,
            targets,
            lens,
            batch_size,
            seq_len,
        })
    }

    /// Number of counted targets.
    pub fn count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Per-layer keys and values of earlier tokens, for incremental decoding. The prefix is not
/// copied in: every step attends over the prefix table and this cache.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Tokens already in the cache.
    pub len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for one sequence of up to `capacity` tokens.
    pub fn new(model: &Gpt2, backend: &dyn Backend, capacity: usize) -> Result<KvCache> {
        let c = &model.config;
        let dims = [1, capacity, c.n_head, c.head_dim()];
        let mk = || -> Result<Vec<Tensor>> {
            (0..c.n_layer)
                .map(|_| backend.zeros(&dims, model.dtype))
                .collect()
        };
        Ok(KvCache {
            k: mk()?,
            v: mk()?,
            len: 0,
            capacity,
        })
    }
}

/// Activations of one forward pass, kept for the backward.
#[derive(Debug)]
pub struct Activations {
    batch_size: usize,
    seq_len: usize,
    /// Residual stream before each layer and after the last: `L + 1` tensors `[M, C]`.
    res: Vec<Tensor>,
    // Layer-norm outputs and the GELU output feed only frozen matmuls: the backward never
    // needs them, so one scratch each serves every layer.
    ln1: Tensor,
    ln1_mean: Vec<Tensor>,
    ln1_rstd: Vec<Tensor>,
    qkv: Vec<Tensor>,
    atty: Vec<Tensor>,
    lse: Vec<Tensor>,
    mid: Vec<Tensor>,
    ln2: Tensor,
    ln2_mean: Vec<Tensor>,
    ln2_rstd: Vec<Tensor>,
    fch: Vec<Tensor>,
    fcg: Tensor,
    lnf: Tensor,
    lnf_mean: Tensor,
    lnf_rstd: Tensor,
    /// Logits `[M, V]` in the model's dtype: every row, or with
    /// [`Activations::counted_only`] the counted rows first (`counted_rows` gives their
    /// positions). In a half-precision model the gradient of a training forward is written
    /// over them (the logits are then gone).
    pub logits: Tensor,
    /// With `counted_only`: the rows (`b·T + t`) whose targets count, in order.
    pub counted_rows: Vec<i32>,
    counted_only: bool,
    head_in: Tensor,
    losses: Tensor,
    /// f32 models: a separate logit-gradient buffer.
    dlogits: Option<Tensor>,
    /// Half-precision models: the logit gradient is written over `logits`.
    grad_in_place: bool,
}

impl Activations {
    /// Computes the vocabulary projection (and its gradient) only at rows whose target
    /// counts: prompts and padding cost no `V`-wide work. Loss and gradients are unchanged;
    /// `logits` then holds the counted rows only.
    pub fn counted_only(mut self) -> Self {
        self.counted_only = true;
        self
    }

    /// Buffers for batches of `batch_size × seq_len` tokens; `with_grad` adds the logit
    /// gradient buffer the backward needs.
    pub fn new(
        model: &Gpt2,
        backend: &dyn Backend,
        batch_size: usize,
        seq_len: usize,
        with_grad: bool,
    ) -> Result<Activations> {
        let c = &model.config;
        let (m, e, dt) = (batch_size * seq_len, c.n_embd, model.dtype);
        let l = c.n_layer;
        let z = |shape: &[usize], dt: DType| backend.zeros(shape, dt);
        let many = |shape: &[usize], dt: DType, n: usize| -> Result<Vec<Tensor>> {
            (0..n).map(|_| z(shape, dt)).collect()
        };
        Ok(Activations {
            batch_size,
            seq_len,
            res: many(&[m, e], dt, l + 1)?,
            ln1: z(&[m, e], dt)?,
            ln1_mean: many(&[m], DType::F32, l)?,
            ln1_rstd: many(&[m], DType::F32, l)?,
            qkv: many(&[m, 3 * e], dt, l)?,
            atty: many(&[m, e], dt, l)?,
            lse: many(&[batch_size, c.n_head, seq_len], DType::F32, l)?,
            mid: many(&[m, e], dt, l)?,
            ln2: z(&[m, e], dt)?,
            ln2_mean: many(&[m], DType::F32, l)?,
            ln2_rstd: many(&[m], DType::F32, l)?,
            fch: many(&[m, c.n_inner], dt, l)?,
            fcg: z(&[m, c.n_inner], dt)?,
            lnf: z(&[m, e], dt)?,
            lnf_mean: z(&[m], DType::F32)?,
            lnf_rstd: z(&[m], DType::F32)?,
            logits: z(&[m, c.vocab_size], dt)?,
            counted_rows: vec![],
            counted_only: false,
            head_in: z(&[m, e], dt)?,
            losses: z(&[m], DType::F32)?,
            dlogits: if with_grad && dt == DType::F32 {
                Some(z(&[m, c.vocab_size], DType::F32)?)
            } else {
                None
            },
            grad_in_place: with_grad && dt != DType::F32,
        })
    }
}

/// Buffers of the backward pass.
#[derive(Debug)]
pub struct Gradients {
    d_res: Tensor,
    d_tmp: Tensor,
    d_qkv: Tensor,
    d_fc: Tensor,
    d_fc2: Tensor,
    /// Gradient of the summed token loss with respect to the prefix `[P, L·2·C]`, f32.
    pub d_prefix: Tensor,
}

impl Gradients {
    /// Buffers for batches of `batch_size × seq_len` and a prefix of `prefix_len`.
    pub fn new(
        model: &Gpt2,
        backend: &dyn Backend,
        batch_size: usize,
        seq_len: usize,
        prefix_len: usize,
    ) -> Result<Gradients> {
        let c = &model.config;
        let (m, e, dt) = (batch_size * seq_len, c.n_embd, model.dtype);
        Ok(Gradients {
            d_res: backend.zeros(&[m, e], dt)?,
            d_tmp: backend.zeros(&[m, e], dt)?,
            d_qkv: backend.zeros(&[m, 3 * e], dt)?,
            d_fc: backend.zeros(&[m, c.n_inner], dt)?,
            d_fc2: backend.zeros(&[m, c.n_inner], dt)?,
            d_prefix: backend.zeros(&[prefix_len, c.n_layer * 2 * e], DType::F32)?,
        })
    }
}

/// Loss of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSum {
    /// Sum of the token losses (nats).
    pub sum: f64,
    /// Number of counted targets.
    pub count: usize,
}

impl LossSum {
    /// Token-weighted mean loss.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

impl Gpt2 {
    /// The compute dtype of a model on `backend`: f32 on the cpu device (the reference),
    /// f16 on the kernel devices (emu, cuda): weights are converted once at load.
    pub fn dtype_for(backend: &dyn Backend) -> DType {
        match backend.device() {
            crate::device::Device::Cpu => DType::F32,
            _ => DType::F16,
        }
    }

    /// Loads an HF model folder: `config.json` and `model.safetensors` (or the shards of
    /// `model.safetensors.index.json`), in the compute dtype of `backend`
    /// ([`Gpt2::dtype_for`]).
    pub fn load(dir: &Path, backend: &dyn Backend) -> Result<Gpt2> {
        let config = Gpt2Config::load(&dir.join("config.json"))?;
        let dtype = Gpt2::dtype_for(backend);
        let weights = Weights::load_dir(dir, &config, backend, dtype)?;
        Ok(Gpt2 {
            config,
            weights,
            dtype,
            dir: dir.to_path_buf(),
        })
    }

    /// Checks that a prefix tensor is `[P, L·2·C]` (any dtype); returns `P`.
    pub fn check_prefix_shape(&self, prefix: &Tensor) -> Result<usize> {
        let c = &self.config;
        let d = prefix.dims();
        if d.len() != 2 || d[1] != c.n_layer * 2 * c.n_embd {
            return Err(Error::shape(
                "prefix",
                format!("[P, L*2*C = {}]", c.n_layer * 2 * c.n_embd),
                d,
            ));
        }
        Ok(d[0])
    }

    /// Checks that a prefix tensor `[P, L·2·C]` fits this model.
    pub fn check_prefix(&self, prefix: &Tensor) -> Result<usize> {
        let c = &self.config;
        let d = prefix.dims();
        if d.len() != 2 || d[1] != c.n_layer * 2 * c.n_embd {
            return Err(Error::shape(
                "prefix",
                format!("[P, L*2*C = {}]", c.n_layer * 2 * c.n_embd),
                d,
            ));
        }
        if prefix.dtype() != self.dtype {
            return Err(Error::DType {
                arg: "prefix".into(),
                expected: self.dtype.name().into(),
                got: prefix.dtype().name().into(),
            });
        }
        Ok(d[0])
    }

    /// Views of layer `l`'s prefix keys and values `[1, P, H, D]` in a `[P, L·2·C]` tensor.
    fn prefix_layer<'a>(
        &self,
        prefix: &'a Tensor,
        l: usize,
    ) -> Result<(TensorView<'a>, TensorView<'a>)> {
        let c = &self.config;
        let p = prefix.dims()[0];
        let v = prefix
            .view()
            .reshape(&[p, c.n_layer, 2, c.n_head, c.head_dim()])?
            .select(1, l)?;
        Ok((v.select(1, 0)?.unsqueeze(0)?, v.select(1, 1)?.unsqueeze(0)?))
    }

    /// Forward pass over `batch` with an optional prefix `[P, L·2·C]` (real tokens at
    /// positions `P + past ..`). With a cache, the new keys/values are appended to it and
    /// attention covers the cached tokens too (batch of one sequence). Returns the summed
    /// loss; with a logit-gradient buffer in `acts`, also writes the gradient of that sum.
    pub fn forward(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: Option<&Tensor>,
        acts: &mut Activations,
        mut cache: Option<&mut KvCache>,
    ) -> Result<LossSum> {
        let c = &self.config;
        let w = &self.weights;
        let (b, t) = (batch.batch_size, batch.seq_len);
        if (acts.batch_size, acts.seq_len) != (b, t) {
            return Err(Error::shape(
                "activations",
                format!("buffers for [B={b}, T={t}]"),
                &[acts.batch_size, acts.seq_len],
            ));
        }
        let p = match prefix {
            Some(pre) => self.check_prefix(pre)?,
            None => 0,
        };
        let past = cache.as_ref().map_or(0, |k| k.len);
        if let Some(k) = &cache {
            if b != 1 || past + t > k.capacity {
                return Err(Error::index(
                    "cache",
                    format!(
                        "holds one sequence of {} tokens; asked for batch {b} with {} tokens",
                        k.capacity,
                        past + t
                    ),
                ));
            }
        }
        if p + past + t > c.n_positions {
            return Err(Error::index(
                "sequence",
                format!(
                    "{} tokens after a prefix of {p} exceed n_positions = {} (at most {} tokens)",
                    past + t,
                    c.n_positions,
                    c.n_positions - p
                ),
            ));
        }
        let (h, d) = (c.n_head, c.head_dim());
        let lens: Vec<i32> = batch.lens.iter().map(|&n| n as i32).collect();
        let lens_k: Vec<i32> = lens.iter().map(|&n| n + past as i32).collect();
        let scale = if c.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };
        let eps = c.layer_norm_epsilon;

        be.embed(
            &batch.ids,
            t,
            &w.wte.view(),
            &w.wpe.view(),
            p + past,
            &mut acts.res[0].view_mut(),
        )?;
        for l in 0..c.n_layer {
            let lw = &w.layers[l];
            let (res_in, res_out) = acts.res.split_at_mut(l + 1);
            let res_in = &res_in[l];
            let res_out = &mut res_out[0];
            be.layernorm(
                &res_in.view(),
                &lw.ln1_w.view(),
                &lw.ln1_b.view(),
                eps,
                &mut acts.ln1.view_mut(),
                &mut acts.ln1_mean[l].view_mut(),
                &mut acts.ln1_rstd[l].view_mut(),
            )?;
            be.matmul(
                &acts.ln1.view(),
                &lw.attn_w.view(),
                Some(&lw.attn_b.view()),
                &mut acts.qkv[l].view_mut(),
                MatmulOpts::default(),
            )?;
            let qkv = acts.qkv[l].view().reshape(&[b, t, 3, h, d])?;
            let (q, k_new, v_new) = (qkv.select(2, 0)?, qkv.select(2, 1)?, qkv.select(2, 2)?);
            let (k_all, v_all);
            if let Some(kc) = cache.as_deref_mut() {
                be.copy(&k_new, &mut kc.k[l].view_mut().narrow(1, past, t)?)?;
                be.copy(&v_new, &mut kc.v[l].view_mut().narrow(1, past, t)?)?;
                k_all = kc.k[l].view().narrow(1, 0, past + t)?;
                v_all = kc.v[l].view().narrow(1, 0, past + t)?;
            } else {
                k_all = k_new;
                v_all = v_new;
            }
            let mut args = AttnFwdArgs::new(q, k_all, v_all)
                .seqlens(&lens, &lens_k)
                .causal(true)
                .scale(scale);
            if let Some(pre) = prefix {
                let (kp, vp) = self.prefix_layer(pre, l)?;
                args = args.prefix(kp, vp);
            }
            be.attn_fwd(
                &args,
                AttnFwdOut {
                    o: acts.atty[l].view_mut().reshape(&[b, t, h, d])?,
                    lse: Some(acts.lse[l].view_mut()),
                },
            )?;
            // Biases ride along with the next elementwise pass (bias + residual, bias +
            // GELU): no extra pass over the matmul outputs.
            be.matmul(
                &acts.atty[l].view(),
                &lw.proj_w.view(),
                None,
                &mut acts.mid[l].view_mut(),
                MatmulOpts::default(),
            )?;
            be.bias_residual(
                &mut acts.mid[l].view_mut(),
                &lw.proj_b.view(),
                &res_in.view(),
            )?;
            be.layernorm(
                &acts.mid[l].view(),
                &lw.ln2_w.view(),
                &lw.ln2_b.view(),
                eps,
                &mut acts.ln2.view_mut(),
                &mut acts.ln2_mean[l].view_mut(),
                &mut acts.ln2_rstd[l].view_mut(),
            )?;
            be.matmul(
                &acts.ln2.view(),
                &lw.fc_w.view(),
                None,
                &mut acts.fch[l].view_mut(),
                MatmulOpts::default(),
            )?;
            be.bias_gelu(
                &mut acts.fch[l].view_mut(),
                &lw.fc_b.view(),
                &mut acts.fcg.view_mut(),
            )?;
            be.matmul(
                &acts.fcg.view(),
                &lw.fc_proj_w.view(),
                None,
                &mut res_out.view_mut(),
                MatmulOpts::default(),
            )?;
            be.bias_residual(
                &mut res_out.view_mut(),
                &lw.fc_proj_b.view(),
                &acts.mid[l].view(),
            )?;
        }
        if let Some(kc) = cache {
            kc.len += t;
        }
        be.layernorm(
            &acts.res[c.n_layer].view(),
            &w.lnf_w.view(),
            &w.lnf_b.view(),
            eps,
            &mut acts.lnf.view_mut(),
            &mut acts.lnf_mean.view_mut(),
            &mut acts.lnf_rstd.view_mut(),
        )?;
        let m = b * t;
        acts.counted_rows = (0..m as i32)
            .filter(|&r| batch.targets[r as usize] != IGNORE)
            .collect();
        let compact = acts.counted_only && acts.counted_rows.len() < m;
        let (n, targets): (usize, Vec<i32>) = if compact {
            let rows = &acts.counted_rows;
            (
                rows.len(),
                rows.iter().map(|&r| batch.targets[r as usize]).collect(),
            )
        } else {
            (m, batch.targets.clone())
        };
        if compact && n > 0 {
            be.gather_rows(
                &acts.lnf.view(),
                &acts.counted_rows,
                &mut acts.head_in.view_mut().narrow(0, 0, n)?,
            )?;
        }
        let head_in = if compact {
            acts.head_in.view().narrow(0, 0, n)?
        } else {
            acts.lnf.view()
        };
        let mut sum = 0f64;
        if n > 0 {
            be.matmul(
                &head_in,
                &w.wte.view(),
                None,
                &mut acts.logits.view_mut().narrow(0, 0, n)?,
                MatmulOpts::nt(),
            )?;
            let mut losses = acts.losses.view_mut().narrow(0, 0, n)?;
            if acts.grad_in_place {
                be.cross_entropy_inplace(
                    &mut acts.logits.view_mut().narrow(0, 0, n)?,
                    &targets,
                    &mut losses,
                )?;
            } else {
                let mut dl = match acts.dlogits.as_mut() {
                    Some(t) => Some(t.view_mut().narrow(0, 0, n)?),
                    None => None,
                };
                be.cross_entropy(
                    &acts.logits.view().narrow(0, 0, n)?,
                    &targets,
                    &mut losses,
                    dl.as_mut(),
                )?;
            }
            let losses = be.download(&acts.losses)?.to_f32_vec();
            sum = targets
                .iter()
                .zip(&losses[..n])
                .filter(|(&tg, _)| tg != IGNORE)
                .map(|(_, &x)| x as f64)
                .sum();
        }
        Ok(LossSum {
            sum,
            count: batch.count(),
        })
    }

    /// Backward of the summed loss of the last [`Gpt2::forward`] (which must have had a
    /// logit-gradient buffer) to the prefix: writes `grads.d_prefix [P, L·2·C]` (f32).
    /// Only activation gradients are computed; layer 0 runs the prefix-only attention
    /// backward and nothing below it.
    pub fn backward(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: &Tensor,
        acts: &Activations,
        grads: &mut Gradients,
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights;
        let p = self.check_prefix(prefix)?;
        if grads.d_prefix.dims() != [p, c.n_layer * 2 * c.n_embd] {
            return Err(Error::shape(
                "d_prefix",
                format!("[{p}, {}] like the prefix", c.n_layer * 2 * c.n_embd),
                grads.d_prefix.dims(),
            ));
        }
        let (b, t) = (batch.batch_size, batch.seq_len);
        let (h, d) = (c.n_head, c.head_dim());
        if acts.dlogits.is_none() && !acts.grad_in_place {
            return Err(Error::index(
                "activations",
                "the forward kept no logit gradient (with_grad = false)",
            ));
        }
        let dlogits = acts.dlogits.as_ref().unwrap_or(&acts.logits);
        let lens: Vec<i32> = batch.lens.iter().map(|&n| n as i32).collect();
        let scale = if c.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };

        // Head and final layer norm: d_lnf = dlogits · wte, then through ln_f.
        let m = b * t;
        let rows = &acts.counted_rows;
        if acts.counted_only && rows.len() < m {
            let n = rows.len();
            if n > 0 {
                be.matmul(
                    &dlogits.view().narrow(0, 0, n)?,
                    &w.wte.view(),
                    None,
                    &mut grads.d_res.view_mut().narrow(0, 0, n)?,
                    MatmulOpts::default(),
                )?;
            }
            be.scatter_rows(
                &grads.d_res.view().narrow(0, 0, n)?,
                rows,
                &mut grads.d_tmp.view_mut(),
            )?;
        } else {
            be.matmul(
                &dlogits.view(),
                &w.wte.view(),
                None,
                &mut grads.d_tmp.view_mut(),
                MatmulOpts::default(),
            )?;
        }
        be.layernorm_bwd(
            &grads.d_tmp.view(),
            &acts.res[c.n_layer].view(),
            &w.lnf_w.view(),
            &acts.lnf_mean.view(),
            &acts.lnf_rstd.view(),
            &mut grads.d_res.view_mut(),
            false,
        )?;
        let d_prefix_layers = grads
            .d_prefix
            .view_mut()
            .reshape(&[p, c.n_layer, 2, h, d])?
            .unbind(1)?;
        for (l, d_pre) in d_prefix_layers.into_iter().enumerate().rev() {
            let lw = &w.layers[l];
            // MLP branch: res[l+1] = mid + c_proj(gelu(c_fc(ln_2(mid)))).
            be.matmul(
                &grads.d_res.view(),
                &lw.fc_proj_w.view(),
                None,
                &mut grads.d_fc.view_mut(),
                MatmulOpts::nt(),
            )?;
            be.gelu_bwd(
                &acts.fch[l].view(),
                &grads.d_fc.view(),
                &mut grads.d_fc2.view_mut(),
            )?;
            be.matmul(
                &grads.d_fc2.view(),
                &lw.fc_w.view(),
                None,
                &mut grads.d_tmp.view_mut(),
                MatmulOpts::nt(),
            )?;
            be.layernorm_bwd(
                &grads.d_tmp.view(),
                &acts.mid[l].view(),
                &lw.ln2_w.view(),
                &acts.ln2_mean[l].view(),
                &acts.ln2_rstd[l].view(),
                &mut grads.d_res.view_mut(),
                true,
            )?;
            // Attention branch: mid = res[l] + c_proj(attn(ln_1(res[l]))).
            be.matmul(
                &grads.d_res.view(),
                &lw.proj_w.view(),
                None,
                &mut grads.d_tmp.view_mut(),
                MatmulOpts::nt(),
            )?;
            let qkv = acts.qkv[l].view().reshape(&[b, t, 3, h, d])?;
            let (kp, vp) = self.prefix_layer(prefix, l)?;
            let fwd = AttnFwdArgs::new(qkv.select(2, 0)?, qkv.select(2, 1)?, qkv.select(2, 2)?)
                .prefix(kp, vp)
                .seqlens(&lens, &lens)
                .causal(true)
                .scale(scale);
            let first = l == 0;
            let mut dpre = d_pre.unbind(1)?.into_iter();
            let (dk_pre, dv_pre) = match (dpre.next(), dpre.next()) {
                (Some(k), Some(v)) => (k.unsqueeze(0)?, v.unsqueeze(0)?),
                _ => {
                    return Err(Error::index(
                        "d_prefix",
                        "cannot split into keys and values",
                    ))
                }
            };
            let mut seq_grads: Vec<Option<TensorViewMut>> = if first {
                vec![None, None, None]
            } else {
                grads
                    .d_qkv
                    .view_mut()
                    .reshape(&[b, t, 3, h, d])?
                    .unbind(2)?
                    .into_iter()
                    .map(Some)
                    .collect()
            };
            let dv = seq_grads.pop().flatten();
            let dk = seq_grads.pop().flatten();
            let dq = seq_grads.pop().flatten();
            be.attn_bwd(
                &AttnBwdArgs {
                    fwd,
                    o: acts.atty[l].view().reshape(&[b, t, h, d])?,
                    lse: acts.lse[l].view(),
                    d_o: grads.d_tmp.view().reshape(&[b, t, h, d])?,
                    prefix_only: first,
                },
                AttnGrads {
                    dq,
                    dk,
                    dv,
                    dk_pre: Some(dk_pre),
                    dv_pre: Some(dv_pre),
                },
            )?;
            if first {
                break;
            }
            be.matmul(
                &grads.d_qkv.view(),
                &lw.attn_w.view(),
                None,
                &mut grads.d_tmp.view_mut(),
                MatmulOpts::nt(),
            )?;
            be.layernorm_bwd(
                &grads.d_tmp.view(),
                &acts.res[l].view(),
                &lw.ln1_w.view(),
                &acts.ln1_mean[l].view(),
                &acts.ln1_rstd[l].view(),
                &mut grads.d_res.view_mut(),
                true,
            )?;
        }
        Ok(())
    }
}
