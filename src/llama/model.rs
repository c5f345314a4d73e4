//! The Llama-family forward pass with prefix K/V in every layer, and its manual backward to
//! the prefix (activation gradients only: the model is frozen). Written once against
//! [`Backend`].
//!
//! A layer: `h = x + o(attn(rope(q(n)), rope(k(n)), v(n)))` with `n = rms_in(x)`, then
//! `y = h + down(silu(gate(m)) · up(m))` with `m = rms_post(h)`. The new keys are rotated at
//! positions `P + past ..` before they are cached or attended over; the prefix keys are not
//! rotated (PEFT hands them to the model as `past_key_values`).

use super::config::LlamaConfig;
use super::weights::{Linear, Weights};
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::lm::head::{Head, Logits};
use crate::lm::{Batch, Geometry, KvCache, LossSum, PackedWeights, PrefixLm, Workspace, IGNORE};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};
use std::path::{Path, PathBuf};

/// A frozen Llama, Qwen2 or Mistral model.
#[derive(Debug)]
pub struct Llama {
    /// The configuration.
    pub config: LlamaConfig,
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

/// Activations of one forward pass, kept for the backward; sized for up to `rows` tokens
/// (`B·T`) and reused for any smaller batch (grow-only, docs/ARCHITECTURE.md §3).
#[derive(Debug)]
pub struct Activations {
    rows: usize,
    /// The residual stream before each layer and after the last: `L + 1` of `[M, C]`.
    res: Vec<Tensor>,
    /// `rstd` of each layer's input norm `[M]` (f32).
    rstd_in: Vec<Tensor>,
    /// Rotated queries `[M, Hq·D]`, rotated keys and values `[M, Hkv·D]`, per layer.
    q: Vec<Tensor>,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Attention outputs `[M, Hq·D]` and their LSE `[Hq·M]`, per layer.
    atty: Vec<Tensor>,
    lse: Vec<Tensor>,
    /// The residual after attention `[M, C]` and its norm's `rstd [M]`, per layer.
    mid: Vec<Tensor>,
    rstd_post: Vec<Tensor>,
    /// Norm outputs, the MLP's gate and up projections `[M, F]` and the SwiGLU output feed
    /// only frozen matmuls: one scratch each. The backward recomputes gate and up from `mid`
    /// (two matmuls a layer) instead of keeping `2·L·M·F` values: for Qwen2-0.5B's shape at
    /// 512 rows that is 478 MB of f32 for about a fifth more arithmetic in a training step.
    norm: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    rstd_final: Tensor,
    /// The head, the losses and the gradient the backward starts from.
    head: Head,
}

impl Activations {
    /// Buffers for any batch of at most `rows` tokens (`B·T`, padding included);
    /// `with_grad` adds the logit gradient the backward needs.
    pub fn with_rows(
        model: &Llama,
        be: &dyn Backend,
        rows: usize,
        with_grad: bool,
    ) -> Result<Activations> {
        Activations::build(model, be, rows, with_grad, Logits::Whole)
    }

    /// The buffers for `rows` rows, the head's kept as `logits` says.
    fn build(
        model: &Llama,
        be: &dyn Backend,
        rows: usize,
        with_grad: bool,
        logits: Logits,
    ) -> Result<Activations> {
        let c = &model.config;
        let (width, vocab) = (c.hidden_size, c.vocab_size);
        let head = Head::new(be, rows, width, vocab, model.dtype, with_grad, logits)?;
        let (m, e, f, dt) = (rows, c.hidden_size, c.intermediate_size, model.dtype);
        let l = c.num_hidden_layers;
        let (qw, kw) = (c.q_width(), c.kv_width());
        let z = |shape: &[usize], dt: DType| be.zeros(shape, dt);
        let many = |shape: &[usize], dt: DType, n: usize| -> Result<Vec<Tensor>> {
            (0..n).map(|_| z(shape, dt)).collect()
        };
        Ok(Activations {
            rows,
            head,
            res: many(&[m, e], dt, l + 1)?,
            rstd_in: many(&[m], DType::F32, l)?,
            q: many(&[m, qw], dt, l)?,
            k: many(&[m, kw], dt, l)?,
            v: many(&[m, kw], dt, l)?,
            atty: many(&[m, qw], dt, l)?,
            lse: many(&[c.num_attention_heads * m], DType::F32, l)?,
            mid: many(&[m, e], dt, l)?,
            rstd_post: many(&[m], DType::F32, l)?,
            norm: z(&[m, e], dt)?,
            gate: z(&[m, f], dt)?,
            up: z(&[m, f], dt)?,
            act: z(&[m, f], dt)?,
            rstd_final: z(&[m], DType::F32)?,
        })
    }

    /// Buffers for batches of `batch_size × seq_len` tokens.
    pub fn new(
        model: &Llama,
        be: &dyn Backend,
        batch_size: usize,
        seq_len: usize,
        with_grad: bool,
    ) -> Result<Activations> {
        Activations::with_rows(model, be, batch_size * seq_len, with_grad)
    }

    /// Training (or loss-only) buffers that keep no logits: the forward computes the
    /// vocabulary projection, the loss and (`with_grad`) the projection's backward
    /// `chunk_rows` counted rows at a time (`None`: as many as fit
    /// [`crate::lm::head::HEAD_CHUNK_BYTES`] of logits), keeping only the gradient at the
    /// head's input. Loss and prefix gradient are those of [`Activations::with_rows`];
    /// `logits` stays empty.
    pub fn streamed(
        model: &Llama,
        be: &dyn Backend,
        rows: usize,
        with_grad: bool,
        chunk_rows: Option<usize>,
    ) -> Result<Activations> {
        Activations::build(model, be, rows, with_grad, Logits::Streamed(chunk_rows))
    }

    /// Computes the vocabulary projection (and its gradient) only at rows whose target
    /// counts; loss and gradients are unchanged, `logits` then holds the counted rows only.
    pub fn counted_only(mut self) -> Self {
        self.head.set_counted_only();
        self
    }

    /// Logits `[M, V]` of the last forward: every row, or with
    /// [`Activations::counted_only`] the counted rows first ([`Activations::counted_rows`]
    /// gives their positions). A half-precision model writes the gradient of a training
    /// forward over them. [`Activations::streamed`] keeps no logits (this is its last chunk).
    pub fn logits(&self) -> &Tensor {
        self.head.logits()
    }

    /// The rows (`b·T + t`) whose targets counted in the last forward, in order.
    pub fn counted_rows(&self) -> &[i32] {
        self.head.counted_rows()
    }
}

/// The activation gradients of the backward, for any batch of at most `rows` tokens.
#[derive(Debug)]
pub struct GradScratch {
    rows: usize,
    d_res: Tensor,
    d_tmp: Tensor,
    d_att: Tensor,
    d_q: Tensor,
    d_k: Tensor,
    d_v: Tensor,
    d_act: Tensor,
    d_gate: Tensor,
    d_up: Tensor,
    /// The MLP input `rms_post(h)`, its `rstd`, and gate and up, recomputed per layer.
    norm: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
}

impl GradScratch {
    /// Buffers for any batch of at most `rows` tokens.
    pub fn new(model: &Llama, be: &dyn Backend, rows: usize) -> Result<GradScratch> {
        let c = &model.config;
        let (m, e, f, dt) = (rows, c.hidden_size, c.intermediate_size, model.dtype);
        let (qw, kw) = (c.q_width(), c.kv_width());
        Ok(GradScratch {
            rows,
            d_res: be.zeros(&[m, e], dt)?,
            d_tmp: be.zeros(&[m, e], dt)?,
            d_att: be.zeros(&[m, qw], dt)?,
            d_q: be.zeros(&[m, qw], dt)?,
            d_k: be.zeros(&[m, kw], dt)?,
            d_v: be.zeros(&[m, kw], dt)?,
            d_act: be.zeros(&[m, f], dt)?,
            d_gate: be.zeros(&[m, f], dt)?,
            d_up: be.zeros(&[m, f], dt)?,
            norm: be.zeros(&[m, e], dt)?,
            rstd: be.zeros(&[m], DType::F32)?,
            gate: be.zeros(&[m, f], dt)?,
            up: be.zeros(&[m, f], dt)?,
        })
    }
}

/// What a [`Workspace`] holds for this family.
struct LlamaWorkspace {
    acts: Activations,
    grads: Option<GradScratch>,
}

fn rows(t: &Tensor, rows: usize) -> Result<TensorView<'_>> {
    t.view().narrow(0, 0, rows)
}

fn rows_mut(t: &mut Tensor, rows: usize) -> Result<TensorViewMut<'_>> {
    t.view_mut().narrow(0, 0, rows)
}

/// `out = x · Wᵀ (+ b)` of a torch `Linear`.
/// Through the model's packed copy of the weight when it has one.
fn linear(
    be: &dyn Backend,
    pk: &PackedWeights,
    x: &TensorView,
    w: &Linear,
    out: &mut TensorViewMut,
) -> Result<()> {
    let bias = w.bias.as_ref().map(|b| b.view());
    pk.matmul(be, x, &w.weight, bias.as_ref(), out, MatmulOpts::nt())
}

/// `dx (+)= dy · W`: the input gradient of a torch `Linear`.
fn linear_bwd(
    be: &dyn Backend,
    dy: &TensorView,
    w: &Linear,
    dx: &mut TensorViewMut,
    accumulate: bool,
) -> Result<()> {
    let opts = MatmulOpts {
        accumulate,
        ..Default::default()
    };
    be.matmul(dy, &w.weight.view(), None, dx, opts)
}

impl Llama {
    /// The MLP's two input projections `gate = n · W_gateᵀ`, `up = n · W_upᵀ` of layer
    /// weights `lw` (the forward, and the backward's recomputation: the same products).
    fn gate_up(
        &self,
        be: &dyn Backend,
        lw: &super::weights::LayerWeights,
        n: &TensorView,
        gate: &mut TensorViewMut,
        up: &mut TensorViewMut,
    ) -> Result<()> {
        linear(be, &self.packed, n, &lw.gate, gate)?;
        linear(be, &self.packed, n, &lw.up, up)
    }

    /// Loads a Hugging Face model folder: `config.json` and `model.safetensors` (or the
    /// shards of `model.safetensors.index.json`), in the compute dtype of `backend`
    /// ([`crate::lm::dtype_for`]).
    pub fn load(dir: &Path, backend: &dyn Backend) -> Result<Llama> {
        let config = LlamaConfig::load(&dir.join("config.json"))?;
        let dtype = crate::lm::dtype_for(backend);
        let weights = Weights::load_dir(dir, &config, backend, dtype)?;
        Ok(Llama {
            config,
            weights,
            dtype,
            dir: dir.to_path_buf(),
            packed: PackedWeights::new(),
        })
    }

    /// Views of layer `l`'s prefix keys and values `[1, P, Hkv, D]` in a `[P, L·2·Hkv·D]`
    /// tensor.
    fn prefix_layer<'a>(
        &self,
        prefix: &'a Tensor,
        l: usize,
    ) -> Result<(TensorView<'a>, TensorView<'a>)> {
        let c = &self.config;
        let p = prefix.dims()[0];
        let v = prefix
            .view()
            .reshape(&[p, c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim])?
            .select(1, l)?;
        Ok((v.select(1, 0)?.unsqueeze(0)?, v.select(1, 1)?.unsqueeze(0)?))
    }

    /// The rotary tables `cos, sin [T, D/2]` (f32) of positions `start .. start + len`, on
    /// the backend.
    fn rope_tables(&self, be: &dyn Backend, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.config.head_dim / 2;
        let (cos, sin) = self.config.rope_tables(start, len);
        Ok((
            be.upload(&Tensor::from_f32(&[len, half], &cos, DType::F32)?)?,
            be.upload(&Tensor::from_f32(&[len, half], &sin, DType::F32)?)?,
        ))
    }

    fn scale(&self) -> f32 {
        1.0 / (self.config.head_dim as f32).sqrt()
    }

    /// Forward pass over `batch` with an optional prefix `[P, L·2·Hkv·D]` (real tokens at
    /// positions `P + past ..`). With a cache (a batch of one sequence), the new rotated
    /// keys and values are appended to it and attention covers the cached tokens too.
    /// Returns the summed loss; with a logit-gradient buffer in `acts`, also writes the
    /// gradient of that sum.
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
        if p + past + t > c.max_position_embeddings {
            return Err(Error::index(
                "sequence",
                format!(
                    "{} tokens after a prefix of {p} exceed max_position_embeddings = {} (at most {} tokens)",
                    past + t,
                    c.max_position_embeddings,
                    c.max_position_embeddings.saturating_sub(p)
                ),
            ));
        }
        if let Some(&bad) = batch
            .ids
            .iter()
            .find(|&&id| id < 0 || id as usize >= c.vocab_size)
        {
            return Err(Error::index(
                "input_ids",
                format!("token {bad} outside the vocabulary 0..{}", c.vocab_size),
            ));
        }
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let lens: Vec<i32> = batch.lens.iter().map(|&n| n as i32).collect();
        let lens_k: Vec<i32> = lens.iter().map(|&n| n + past as i32).collect();
        let (cos, sin) = self.rope_tables(be, p + past, t)?;
        let eps = c.rms_norm_eps;

        be.gather_rows(
            &w.embed.view(),
            &batch.ids,
            &mut rows_mut(&mut acts.res[0], m)?,
        )?;
        for l in 0..c.num_hidden_layers {
            let lw = &w.layers[l];
            let (res_in, res_out) = acts.res.split_at_mut(l + 1);
            let x = rows(&res_in[l], m)?;
            be.rmsnorm(
                &x,
                &lw.input_norm.view(),
                eps,
                &mut rows_mut(&mut acts.norm, m)?,
                &mut rows_mut(&mut acts.rstd_in[l], m)?,
            )?;
            let n = rows(&acts.norm, m)?;
            linear(
                be,
                &self.packed,
                &n,
                &lw.q,
                &mut rows_mut(&mut acts.q[l], m)?,
            )?;
            linear(
                be,
                &self.packed,
                &n,
                &lw.k,
                &mut rows_mut(&mut acts.k[l], m)?,
            )?;
            linear(
                be,
                &self.packed,
                &n,
                &lw.v,
                &mut rows_mut(&mut acts.v[l], m)?,
            )?;
            let (cv, sv) = (cos.view(), sin.view());
            be.rope(
                &mut rows_mut(&mut acts.q[l], m)?.reshape(&[b, t, hq, d])?,
                &cv,
                &sv,
            )?;
            be.rope(
                &mut rows_mut(&mut acts.k[l], m)?.reshape(&[b, t, hkv, d])?,
                &cv,
                &sv,
            )?;
            let q = rows(&acts.q[l], m)?.reshape(&[b, t, hq, d])?;
            let k_new = rows(&acts.k[l], m)?.reshape(&[b, t, hkv, d])?;
            let v_new = rows(&acts.v[l], m)?.reshape(&[b, t, hkv, d])?;
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
                .scale(self.scale());
            if let Some(pre) = prefix {
                let (kp, vp) = self.prefix_layer(pre, l)?;
                args = args.prefix(kp, vp);
            }
            be.attn_fwd(
                &args,
                AttnFwdOut {
                    o: rows_mut(&mut acts.atty[l], m)?.reshape(&[b, t, hq, d])?,
                    lse: Some(rows_mut(&mut acts.lse[l], hq * m)?.reshape(&[b, hq, t])?),
                },
            )?;
            // h = x + o(atty)
            let mut mid = rows_mut(&mut acts.mid[l], m)?;
            linear(be, &self.packed, &rows(&acts.atty[l], m)?, &lw.o, &mut mid)?;
            be.add_assign(&mut mid, &x)?;
            let mid = rows(&acts.mid[l], m)?;
            be.rmsnorm(
                &mid,
                &lw.post_norm.view(),
                eps,
                &mut rows_mut(&mut acts.norm, m)?,
                &mut rows_mut(&mut acts.rstd_post[l], m)?,
            )?;
            self.gate_up(
                be,
                lw,
                &rows(&acts.norm, m)?,
                &mut rows_mut(&mut acts.gate, m)?,
                &mut rows_mut(&mut acts.up, m)?,
            )?;
            be.swiglu(
                &rows(&acts.gate, m)?,
                &rows(&acts.up, m)?,
                &mut rows_mut(&mut acts.act, m)?,
            )?;
            // y = h + down(act)
            let mut out = rows_mut(&mut res_out[0], m)?;
            linear(be, &self.packed, &rows(&acts.act, m)?, &lw.down, &mut out)?;
            be.add_assign(&mut out, &mid)?;
        }
        if let Some(kc) = cache {
            kc.len += t;
        }
        be.rmsnorm(
            &rows(&acts.res[c.num_hidden_layers], m)?,
            &w.norm.view(),
            eps,
            &mut rows_mut(&mut acts.norm, m)?,
            &mut rows_mut(&mut acts.rstd_final, m)?,
        )?;
        let sum = acts.head.forward(
            be,
            &rows(&acts.norm, m)?,
            &w.head().view(),
            &batch.targets[..m],
        )?;
        Ok(LossSum {
            sum,
            count: batch.count(),
        })
    }

    /// Backward of the summed loss of the last [`Llama::forward`] (which kept a logit
    /// gradient) to the prefix: writes `d_prefix [P, L·2·Hkv·D]` (f32). Layer 0 runs the
    /// prefix-only attention backward and nothing below it.
    pub fn backward(
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
        let width = c.geometry().prefix_width();
        if d_prefix.dims() != [p, width] {
            return Err(Error::shape(
                "d_prefix",
                format!("[{p}, {width}] like the prefix"),
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
        let m = b * t;
        if m > acts.rows || m > grads.rows {
            return Err(Error::shape(
                "gradients",
                format!("buffers for at least B·T = {b}·{t} = {m} rows"),
                &[acts.rows.min(grads.rows)],
            ));
        }
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let lens: Vec<i32> = batch.lens.iter().map(|&n| n as i32).collect();
        let (cos, sin) = self.rope_tables(be, p, t)?;
        // Head and final norm: d_norm = dlogits · W_head (a streamed forward computed it
        // already), then through the norm.
        acts.head.backward(
            be,
            &w.head().view(),
            &mut rows_mut(&mut grads.d_tmp, m)?,
            &mut grads.d_res.view_mut(),
        )?;
        be.rmsnorm_bwd(
            &rows(&grads.d_tmp, m)?,
            &rows(&acts.res[c.num_hidden_layers], m)?,
            &w.norm.view(),
            &rows(&acts.rstd_final, m)?,
            &mut rows_mut(&mut grads.d_res, m)?,
            false,
        )?;
        let d_prefix_layers = d_prefix
            .view_mut()
            .reshape(&[p, c.num_hidden_layers, 2, hkv, d])?
            .unbind(1)?;
        for (l, d_pre) in d_prefix_layers.into_iter().enumerate().rev() {
            let lw = &w.layers[l];
            // MLP branch: y = h + down(silu(gate(m)) · up(m)), m = rms_post(h). Gate and up
            // are recomputed from h (the same kernels on the same inputs as the forward).
            be.rmsnorm(
                &rows(&acts.mid[l], m)?,
                &lw.post_norm.view(),
                c.rms_norm_eps,
                &mut rows_mut(&mut grads.norm, m)?,
                &mut rows_mut(&mut grads.rstd, m)?,
            )?;
            self.gate_up(
                be,
                lw,
                &rows(&grads.norm, m)?,
                &mut rows_mut(&mut grads.gate, m)?,
                &mut rows_mut(&mut grads.up, m)?,
            )?;
            linear_bwd(
                be,
                &rows(&grads.d_res, m)?,
                &lw.down,
                &mut rows_mut(&mut grads.d_act, m)?,
                false,
            )?;
            be.swiglu_bwd(
                &rows(&grads.gate, m)?,
                &rows(&grads.up, m)?,
                &rows(&grads.d_act, m)?,
                &mut rows_mut(&mut grads.d_gate, m)?,
                &mut rows_mut(&mut grads.d_up, m)?,
            )?;
            linear_bwd(
                be,
                &rows(&grads.d_gate, m)?,
                &lw.gate,
                &mut rows_mut(&mut grads.d_tmp, m)?,
                false,
            )?;
            linear_bwd(
                be,
                &rows(&grads.d_up, m)?,
                &lw.up,
                &mut rows_mut(&mut grads.d_tmp, m)?,
                true,
            )?;
            be.rmsnorm_bwd(
                &rows(&grads.d_tmp, m)?,
                &rows(&acts.mid[l], m)?,
                &lw.post_norm.view(),
                &rows(&acts.rstd_post[l], m)?,
                &mut rows_mut(&mut grads.d_res, m)?,
                true,
            )?;
            // Attention branch: h = x + o(attn(...)).
            linear_bwd(
                be,
                &rows(&grads.d_res, m)?,
                &lw.o,
                &mut rows_mut(&mut grads.d_att, m)?,
                false,
            )?;
            let (kp, vp) = self.prefix_layer(prefix, l)?;
            let fwd = AttnFwdArgs::new(
                rows(&acts.q[l], m)?.reshape(&[b, t, hq, d])?,
                rows(&acts.k[l], m)?.reshape(&[b, t, hkv, d])?,
                rows(&acts.v[l], m)?.reshape(&[b, t, hkv, d])?,
            )
            .prefix(kp, vp)
            .seqlens(&lens, &lens)
            .causal(true)
            .scale(self.scale());
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
            let seq = if first {
                None
            } else {
                Some((
                    rows_mut(&mut grads.d_q, m)?.reshape(&[b, t, hq, d])?,
                    rows_mut(&mut grads.d_k, m)?.reshape(&[b, t, hkv, d])?,
                    rows_mut(&mut grads.d_v, m)?.reshape(&[b, t, hkv, d])?,
                ))
            };
            let (dq, dk, dv) = match seq {
                Some((q, k, v)) => (Some(q), Some(k), Some(v)),
                None => (None, None, None),
            };
            be.attn_bwd(
                &AttnBwdArgs {
                    fwd,
                    o: rows(&acts.atty[l], m)?.reshape(&[b, t, hq, d])?,
                    lse: rows(&acts.lse[l], hq * m)?.reshape(&[b, hq, t])?,
                    d_o: rows(&grads.d_att, m)?.reshape(&[b, t, hq, d])?,
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
            // Back through the rotations, then the q/k/v projections and the input norm.
            let (cv, sv) = (cos.view(), sin.view());
            be.rope_bwd(
                &mut rows_mut(&mut grads.d_q, m)?.reshape(&[b, t, hq, d])?,
                &cv,
                &sv,
            )?;
            be.rope_bwd(
                &mut rows_mut(&mut grads.d_k, m)?.reshape(&[b, t, hkv, d])?,
                &cv,
                &sv,
            )?;
            let mut d_norm = rows_mut(&mut grads.d_tmp, m)?;
            linear_bwd(be, &rows(&grads.d_q, m)?, &lw.q, &mut d_norm, false)?;
            linear_bwd(be, &rows(&grads.d_k, m)?, &lw.k, &mut d_norm, true)?;
            linear_bwd(be, &rows(&grads.d_v, m)?, &lw.v, &mut d_norm, true)?;
            be.rmsnorm_bwd(
                &rows(&grads.d_tmp, m)?,
                &rows(&acts.res[l], m)?,
                &lw.input_norm.view(),
                &rows(&acts.rstd_in[l], m)?,
                &mut rows_mut(&mut grads.d_res, m)?,
                true,
            )?;
        }
        Ok(())
    }
}

impl PrefixLm for Llama {
    fn model_type(&self) -> &'static str {
        self.config.model_type
    }

    fn geometry(&self) -> Geometry {
        self.config.geometry()
    }

    fn prepare_inference(&self, be: &dyn Backend) -> Result<crate::lm::PackReport> {
        let w = &self.weights;
        let mut list = Vec::with_capacity(7 * w.layers.len() + 1);
        for (l, lw) in w.layers.iter().enumerate() {
            let at = |part: &str| format!("model.layers.{l}.{part}.weight");
            list.push((&lw.q.weight, true, at("self_attn.q_proj")));
            list.push((&lw.k.weight, true, at("self_attn.k_proj")));
            list.push((&lw.v.weight, true, at("self_attn.v_proj")));
            list.push((&lw.o.weight, true, at("self_attn.o_proj")));
            list.push((&lw.gate.weight, true, at("mlp.gate_proj")));
            list.push((&lw.up.weight, true, at("mlp.up_proj")));
            list.push((&lw.down.weight, true, at("mlp.down_proj")));
        }
        let head = match w.lm_head {
            Some(_) => "lm_head.weight",
            None => "model.embed_tokens.weight (tied head)",
        };
        list.push((w.head(), true, head.to_string()));
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
            |w: &LlamaWorkspace| w.grads.is_none() && w.acts.rows >= m,
            || {
                Ok(LlamaWorkspace {
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
            |w: &LlamaWorkspace| w.grads.as_ref().is_some_and(|g| g.rows >= m) && w.acts.rows >= m,
            || {
                Ok(LlamaWorkspace {
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
            self.backward(be, batch, prefix, &w.acts, grads, d_prefix)?;
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
        if tokens.is_empty() {
            return Err(Error::index("tokens", "decode needs at least one token"));
        }
        let labels = vec![IGNORE; tokens.len()];
        let batch = Batch::new(&[(tokens, &labels)])?;
        let mut acts = Activations::new(self, be, 1, tokens.len(), false)?;
        self.forward(be, &batch, prefix, &mut acts, Some(cache))?;
        let logits = be.download(acts.logits())?.to_f32_vec();
        let v = self.config.vocab_size;
        Ok(logits[(tokens.len() - 1) * v..tokens.len() * v].to_vec())
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
}
