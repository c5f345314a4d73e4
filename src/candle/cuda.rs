//! The candle op's CUDA path (feature `candle-cuda`): the crate's CUDA kernels on candle's
//! device memory, queued on the stream of candle's `CudaDevice`.
//!
//! Every call is a plan and its run (docs/ARCHITECTURE.md §1, "Plan and run") on the crate's
//! `cuda` backend of the tensors' GPU, with everything the run needs allocated through
//! candle's device on candle's stream: the outputs (which candle then owns), the metadata
//! given in [`super::PrefixAttnOpts`] (copied to the device; an option left unset costs no
//! copy, the kernels take its default) and the workspace. So nothing waits on the host and no
//! other stream is involved; candle's event tracking orders the call against candle's other
//! streams through the guards that cudarc hands out with each device pointer, held until the
//! launches are queued. Candle opens its devices on the primary context, the one the `cuda`
//! backend runs in and requires of a caller's stream.

use super::{error, BwdInputs, PreGrads, PrefixAttnOp, PrefixAttnOpts, SeqGrads};
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, AttnProblem, Meta};
use crate::device::cuda::CudaBackend;
use crate::device::kernel_device::{AttnPlan, Stream, Workspace};
use crate::tensor::{DType, Layout, Location, TensorView, TensorViewMut};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

type CResult<T> = candle_core::Result<T>;

/// Elements of a 16-byte chunk of a 16-bit dtype: the CUDA kernels read q, k, v, the prefix
/// table and `dO` in such chunks, so each row must start on a 16-byte boundary (the
/// planner's `check_vec16`).
const CHUNK_ELEMS: usize = 8;

/// Whether the CUDA kernels can read a tensor of this layout in place: unit stride on the
/// last dimension, every other stride (of a dimension longer than 1) and the start offset a
/// whole number of 16-byte chunks (candle's allocations are 256-byte aligned).
pub(super) fn reads_in_place(l: &candle_core::Layout) -> bool {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    r > 0
        && (dims[r - 1] <= 1 || strides[r - 1] == 1)
        && l.start_offset() % CHUNK_ELEMS == 0
        && dims[..r - 1]
            .iter()
            .zip(strides)
            .all(|(&d, &s)| d <= 1 || s % CHUNK_ELEMS == 0)
}

/// The crate's `cuda` backend of each GPU, opened once per process: it loads the kernel
/// modules and checks a caller's stream against its context. Its own stream stays unused
/// here.
fn backend(ordinal: usize) -> CResult<Arc<CudaBackend>> {
    static BACKENDS: Mutex<Vec<Option<Arc<CudaBackend>>>> = Mutex::new(Vec::new());
    let mut all = BACKENDS.lock().unwrap_or_else(|p| p.into_inner());
    if all.len() <= ordinal {
        all.resize(ordinal + 1, None);
    }
    if let Some(be) = &all[ordinal] {
        return Ok(be.clone());
    }
    let be = Arc::new(CudaBackend::new(ordinal).map_err(error)?);
    all[ordinal] = Some(be.clone());
    Ok(be)
}

/// What the kernels take beyond the contract's checks: f16 or bf16, head dim 64 or 128.
fn check_kernel_problem(pr: &AttnProblem) -> CResult<()> {
    if !matches!(pr.dtype, DType::F16 | DType::BF16) {
        return Err(error(crate::Error::DType {
            arg: "q".into(),
            expected: "f16 or bf16 on CUDA (the CUDA kernels take no f32; the candle op's CPU \
                       path does)"
                .into(),
            got: pr.dtype.name().into(),
        }));
    }
    if pr.head_dim != 64 && pr.head_dim != 128 {
        return Err(error(crate::Error::shape(
            "q",
            format!(
                "head dim D 64 or 128 on CUDA (the CUDA kernels' head dims; the candle op's CPU \
                 path takes any), got D={}",
                pr.head_dim
            ),
            &pr.q_dims(),
        )));
    }
    Ok(())
}

/// The call's device: candle's `CudaDevice`, its stream and the crate's location and
/// backend for it.
struct Gpu {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    loc: Location,
    backend: Arc<CudaBackend>,
}

impl Gpu {
    fn of(s: &CudaStorage) -> CResult<Gpu> {
        let dev = s.device.clone();
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        Ok(Gpu {
            backend: backend(ordinal)?,
            loc: Location::Cuda(ordinal),
            dev,
            stream,
        })
    }

    /// Candle's stream as the crate's [`Stream`].
    fn stream(&self) -> Stream {
        // SAFETY: candle's stream of this device (a stream candle created, or the per-thread
        // default stream, which is this thread's: the op runs on the thread that called it),
        // in the primary context (candle opens devices with `CudaContext::new`, which retains
        // it); `self.dev` keeps it alive while the call queues its work, and the stream
        // outlives that work, as all of candle's.
        unsafe { Stream::from_raw(self.stream.cu_stream()) }
    }

    /// The metadata that `opts` gives, copied to the device (i32 `[B]` each; `None` where
    /// unset).
    fn upload_meta(&self, opts: &PrefixAttnOpts) -> CResult<[Option<CudaSlice<i32>>; 3]> {
        let mut out = [None, None, None];
        for (slot, values) in
            out.iter_mut()
                .zip([&opts.prefix_index, &opts.seqlen_q, &opts.seqlen_k])
        {
            if let Some(v) = values {
                // One element at least: CUDA refuses zero-byte allocations (B = 0).
                *slot = Some(
                    if v.is_empty() {
                        self.stream.alloc_zeros::<i32>(1)
                    } else {
                        self.stream.clone_htod(v.as_slice())
                    }
                    .map_err(candle_core::Error::wrap)?,
                );
            }
        }
        Ok(out)
    }
}

/// A view of candle CUDA storage under candle's layout; the guard cudarc hands out with the
/// pointer goes to `guards` (see the module documentation).
fn view<'a>(
    arg: &str,
    s: &'a CudaStorage,
    l: &candle_core::Layout,
    gpu: &'a Gpu,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> CResult<TensorView<'a>> {
    fn ptr<'a, T>(
        v: &'a CudaSlice<T>,
        dtype: DType,
        stream: &'a CudaStream,
        guards: &mut Vec<SyncOnDrop<'a>>,
    ) -> (u64, usize, DType) {
        let (addr, guard) = v.device_ptr(stream);
        guards.push(guard);
        (addr, v.len(), dtype)
    }
    let (addr, cap, dtype) = match &s.slice {
        CudaStorageSlice::F16(v) => ptr(v, DType::F16, &gpu.stream, guards),
        CudaStorageSlice::BF16(v) => ptr(v, DType::BF16, &gpu.stream, guards),
        CudaStorageSlice::F32(v) => ptr(v, DType::F32, &gpu.stream, guards),
        CudaStorageSlice::I32(v) => ptr(v, DType::I32, &gpu.stream, guards),
        _ => {
            return Err(error(crate::Error::DType {
                arg: arg.into(),
                expected: "f16 or bf16".into(),
                got: s.dtype().as_str().into(),
            }))
        }
    };
    let layout = Layout::new(l.dims(), l.stride(), l.start_offset())
        .map_err(|e| error(crate::Error::layout(arg, e.to_string())))?;
    // SAFETY: the slice holds `cap` elements of `dtype` in device memory of `gpu.loc`, alive
    // and unwritten for `'a` (the caller's read lock on the storage, or candle's own borrow
    // of a custom op's inputs); `from_raw_parts` checks that the layout stays inside it.
    unsafe { TensorView::from_raw_parts(addr, cap, gpu.loc, dtype, layout) }
        .map_err(|e| error(crate::Error::layout(arg, e.to_string())))
}

/// The view of an uploaded metadata array.
fn meta_view<'a>(
    arg: &str,
    v: &'a Option<CudaSlice<i32>>,
    batch: usize,
    gpu: &'a Gpu,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> CResult<Option<Meta<'a>>> {
    let Some(v) = v else { return Ok(None) };
    let (addr, guard) = v.device_ptr(&gpu.stream);
    guards.push(guard);
    let layout = Layout::contiguous(&[batch]).map_err(error)?;
    // SAFETY: `v` holds at least `batch` i32 (uploaded from the options, which the host checks
    // sized `[B]`), borrowed for `'a`.
    let t = unsafe { TensorView::from_raw_parts(addr, v.len(), gpu.loc, DType::I32, layout) }
        .map_err(|e| error(crate::Error::layout(arg, e.to_string())))?;
    Ok(Some(Meta::Device(t)))
}

/// `args` with its metadata replaced by the uploaded arrays.
fn with_device_meta<'a>(
    args: &AttnFwdArgs<'a>,
    meta: &'a [Option<CudaSlice<i32>>; 3],
    batch: usize,
    gpu: &'a Gpu,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> CResult<AttnFwdArgs<'a>> {
    Ok(AttnFwdArgs {
        prefix_index: meta_view("prefix_index", &meta[0], batch, gpu, guards)?,
        seqlen_q: meta_view("seqlen_q", &meta[1], batch, gpu, guards)?,
        seqlen_k: meta_view("seqlen_k", &meta[2], batch, gpu, guards)?,
        ..*args
    })
}

/// A zeroed output buffer allocated through candle's device, so that candle owns it once
/// wrapped; one element at least (CUDA refuses zero-byte allocations).
enum Out {
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl Out {
    fn zeros(gpu: &Gpu, dtype: DType, n: usize) -> CResult<Out> {
        let n = n.max(1);
        Ok(match dtype {
            DType::F16 => Out::F16(gpu.dev.alloc_zeros(n)?),
            DType::BF16 => Out::BF16(gpu.dev.alloc_zeros(n)?),
            DType::F32 => Out::F32(gpu.dev.alloc_zeros(n)?),
            DType::I32 => {
                return Err(error(crate::Error::DType {
                    arg: "q".into(),
                    expected: "f16 or bf16".into(),
                    got: dtype.name().into(),
                }))
            }
        })
    }

    fn view_mut<'a>(
        &'a mut self,
        dims: &[usize],
        gpu: &'a Gpu,
        guards: &mut Vec<SyncOnDrop<'a>>,
    ) -> CResult<TensorViewMut<'a>> {
        fn ptr<'a, T>(
            v: &'a mut CudaSlice<T>,
            dtype: DType,
            stream: &'a CudaStream,
            guards: &mut Vec<SyncOnDrop<'a>>,
        ) -> (u64, usize, DType) {
            let n = v.len();
            let (addr, guard) = v.device_ptr_mut(stream);
            guards.push(guard);
            (addr, n, dtype)
        }
        let (addr, cap, dtype) = match self {
            Out::F16(v) => ptr(v, DType::F16, &gpu.stream, guards),
            Out::BF16(v) => ptr(v, DType::BF16, &gpu.stream, guards),
            Out::F32(v) => ptr(v, DType::F32, &gpu.stream, guards),
        };
        let layout = Layout::contiguous(dims).map_err(error)?;
        // SAFETY: the buffer holds `cap` elements of `dtype` on `gpu.loc` and is borrowed
        // exclusively for the view's lifetime.
        unsafe { TensorViewMut::from_raw_parts(addr, cap, gpu.loc, dtype, layout) }.map_err(error)
    }

    fn into_storage(self, gpu: &Gpu) -> CudaStorage {
        let dev = gpu.dev.clone();
        match self {
            Out::F16(v) => CudaStorage::wrap_cuda_slice(v, dev),
            Out::BF16(v) => CudaStorage::wrap_cuda_slice(v, dev),
            Out::F32(v) => CudaStorage::wrap_cuda_slice(v, dev),
        }
    }

    /// A candle tensor outside any graph (the op's backward returns it as a gradient).
    fn into_tensor(self, gpu: &Gpu, dims: &[usize]) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(self.into_storage(gpu)),
            dims.to_vec(),
            BackpropOp::none(),
            false,
        )
    }
}

/// `bytes` of workspace for a plan's run, allocated through candle (uninitialised: a run
/// needs none) and freed in stream order when dropped.
fn workspace(gpu: &Gpu, bytes: usize) -> CResult<CudaSlice<u8>> {
    // SAFETY: a plan's run writes the workspace before reading it.
    unsafe { gpu.dev.alloc::<u8>(bytes.max(1)) }
}

/// The [`Workspace`] over `ws`.
fn workspace_view<'a>(
    ws: &'a mut CudaSlice<u8>,
    gpu: &'a Gpu,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> Workspace<'a> {
    let bytes = ws.len();
    let (addr, guard) = ws.device_ptr_mut(&gpu.stream);
    guards.push(guard);
    // SAFETY: `bytes` writable bytes on this GPU, borrowed exclusively for `'a`; they are
    // freed in stream order after the run's kernels.
    unsafe { Workspace::from_raw_parts(addr, bytes, gpu.loc) }
}

/// The one-element anchor of `SeqInputs`, on `q`'s device.
pub(super) fn anchor(q: &CudaStorage) -> CResult<(CudaStorage, candle_core::Shape)> {
    let dev = q.device.clone();
    let v = dev.alloc_zeros::<f32>(1)?;
    Ok((
        CudaStorage::wrap_cuda_slice(v, dev),
        candle_core::Shape::from(1),
    ))
}

/// The forward: `o` (candle storage and shape) and the LSE `[B, Hq, Tq]` as a candle tensor.
pub(super) fn forward(
    op: &PrefixAttnOp,
    (k_pre, k_pre_l): (&CudaStorage, &candle_core::Layout),
    (v_pre, v_pre_l): (&CudaStorage, &candle_core::Layout),
) -> CResult<(CudaStorage, candle_core::Shape, Tensor)> {
    let gpu = Gpu::of(k_pre)?;
    // Declared before the guards, which borrow them.
    let meta = gpu.upload_meta(&op.opts)?;
    let held = [&op.q, &op.k, &op.v].map(|t| t.storage_and_layout());
    let mut guards = Vec::new();
    let mut seq = Vec::with_capacity(3);
    for ((s, l), name) in held.iter().zip(["q", "k", "v"]) {
        seq.push(view(name, cuda_storage(name, s)?, l, &gpu, &mut guards)?);
    }
    let [q, k, v]: [TensorView; 3] = seq
        .try_into()
        .unwrap_or_else(|_| unreachable!("one view per tensor"));
    let kp = view("k_pre", k_pre, k_pre_l, &gpu, &mut guards)?;
    let vp = view("v_pre", v_pre, v_pre_l, &gpu, &mut guards)?;
    // The contract's checks on the host, with the options' values: the CPU path's errors.
    let host_args = op.fwd_args([q, k, v, kp, vp]);
    let pr = host_args.check().map_err(error)?;
    check_kernel_problem(&pr)?;

    let args = with_device_meta(&host_args, &meta, pr.batch, &gpu, &mut guards)?;
    let plan = AttnPlan::fwd(&*gpu.backend, &args).map_err(error)?;
    let mut ws = workspace(&gpu, plan.workspace_bytes())?;
    let mut o = Out::zeros(&gpu, pr.dtype, pr.q_dims().iter().product())?;
    let mut lse = Out::zeros(&gpu, DType::F32, pr.lse_dims().iter().product())?;
    {
        let mut out_guards = Vec::new();
        let out = AttnFwdOut {
            o: o.view_mut(&pr.q_dims(), &gpu, &mut out_guards)?,
            lse: Some(lse.view_mut(&pr.lse_dims(), &gpu, &mut out_guards)?),
        };
        let ws = workspace_view(&mut ws, &gpu, &mut out_guards);
        plan.run_fwd(&*gpu.backend, &args, out, ws, gpu.stream())
            .map_err(error)?;
    }
    drop(guards);
    let shape = candle_core::Shape::from(pr.q_dims().to_vec());
    let lse = lse.into_tensor(&gpu, &pr.lse_dims());
    Ok((o.into_storage(&gpu), shape, lse))
}

/// The backward: `(dq, dk, dv)` when `seq` (else the prefix-only backward), the f32 prefix
/// gradients when `pre`.
pub(super) fn backward(
    op: &PrefixAttnOp,
    ins: &BwdInputs,
    seq: bool,
    pre: bool,
) -> CResult<(Option<SeqGrads>, Option<PreGrads>)> {
    const NAMES: [&str; 8] = ["q", "k", "v", "k_pre", "v_pre", "o", "d_o", "lse"];
    let held = [
        &op.q, &op.k, &op.v, ins.k_pre, ins.v_pre, ins.o, ins.d_o, ins.lse,
    ]
    .map(|t| t.storage_and_layout());
    let gpu = Gpu::of(cuda_storage("q", &held[0].0)?)?;
    // Declared before the guards, which borrow them.
    let meta = gpu.upload_meta(&op.opts)?;
    let mut guards = Vec::new();
    let mut views = Vec::with_capacity(NAMES.len());
    for ((s, l), name) in held.iter().zip(NAMES) {
        views.push(view(name, cuda_storage(name, s)?, l, &gpu, &mut guards)?);
    }
    let [q, k, v, kp, vp, o, d_o, lse]: [TensorView; 8] = views
        .try_into()
        .unwrap_or_else(|_| unreachable!("one view per tensor"));
    let host_fwd = op.fwd_args([q, k, v, kp, vp]);
    let pr = host_fwd.check().map_err(error)?;
    check_kernel_problem(&pr)?;

    let fwd = with_device_meta(&host_fwd, &meta, pr.batch, &gpu, &mut guards)?;
    let plan = AttnPlan::bwd(&*gpu.backend, &fwd).map_err(error)?;
    let mut ws = workspace(&gpu, plan.workspace_bytes())?;
    let (q_n, k_n, pre_n) = (
        pr.q_dims().iter().product(),
        pr.k_dims().iter().product(),
        pr.prefix_dims().iter().product(),
    );
    let mut seq_bufs = if seq {
        Some([
            Out::zeros(&gpu, pr.dtype, q_n)?,
            Out::zeros(&gpu, pr.dtype, k_n)?,
            Out::zeros(&gpu, pr.dtype, k_n)?,
        ])
    } else {
        None
    };
    let mut pre_bufs = if pre {
        Some([
            Out::zeros(&gpu, DType::F32, pre_n)?,
            Out::zeros(&gpu, DType::F32, pre_n)?,
        ])
    } else {
        None
    };
    {
        let mut out_guards = Vec::new();
        let mut grads = AttnGrads::default();
        if let Some([dq, dk, dv]) = seq_bufs.as_mut() {
            grads.dq = Some(dq.view_mut(&pr.q_dims(), &gpu, &mut out_guards)?);
            grads.dk = Some(dk.view_mut(&pr.k_dims(), &gpu, &mut out_guards)?);
            grads.dv = Some(dv.view_mut(&pr.k_dims(), &gpu, &mut out_guards)?);
        }
        if let Some([dk_pre, dv_pre]) = pre_bufs.as_mut() {
            grads.dk_pre = Some(dk_pre.view_mut(&pr.prefix_dims(), &gpu, &mut out_guards)?);
            grads.dv_pre = Some(dv_pre.view_mut(&pr.prefix_dims(), &gpu, &mut out_guards)?);
        }
        let args = AttnBwdArgs {
            fwd,
            o,
            lse,
            d_o,
            prefix_only: !seq,
        };
        let ws = workspace_view(&mut ws, &gpu, &mut out_guards);
        plan.run_bwd(&*gpu.backend, &args, grads, ws, gpu.stream())
            .map_err(error)?;
    }
    drop(guards);
    let seq_grads = seq_bufs.map(|[dq, dk, dv]| {
        (
            dq.into_tensor(&gpu, &pr.q_dims()),
            dk.into_tensor(&gpu, &pr.k_dims()),
            dv.into_tensor(&gpu, &pr.k_dims()),
        )
    });
    let pre_grads = pre_bufs.map(|[dk, dv]| {
        (
            dk.into_tensor(&gpu, &pr.prefix_dims()),
            dv.into_tensor(&gpu, &pr.prefix_dims()),
        )
    });
    Ok((seq_grads, pre_grads))
}

/// The CUDA storage of an input (the op checked that all five share `q`'s device).
fn cuda_storage<'a>(arg: &str, s: &'a Storage) -> CResult<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => Err(error(crate::Error::device(
            arg,
            "not on candle's CUDA device, where q is: the tensors of one call must be on one \
             device",
        ))),
    }
}
