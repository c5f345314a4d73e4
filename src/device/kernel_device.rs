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

use super::dense::{self, CeGrad, DenseLaunch, GridCap};
use super::kernels::{
    plan_bwd, plan_decode, plan_fwd, BwdParams, DecodeLaunch, FwdParams, KernelLaunch,
};
use super::{AdamWStep, Backend, Device, MatmulOpts};
use crate::attn::paged::PagedAttnArgs;
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};

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
fn check_location<R: KernelRunner>(r: &R, loc: Location) -> Result<()> {
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
        let launch = KernelLaunch {
            entry: plan.entry,
            grid: plan.grid,
            threads: plan.threads,
            smem_bytes: plan.smem_bytes,
        };
        // `out` stays borrowed until the launch is queued: the kernel writes through the
        // addresses in `params`.
        let _keep = out;
        self.run_attn(&plan.meta, plan.meta_dev, 0, 0, plan.params, &[launch])
    }

    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
        let plan = plan_bwd(args, &grads)?;
        check_location(self, plan.problem.location)?;
        // delta, then the partials at the next 256-byte boundary (the prefix kernel writes
        // 8-byte pairs).
        let delta_bytes = (4 * plan.delta_len).next_multiple_of(256);
        let _keep = grads;
        self.run_attn(
            &plan.meta,
            plan.meta_dev,
            delta_bytes + 4 * plan.partial_len.max(1),
            delta_bytes,
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
