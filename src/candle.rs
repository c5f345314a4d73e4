//! Prefix attention as a [candle](https://github.com/huggingface/candle) op (feature
//! `candle`), forward and backward, on candle's CPU tensors and, with the feature
//! `candle-cuda`, on candle's CUDA tensors.
//!
//! [`prefix_attn`] follows candle-flash-attn's conventions: tensors `[B, T, H, D]`, the
//! arguments in the order `q, k, v` and then the prefix table, `causal` with bottom-right
//! alignment, the natural-log LSE. It computes the contract of docs/ARCHITECTURE.md §1 on the
//! device of its inputs, reading candle's storage in place:
//!
//! - CPU tensors: the crate's CPU backend; any strides whose last dimension is contiguous
//!   (other inputs are made contiguous first); f32, f16 or bf16.
//! - CUDA tensors (feature `candle-cuda`): the crate's CUDA kernels on candle's device
//!   memory, queued on the stream of candle's `CudaDevice` (a plan and its run: nothing waits
//!   on the host, no other stream is involved), the outputs allocated through candle's device;
//!   f16 or bf16, head dim 64 or 128 (the kernels' own: f32 and other head dims are errors
//!   naming `q`); any strides with a contiguous last dimension and rows on 16-byte boundaries
//!   (a fused `qkv` or a PEFT prefix table is read in place; other inputs are made contiguous
//!   first). A call with `prefix_index`/`seqlen_q`/`seqlen_k` copies them to the device
//!   (`3·B` int32 at most), one without copies nothing.
//!
//! - `q [B, Tq, Hq, D]`, `k, v [B, Tk, Hkv, D]`, `k_pre, v_pre [NP, P, Hkv, D]`,
//!   `Hq` a multiple of `Hkv` (GQA, MQA); one dtype and one device for all five.
//! - [`PrefixAttnOpts`]: `softmax_scale` (default `1/sqrt(D)`), `causal`, `prefix_index`
//!   (`[B]`, default 0 for every sequence, `-1` for none), `seqlen_q`/`seqlen_k` (`[B]`,
//!   right padding).
//! - The backward is candle's: `backward()` of anything computed from the output gives `dq`,
//!   `dk`, `dv`, and `dk_pre`, `dv_pre` summed over the sequences that use each prefix (in
//!   f32, rounded once to the prefix's dtype), for whichever inputs are [`candle_core::Var`]s
//!   or depend on one.
//!
//! Bad shapes, dtypes or devices give a [`candle_core::Error`] whose message names the
//! argument (the crate's own [`crate::Error`] inside), never a panic.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use prefix_attn::candle::{prefix_attn, PrefixAttnOpts};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // q, k, v [B=2, T=5, H=4, D=16]; a table of NP=3 prefixes of P=8 rows.
//! let q = Tensor::randn(0f32, 1.0, (2, 5, 4, 16), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (2, 5, 4, 16), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (2, 5, 4, 16), &dev)?;
//! let k_pre = Var::randn(0f32, 1.0, (3, 8, 4, 16), &dev)?;
//! let v_pre = Var::randn(0f32, 1.0, (3, 8, 4, 16), &dev)?;
//! let opts = PrefixAttnOpts {
//!     causal: true,
//!     prefix_index: Some(vec![2, -1]), // sequence 0 uses prefix 2, sequence 1 none
//!     ..Default::default()
//! };
//! let o = prefix_attn(&q, &k, &v, &k_pre, &v_pre, &opts)?; // [2, 5, 4, 16]
//! let grads = o.sqr()?.sum_all()?.backward()?;
//! let dk_pre = grads.get(&k_pre).expect("k_pre is a Var"); // [3, 8, 4, 16]
//! assert_eq!(dk_pre.dims(), &[3, 8, 4, 16]);
//! # Ok(())
//! # }
//! ```
//!
//! How it is wired: candle's custom ops take at most three inputs, so the op is two graph
//! nodes. `SeqInputs` over `(q, k, v)` yields a one-element anchor tensor; `PrefixAttnOp`
//! over `(anchor, k_pre, v_pre)` holds `q, k, v` and computes the attention. Its backward
//! runs the whole `attn_bwd` once (prefix-only when no sequence input needs a gradient),
//! returns the prefix gradients and leaves `dq, dk, dv` for `SeqInputs`'s backward, which
//! candle always runs after it (the anchor is an input of the attention node and nothing
//! else).
//!
//! Building the CUDA path: `candle-cuda` turns on candle-core's `cuda` feature, under which
//! candle compiles its own kernels with nvcc (`candle-kernels`) and has cudarc link the CUDA
//! libraries at build time (`dynamic-linking`); this crate asks cudarc only for
//! `fallback-dynamic-loading`, run-time loading unless something links, so the one cudarc
//! then links them for both (README "Use from candle" gives the commands). Without
//! `candle-cuda`, a CUDA tensor is an error naming the argument.

use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::device::cpu::CpuBackend;
use crate::device::Backend;
use crate::tensor::{DType, Layout, Location, TensorView, TensorViewMut};
use candle_core::{CpuStorage, CustomOp3, Storage, Tensor};
use half::{bf16, f16};
use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(feature = "candle-cuda")]
mod cuda;

/// Options of [`prefix_attn`]; the default is non-causal, scale `1/sqrt(D)`, prefix 0 for
/// every sequence, no padding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixAttnOpts {
    /// Score scale (default `1/sqrt(D)`).
    pub softmax_scale: Option<f32>,
    /// Causal masking, aligned bottom-right (query row `i` sees sequence key
    /// `j <= i + seqlen_k - seqlen_q`).
    pub causal: bool,
    /// The prefix each sequence uses, `[B]` in `-1..NP` (`-1`: none; default 0 for all).
    /// From a candle I32 tensor: `idx.to_vec1::<i32>()?`. Out-of-range values are errors.
    pub prefix_index: Option<Vec<i32>>,
    /// Valid query rows of each sequence `[B]` (default `Tq`); rows past it give `o = 0`.
    pub seqlen_q: Option<Vec<i32>>,
    /// Valid sequence keys of each sequence `[B]` (default `Tk`).
    pub seqlen_k: Option<Vec<i32>>,
}

/// Prefix attention of `q [B, Tq, Hq, D]` over `[k_pre, v_pre [NP, P, Hkv, D] ; k, v
/// [B, Tk, Hkv, D]]`: the output `[B, Tq, Hq, D]` in q's dtype, differentiable with respect
/// to all five inputs (see the [module documentation](self)).
pub fn prefix_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    k_pre: &Tensor,
    v_pre: &Tensor,
    opts: &PrefixAttnOpts,
) -> candle_core::Result<Tensor> {
    Ok(apply(q, k, v, k_pre, v_pre, opts)?.0)
}

/// [`prefix_attn`] that also returns the natural-log LSE `[B, Hq, Tq]` in f32 (`-inf` on
/// padding rows and rows that see no key). The LSE is not differentiable: it has no graph.
pub fn prefix_attn_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    k_pre: &Tensor,
    v_pre: &Tensor,
    opts: &PrefixAttnOpts,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (o, saved) = apply(q, k, v, k_pre, v_pre, opts)?;
    let lse = lock(&saved.lse)?
        .clone()
        .ok_or_else(|| candle_core::Error::msg("prefix_attn: the forward stored no LSE"))?;
    Ok((o, lse))
}

fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    k_pre: &Tensor,
    v_pre: &Tensor,
    opts: &PrefixAttnOpts,
) -> candle_core::Result<(Tensor, Arc<Saved>)> {
    let named = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("k_pre", k_pre),
        ("v_pre", v_pre),
    ];
    for (arg, t) in named {
        check_device(arg, t.device(), q.device())?;
    }
    let [q, k, v, k_pre, v_pre] = named.map(|(_, t)| in_place_or_copy(t));
    let (q, k, v, k_pre, v_pre) = (q?, k?, v?, k_pre?, v_pre?);
    let saved = Arc::new(Saved::default());
    let anchor = q.apply_op3(
        &k,
        &v,
        SeqInputs {
            saved: saved.clone(),
        },
    )?;
    let o = anchor.apply_op3(
        &k_pre,
        &v_pre,
        PrefixAttnOp {
            q,
            k,
            v,
            opts: opts.clone(),
            saved: saved.clone(),
        },
    )?;
    Ok((o, saved))
}

/// What the forward leaves for the backward: the LSE `[B, Hq, Tq]` (f32, on the inputs'
/// device), and the sequence gradients `(dq, dk, dv)` that the attention node's backward leaves
/// for `SeqInputs`'s.
#[derive(Default)]
struct Saved {
    lse: Mutex<Option<Tensor>>,
    seq_grads: Mutex<Option<SeqGrads>>,
}

/// `(dq, dk, dv)` in the inputs' dtype.
type SeqGrads = (Tensor, Tensor, Tensor);
/// `(dk_pre, dv_pre)` in f32, summed over the sequences that use each prefix.
type PreGrads = (Tensor, Tensor);

fn lock<T>(m: &Mutex<T>) -> candle_core::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::msg("prefix_attn: a thread panicked holding its state"))
}

/// The crate's error as candle's; the message names the argument.
fn error(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// What the candle op says of a device it does not compute on.
#[cfg(feature = "candle-cuda")]
const DEVICES: &str = "the candle op runs on CPU and CUDA tensors";
#[cfg(not(feature = "candle-cuda"))]
const DEVICES: &str = "this build of the candle op runs on CPU tensors only (its CUDA path needs \
                       prefix-attn's `candle-cuda` feature, see prefix_attn::candle)";

/// `dev` is one the op computes on, and `q`'s.
fn check_device(
    arg: &str,
    dev: &candle_core::Device,
    q_dev: &candle_core::Device,
) -> candle_core::Result<()> {
    let usable = match dev {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => cfg!(feature = "candle-cuda"),
        candle_core::Device::Metal(_) => false,
    };
    if !usable {
        return Err(error(crate::Error::device(
            arg,
            format!("on candle device {:?}; {DEVICES}", dev.location()),
        )));
    }
    if !dev.same_device(q_dev) {
        return Err(error(crate::Error::device(
            arg,
            format!(
                "on candle device {:?}, q on {:?}: the five tensors must be on one device",
                dev.location(),
                q_dev.location()
            ),
        )));
    }
    Ok(())
}

/// `t` itself when the op's backend reads it in place, else a contiguous copy (candle's own
/// op, so gradients still flow). The CPU backend reads any strides whose last dimension is
/// contiguous; the CUDA kernels also need 16-byte aligned rows (`cuda::reads_in_place`).
fn in_place_or_copy(t: &Tensor) -> candle_core::Result<Tensor> {
    let (dims, strides) = (t.dims(), t.stride());
    let r = dims.len();
    if r == 0 {
        return Ok(t.clone());
    }
    let rows = dims[r - 1] <= 1 || strides[r - 1] == 1;
    #[cfg(feature = "candle-cuda")]
    if t.device().is_cuda() && !(rows && cuda::reads_in_place(t.layout())) {
        // `force_contiguous`: a contiguous tensor at a misaligned offset needs a copy too.
        return t.force_contiguous();
    }
    if rows {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The anchor node over `(q, k, v)`: a one-element tensor (CUDA refuses zero-byte
/// allocations) whose only use is to make the attention node depend on them, and whose
/// backward hands out `(dq, dk, dv)`.
struct SeqInputs {
    saved: Arc<Saved>,
}

impl CustomOp3 for SeqInputs {
    fn name(&self) -> &'static str {
        "prefix-attn-seq-inputs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &candle_core::Layout,
        _: &CpuStorage,
        _: &candle_core::Layout,
        _: &CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), candle_core::Shape::from(1)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::anchor(q)
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _anchor: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = lock(&self.saved.seq_grads)?.take().ok_or_else(|| {
            candle_core::Error::msg(
                "prefix_attn: the backward of q, k, v ran before the attention's backward",
            )
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The attention node over `(anchor, k_pre, v_pre)`, holding `q, k, v`.
struct PrefixAttnOp {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    opts: PrefixAttnOpts,
    saved: Arc<Saved>,
}

impl PrefixAttnOp {
    fn fwd_args<'a>(&'a self, [q, k, v, k_pre, v_pre]: [TensorView<'a>; 5]) -> AttnFwdArgs<'a> {
        let o = &self.opts;
        AttnFwdArgs {
            q,
            k,
            v,
            prefix: None,
            prefix_index: o.prefix_index.as_deref().map(Into::into),
            seqlen_q: o.seqlen_q.as_deref().map(Into::into),
            seqlen_k: o.seqlen_k.as_deref().map(Into::into),
            causal: o.causal,
            scale: o.softmax_scale,
        }
        .prefix(k_pre, v_pre)
    }
}

impl CustomOp3 for PrefixAttnOp {
    fn name(&self) -> &'static str {
        "prefix-attn"
    }

    fn cpu_fwd(
        &self,
        _anchor: &CpuStorage,
        _: &candle_core::Layout,
        k_pre: &CpuStorage,
        k_pre_l: &candle_core::Layout,
        v_pre: &CpuStorage,
        v_pre_l: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let held = Held::new([&self.q, &self.k, &self.v])?;
        let [q, k, v] = held.views(["q", "k", "v"])?;
        let args = self.fwd_args([
            q,
            k,
            v,
            cpu_view("k_pre", k_pre, k_pre_l)?,
            cpu_view("v_pre", v_pre, v_pre_l)?,
        ]);
        let pr = args.check().map_err(error)?;
        let mut o = HostVec::zeros(pr.dtype, pr.q_dims().iter().product())?;
        let mut lse = vec![0f32; pr.lse_dims().iter().product()];
        CpuBackend
            .attn_fwd(
                &args,
                AttnFwdOut {
                    o: o.view_mut(&pr.q_dims())?,
                    lse: Some(host_mut(&mut lse, &pr.lse_dims())?),
                },
            )
            .map_err(error)?;
        *lock(&self.saved.lse)? = Some(Tensor::from_vec(
            lse,
            pr.lse_dims().to_vec(),
            &candle_core::Device::Cpu,
        )?);
        Ok((
            o.into_storage(),
            candle_core::Shape::from(pr.q_dims().to_vec()),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        _anchor: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        k_pre: &candle_core::CudaStorage,
        k_pre_l: &candle_core::Layout,
        v_pre: &candle_core::CudaStorage,
        v_pre_l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (o, shape, lse) = cuda::forward(self, (k_pre, k_pre_l), (v_pre, v_pre_l))?;
        *lock(&self.saved.lse)? = Some(lse);
        Ok((o, shape))
    }

    fn bwd(
        &self,
        anchor: &Tensor,
        k_pre: &Tensor,
        v_pre: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let seq = self.q.track_op() || self.k.track_op() || self.v.track_op();
        let pre = k_pre.track_op() || v_pre.track_op();
        let d_o = in_place_or_copy(d_o)?;
        let lse = lock(&self.saved.lse)?.clone().ok_or_else(|| {
            candle_core::Error::msg("prefix_attn: backward before the forward stored its LSE")
        })?;
        let ins = BwdInputs {
            k_pre,
            v_pre,
            o,
            d_o: &d_o,
            lse: &lse,
        };
        let (seq_grads, pre_grads) = match self.q.device() {
            #[cfg(feature = "candle-cuda")]
            candle_core::Device::Cuda(_) => cuda::backward(self, &ins, seq, pre)?,
            _ => self.cpu_bwd(&ins, seq, pre)?,
        };
        if let Some(g) = seq_grads {
            *lock(&self.saved.seq_grads)? = Some(g);
        }
        let (dk_pre, dv_pre) = match pre_grads {
            Some((dk, dv)) => (
                Some(dk.to_dtype(k_pre.dtype())?),
                Some(dv.to_dtype(v_pre.dtype())?),
            ),
            None => (None, None),
        };
        // The anchor's gradient must exist whenever q, k or v track one.
        Ok((Some(anchor.zeros_like()?), dk_pre, dv_pre))
    }
}

/// The tensors of the backward besides `q, k, v` (which the op holds).
struct BwdInputs<'a> {
    k_pre: &'a Tensor,
    v_pre: &'a Tensor,
    o: &'a Tensor,
    d_o: &'a Tensor,
    lse: &'a Tensor,
}

impl PrefixAttnOp {
    /// The whole `attn_bwd` on the CPU backend: the sequence gradients when `seq` (else the
    /// prefix-only backward), the prefix gradients when `pre`.
    fn cpu_bwd(
        &self,
        ins: &BwdInputs,
        seq: bool,
        pre: bool,
    ) -> candle_core::Result<(Option<SeqGrads>, Option<PreGrads>)> {
        let held = Held::new([
            &self.q, &self.k, &self.v, ins.k_pre, ins.v_pre, ins.o, ins.d_o, ins.lse,
        ])?;
        let [q, k, v, kp, vp, o, d_o, lse] =
            held.views(["q", "k", "v", "k_pre", "v_pre", "o", "d_o", "lse"])?;
        let fwd = self.fwd_args([q, k, v, kp, vp]);
        let pr = fwd.check().map_err(error)?;
        let (q_n, k_n, pre_n) = (
            pr.q_dims().iter().product(),
            pr.k_dims().iter().product(),
            pr.prefix_dims().iter().product(),
        );
        let mut seq_bufs = if seq {
            Some([
                HostVec::zeros(pr.dtype, q_n)?,
                HostVec::zeros(pr.dtype, k_n)?,
                HostVec::zeros(pr.dtype, k_n)?,
            ])
        } else {
            None
        };
        let mut pre_bufs = if pre {
            Some([vec![0f32; pre_n], vec![0f32; pre_n]])
        } else {
            None
        };
        let args = AttnBwdArgs {
            fwd,
            o,
            lse,
            d_o,
            prefix_only: !seq,
        };
        let mut grads = AttnGrads::default();
        if let Some([dq, dk, dv]) = seq_bufs.as_mut() {
            grads.dq = Some(dq.view_mut(&pr.q_dims())?);
            grads.dk = Some(dk.view_mut(&pr.k_dims())?);
            grads.dv = Some(dv.view_mut(&pr.k_dims())?);
        }
        if let Some([dk_pre, dv_pre]) = pre_bufs.as_mut() {
            grads.dk_pre = Some(host_mut(dk_pre, &pr.prefix_dims())?);
            grads.dv_pre = Some(host_mut(dv_pre, &pr.prefix_dims())?);
        }
        CpuBackend.attn_bwd(&args, grads).map_err(error)?;

        let seq_grads = match seq_bufs {
            Some([dq, dk, dv]) => Some((
                dq.into_tensor(&pr.q_dims())?,
                dk.into_tensor(&pr.k_dims())?,
                dv.into_tensor(&pr.k_dims())?,
            )),
            None => None,
        };
        let pre_grads = match pre_bufs {
            Some([dk, dv]) => {
                let t = |g: Vec<f32>| {
                    Tensor::from_vec(g, pr.prefix_dims().to_vec(), &candle_core::Device::Cpu)
                };
                Some((t(dk)?, t(dv)?))
            }
            None => None,
        };
        Ok((seq_grads, pre_grads))
    }
}

/// Read locks on the storage of candle CPU tensors, from which views are made.
struct Held<'t, const N: usize> {
    guards: [(candle_core::StorageRef<'t>, &'t candle_core::Layout); N],
}

impl<'t, const N: usize> Held<'t, N> {
    fn new(ts: [&'t Tensor; N]) -> candle_core::Result<Self> {
        Ok(Held {
            guards: ts.map(|t| t.storage_and_layout()),
        })
    }

    fn views(&self, names: [&str; N]) -> candle_core::Result<[TensorView<'_>; N]> {
        let mut out = Vec::with_capacity(N);
        for ((s, l), name) in self.guards.iter().zip(names) {
            match &**s {
                Storage::Cpu(s) => out.push(cpu_view(name, s, l)?),
                _ => {
                    return Err(error(crate::Error::device(
                        name,
                        "not on candle's CPU device, where q is: the tensors of one call must \
                         be on one device",
                    )))
                }
            }
        }
        Ok(out
            .try_into()
            .unwrap_or_else(|_| unreachable!("one view per tensor")))
    }
}

/// A view of candle CPU storage under candle's layout (strides and start offset in elements).
fn cpu_view<'a>(
    arg: &str,
    s: &'a CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<TensorView<'a>> {
    let (addr, cap, dtype) = match s {
        CpuStorage::F32(v) => (v.as_ptr() as usize as u64, v.len(), DType::F32),
        CpuStorage::F16(v) => (v.as_ptr() as usize as u64, v.len(), DType::F16),
        CpuStorage::BF16(v) => (v.as_ptr() as usize as u64, v.len(), DType::BF16),
        other => {
            return Err(error(crate::Error::DType {
                arg: arg.into(),
                expected: "f32, f16 or bf16".into(),
                got: candle_core::backend::BackendStorage::dtype(other)
                    .as_str()
                    .into(),
            }))
        }
    };
    let layout = Layout::new(l.dims(), l.stride(), l.start_offset())
        .map_err(|e| error(crate::Error::layout(arg, e.to_string())))?;
    // SAFETY: the vector holds `cap` elements of `dtype`, and the caller's read lock on the
    // storage keeps it alive and unwritten for `'a`; `from_raw_parts` checks that the layout
    // stays inside it.
    unsafe { TensorView::from_raw_parts(addr, cap, Location::Host, dtype, layout) }
        .map_err(|e| error(crate::Error::layout(arg, e.to_string())))
}

fn host_mut<'a>(v: &'a mut [f32], dims: &[usize]) -> candle_core::Result<TensorViewMut<'a>> {
    let layout = Layout::contiguous(dims).map_err(error)?;
    // SAFETY: `v` is borrowed exclusively for `'a`.
    unsafe {
        TensorViewMut::from_raw_parts(
            v.as_mut_ptr() as usize as u64,
            v.len(),
            Location::Host,
            DType::F32,
            layout,
        )
    }
    .map_err(error)
}

/// An output buffer in the inputs' dtype, handed to candle without a copy.
enum HostVec {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostVec {
    fn zeros(dtype: DType, n: usize) -> candle_core::Result<HostVec> {
        Ok(match dtype {
            DType::F32 => HostVec::F32(vec![0.0; n]),
            DType::F16 => HostVec::F16(vec![f16::ZERO; n]),
            DType::BF16 => HostVec::BF16(vec![bf16::ZERO; n]),
            DType::I32 => {
                return Err(error(crate::Error::DType {
                    arg: "q".into(),
                    expected: "f32, f16 or bf16".into(),
                    got: dtype.name().into(),
                }))
            }
        })
    }

    fn view_mut(&mut self, dims: &[usize]) -> candle_core::Result<TensorViewMut<'_>> {
        let (addr, cap, dtype) = match self {
            HostVec::F32(v) => (v.as_mut_ptr() as usize as u64, v.len(), DType::F32),
            HostVec::F16(v) => (v.as_mut_ptr() as usize as u64, v.len(), DType::F16),
            HostVec::BF16(v) => (v.as_mut_ptr() as usize as u64, v.len(), DType::BF16),
        };
        let layout = Layout::contiguous(dims).map_err(error)?;
        // SAFETY: the vector is borrowed exclusively for the view's lifetime.
        unsafe { TensorViewMut::from_raw_parts(addr, cap, Location::Host, dtype, layout) }
            .map_err(error)
    }

    fn into_storage(self) -> CpuStorage {
        match self {
            HostVec::F32(v) => CpuStorage::F32(v),
            HostVec::F16(v) => CpuStorage::F16(v),
            HostVec::BF16(v) => CpuStorage::BF16(v),
        }
    }

    fn into_tensor(self, dims: &[usize]) -> candle_core::Result<Tensor> {
        let dev = &candle_core::Device::Cpu;
        match self {
            HostVec::F32(v) => Tensor::from_vec(v, dims.to_vec(), dev),
            HostVec::F16(v) => Tensor::from_vec(v, dims.to_vec(), dev),
            HostVec::BF16(v) => Tensor::from_vec(v, dims.to_vec(), dev),
        }
    }
}
