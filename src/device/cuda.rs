//! The `cuda` device: the kernels on an NVIDIA GPU through cudarc (dynamic loading: the crate
//! builds and runs without CUDA installed; detection never panics).
//!
//! Attention runs on views of device memory (e.g. an inference engine's own buffers, wrapped
//! with [`crate::tensor::TensorView::from_raw_parts`] at [`Location::Cuda`]). Device-resident [`Tensor`]s and
//! the dense GPT-2 operations arrive with the GPU training path; until then those methods
//! return [`Error::Unsupported`].

use super::kernels::{
    plan_bwd, plan_fwd, BwdParams, FwdParams, KernelLaunch, PREFIX_ATTN_BWD_FATBIN,
    PREFIX_ATTN_FWD_FATBIN,
};
use super::{Backend, Device};
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Mutex};

// SAFETY: the parameter structs are #[repr(C)] plain data mirrored by the kernels' structs.
unsafe impl DeviceRepr for FwdParams {}
unsafe impl DeviceRepr for BwdParams {}

/// Whether the CUDA driver library can be loaded (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only probes for the shared library.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, 0 when there is no driver or no device.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    std::panic::catch_unwind(|| {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    })
    .unwrap_or(0)
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Kernel {
        kernel: what.to_string(),
        msg: format!("CUDA error: {e:?}"),
    }
}

/// The `cuda` device.
pub struct CudaBackend {
    ordinal: usize,
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    fwd: Mutex<Option<Arc<CudaModule>>>,
    bwd: Mutex<Option<Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, or explains why it cannot.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        if !driver_present() {
            return Err(Error::device(
                "cuda",
                "no CUDA driver (libcuda) on this machine; use the cpu device",
            ));
        }
        let n = device_count();
        if ordinal >= n {
            return Err(Error::device(
                "cuda",
                format!("device cuda:{ordinal} requested, {n} CUDA device(s) present"),
            ));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::device("cuda", "creating the CUDA context panicked"))?
            .map_err(cuda_err("context"))?;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ordinal,
            _ctx: ctx,
            stream,
            fwd: Mutex::new(None),
            bwd: Mutex::new(None),
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let (slot, image) = if name.starts_with("prefix_attn_bwd") {
            (&self.bwd, PREFIX_ATTN_BWD_FATBIN)
        } else {
            (&self.fwd, PREFIX_ATTN_FWD_FATBIN)
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let image = image.ok_or_else(|| {
                Error::Unsupported(
                    "the CUDA kernels were not compiled into this build (nvcc was not found; \
                     see scripts/install-nvcc.sh and PREFIX_ATTN_REQUIRE_NVCC)"
                        .into(),
                )
            })?;
            let module = self
                ._ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(cuda_err("module load"))?;
            *slot = Some(module);
        }
        let module = slot
            .as_ref()
            .ok_or_else(|| Error::device("cuda", "module not loaded"))?;
        let func = module.load_function(name).map_err(cuda_err(name))?;
        Ok(func)
    }

    fn launch<P: DeviceRepr>(&self, l: &KernelLaunch, params: &P) -> Result<()> {
        let func = self.function(l.entry)?;
        if l.smem_bytes > 48 * 1024 {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                l.smem_bytes as i32,
            )
            .map_err(cuda_err(l.entry))?;
        }
        let cfg = LaunchConfig {
            grid_dim: l.grid,
            block_dim: (l.threads, 1, 1),
            shared_mem_bytes: l.smem_bytes as u32,
        };
        // SAFETY: the plan checked every shape, stride and alignment against the views, which
        // outlive the launch; the kernel reads and writes only within them.
        unsafe {
            self.stream
                .launch_builder(&func)
                .arg(params)
                .launch(cfg)
                .map_err(cuda_err(l.entry))?;
        }
        Ok(())
    }

    /// The backward kernels on views of this device's memory.
    pub fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
        let mut plan = plan_bwd(args, &grads)?;
        if plan.problem.location != Location::Cuda(self.ordinal) {
            return Err(Error::device(
                "q",
                format!(
                    "the tensors are on {}, this backend is cuda:{}",
                    plan.problem.location, self.ordinal
                ),
            ));
        }
        use cudarc::driver::DevicePtr;
        let meta = self
            .stream
            .clone_htod(&plan.meta)
            .map_err(cuda_err("metadata upload"))?;
        let delta = self
            .stream
            .alloc_zeros::<f32>(plan.delta_len.max(1))
            .map_err(cuda_err("scratch"))?;
        let partial = self
            .stream
            .alloc_zeros::<f32>(plan.partial_len.max(1))
            .map_err(cuda_err("scratch"))?;
        let b = plan.problem.batch as u64;
        {
            let (m, _s1) = meta.device_ptr(&self.stream);
            let (d, _s2) = delta.device_ptr(&self.stream);
            let (pp, _s3) = partial.device_ptr(&self.stream);
            plan.params.f.prefix_index = m;
            plan.params.f.seqlen_q = m + 4 * b;
            plan.params.f.seqlen_k = m + 8 * b;
            plan.params.delta = d;
            plan.params.partial = pp;
        }
        let _keep = grads;
        for l in &plan.launches {
            self.launch(l, &plan.params)?;
        }
        // The scratch and metadata buffers must outlive the kernels.
        self.stream.synchronize().map_err(cuda_err("backward"))?;
        drop((meta, delta, partial));
        Ok(())
    }

    /// The forward kernel on views of this device's memory.
    pub fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        let mut plan = plan_fwd(args, &out)?;
        if plan.problem.location != Location::Cuda(self.ordinal) {
            return Err(Error::device(
                "q",
                format!(
                    "the tensors are on {}, this backend is cuda:{}",
                    plan.problem.location, self.ordinal
                ),
            ));
        }
        if plan.is_empty() {
            return Ok(());
        }
        let meta = self
            .stream
            .clone_htod(&plan.meta)
            .map_err(cuda_err("metadata upload"))?;
        let b = plan.problem.batch as u64;
        {
            use cudarc::driver::DevicePtr;
            let (base, _sync) = meta.device_ptr(&self.stream);
            plan.params.prefix_index = base;
            plan.params.seqlen_q = base + 4 * b;
            plan.params.seqlen_k = base + 8 * b;
        }
        let launch = KernelLaunch {
            entry: plan.entry,
            grid: plan.grid,
            threads: plan.threads,
            smem_bytes: plan.smem_bytes,
        };
        let _keep = out;
        self.launch(&launch, &plan.params)?;
        // The metadata buffer must outlive the kernel: wait before it is freed.
        self.stream.synchronize().map_err(cuda_err(plan.entry))?;
        drop(meta);
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    fn zeros(&self, _: &[usize], _: DType) -> Result<Tensor> {
        Err(Error::Unsupported("cuda: device-resident tensors arrive with the GPU training path; attention runs on device views (TensorView::from_raw_parts) today".into()))
    }
    fn upload(&self, _: &Tensor) -> Result<Tensor> {
        Err(Error::Unsupported("cuda: device-resident tensors arrive with the GPU training path; attention runs on device views (TensorView::from_raw_parts) today".into()))
    }
    fn download(&self, _: &Tensor) -> Result<Tensor> {
        Err(Error::Unsupported("cuda: device-resident tensors arrive with the GPU training path; attention runs on device views (TensorView::from_raw_parts) today".into()))
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }
    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        CudaBackend::attn_fwd(self, args, out)
    }
    fn attn_bwd(&self, _: &AttnBwdArgs, _: AttnGrads) -> Result<()> {
        Err(Error::Unsupported(
            "cuda: the attention backward kernel is not built yet".into(),
        ))
    }
}
