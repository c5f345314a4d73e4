//! Where work runs: the backend interface and its devices.
//!
//! The GPT-2 model and the attention API are written once against [`Backend`]. The `cpu`
//! backend is plain Rust and is the reference; `emu` (the CUDA kernels run on the CPU by the
//! emulator) and `cuda` (the kernels on a GPU, through cudarc) implement the same trait.

mod check;
pub mod cpu;
pub mod cuda;
pub mod decode_bench;
pub mod decode_plan;
pub mod dense;
pub mod emu;
pub mod kernel_device;
pub mod kernels;
pub mod launch_table;
pub mod packed;
pub mod registry;
mod small_gemm;

use crate::attn::paged::{kv_append_plan, AppendRun, PagedAttnArgs};
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};
use std::fmt;
use std::str::FromStr;

/// Writes new keys and values `k_new, v_new [B, Tnew, Hkv, D]` into a paged cache
/// `k_cache, v_cache [num_pages, page_size, Hkv, D]` at positions `seqlen_k[b] ..
/// seqlen_k[b] + Tnew` of each sequence (block table `[B, max_pages]`, row-major; host
/// metadata, checked), on any backend: one strided copy per run of consecutive slots in a
/// page (a decode step is one copy per sequence). The caller then counts the new rows in its
/// `seqlen_k`.
#[allow(clippy::too_many_arguments)]
pub fn kv_append(
    be: &dyn Backend,
    k_new: &TensorView,
    v_new: &TensorView,
    k_cache: &mut TensorViewMut,
    v_cache: &mut TensorViewMut,
    block_table: &[i32],
    seqlen_k: &[i32],
) -> Result<()> {
    let cd = k_cache.dims().to_vec();
    if cd.len() != 4 {
        return Err(Error::shape(
            "k_cache",
            "[num_pages, page_size, Hkv, D]",
            &cd,
        ));
    }
    if v_cache.dims() != cd.as_slice() {
        return Err(Error::shape(
            "v_cache",
            format!("{cd:?} like k_cache"),
            v_cache.dims(),
        ));
    }
    let nd = k_new.dims();
    if nd.len() != 4 || nd[0] != seqlen_k.len() || nd[2..] != cd[2..] {
        return Err(Error::shape(
            "k_new",
            format!("[B={}, Tnew, Hkv={}, D={}]", seqlen_k.len(), cd[2], cd[3]),
            nd,
        ));
    }
    if v_new.dims() != nd {
        return Err(Error::shape(
            "v_new",
            format!("{nd:?} like k_new"),
            v_new.dims(),
        ));
    }
    let runs = kv_append_plan(nd[1], cd[0], cd[1], block_table, seqlen_k)?;
    let run = |src: &TensorView, dst: &mut TensorViewMut, r: &AppendRun| -> Result<()> {
        let from = src.select(0, r.b)?.narrow(0, r.t0, r.len)?;
        let mut to = dst
            .reborrow()
            .select(0, r.page)?
            .narrow(0, r.slot0, r.len)?;
        be.copy(&from, &mut to)
    };
    for r in &runs {
        run(k_new, k_cache, r)?;
        run(v_new, v_cache, r)?;
    }
    Ok(())
}

/// A device that work can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Plain Rust on the host (the reference).
    Cpu,
    /// The CUDA kernels compiled for the host and run by the CPU emulator (a test instrument).
    Emu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
}

impl Device {
    /// Where this device's tensors live.
    pub fn location(self) -> Location {
        match self {
            Device::Cpu | Device::Emu => Location::Host,
            Device::Cuda(i) => Location::Cuda(i),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emu => f.write_str("emu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "emu" => Ok(Device::Emu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::device(
                        "device",
                        format!("{s:?}, expected cpu, emu, cuda or cuda:N"),
                    )
                }),
        }
    }
}

/// The operations the model and the attention API need from a device. Every method checks
/// its arguments (shapes, dtypes, devices) and returns an error rather than panicking.
/// Every device implements every operation: `cpu` directly, `emu` and `cuda` through
/// [`kernel_device::KernelRunner`]. The Llama family's operations (after
/// `cross_entropy_inplace`) have default bodies that return [`missing_op`]'s error.
pub trait Backend: Send + Sync {
    /// The device this backend runs on.
    fn device(&self) -> Device;

    /// A zero-filled tensor in this device's memory.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;

    /// A copy of a host tensor in this device's memory.
    fn upload(&self, host: &Tensor) -> Result<Tensor>;

    /// [`Backend::upload`] of a tensor the caller no longer needs: a device whose memory is
    /// the host's takes it as it is, without a copy (loading a model then holds each weight
    /// once, not twice).
    fn upload_owned(&self, host: Tensor) -> Result<Tensor> {
        self.upload(&host)
    }

    /// A host copy of a tensor of this device.
    fn download(&self, t: &Tensor) -> Result<Tensor>;

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    /// Bytes of device memory held by this backend's tensors and scratch now, and the most
    /// held since the last [`Backend::reset_peak_memory`]; `None` for host devices.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }

    /// Starts a new peak for [`Backend::memory`].
    fn reset_peak_memory(&self) {}

    /// Milliseconds the work queued by `f` takes on the device: CUDA events around it on a
    /// GPU (launch gaps of the host excluded only where the queue runs ahead), wall time of a
    /// synchronised call elsewhere.
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let t0 = std::time::Instant::now();
        f()?;
        self.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    /// Prefix attention forward (see [`crate::attn`] for the contract).
    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()>;

    /// Prefix attention backward (see [`crate::attn`] for the contract).
    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()>;

    /// Paged-KV decode: `Tq ≤ 16` new queries per sequence over `[prefix table ; paged K/V]`
    /// (see [`crate::attn::paged`] for the contract). Writes `o [B, Tq, Hq, D]` and, if given,
    /// `lse [B, Hq, Tq]`.
    fn attn_decode(&self, args: &PagedAttnArgs, out: AttnFwdOut) -> Result<()>;

    /// `out [M, N] = op(a) · op(b) (+ bias [N]) (+ out when accumulating)`, scaled by
    /// `opts.alpha` (the product only). `op(a)` is `a [M, K]` or, transposed, `a [K, M]`;
    /// `op(b)` is `b [K, N]` or, transposed, `b [N, K]` (torch `Linear` weights).
    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()>;

    /// Whether [`Backend::pack_weight`] makes copies (the default: no).
    fn packs_weights(&self) -> bool {
        false
    }

    /// A copy of the frozen weight `w` (`[K, N]`, or `[N, K]` when `trans`: a torch `Linear`)
    /// in the layout this backend multiplies fastest, for [`Backend::matmul_packed`]; `None`
    /// where the backend has no such layout (the default: the emulator and CUDA multiply the
    /// tensor itself) or packing is off. `what` names the weight in errors. The copy costs
    /// the weight's size in memory again and does not follow later changes of `w`.
    fn pack_weight(
        &self,
        w: &TensorView,
        trans: bool,
        what: &str,
    ) -> Result<Option<packed::PackedWeight>> {
        let _ = (w, trans, what);
        Ok(None)
    }

    /// `out [M, N] = a [M, K] · W (+ bias [N]) (+ out when accumulating)` for a weight packed
    /// by [`Backend::pack_weight`]; the same product as [`Backend::matmul`] on the tensor it
    /// was packed from, to rounding.
    fn matmul_packed(
        &self,
        a: &TensorView,
        w: &packed::PackedWeight,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()> {
        let _ = (a, w, bias, out, accumulate);
        Err(missing_op(self.device(), "matmul_packed"))
    }

    /// Layer norm over the last dimension of `x [M, C]`: `out = (x - mean) * rstd * w + b`,
    /// also storing `mean [M]` and `rstd [M]` (f32) for the backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        x: &TensorView,
        weight: &TensorView,
        bias: &TensorView,
        eps: f32,
        out: &mut TensorViewMut,
        mean: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
    ) -> Result<()>;

    /// Input gradient of layer norm (the weights are frozen): `dx (+)= d LN(x) / dx · dy`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dy: &TensorView,
        x: &TensorView,
        weight: &TensorView,
        mean: &TensorView,
        rstd: &TensorView,
        dx: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()>;

    /// `out = gelu(x)`, tanh form (`gelu_new`).
    fn gelu(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()>;
    /// Bias and GELU of an MLP's first layer in one pass: `h += bias` (row-broadcast, kept
    /// for the backward) and `out = gelu(h)`.
    fn bias_gelu(
        &self,
        h: &mut TensorViewMut,
        bias: &TensorView,
        out: &mut TensorViewMut,
    ) -> Result<()>;
    /// A projection's bias and the residual in one pass: `out += bias + residual`.
    fn bias_residual(
        &self,
        out: &mut TensorViewMut,
        bias: &TensorView,
        residual: &TensorView,
    ) -> Result<()>;
    /// `dx = gelu'(x) · dy`.
    fn gelu_bwd(&self, x: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()>;
    /// `out = tanh(x)`.
    fn tanh(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()>;
    /// `dx = (1 - y²) · dy` where `y = tanh(x)`.
    fn tanh_bwd(&self, y: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()>;
    /// One AdamW update exactly as `torch.optim.AdamW` (f32): decoupled weight decay
    /// `p *= 1 - lr·wd`, moments `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²`, then
    /// `p -= lr / (1-β1^t) · m / (sqrt(v) / sqrt(1-β2^t) + eps)`.
    fn adamw(
        &self,
        param: &mut TensorViewMut,
        grad: &TensorView,
        m: &mut TensorViewMut,
        v: &mut TensorViewMut,
        hp: AdamWStep,
    ) -> Result<()>;
    /// `y += alpha · x`.
    fn axpy(&self, y: &mut TensorViewMut, alpha: f32, x: &TensorView) -> Result<()>;
    /// `x *= alpha`.
    fn scale(&self, x: &mut TensorViewMut, alpha: f32) -> Result<()>;
    /// `out += x` (same shapes).
    fn add_assign(&self, out: &mut TensorViewMut, x: &TensorView) -> Result<()>;
    /// `out[n] (+)= sum over rows of x [M, N]` (bias gradients).
    fn sum_rows(&self, x: &TensorView, out: &mut TensorViewMut, accumulate: bool) -> Result<()>;
    /// Copies `src` into `dst` (same shapes, any strides).
    fn copy(&self, src: &TensorView, dst: &mut TensorViewMut) -> Result<()>;

    /// `dst [n, C]` row `i` = `src [M, C]` row `rows[i]`.
    fn gather_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()>;

    /// `dst [M, C]` row `rows[i]` = `src [n, C]` row `i`; the other rows of `dst` become 0.
    fn scatter_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()>;

    /// Token + position embedding: `out [B·T, C]` row `b·T + t` is
    /// `wte[ids[b·T + t]] + wpe[pos_offset + t]`.
    fn embed(
        &self,
        ids: &[i32],
        seq_len: usize,
        wte: &TensorView,
        wpe: &TensorView,
        pos_offset: usize,
        out: &mut TensorViewMut,
    ) -> Result<()>;

    /// Softmax cross-entropy per row of `logits [M, V]` against `targets [M]` (`-100`:
    /// ignored, loss 0): writes `losses [M]` (f32) and, if given, `dlogits = softmax - onehot`
    /// for counted rows and 0 for ignored ones: the gradient of the **sum** of the losses.
    fn cross_entropy(
        &self,
        logits: &TensorView,
        targets: &[i32],
        losses: &mut TensorViewMut,
        dlogits: Option<&mut TensorViewMut>,
    ) -> Result<()>;

    /// As [`Backend::cross_entropy`] with the gradient written **over the logits** (no second
    /// `[M, V]` buffer): after the call `logits` holds `softmax - onehot` (0 on ignored rows).
    fn cross_entropy_inplace(
        &self,
        logits: &mut TensorViewMut,
        targets: &[i32],
        losses: &mut TensorViewMut,
    ) -> Result<()>;

    // The operations of the Llama family (Llama, Qwen2, Mistral). Every device implements
    // them (`cpu` in plain Rust, `emu`/`cuda` with the kernels of `kernels/dense.cu`); the
    // default bodies answer with [`missing_op`]'s error, so a backend written for GPT-2 only
    // (a test's wrapper, say) says plainly what it lacks.

    /// RMS norm over the last dimension of `x [M, C]`, computed in f32 as transformers'
    /// `LlamaRMSNorm` does: `out = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)`,
    /// also storing `rstd [M]` (f32) for the backward.
    fn rmsnorm(
        &self,
        x: &TensorView,
        weight: &TensorView,
        eps: f32,
        out: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
    ) -> Result<()> {
        let _ = (x, weight, eps, out, rstd);
        Err(missing_op(self.device(), "rmsnorm"))
    }

    /// Input gradient of [`Backend::rmsnorm`] (the weight is frozen):
    /// `dx (+)= rstd · (w·dy) − x · rstd³ · mean(w·dy·x)`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dy: &TensorView,
        x: &TensorView,
        weight: &TensorView,
        rstd: &TensorView,
        dx: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()> {
        let _ = (dy, x, weight, rstd, dx, accumulate);
        Err(missing_op(self.device(), "rmsnorm_bwd"))
    }

    /// Rotary position embedding, in place, of `x [B, T, H, D]` (contiguous), in the
    /// rotate-half form of transformers: for `j < D/2`, with `c = cos[t, j]`, `s = sin[t, j]`,
    /// `x[j] ← x[j]·c − x[j + D/2]·s` and `x[j + D/2] ← x[j + D/2]·c + x[j]·s`.
    /// `cos, sin` (f32) hold the angles of the positions: `[T, D/2]`, the same for every
    /// sequence of the batch (training, prefill), or `[B, T, D/2]`, each sequence its own
    /// (the serving step, where sequences sit at different positions).
    fn rope(&self, x: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        let _ = (x, cos, sin);
        Err(missing_op(self.device(), "rope"))
    }

    /// Backward of [`Backend::rope`], in place on the gradient `dx [B, T, H, D]`: the
    /// transposed rotation (the angle negated).
    fn rope_bwd(&self, dx: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        let _ = (dx, cos, sin);
        Err(missing_op(self.device(), "rope_bwd"))
    }

    /// The gated MLP's activation (SwiGLU): `out = silu(gate) · up`, `silu(x) = x · σ(x)`,
    /// all `[M, F]`.
    fn swiglu(&self, gate: &TensorView, up: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        let _ = (gate, up, out);
        Err(missing_op(self.device(), "swiglu"))
    }

    /// Backward of [`Backend::swiglu`]: `d_gate = dy · up · silu'(gate)` and
    /// `d_up = dy · silu(gate)`, with `silu'(x) = σ(x) · (1 + x · (1 − σ(x)))`.
    fn swiglu_bwd(
        &self,
        gate: &TensorView,
        up: &TensorView,
        dy: &TensorView,
        d_gate: &mut TensorViewMut,
        d_up: &mut TensorViewMut,
    ) -> Result<()> {
        let _ = (gate, up, dy, d_gate, d_up);
        Err(missing_op(self.device(), "swiglu_bwd"))
    }
}

/// The error of an operation a backend does not implement (the default body of the Llama
/// family's operations).
pub fn missing_op(device: Device, op: &str) -> Error {
    Error::Unsupported(format!(
        "Backend::{op} is not implemented by this {device} backend"
    ))
}

/// Hyper-parameters of one [`Backend::adamw`] update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added after the square root.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// 1-based step count (for the bias corrections).
    pub step: u64,
}

impl AdamWStep {
    /// `{1 - lr·wd, 1 - β1, β2, 1 - β2, lr / (1 - β1^t), sqrt(1 - β2^t), eps, 0}`: the scalars
    /// of torch's single-tensor AdamW, computed in f64 (Python floats there) and rounded to
    /// f32. The one definition of the update's constants: the `cpu` device's loop and the
    /// kernel devices' `dense_adamw` launch (its `f` parameters) both read them from here.
    pub fn constants(&self) -> [f32; 8] {
        let step = self.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - self.beta1.powi(step);
        let bc2 = 1.0 - self.beta2.powi(step);
        [
            (1.0 - self.lr * self.weight_decay) as f32,
            (1.0 - self.beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            (self.lr / bc1) as f32,
            bc2.sqrt() as f32,
            self.eps as f32,
            0.0,
        ]
    }
}

/// Options of [`Backend::matmul`].
#[derive(Clone, Copy, Debug)]
pub struct MatmulOpts {
    /// Use `a` transposed.
    pub trans_a: bool,
    /// Use `b` transposed.
    pub trans_b: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
    /// Scale of the product.
    pub alpha: f32,
}

impl Default for MatmulOpts {
    fn default() -> Self {
        MatmulOpts {
            trans_a: false,
            trans_b: false,
            accumulate: false,
            alpha: 1.0,
        }
    }
}

impl MatmulOpts {
    /// `b` transposed.
    pub fn nt() -> Self {
        MatmulOpts {
            trans_b: true,
            ..Default::default()
        }
    }
    /// `a` transposed.
    pub fn tn() -> Self {
        MatmulOpts {
            trans_a: true,
            ..Default::default()
        }
    }
    /// Accumulate into `out`.
    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }
}

/// The backend for `device`. Devices whose backend is not part of this build say so.
pub fn backend(device: Device) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend)),
        Device::Emu => Ok(Box::new(emu::EmuBackend)),
        Device::Cuda(ordinal) => Ok(Box::new(cuda::CudaBackend::new(ordinal)?)),
    }
}
