//! The GPT-2 forward pass with prefix K/V in every layer, and its manual backward that
//! computes activation gradients and the prefix gradient only (the model is frozen: no
//! weight gradient is ever computed). Written once against [`Backend`].

use super::config::Gpt2Config;
use super::weights::Weights;
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::lm::head::{Head, Logits};
use crate::lm::{Batch, Geometry, KvCache, LossSum, PackedWeights, PrefixLm, Workspace, IGNORE};
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
    /// Packed copies of the matmul weights, made by
    /// [`PrefixLm::prepare_inference`](crate::lm::PrefixLm::prepare_inference); clear them
    /// before changing `weights` in place.
    pub packed: PackedWeights,
}

/// Activations of one forward pass, kept for the backward.
#[derive(Debug)]
pub struct Activations {
    /// Token rows `M = B·T` the buffers hold: a batch of up to that many uses their first
    /// `B·T` rows (grow-only reuse, docs/ARCHITECTURE.md §3).
    rows: usize,
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
    /// The head, the losses and the gradient the backward starts from.
    head: Head,
}

impl Activations {
    /// Computes the vocabulary projection (and its gradient) only at rows whose target
    /// counts: prompts and padding cost no `V`-wide work. Loss and gradients are unchanged;
    /// `logits` then holds the counted rows only.
    pub fn counted_only(mut self) -> Self {
        self.head.set_counted_only();
        self
    }

    /// Logits `[M, V]` of the last forward in the model's dtype: every row, or with
    /// [`Activations::counted_only`] the counted rows first ([`Activations::counted_rows`]
    /// gives their positions). In a half-precision model the gradient of a training forward
    /// is written over them. [`Activations::streamed`] keeps no logits (this is its last
    /// chunk).
    pub fn logits(&self) -> &Tensor {
        self.head.logits()
    }

    /// The rows (`b·T + t`) whose targets counted in the last forward, in order.
    pub fn counted_rows(&self) -> &[i32] {
        self.head.counted_rows()
    }

    /// Training (or loss-only) buffers that keep no logits: the forward computes the
    /// vocabulary projection, the loss and (`with_grad`) the projection's backward
    /// `chunk_rows` counted rows at a time (`None`: as many as fit
    /// [`crate::lm::head::HEAD_CHUNK_BYTES`] of logits), keeping only the gradient at the
    /// head's input. Loss and prefix gradient are those of [`Activations::with_rows`].
    pub fn streamed(
        model: &Gpt2,
        backend: &dyn Backend,
        rows: usize,
        with_grad: bool,
        chunk_rows: Option<usize>,
    ) -> Result<Activations> {
        Activations::build(
            model,
            backend,
            rows,
            with_grad,
            Logits::Streamed(chunk_rows),
        )
    }

    /// Buffers for batches of `batch_size × seq_len` tokens (or any batch of at most that
    /// many); `with_grad` adds the logit gradient buffer the backward needs.
    pub fn new(
        model: &Gpt2,
        backend: &dyn Backend,
        batch_size: usize,
        seq_len: usize,
        with_grad: bool,
    ) -> Result<Activations> {
        Activations::with_rows(model, backend, batch_size * seq_len, with_grad)
    }

    /// Buffers for any batch of at most `rows` tokens (`B·T`, padding included).
    pub fn with_rows(
        model: &Gpt2,
        backend: &dyn Backend,
        rows: usize,
        with_grad: bool,
    ) -> Result<Activations> {
        Activations::build(model, backend, rows, with_grad, Logits::Whole)
    }

    /// The buffers for `rows` rows, the head's kept as `logits` says.
    fn build(
        model: &Gpt2,
        backend: &dyn Backend,
        rows: usize,
        with_grad: bool,
        logits: Logits,
    ) -> Result<Activations> {
        let c = &model.config;
        let (width, vocab) = (c.n_embd, c.vocab_size);
        let head = Head::new(backend, rows, width, vocab, model.dtype, with_grad, logits)?;
        let (m, e, dt) = (rows, c.n_embd, model.dtype);
        let l = c.n_layer;
        let z = |shape: &[usize], dt: DType| backend.zeros(shape, dt);
        let many = |shape: &[usize], dt: DType, n: usize| -> Result<Vec<Tensor>> {
            (0..n).map(|_| z(shape, dt)).collect()
        };
        Ok(Activations {
            rows,
            res: many(&[m, e], dt, l + 1)?,
            ln1: z(&[m, e], dt)?,
            ln1_mean: many(&[m], DType::F32, l)?,
            ln1_rstd: many(&[m], DType::F32, l)?,
            qkv: many(&[m, 3 * e], dt, l)?,
            atty: many(&[m, e], dt, l)?,
            // [B, H, T] of a batch, flat: any B·T <= rows fits.
            lse: many(&[c.n_head * m], DType::F32, l)?,
            mid: many(&[m, e], dt, l)?,
            ln2: z(&[m, e], dt)?,
            ln2_mean: many(&[m], DType::F32, l)?,
            ln2_rstd: many(&[m], DType::F32, l)?,
            fch: many(&[m, c.n_inner], dt, l)?,
            fcg: z(&[m, c.n_inner], dt)?,
            lnf: z(&[m, e], dt)?,
            lnf_mean: z(&[m], DType::F32)?,
            lnf_rstd: z(&[m], DType::F32)?,
            head,
        })
    }
}

/// Buffers of the backward pass.
#[derive(Debug)]
pub struct Gradients {
    scratch: GradScratch,
    /// Gradient of the summed token loss with respect to the prefix `[P, L·2·C]`, f32.
    pub d_prefix: Tensor,
}

/// The activation gradients of the backward, for any batch of at most `rows` tokens.
#[derive(Debug)]
struct GradScratch {
    rows: usize,
    d_res: Tensor,
    d_tmp: Tensor,
    d_qkv: Tensor,
    d_fc: Tensor,
    d_fc2: Tensor,
}

impl GradScratch {
    fn new(model: &Gpt2, backend: &dyn Backend, rows: usize) -> Result<GradScratch> {
        let c = &model.config;
        let (m, e, dt) = (rows, c.n_embd, model.dtype);
        Ok(GradScratch {
            rows,
            d_res: backend.zeros(&[m, e], dt)?,
            d_tmp: backend.zeros(&[m, e], dt)?,
            d_qkv: backend.zeros(&[m, 3 * e], dt)?,
            d_fc: backend.zeros(&[m, c.n_inner], dt)?,
            d_fc2: backend.zeros(&[m, c.n_inner], dt)?,
        })
    }
}

impl Gradients {
    /// Buffers for batches of `batch_size × seq_len` (or fewer tokens) and a prefix of
    /// `prefix_len`.
    pub fn new(
        model: &Gpt2,
        backend: &dyn Backend,
        batch_size: usize,
        seq_len: usize,
        prefix_len: usize,
    ) -> Result<Gradients> {
        let c = &model.config;
        Ok(Gradients {
            scratch: GradScratch::new(model, backend, batch_size * seq_len)?,
            d_prefix: backend.zeros(&[prefix_len, c.n_layer * 2 * c.n_embd], DType::F32)?,
        })
    }
}

/// What a [`Workspace`] holds for GPT-2: activations, and for training the gradient scratch.
struct Gpt2Workspace {
    acts: Activations,
    grads: Option<GradScratch>,
}

/// The input gradient of `linear(ln(x))` from the linear's output gradient `d_out`:
/// through the weight `w` (`nt`) into `d_tmp`, then through the layer norm (`ln` = x, its
/// weight, mean and rstd) accumulated into `d_res`. Both branches of a block end so.
fn linear_ln_bwd(
    be: &dyn Backend,
    d_out: &TensorView,
    w: &TensorView,
    [x, ln_w, mean, rstd]: [&TensorView; 4],
    d_tmp: &mut TensorViewMut,
    d_res: &mut TensorViewMut,
) -> Result<()> {
    be.matmul(d_out, w, None, d_tmp, MatmulOpts::nt())?;
    be.layernorm_bwd(&d_tmp.as_view(), x, ln_w, mean, rstd, d_res, true)
}

/// The first `rows` rows of a buffer.
fn rows(t: &Tensor, rows: usize) -> Result<TensorView<'_>> {
    t.view().narrow(0, 0, rows)
}

/// The first `rows` rows of a buffer, to write.
fn rows_mut(t: &mut Tensor, rows: usize) -> Result<TensorViewMut<'_>> {
    t.view_mut().narrow(0, 0, rows)
}

/// The buffers of a block's part after attention ([`Gpt2::block_mlp`]), `[M, ·]` rows.
pub(crate) struct BlockMlpBufs<'a> {
    /// `x + atty · W_proj + b_proj` `[M, C]`.
    pub mid: TensorViewMut<'a>,
    /// `LN2(mid)` `[M, C]`.
    pub ln: TensorViewMut<'a>,
    /// LN2's mean `[M]` (f32).
    pub mean: TensorViewMut<'a>,
    /// LN2's reciprocal standard deviation `[M]` (f32).
    pub rstd: TensorViewMut<'a>,
    /// The MLP's pre-GELU activations `[M, 4C]`, which the backward needs.
    pub fch: TensorViewMut<'a>,
    /// GELU of `fch` `[M, 4C]`.
    pub fcg: TensorViewMut<'a>,
    /// The block's output `mid + MLP(LN2(mid))` `[M, C]`.
    pub out: TensorViewMut<'a>,
}

impl Gpt2 {
    /// Block `l` up to attention: `ln = LN1(x)` (keeping its statistics) and the fused
    /// projection `qkv = ln · W_attn + b_attn` `[M, 3C]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_qkv(
        &self,
        be: &dyn Backend,
        l: usize,
        x: &TensorView,
        ln: &mut TensorViewMut,
        mean: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
        qkv: &mut TensorViewMut,
    ) -> Result<()> {
        let lw = &self.weights.layers[l];
        let eps = self.config.layer_norm_epsilon;
        be.layernorm(x, &lw.ln1_w.view(), &lw.ln1_b.view(), eps, ln, mean, rstd)?;
        self.packed.matmul(
            be,
            &ln.as_view(),
            &lw.attn_w,
            Some(&lw.attn_b.view()),
            qkv,
            MatmulOpts::default(),
        )
    }

    /// Block `l` after attention: the output projection and residual into `mid`, then the
    /// MLP and its residual into `out`. Biases ride along with the next elementwise pass
    /// (bias + residual, bias + GELU): no extra pass over the matmul outputs.
    pub(crate) fn block_mlp(
        &self,
        be: &dyn Backend,
        l: usize,
        x: &TensorView,
        atty: &TensorView,
        mut b: BlockMlpBufs,
    ) -> Result<()> {
        let lw = &self.weights.layers[l];
        let eps = self.config.layer_norm_epsilon;
        let mm = MatmulOpts::default();
        let pk = &self.packed;
        pk.matmul(be, atty, &lw.proj_w, None, &mut b.mid, mm)?;
        be.bias_residual(&mut b.mid, &lw.proj_b.view(), x)?;
        let mid = b.mid.as_view();
        be.layernorm(
            &mid,
            &lw.ln2_w.view(),
            &lw.ln2_b.view(),
            eps,
            &mut b.ln,
            &mut b.mean,
            &mut b.rstd,
        )?;
        pk.matmul(be, &b.ln.as_view(), &lw.fc_w, None, &mut b.fch, mm)?;
        be.bias_gelu(&mut b.fch, &lw.fc_b.view(), &mut b.fcg)?;
        pk.matmul(be, &b.fcg.as_view(), &lw.fc_proj_w, None, &mut b.out, mm)?;
        be.bias_residual(&mut b.out, &lw.fc_proj_b.view(), &mid)
    }
}

impl Gpt2 {
    /// The compute dtype of a model on `backend` ([`crate::lm::dtype_for`]).
    pub fn dtype_for(backend: &dyn Backend) -> DType {
        crate::lm::dtype_for(backend)
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
            packed: PackedWeights::new(),
        })
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
        let m = b * t;
        if m > acts.rows {
            return Err(Error::shape(
                "activations",
                format!("buffers for at least B·T = {b}·{t} = {m} rows"),
                &[acts.rows],
            ));
        }
        let p = match prefix {
            Some(pre) => self.check_prefix(pre)?,
            None => 0,
        };
        let past = cache.as_ref().map_or(0, |k| k.len);
        if let Some(k) = &cache {
            if b != 1 || past + t > k.capacity() {
                return Err(Error::index(
                    "cache",
                    format!(
                        "holds one sequence of {} tokens; asked for batch {b} with {} tokens",
                        k.capacity(),
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
            &mut rows_mut(&mut acts.res[0], m)?,
        )?;
        for l in 0..c.n_layer {
            let (res_in, res_out) = acts.res.split_at_mut(l + 1);
            let res_in = &res_in[l];
            let res_out = &mut res_out[0];
            self.block_qkv(
                be,
                l,
                &rows(res_in, m)?,
                &mut rows_mut(&mut acts.ln1, m)?,
                &mut rows_mut(&mut acts.ln1_mean[l], m)?,
                &mut rows_mut(&mut acts.ln1_rstd[l], m)?,
                &mut rows_mut(&mut acts.qkv[l], m)?,
            )?;
            let qkv = rows(&acts.qkv[l], m)?.reshape(&[b, t, 3, h, d])?;
            let (q, k_new, v_new) = (qkv.select(2, 0)?, qkv.select(2, 1)?, qkv.select(2, 2)?);
            let (k_all, v_all);
            if let Some(kc) = cache.as_deref_mut() {
                let (kl, vl) = kc.layer_mut(l)?;
                be.copy(&k_new, &mut kl.view_mut().narrow(1, past, t)?)?;
                be.copy(&v_new, &mut vl.view_mut().narrow(1, past, t)?)?;
                k_all = kl.view().narrow(1, 0, past + t)?;
                v_all = vl.view().narrow(1, 0, past + t)?;
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
                    o: rows_mut(&mut acts.atty[l], m)?.reshape(&[b, t, h, d])?,
                    lse: Some(rows_mut(&mut acts.lse[l], h * m)?.reshape(&[b, h, t])?),
                },
            )?;
            self.block_mlp(
                be,
                l,
                &rows(res_in, m)?,
                &rows(&acts.atty[l], m)?,
                BlockMlpBufs {
                    mid: rows_mut(&mut acts.mid[l], m)?,
                    ln: rows_mut(&mut acts.ln2, m)?,
                    mean: rows_mut(&mut acts.ln2_mean[l], m)?,
                    rstd: rows_mut(&mut acts.ln2_rstd[l], m)?,
                    fch: rows_mut(&mut acts.fch[l], m)?,
                    fcg: rows_mut(&mut acts.fcg, m)?,
                    out: rows_mut(res_out, m)?,
                },
            )?;
        }
        if let Some(kc) = cache {
            kc.len += t;
        }
        be.layernorm(
            &rows(&acts.res[c.n_layer], m)?,
            &w.lnf_w.view(),
            &w.lnf_b.view(),
            eps,
            &mut rows_mut(&mut acts.lnf, m)?,
            &mut rows_mut(&mut acts.lnf_mean, m)?,
            &mut rows_mut(&mut acts.lnf_rstd, m)?,
        )?;
        let sum =
            acts.head
                .forward(be, &rows(&acts.lnf, m)?, &w.wte.view(), &batch.targets[..m])?;
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
        self.backward_into(
            be,
            batch,
            prefix,
            acts,
            &mut grads.scratch,
            &mut grads.d_prefix,
        )
    }

    /// [`Gpt2::backward`] with its scratch and the prefix gradient apart.
    fn backward_into(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: &Tensor,
        acts: &Activations,
        grads: &mut GradScratch,
        d_prefix: &mut Tensor,
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights;
        let p = self.check_prefix(prefix)?;
        if d_prefix.dims() != [p, c.n_layer * 2 * c.n_embd] {
            return Err(Error::shape(
                "d_prefix",
                format!("[{p}, {}] like the prefix", c.n_layer * 2 * c.n_embd),
                d_prefix.dims(),
            ));
        }
        if d_prefix.dtype() != DType::F32 {
            return Err(Error::DType {
                arg: "d_prefix".into(),
                expected: "f32".into(),
                got: d_prefix.dtype().name().into(),
            });
        }
        let (b, t) = (batch.batch_size, batch.seq_len);
        let (h, d) = (c.n_head, c.head_dim());
        let m = b * t;
        if m > acts.rows || m > grads.rows {
            return Err(Error::shape(
                "gradients",
                format!("buffers for at least B·T = {b}·{t} = {m} rows"),
                &[acts.rows.min(grads.rows)],
            ));
        }
        let lens: Vec<i32> = batch.lens.iter().map(|&n| n as i32).collect();
        let scale = if c.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };

        // Head and final layer norm: d_lnf = dlogits · wte (a streamed forward computed it
        // already), then through ln_f.
        acts.head.backward(
            be,
            &w.wte.view(),
            &mut rows_mut(&mut grads.d_tmp, m)?,
            &mut grads.d_res.view_mut(),
        )?;
        be.layernorm_bwd(
            &rows(&grads.d_tmp, m)?,
            &rows(&acts.res[c.n_layer], m)?,
            &w.lnf_w.view(),
            &rows(&acts.lnf_mean, m)?,
            &rows(&acts.lnf_rstd, m)?,
            &mut rows_mut(&mut grads.d_res, m)?,
            false,
        )?;
        let d_prefix_layers = d_prefix
            .view_mut()
            .reshape(&[p, c.n_layer, 2, h, d])?
            .unbind(1)?;
        for (l, d_pre) in d_prefix_layers.into_iter().enumerate().rev() {
            let lw = &w.layers[l];
            // MLP branch: res[l+1] = mid + c_proj(gelu(c_fc(ln_2(mid)))).
            be.matmul(
                &rows(&grads.d_res, m)?,
                &lw.fc_proj_w.view(),
                None,
                &mut rows_mut(&mut grads.d_fc, m)?,
                MatmulOpts::nt(),
            )?;
            be.gelu_bwd(
                &rows(&acts.fch[l], m)?,
                &rows(&grads.d_fc, m)?,
                &mut rows_mut(&mut grads.d_fc2, m)?,
            )?;
            linear_ln_bwd(
                be,
                &rows(&grads.d_fc2, m)?,
                &lw.fc_w.view(),
                [
                    &rows(&acts.mid[l], m)?,
                    &lw.ln2_w.view(),
                    &rows(&acts.ln2_mean[l], m)?,
                    &rows(&acts.ln2_rstd[l], m)?,
                ],
                &mut rows_mut(&mut grads.d_tmp, m)?,
                &mut rows_mut(&mut grads.d_res, m)?,
            )?;
            // Attention branch: mid = res[l] + c_proj(attn(ln_1(res[l]))).
            be.matmul(
                &rows(&grads.d_res, m)?,
                &lw.proj_w.view(),
                None,
                &mut rows_mut(&mut grads.d_tmp, m)?,
                MatmulOpts::nt(),
            )?;
            let qkv = rows(&acts.qkv[l], m)?.reshape(&[b, t, 3, h, d])?;
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
                rows_mut(&mut grads.d_qkv, m)?
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
                    o: rows(&acts.atty[l], m)?.reshape(&[b, t, h, d])?,
                    lse: rows(&acts.lse[l], h * m)?.reshape(&[b, h, t])?,
                    d_o: rows(&grads.d_tmp, m)?.reshape(&[b, t, h, d])?,
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
            linear_ln_bwd(
                be,
                &rows(&grads.d_qkv, m)?,
                &lw.attn_w.view(),
                [
                    &rows(&acts.res[l], m)?,
                    &lw.ln1_w.view(),
                    &rows(&acts.ln1_mean[l], m)?,
                    &rows(&acts.ln1_rstd[l], m)?,
                ],
                &mut rows_mut(&mut grads.d_tmp, m)?,
                &mut rows_mut(&mut grads.d_res, m)?,
            )?;
        }
        Ok(())
    }
}

impl PrefixLm for Gpt2 {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn step_paged(
        &self,
        be: &dyn Backend,
        seqs: &[crate::lm::paged::PagedSeq],
        kv: &mut crate::lm::paged::PagedKv,
        prefixes: &crate::lm::paged::PrefixTable,
        mode: crate::lm::paged::PrefixMode,
    ) -> Result<Vec<Vec<f32>>> {
        self.step_paged_impl(be, seqs, kv, prefixes, mode)
    }

    fn geometry(&self) -> Geometry {
        self.config.geometry()
    }

    fn prepare_inference(&self, be: &dyn Backend) -> Result<crate::lm::PackReport> {
        let w = &self.weights;
        let mut list = Vec::with_capacity(4 * w.layers.len() + 1);
        for (l, lw) in w.layers.iter().enumerate() {
            list.push((&lw.attn_w, false, format!("h.{l}.attn.c_attn.weight")));
            list.push((&lw.proj_w, false, format!("h.{l}.attn.c_proj.weight")));
            list.push((&lw.fc_w, false, format!("h.{l}.mlp.c_fc.weight")));
            list.push((&lw.fc_proj_w, false, format!("h.{l}.mlp.c_proj.weight")));
        }
        // The tied output head: logits = x · wteᵀ.
        list.push((&w.wte, true, "wte.weight".to_string()));
        self.packed.prepare(be, &list)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.config.eos_token_id
    }

    fn loss(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: Option<&Tensor>,
        ws: &mut Workspace,
    ) -> Result<LossSum> {
        let m = batch.batch_size * batch.seq_len;
        let w = ws.get(
            |w: &Gpt2Workspace| w.grads.is_none() && w.acts.rows >= m,
            || {
                Ok(Gpt2Workspace {
                    acts: Activations::streamed(self, be, m, false, None)?,
                    grads: None,
                })
            },
        )?;
        self.forward(be, batch, prefix, &mut w.acts, None)
    }

    fn loss_and_grad(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: &Tensor,
        ws: &mut Workspace,
        d_prefix: &mut Tensor,
    ) -> Result<LossSum> {
        let m = batch.batch_size * batch.seq_len;
        let w = ws.get(
            |w: &Gpt2Workspace| w.grads.as_ref().is_some_and(|g| g.rows >= m) && w.acts.rows >= m,
            || {
                Ok(Gpt2Workspace {
                    acts: Activations::streamed(self, be, m, true, None)?,
                    grads: Some(GradScratch::new(self, be, m)?),
                })
            },
        )?;
        let loss = self.forward(be, batch, Some(prefix), &mut w.acts, None)?;
        if loss.sum.is_finite() && loss.count > 0 {
            let Some(grads) = w.grads.as_mut() else {
                return Err(Error::index("workspace", "no gradient buffers"));
            };
            self.backward_into(be, batch, prefix, &w.acts, grads, d_prefix)?;
        }
        Ok(loss)
    }

    fn decode(
        &self,
        be: &dyn Backend,
        tokens: &[u32],
        prefix: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let labels = vec![IGNORE; tokens.len()];
        let batch = Batch::new(&[(tokens, &labels)])?;
        let mut acts = Activations::new(self, be, 1, tokens.len(), false)?;
        self.forward(be, &batch, prefix, &mut acts, Some(cache))?;
        let logits = be.download(acts.logits())?.to_f32_vec();
        let v = self.config.vocab_size;
        Ok(logits[(tokens.len() - 1) * v..tokens.len() * v].to_vec())
    }
}
