//! The kernel devices, written once.
//!
//! `emu` and `cuda` run the same kernels from the same plans; what differs is where memory
//! lives and how one kernel is launched. That difference is [`KernelRunner`]: memory and
//! copies, a matmul (the emulator's `gemm` or cuBLAS), one dense launch, and the attention
//! launches with their metadata and scratch placed in device memory. Every type that
//! implements it is a [`Backend`] through the one implementation below, which plans each
//! operation (all argument checks happen in the planners, before any launch) and hands the
//! launch to the runner. An operation added to [`Backend`] is added here once, for both
//! devices; there are no default bodies to forget.
//!
//! Two more ways in, for engines (docs/ARCHITECTURE.md §1, "The caller's stream" and
//! "Plan and run"): [`AttnOnStream`], the one-shot calls ordered against a caller's CUDA
//! stream, and [`AttnPlan`], a plan made once per shape whose run allocates nothing, copies
//! nothing from the host and never synchronises, so that a CUDA graph can capture it.

use super::dense::{self, CeGrad, DenseLaunch, GridCap};
use super::kernels::{
    plan_bwd, plan_decode, plan_fwd, plan_meta_clamp, BwdParams, DecodeLaunch, FwdParams,
    KernelLaunch,
};
use super::{AdamWStep, Backend, Device, MatmulOpts};
use crate::attn::paged::PagedAttnArgs;
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::attn::{AttnProblem, Meta};
use crate::error::{Error, Result};
use crate::tensor::{DType, Layout, Location, Tensor, TensorView, TensorViewMut};
use std::marker::PhantomData;

/// The CUDA stream a call is queued on: the device's own stream ([`Stream::OWN`], the
/// default) or a caller's `CUstream`. Devices without streams (`emu`) refuse a caller's
/// stream with an error naming `stream`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream(usize);

impl Stream {
    /// The device's own stream.
    pub const OWN: Stream = Stream(0);

    /// A caller's stream; a null handle is [`Stream::OWN`].
    ///
    /// # Safety
    /// `stream` must be null or a valid `CUstream` of the device's primary context (the one
    /// the CUDA runtime API uses), alive until the work this crate queues on it has run.
    pub unsafe fn from_raw(stream: cudarc::driver::sys::CUstream) -> Stream {
        Stream(stream as usize)
    }

    /// The caller's handle, or `None` for the device's own stream.
    pub fn raw(self) -> Option<cudarc::driver::sys::CUstream> {
        (self.0 != 0).then_some(self.0 as cudarc::driver::sys::CUstream)
    }
}

/// A parameter struct of the attention kernels, passed by value to a launch.
pub trait AttnParams: Copy + cudarc::driver::DeviceRepr {
    /// Points the struct at the device arrays `[prefix_index, seqlen_q, seqlen_k]` (int32
    /// `[B]` each) and at `scratch` (unused by the forward).
    fn place(&mut self, meta: [u64; 3], scratch: u64, scratch_split: usize);
    /// The forward part (sizes and metadata addresses).
    fn fwd(&self) -> &FwdParams;
}

impl AttnParams for FwdParams {
    fn fwd(&self) -> &FwdParams {
        self
    }
    fn place(&mut self, meta: [u64; 3], _scratch: u64, _split: usize) {
        [self.prefix_index, self.seqlen_q, self.seqlen_k] = meta;
    }
}

impl AttnParams for BwdParams {
    /// The scratch holds `delta` first and the prefix partials from byte `scratch_split` on.
    fn fwd(&self) -> &FwdParams {
        &self.f
    }
    fn place(&mut self, meta: [u64; 3], scratch: u64, scratch_split: usize) {
        self.f.place(meta, 0, 0);
        self.delta = scratch;
        self.partial = scratch + scratch_split as u64;
    }
}

/// What a kernel device provides; [`Backend`] follows from it.
pub trait KernelRunner: Send + Sync {
    /// The device.
    fn device(&self) -> Device;
    /// Grid cap for the dense kernels' grid-stride loops.
    fn grid_cap(&self) -> GridCap;
    /// See [`Backend::zeros`].
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// See [`Backend::upload`].
    fn upload(&self, host: &Tensor) -> Result<Tensor>;
    /// See [`Backend::download`].
    fn download(&self, t: &Tensor) -> Result<Tensor>;
    /// See [`Backend::synchronize`].
    fn synchronize(&self) -> Result<()>;
    /// See [`Backend::memory`].
    fn memory(&self) -> Option<(usize, usize)>;
    /// See [`Backend::reset_peak_memory`].
    fn reset_peak_memory(&self);
    /// See [`Backend::time_ms`].
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
    /// See [`Backend::matmul`].
    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()>;
    /// Loads what launching the kernels `entries` needs (the `cuda` device: their modules and
    /// functions), so that a plan's run loads nothing.
    fn prepare(&self, entries: &[&'static str]) -> Result<()>;
    /// Queues one kernel with `params` on `stream`: no allocation, no copy from the host, no
    /// synchronisation. A device without streams refuses a caller's stream (an error naming
    /// `stream`).
    ///
    /// # Safety
    /// Every address in `params` must point to memory of this device that the kernel may read
    /// and write within the shapes and strides its planner validated, alive until the kernel
    /// has run.
    unsafe fn launch_on<P: Copy + cudarc::driver::DeviceRepr>(
        &self,
        l: &KernelLaunch,
        params: &P,
        stream: Stream,
    ) -> Result<()>;
    /// Runs `f`, which queues work on this device's own stream, ordered against `stream`:
    /// after everything queued on `stream` so far, and before everything `stream` queues
    /// later (docs/ARCHITECTURE.md §1); [`Stream::OWN`] runs just `f`. A device without
    /// streams refuses a caller's stream (an error naming `stream`).
    fn ordered_with<T>(&self, stream: Stream, f: impl FnOnce() -> Result<T>) -> Result<T>;
    /// Places a planned paged decode's host metadata (`plan.meta`, the thirds not given as
    /// device tensors) and its split partials in device memory, points the plan at them
    /// ([`DecodeLaunch::place`]) and launches the decode kernel and, with several splits, the
    /// merge.
    fn run_decode(&self, plan: DecodeLaunch) -> Result<()>;
    /// Places a planned dense kernel's index array on the device and launches it.
    fn run_dense(&self, l: DenseLaunch) -> Result<()>;
    /// Places the plan's metadata (`3B` int32 values `[prefix_index; seqlen_q; seqlen_k]`,
    /// each third replaced by the device array in `meta_dev` where one is given: when all
    /// three are, nothing is copied from the host; when any is, the metadata clamp runs
    /// first and the kernels read its clamped copy, see [`super::kernels::plan_meta_clamp`])
    /// and `scratch_bytes` of scratch (the partials from byte
    /// `scratch_split` on) in device memory, points `params` at them, and launches
    /// `launches` in order.
    #[allow(clippy::too_many_arguments)]
    fn run_attn<P: AttnParams>(
        &self,
        meta: &[i32],
        meta_dev: [Option<u64>; 3],
        scratch_bytes: usize,
        scratch_split: usize,
        params: P,
        launches: &[KernelLaunch],
    ) -> Result<()>;
}

/// The addresses of the three metadata arrays: each device array where given, else its third
/// of the host-side array uploaded at `uploaded`.
pub fn meta_addrs(uploaded: u64, batch: usize, meta_dev: [Option<u64>; 3]) -> [u64; 3] {
    std::array::from_fn(|i| meta_dev[i].unwrap_or(uploaded + (4 * i * batch) as u64))
}

/// Where the tensors of a kernel device live.
fn location<R: KernelRunner>(r: &R) -> Location {
    r.device().location()
}

/// The tensors of an attention call must live on the runner's device.
pub(crate) fn check_location<R: KernelRunner>(r: &R, loc: Location) -> Result<()> {
    if loc != location(r) {
        return Err(Error::device(
            "q",
            format!(
                "the tensors are on {loc}, the {} device computes on {}",
                r.device(),
                location(r)
            ),
        ));
    }
    Ok(())
}

impl<R: KernelRunner> Backend for R {
    fn device(&self) -> Device {
        KernelRunner::device(self)
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        KernelRunner::zeros(self, shape, dtype)
    }
    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        KernelRunner::upload(self, host)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        KernelRunner::download(self, t)
    }
    fn synchronize(&self) -> Result<()> {
        KernelRunner::synchronize(self)
    }
    fn memory(&self) -> Option<(usize, usize)> {
        KernelRunner::memory(self)
    }
    fn reset_peak_memory(&self) {
        KernelRunner::reset_peak_memory(self)
    }
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        KernelRunner::time_ms(self, f)
    }

    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        let plan = plan_fwd(args, &out)?;
        check_location(self, plan.problem.location)?;
        if plan.is_empty() {
            return Ok(());
        }
        let launch = plan.kernel_launch();
        // `out` stays borrowed until the launch is queued: the kernel writes through the
        // addresses in `params`.
        let _keep = out;
        self.run_attn(&plan.meta, plan.meta_dev, 0, 0, plan.params, &[launch])
    }

    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
        let plan = plan_bwd(args, &grads)?;
        check_location(self, plan.problem.location)?;
        let (scratch_bytes, scratch_split) = plan.scratch_bytes();
        let _keep = grads;
        self.run_attn(
            &plan.meta,
            plan.meta_dev,
            scratch_bytes,
            scratch_split,
            plan.params,
            &plan.launches,
        )
    }

    fn attn_decode(&self, args: &PagedAttnArgs, out: AttnFwdOut) -> Result<()> {
        let plan = plan_decode(args, &out)?;
        check_location(self, plan.problem.location)?;
        if plan.launches.is_empty() {
            return Ok(());
        }
        // `out` stays borrowed until the launches are queued.
        let _keep = out;
        self.run_decode(plan)
    }

    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()> {
        KernelRunner::matmul(self, a, b, bias, out, opts)
    }

    fn layernorm(
        &self,
        x: &TensorView,
        weight: &TensorView,
        bias: &TensorView,
        eps: f32,
        out: &mut TensorViewMut,
        mean: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::layernorm(
            x, weight, bias, eps, out, mean, rstd, loc, cap,
        )?)
    }
    fn layernorm_bwd(
        &self,
        dy: &TensorView,
        x: &TensorView,
        weight: &TensorView,
        mean: &TensorView,
        rstd: &TensorView,
        dx: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::layernorm_bwd(
            dy, x, weight, mean, rstd, dx, accumulate, loc, cap,
        )?)
    }
    fn gelu(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::unary("dense_gelu", x, out, loc, cap)?)
    }
    fn bias_gelu(
        &self,
        h: &mut TensorViewMut,
        bias: &TensorView,
        out: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::bias_gelu(h, bias, out, loc, cap)?)
    }
    fn bias_residual(
        &self,
        out: &mut TensorViewMut,
        bias: &TensorView,
        residual: &TensorView,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::bias_residual(out, bias, residual, loc, cap)?)
    }
    fn gelu_bwd(&self, x: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::binary("dense_gelu_bwd", x, dy, dx, loc, cap)?)
    }
    fn rmsnorm(
        &self,
        x: &TensorView,
        weight: &TensorView,
        eps: f32,
        out: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::rmsnorm(x, weight, eps, out, rstd, loc, cap)?)
    }
    fn rmsnorm_bwd(
        &self,
        dy: &TensorView,
        x: &TensorView,
        weight: &TensorView,
        rstd: &TensorView,
        dx: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::rmsnorm_bwd(
            dy, x, weight, rstd, dx, accumulate, loc, cap,
        )?)
    }
    fn rope(&self, x: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::rope(x, cos, sin, 1.0, loc, cap)?)
    }
    fn rope_bwd(&self, dx: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::rope(dx, cos, sin, -1.0, loc, cap)?)
    }
    fn swiglu(&self, gate: &TensorView, up: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::swiglu(gate, up, out, loc, cap)?)
    }
    fn swiglu_bwd(
        &self,
        gate: &TensorView,
        up: &TensorView,
        dy: &TensorView,
        d_gate: &mut TensorViewMut,
        d_up: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::swiglu_bwd(gate, up, dy, d_gate, d_up, loc, cap)?)
    }
    fn tanh(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::unary("dense_tanh", x, out, loc, cap)?)
    }
    fn tanh_bwd(&self, y: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::binary("dense_tanh_bwd", y, dy, dx, loc, cap)?)
    }
    fn adamw(
        &self,
        param: &mut TensorViewMut,
        grad: &TensorView,
        m: &mut TensorViewMut,
        v: &mut TensorViewMut,
        hp: AdamWStep,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::adamw(param, grad, m, v, hp, loc, cap)?)
    }
    fn axpy(&self, y: &mut TensorViewMut, alpha: f32, x: &TensorView) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::axpby(y, alpha, Some(x), 1.0, loc, cap)?)
    }
    fn scale(&self, x: &mut TensorViewMut, alpha: f32) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::axpby(x, 0.0, None, alpha, loc, cap)?)
    }
    fn add_assign(&self, out: &mut TensorViewMut, x: &TensorView) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::axpby(out, 1.0, Some(x), 1.0, loc, cap)?)
    }
    fn sum_rows(&self, x: &TensorView, out: &mut TensorViewMut, accumulate: bool) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::sum_rows(x, out, accumulate, loc, cap)?)
    }
    fn copy(&self, src: &TensorView, dst: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::copy(src, dst, false, loc, cap)?)
    }
    fn gather_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::gather_rows(src, rows, dst, loc, cap)?)
    }
    fn scatter_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::scatter_rows(src, rows, dst, loc, cap)?)
    }
    fn embed(
        &self,
        ids: &[i32],
        seq_len: usize,
        wte: &TensorView,
        wpe: &TensorView,
        pos_offset: usize,
        out: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::embed(
            ids, seq_len, wte, wpe, pos_offset, out, loc, cap,
        )?)
    }
    fn cross_entropy(
        &self,
        logits: &TensorView,
        targets: &[i32],
        losses: &mut TensorViewMut,
        dlogits: Option<&mut TensorViewMut>,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        let grad = match dlogits {
            Some(d) => CeGrad::Into(d),
            None => CeGrad::None,
        };
        self.run_dense(dense::cross_entropy(
            logits, targets, losses, grad, loc, cap,
        )?)
    }
    fn cross_entropy_inplace(
        &self,
        logits: &mut TensorViewMut,
        targets: &[i32],
        losses: &mut TensorViewMut,
    ) -> Result<()> {
        let (loc, cap) = (location(self), self.grid_cap());
        self.run_dense(dense::cross_entropy(
            &logits.as_view(),
            targets,
            losses,
            CeGrad::InPlace,
            loc,
            cap,
        )?)
    }
}

/// The attention calls of a kernel device on a caller's CUDA stream: the one-shot calls of
/// [`Backend`] (planned, metadata uploaded and scratch grown as there), queued on the device's
/// own stream and event-ordered against `stream` ([`KernelRunner::ordered_with`]).
/// [`Stream::OWN`] makes each exactly its [`Backend`] call.
pub trait AttnOnStream {
    /// [`Backend::attn_fwd`] ordered against `stream`.
    fn attn_fwd_on(&self, args: &AttnFwdArgs, out: AttnFwdOut, stream: Stream) -> Result<()>;
    /// [`Backend::attn_bwd`] ordered against `stream`.
    fn attn_bwd_on(&self, args: &AttnBwdArgs, grads: AttnGrads, stream: Stream) -> Result<()>;
    /// [`Backend::attn_decode`] ordered against `stream`.
    fn attn_decode_on(&self, args: &PagedAttnArgs, out: AttnFwdOut, stream: Stream) -> Result<()>;
}

impl<R: KernelRunner> AttnOnStream for R {
    fn attn_fwd_on(&self, args: &AttnFwdArgs, out: AttnFwdOut, stream: Stream) -> Result<()> {
        self.ordered_with(stream, || Backend::attn_fwd(self, args, out))
    }
    fn attn_bwd_on(&self, args: &AttnBwdArgs, grads: AttnGrads, stream: Stream) -> Result<()> {
        self.ordered_with(stream, || Backend::attn_bwd(self, args, grads))
    }
    fn attn_decode_on(&self, args: &PagedAttnArgs, out: AttnFwdOut, stream: Stream) -> Result<()> {
        self.ordered_with(stream, || Backend::attn_decode(self, args, out))
    }
}

/// Alignment (bytes) a plan's workspace must have.
pub const WORKSPACE_ALIGN: usize = 16;

/// Caller-provided device memory for a plan's run: at least [`AttnPlan::workspace_bytes`]
/// bytes, [`WORKSPACE_ALIGN`]-aligned, on the plan's device. It receives the clamped metadata
/// and, for the backward, the kernels' scratch; it needs no initialisation, and its contents
/// mean nothing after the run.
#[derive(Debug)]
pub struct Workspace<'a> {
    addr: u64,
    bytes: usize,
    location: Location,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> Workspace<'a> {
    /// The memory of a contiguous view of any dtype (a tensor from [`Backend::zeros`], say).
    pub fn from_view(t: TensorViewMut<'a>) -> Result<Workspace<'a>> {
        if !t.layout().is_contiguous() {
            return Err(Error::layout(
                "workspace",
                format!("must be a contiguous view, got {:?}", t.layout()),
            ));
        }
        let size = t.dtype().size();
        Ok(Workspace {
            addr: t.base_addr() + (t.layout().offset() * size) as u64,
            bytes: t.numel() * size,
            location: t.location(),
            _borrow: PhantomData,
        })
    }

    /// `bytes` bytes of foreign memory at `addr` on `location`.
    ///
    /// # Safety
    /// The bytes must be writable memory at `location`, used by nothing else for `'a` and
    /// until the kernels of the run they are given to have run.
    pub unsafe fn from_raw_parts(addr: u64, bytes: usize, location: Location) -> Workspace<'a> {
        Workspace {
            addr,
            bytes,
            location,
            _borrow: PhantomData,
        }
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Where it lives.
    pub fn location(&self) -> Location {
        self.location
    }
}

/// Bytes of the clamped metadata (`3B` int32) at the start of a workspace, rounded up to 256
/// so that the scratch after it keeps the allocator's alignment.
fn meta_bytes(batch: usize) -> usize {
    (12 * batch).max(1).next_multiple_of(256)
}

/// The address of the tensors a plan is made with that the caller does not give (outputs):
/// the planners read addresses only to check their alignment, never an element.
const PLAN_ADDR: u64 = 1 << 12;

/// A contiguous output view at [`PLAN_ADDR`], for planning only.
fn plan_view<'a>(dims: &[usize], dtype: DType, loc: Location) -> Result<TensorViewMut<'a>> {
    let layout = Layout::contiguous(dims)?;
    let cap = if layout.numel() == 0 {
        0
    } else {
        layout.span()
    };
    // SAFETY: the view goes only to the planners, which read no element of a view (they read
    // its dims, strides, dtype, location and address), and the plan keeps no view.
    unsafe { TensorViewMut::from_raw_parts(PLAN_ADDR, cap, loc, dtype, layout) }
}

/// `args` with its metadata replaced by values valid for every call of these shapes: a plan
/// never reads metadata (every run passes its own). `none` holds `-1` per sequence.
fn shape_args<'a>(args: &AttnFwdArgs<'a>, none: &'a [i32]) -> AttnFwdArgs<'a> {
    AttnFwdArgs {
        prefix_index: args.prefix.is_some().then_some(Meta::Host(none)),
        seqlen_q: None,
        seqlen_k: None,
        ..*args
    }
}

/// The checks a planned run (of [`AttnPlan`] or [`super::decode_plan::DecodePlan`]) makes
/// against its plan, each an error naming the argument.
pub(crate) mod run_checks {
    use super::{KernelRunner, Workspace, WORKSPACE_ALIGN};
    use crate::device::Device;
    use crate::error::{Error, Result};
    use crate::tensor::{DType, Location};

    /// The run's device is the plan's.
    pub fn device<R: KernelRunner>(planned: Device, runner: &R) -> Result<()> {
        if runner.device() != planned {
            return Err(Error::device(
                "plan",
                format!("planned for {planned}, run on {}", runner.device()),
            ));
        }
        Ok(())
    }

    /// The run's element type is the plan's (named after `q`).
    pub fn dtype(planned: DType, run: DType) -> Result<()> {
        if run != planned {
            return Err(Error::DType {
                arg: "q".into(),
                expected: format!("{planned} (the plan's)"),
                got: run.name().into(),
            });
        }
        Ok(())
    }

    /// `arg`'s dims in the run are the plan's, which `what` names (`[B, Tq, Hq, D]`).
    pub fn dims(arg: &str, what: &str, planned: &[usize], run: &[usize]) -> Result<()> {
        if run != planned {
            return Err(Error::shape(
                arg,
                format!("{planned:?}, the plan's {what}"),
                run,
            ));
        }
        Ok(())
    }

    /// A prefix table in the run exactly when the plan has one, of the plan's dims.
    pub fn prefix(planned: Option<[usize; 4]>, run: Option<[usize; 4]>) -> Result<()> {
        match (planned, run) {
            (None, Some(_)) => Err(Error::index(
                "k_pre",
                "given, but the plan has no prefix table",
            )),
            (Some(_), None) => Err(Error::index(
                "k_pre",
                "missing: the plan has a prefix table",
            )),
            (Some(p), Some(r)) => dims("k_pre", "[NP, P, Hkv, D]", &p, &r),
            (None, None) => Ok(()),
        }
    }

    /// The run's score scale is the plan's, bit for bit.
    pub fn scale(planned: f32, run: f32) -> Result<()> {
        if run.to_bits() != planned.to_bits() {
            return Err(Error::index(
                "scale",
                format!("{run}, the plan's is {planned}"),
            ));
        }
        Ok(())
    }

    /// The workspace is on `loc`, [`WORKSPACE_ALIGN`]-aligned and at least `need` bytes (of
    /// the plan's `planned` bytes).
    pub fn workspace(ws: &Workspace, loc: Location, need: usize, planned: usize) -> Result<()> {
        if ws.location() != loc {
            return Err(Error::device(
                "workspace",
                format!("lives on {}, the plan's tensors on {loc}", ws.location()),
            ));
        }
        if ws.addr() % WORKSPACE_ALIGN as u64 != 0 {
            return Err(Error::layout(
                "workspace",
                format!(
                    "address {:#x} is not {WORKSPACE_ALIGN}-byte aligned",
                    ws.addr()
                ),
            ));
        }
        if ws.bytes() < need {
            return Err(Error::layout(
                "workspace",
                format!(
                    "{} bytes, this run needs {need} (the plan's workspace_bytes: {planned})",
                    ws.bytes()
                ),
            ));
        }
        Ok(())
    }
}

/// A run takes device metadata only (it uploads nothing).
fn device_meta_only(args: &AttnFwdArgs) -> Result<()> {
    for (name, m) in [
        ("prefix_index", &args.prefix_index),
        ("seqlen_q", &args.seqlen_q),
        ("seqlen_k", &args.seqlen_k),
    ] {
        if let Some(Meta::Host(_)) = m {
            return Err(Error::device(
                name,
                "host metadata given to a plan's run, which copies nothing from the host: pass \
                 an i32 tensor [B] on the plan's device, or none for the default",
            ));
        }
    }
    Ok(())
}

/// An attention call planned once for a shape and run many times: the plan validates the
/// shapes with every check of [`Backend::attn_fwd`] / [`Backend::attn_bwd`] (the planners
/// [`plan_fwd`] and [`plan_bwd`]), fixes the launches and sizes the workspace; a run
/// ([`AttnPlan::run_fwd`], [`AttnPlan::run_bwd`]) allocates nothing, copies nothing from the
/// host and never synchronises, so a CUDA graph can capture it (docs/ARCHITECTURE.md §1,
/// "Plan and run").
///
/// A run passes its own tensors, which must have the plan's shapes and dtype (any strides
/// the planners accept, checked again on the host at every run), its metadata as i32 device
/// tensors `[B]` (each optional: a missing one takes its default; every value clamped as for
/// any device metadata), a [`Workspace`] and a [`Stream`].
#[derive(Clone, Debug)]
pub struct AttnPlan {
    device: Device,
    backward: bool,
    problem: AttnProblem,
    has_prefix: bool,
    launches: Vec<KernelLaunch>,
    scratch_bytes: usize,
}

impl AttnPlan {
    /// Plans the forward of calls shaped like `args` on `runner`'s device: its tensors give
    /// the shapes, dtype and strides (no element is read, and no metadata: each run passes
    /// its own).
    pub fn fwd<R: KernelRunner>(runner: &R, args: &AttnFwdArgs) -> Result<AttnPlan> {
        let none = vec![-1; args.q.dims().first().copied().unwrap_or(0)];
        let args = shape_args(args, &none);
        let pr = args.check()?;
        check_location(runner, pr.location)?;
        let out = AttnFwdOut {
            o: plan_view(&pr.q_dims(), pr.dtype, pr.location)?,
            lse: Some(plan_view(&pr.lse_dims(), DType::F32, pr.location)?),
        };
        let l = plan_fwd(&args, &out)?;
        let launches = if l.is_empty() {
            vec![]
        } else {
            vec![l.kernel_launch()]
        };
        AttnPlan::new(runner, false, l.problem, args.prefix.is_some(), launches, 0)
    }

    /// Plans the backward of calls shaped like `args` (the forward's inputs; `o`, `lse` and
    /// `dO` follow from them) on `runner`'s device, sized for the most a run may ask: the
    /// sequence gradients and, with a prefix table, both prefix gradients. A run may leave
    /// any of those out (`prefix_only`, no `dk_pre`/`dv_pre`).
    pub fn bwd<R: KernelRunner>(runner: &R, args: &AttnFwdArgs) -> Result<AttnPlan> {
        let none = vec![-1; args.q.dims().first().copied().unwrap_or(0)];
        let args = shape_args(args, &none);
        let pr = args.check()?;
        check_location(runner, pr.location)?;
        let loc = pr.location;
        let (o, d_o, lse) = (
            plan_view(&pr.q_dims(), pr.dtype, loc)?,
            plan_view(&pr.q_dims(), pr.dtype, loc)?,
            plan_view(&pr.lse_dims(), DType::F32, loc)?,
        );
        let b = AttnBwdArgs {
            fwd: args,
            o: o.as_view(),
            lse: lse.as_view(),
            d_o: d_o.as_view(),
            prefix_only: false,
        };
        let has_prefix = args.prefix.is_some();
        let pre = || -> Result<Option<TensorViewMut>> {
            match has_prefix {
                true => plan_view(&pr.prefix_dims(), DType::F32, loc).map(Some),
                false => Ok(None),
            }
        };
        let grads = AttnGrads {
            dq: Some(plan_view(&pr.q_dims(), pr.dtype, loc)?),
            dk: Some(plan_view(&pr.k_dims(), pr.dtype, loc)?),
            dv: Some(plan_view(&pr.k_dims(), pr.dtype, loc)?),
            dk_pre: pre()?,
            dv_pre: pre()?,
        };
        let l = plan_bwd(&b, &grads)?;
        let (scratch, _) = l.scratch_bytes();
        AttnPlan::new(runner, true, l.problem, has_prefix, l.launches, scratch)
    }

    fn new<R: KernelRunner>(
        runner: &R,
        backward: bool,
        problem: AttnProblem,
        has_prefix: bool,
        launches: Vec<KernelLaunch>,
        scratch_bytes: usize,
    ) -> Result<AttnPlan> {
        let mut entries: Vec<&'static str> = launches.iter().map(|l| l.entry).collect();
        entries.push(super::kernels::META_CLAMP_KERNEL);
        runner.prepare(&entries)?;
        Ok(AttnPlan {
            device: runner.device(),
            backward,
            problem,
            has_prefix,
            launches,
            scratch_bytes,
        })
    }

    /// Bytes of [`Workspace`] a run needs: the clamped metadata (`12·B` rounded up to 256)
    /// and, for the backward, the scratch (`delta` and the prefix partials).
    pub fn workspace_bytes(&self) -> usize {
        meta_bytes(self.problem.batch) + self.scratch_bytes
    }

    /// Whether this plans the backward.
    pub fn is_backward(&self) -> bool {
        self.backward
    }

    /// The device it was planned for.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The kernel launches of a run, in order (after the metadata clamp); a backward run
    /// without prefix gradients, or `prefix_only`, skips some of them.
    pub fn launches(&self) -> &[KernelLaunch] {
        &self.launches
    }

    /// The validated problem (its sizes; its metadata vectors are placeholders, since a plan
    /// reads no metadata).
    pub fn problem(&self) -> &AttnProblem {
        &self.problem
    }

    /// The forward on `runner` (the plan's device) with the tensors of `args` and `out`,
    /// which must have the plan's shapes and dtype. Metadata must be device tensors or none.
    pub fn run_fwd<R: KernelRunner>(
        &self,
        runner: &R,
        args: &AttnFwdArgs,
        out: AttnFwdOut,
        workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_kind(runner, false)?;
        device_meta_only(args)?;
        let l = plan_fwd(args, &out)?;
        self.check_problem(runner, &l.problem, args.prefix.is_some())?;
        self.check_workspace(&workspace, 0)?;
        if l.is_empty() {
            return Ok(());
        }
        // `out` stays borrowed until the launches are queued.
        let _keep = out;
        // SAFETY: the planner checked every address, shape and stride in `l.params` against
        // the views, which the caller borrows for the call (device metadata among them); the
        // workspace is the caller's, large enough (checked above).
        unsafe {
            launch_planned(
                runner,
                l.params,
                &[l.kernel_launch()],
                l.meta_dev,
                &workspace,
                0,
                stream,
            )
        }
    }

    /// The backward on `runner` (the plan's device) with the tensors of `args` and `grads`,
    /// which must have the plan's shapes and dtype. Metadata must be device tensors or none.
    pub fn run_bwd<R: KernelRunner>(
        &self,
        runner: &R,
        args: &AttnBwdArgs,
        grads: AttnGrads,
        workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_kind(runner, true)?;
        device_meta_only(&args.fwd)?;
        let l = plan_bwd(args, &grads)?;
        self.check_problem(runner, &l.problem, args.fwd.prefix.is_some())?;
        let (scratch, split) = l.scratch_bytes();
        self.check_workspace(&workspace, scratch)?;
        let _keep = grads;
        // SAFETY: as in `run_fwd`; the scratch (`scratch` bytes after the metadata) fits.
        unsafe {
            launch_planned(
                runner,
                l.params,
                &l.launches,
                l.meta_dev,
                &workspace,
                split,
                stream,
            )
        }
    }

    fn check_kind<R: KernelRunner>(&self, runner: &R, backward: bool) -> Result<()> {
        run_checks::device(self.device, runner)?;
        if backward != self.backward {
            let (planned, called) = if self.backward {
                ("backward", "forward")
            } else {
                ("forward", "backward")
            };
            return Err(Error::Unsupported(format!(
                "plan: planned for the {planned}, run as the {called}"
            )));
        }
        Ok(())
    }

    /// The run's problem (validated by the planner) against the plan's: same dtype, shapes,
    /// prefix table, masking and scale.
    fn check_problem<R: KernelRunner>(
        &self,
        runner: &R,
        pr: &AttnProblem,
        has_prefix: bool,
    ) -> Result<()> {
        check_location(runner, pr.location)?;
        let p = &self.problem;
        run_checks::dtype(p.dtype, pr.dtype)?;
        run_checks::dims("q", "[B, Tq, Hq, D]", &p.q_dims(), &pr.q_dims())?;
        run_checks::dims("k", "[B, Tk, Hkv, D]", &p.k_dims(), &pr.k_dims())?;
        run_checks::prefix(
            self.has_prefix.then(|| p.prefix_dims()),
            has_prefix.then(|| pr.prefix_dims()),
        )?;
        if pr.causal != p.causal {
            return Err(Error::index(
                "causal",
                format!("{}, the plan's is {}", pr.causal, p.causal),
            ));
        }
        run_checks::scale(p.scale, pr.scale)
    }

    /// The workspace is on the plan's device, aligned, and holds the metadata and `scratch`
    /// bytes.
    fn check_workspace(&self, ws: &Workspace, scratch: usize) -> Result<()> {
        let need = meta_bytes(self.problem.batch) + scratch;
        run_checks::workspace(ws, self.problem.location, need, self.workspace_bytes())
    }
}

/// A planned run's launches: the metadata clamp from the caller's device arrays (a missing
/// one: its default) into the workspace, then `launches` reading that copy, with the scratch
/// after it (the backward's partials from byte `scratch_split` of the scratch on).
///
/// # Safety
/// Every address in `params` must come from views the planner checked, alive until the
/// kernels have run, and `ws` must hold the metadata and the scratch the launches use.
unsafe fn launch_planned<R: KernelRunner, P: AttnParams>(
    runner: &R,
    mut params: P,
    launches: &[KernelLaunch],
    meta_dev: [Option<u64>; 3],
    ws: &Workspace,
    scratch_split: usize,
    stream: Stream,
) -> Result<()> {
    let batch = params.fwd().batch.max(0) as usize;
    let (clamp_params, clamp) =
        plan_meta_clamp(params.fwd(), meta_dev.map(|m| m.unwrap_or(0)), ws.addr)?;
    if batch > 0 {
        // SAFETY: the sources are the caller's checked i32 [B] device tensors (or 0: the
        // defaults) and the destination the first 12·B bytes of the workspace.
        unsafe { runner.launch_on(&clamp, &clamp_params, stream)? };
    }
    params.place(
        meta_addrs(ws.addr, batch, [None; 3]),
        ws.addr + meta_bytes(batch) as u64,
        scratch_split,
    );
    for l in launches {
        // SAFETY: the caller's promise, with the metadata and scratch placed in `ws`.
        unsafe { runner.launch_on(l, &params, stream)? };
    }
    Ok(())
}
