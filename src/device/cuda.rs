//! The `cuda` device: the kernels on an NVIDIA GPU through cudarc (dynamic loading: the crate
//! builds and runs without CUDA installed; detection never panics).
//!
//! Tensors of this device live in device memory ([`Tensor`]s with device storage, freed in
//! stream order when dropped). Attention and the dense GPT-2 kernels run on one stream; dense
//! matmuls go to cuBLAS (`cublasGemmEx`, f32 compute: fp16/bf16 inputs with fp32
//! accumulation). Attention also runs on views of foreign device memory (an inference
//! engine's own buffers, wrapped with [`crate::tensor::TensorView::from_raw_parts`]) and on a
//! caller's stream: event-ordered one-shot calls, or a plan's run launched on that stream
//! directly ([`super::kernel_device::Stream`], docs/ARCHITECTURE.md §1).

use super::dense::{self, DenseLaunch, DenseParams, GridCap};
use super::kernel_device::{meta_addrs, AttnParams, KernelRunner, Stream};
use super::kernels::{
    fatbin, plan_meta_clamp, BwdParams, DecodeLaunch, DecodeParams, FwdParams, KernelLaunch,
    MetaClampParams,
};
use super::{Device, MatmulOpts};
use crate::error::{Error, Result};
use crate::tensor::{DType, DeviceMemory, Location, Tensor, TensorView, TensorViewMut};
use cudarc::cublas::sys as blas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes held by a backend's allocations, now and at the peak.
#[derive(Debug, Default)]
struct MemCounter {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl MemCounter {
    fn add(&self, n: usize) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, n: usize) {
        self.now.fetch_sub(n, Ordering::Relaxed);
    }
}

// SAFETY: the parameter structs are #[repr(C)] plain data mirrored by the kernels' structs.
unsafe impl DeviceRepr for FwdParams {}
unsafe impl DeviceRepr for BwdParams {}
unsafe impl DeviceRepr for MetaClampParams {}
unsafe impl DeviceRepr for DecodeParams {}
unsafe impl DeviceRepr for DenseParams {}

/// File names of the CUDA driver library and of cuBLAS, each among those that cudarc's
/// run-time loader tries (CUDA 13).
#[cfg(not(windows))]
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so", "libcuda.so.1"];
#[cfg(not(windows))]
const CUBLAS_LIBRARIES: &[&str] = &["libcublas.so", "libcublas.so.13"];
#[cfg(windows)]
const DRIVER_LIBRARIES: &[&str] = &["nvcuda.dll"];
#[cfg(windows)]
const CUBLAS_LIBRARIES: &[&str] = &["cublas64_13.dll"];

/// Whether one of `names` can be loaded. Asked with libloading rather than cudarc's
/// `is_culib_present`, which exists only where cudarc loads the libraries at run time: where it
/// links them (feature `candle-cuda`) the process could not have started without them, and
/// the probe finds the copy already mapped.
fn library_present(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: loading a CUDA library runs only its initialisers, as cudarc's own loader
        // does; the handle is dropped at once (the library stays mapped while cudarc or the
        // dynamic loader holds it).
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// Whether the CUDA driver library can be loaded (never panics).
pub fn driver_present() -> bool {
    library_present(DRIVER_LIBRARIES)
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

/// The files of the CUDA libraries (libcuda, libcublas, libcublasLt, libnvrtc) mapped into
/// this process, read from `/proc/self/maps`: which copies the loader actually picked. Empty
/// before the first use of each library, and on systems without `/proc`.
pub fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|path| {
            let file = path.rsplit('/').next().unwrap_or("");
            [
                "libcuda.so",
                "libcublas.so",
                "libcublasLt.so",
                "libnvrtc.so",
            ]
            .iter()
            .any(|lib| file.starts_with(lib))
        })
        .map(String::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Kernel {
        kernel: what.to_string(),
        msg: format!("CUDA error: {e:?}"),
    }
}

/// A cuBLAS handle bound to the backend's stream.
struct BlasHandle(blas::cublasHandle_t);
// SAFETY: the handle is used under the backend's mutex only.
unsafe impl Send for BlasHandle {}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate and destroyed once.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.0);
        }
    }
}

/// The `cuda` device.
pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: Mutex<Option<BlasHandle>>,
    mem: Arc<MemCounter>,
    attn: Mutex<AttnCache>,
}

/// Attention launch state reused from call to call on the backend's one stream, so that a
/// call does no host-to-device copy and no allocation when nothing changed: the metadata last
/// uploaded (every layer of a training step passes the same `[prefix_index; seqlen_q;
/// seqlen_k]`) and a grow-only backward scratch. Reuse is safe because every use is ordered on
/// the stream; a replaced buffer is freed in stream order.
#[derive(Default)]
struct AttnCache {
    meta: Option<(Vec<i32>, CudaSlice<i32>)>,
    scratch: Option<CudaMem>,
    /// The metadata clamp's output `[3B]` int32 (grow-only), for calls with device metadata.
    clamped: Option<CudaMem>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

/// Device memory of a [`CudaBackend`] (a tensor's storage or scratch), counted while alive.
struct CudaMem {
    buf: CudaSlice<u8>,
    addr: u64,
    stream: Arc<CudaStream>,
    ordinal: usize,
    mem: Arc<MemCounter>,
}

impl CudaMem {
    fn new(
        buf: CudaSlice<u8>,
        stream: &Arc<CudaStream>,
        ordinal: usize,
        mem: &Arc<MemCounter>,
    ) -> CudaMem {
        let addr = {
            let (p, _sync) = buf.device_ptr(stream);
            p
        };
        mem.add(buf.len());
        CudaMem {
            buf,
            addr,
            stream: stream.clone(),
            ordinal,
            mem: mem.clone(),
        }
    }
}

impl Drop for CudaMem {
    fn drop(&mut self) {
        self.mem.sub(self.buf.len());
    }
}

impl DeviceMemory for CudaMem {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.buf.len()
    }
    fn location(&self) -> Location {
        Location::Cuda(self.ordinal)
    }
    fn read(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.buf.len() {
            return Err(Error::shape(
                "device read",
                format!("{} bytes", self.buf.len()),
                &[out.len()],
            ));
        }
        self.stream
            .memcpy_dtoh(&self.buf, out)
            .map_err(cuda_err("device-to-host copy"))?;
        self.stream
            .synchronize()
            .map_err(cuda_err("device-to-host copy"))
    }
    fn duplicate(&self) -> Result<Box<dyn DeviceMemory>> {
        let buf = self
            .stream
            .clone_dtod(&self.buf)
            .map_err(cuda_err("device copy"))?;
        Ok(Box::new(CudaMem::new(
            buf,
            &self.stream,
            self.ordinal,
            &self.mem,
        )))
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
        // One stream orders every launch, copy and free of this backend's own buffers:
        // per-buffer events are not needed.
        // SAFETY: this backend's buffers are used on its stream only. A caller's stream
        // (`Stream`) runs only kernels on the caller's memory (a plan's run), or is ordered
        // against this stream by explicit events (`ordered_with`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ordinal,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            mem: Arc::new(MemCounter::default()),
            attn: Mutex::new(AttnCache::default()),
        })
    }

    /// Device address of `meta` (the plan's `[prefix_index; seqlen_q; seqlen_k]`), uploaded
    /// only when it differs from the last call's.
    fn attn_meta(&self, cache: &mut AttnCache, meta: &[i32]) -> Result<u64> {
        if cache.meta.as_ref().is_none_or(|(m, _)| m != meta) {
            cache.meta = Some((meta.to_vec(), self.upload_i32(meta)?));
        }
        let (_, buf) = cache.meta.as_ref().expect("set above");
        let (addr, _sync) = buf.device_ptr(&self.stream);
        Ok(addr)
    }

    /// Device address of at least `bytes` bytes of backward scratch (grown, never shrunk;
    /// 256-byte aligned by the allocator).
    fn attn_scratch(&self, cache: &mut AttnCache, bytes: usize) -> Result<u64> {
        if cache.scratch.as_ref().is_none_or(|m| m.buf.len() < bytes) {
            cache.scratch = None;
            cache.scratch = Some(self.alloc(bytes, "attention backward scratch")?);
        }
        Ok(cache.scratch.as_ref().expect("set above").addr)
    }

    /// The device's name and memory (free, total bytes), for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        match self.ctx.mem_get_info() {
            Ok((free, total)) => format!(
                "cuda:{} {name} ({:.1} GiB free of {:.1} GiB)",
                self.ordinal,
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            ),
            Err(_) => format!("cuda:{} {name}", self.ordinal),
        }
    }

    fn function(&self, name: &'static str) -> Result<CudaFunction> {
        let mut funcs = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        // The registry names the entry's source file; its fatbin carries that file's stem.
        let file = super::registry::kernel(name)?.file;
        let image = fatbin(file)?;
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let image = image.ok_or_else(|| {
                        Error::Unsupported(
                            "the CUDA kernels were not compiled into this build (nvcc was not \
                             found; see scripts/install-nvcc.sh and PREFIX_ATTN_REQUIRE_NVCC)"
                                .into(),
                        )
                    })?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                        .map_err(cuda_err("module load"))?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let func = module.load_function(name).map_err(cuda_err(name))?;
        funcs.insert(name, func.clone());
        Ok(func)
    }

    fn launch<P: DeviceRepr>(&self, l: &KernelLaunch, params: &P) -> Result<()> {
        self.launch_with(&self.stream, l, params)
    }

    /// The caller's stream as a cudarc stream of this backend's context (never destroyed by
    /// it). A stream of another context is an error naming `stream`.
    fn caller_stream(&self, raw: cudarc::driver::sys::CUstream) -> Result<Arc<CudaStream>> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        let mut owner: cudarc::driver::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: a query of the handle, which `Stream::from_raw`'s contract makes a valid
        // stream; `owner` is a writable out-parameter.
        unsafe { cudarc::driver::sys::cuStreamGetCtx(raw, &mut owner) }
            .result()
            .map_err(|e| Error::device("stream", format!("not a usable CUDA stream: {e:?}")))?;
        if owner != self.ctx.cu_ctx() {
            return Err(Error::device(
                "stream",
                format!(
                    "belongs to another CUDA context than cuda:{}'s primary context (the one the CUDA runtime API and this crate use)",
                    self.ordinal
                ),
            ));
        }
        // SAFETY: a valid stream of this context (checked above), kept alive by the caller
        // while the work queued on it runs (`Stream::from_raw`); the wrapper does not own it.
        Ok(unsafe { self.ctx.wrap_borrowed_stream(raw) })
    }

    fn launch_with<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        l: &KernelLaunch,
        params: &P,
    ) -> Result<()> {
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
        // outlive the launch (or, for scratch, are freed in stream order after it); the kernel
        // reads and writes only within them.
        unsafe {
            stream
                .launch_builder(&func)
                .arg(params)
                .launch(cfg)
                .map_err(cuda_err(l.entry))?;
        }
        Ok(())
    }

    /// A device buffer of `bytes` bytes (zeroed), with an out-of-memory error that names the
    /// size asked for.
    fn alloc(&self, bytes: usize, what: &str) -> Result<CudaMem> {
        let buf = self.stream.alloc_zeros::<u8>(bytes.max(16)).map_err(|e| {
            let free = self
                .ctx
                .mem_get_info()
                .map(|(f, _)| format!("{:.1} MiB free", f as f64 / (1u64 << 20) as f64))
                .unwrap_or_default();
            Error::device(
                what,
                format!(
                    "cuda:{}: cannot allocate {:.1} MiB ({free}): {e:?}",
                    self.ordinal,
                    bytes as f64 / (1u64 << 20) as f64
                ),
            )
        })?;
        Ok(CudaMem::new(buf, &self.stream, self.ordinal, &self.mem))
    }

    /// Copies an int32 array to the device (freed in stream order when dropped).
    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self
                .stream
                .alloc_zeros::<i32>(1)
                .map_err(cuda_err("index upload"));
        }
        self.stream.clone_htod(v).map_err(cuda_err("index upload"))
    }

    fn blas(&self) -> Result<std::sync::MutexGuard<'_, Option<BlasHandle>>> {
        let mut g = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            if !library_present(CUBLAS_LIBRARIES) {
                return Err(Error::device(
                    "cublas",
                    "libcublas was not found (install the CUDA toolkit's cuBLAS or put it on \
                     LD_LIBRARY_PATH)",
                ));
            }
            // cuBLAS works on the calling thread's current context.
            self.ctx
                .bind_to_thread()
                .map_err(cuda_err("bind context"))?;
            let h = cudarc::cublas::result::create_handle()
                .map_err(|e| Error::device("cublas", format!("cublasCreate: {e:?}")))?;
            let handle = BlasHandle(h);
            // SAFETY: valid handle and stream of this context.
            unsafe {
                cudarc::cublas::result::set_stream(
                    handle.0,
                    self.stream.cu_stream() as blas::cudaStream_t,
                )
            }
            .map_err(|e| Error::device("cublas", format!("cublasSetStream: {e:?}")))?;
            *g = Some(handle);
        }
        Ok(g)
    }

    /// Copies `src` into `dst` with the driver's device-to-device copy (both contiguous on
    /// this GPU, of the same shape and dtype): the copy engine's path, which bounds every
    /// copy kernel (the `bench attn` copy ceiling).
    pub fn memcpy(&self, src: &TensorView, dst: &mut TensorViewMut) -> Result<()> {
        let loc = Location::Cuda(self.ordinal);
        if src.dims() != dst.dims() || src.dtype() != dst.dtype() {
            return Err(Error::shape(
                "memcpy dst",
                format!("{:?} {} like src", src.dims(), src.dtype()),
                dst.dims(),
            ));
        }
        let d = dst.as_view();
        for (arg, t) in [("memcpy src", src), ("memcpy dst", &d)] {
            if t.location() != loc || !t.layout().is_contiguous() {
                return Err(Error::layout(
                    arg,
                    format!(
                        "needs a contiguous view on {loc}, got {:?} on {}",
                        t.layout(),
                        t.location()
                    ),
                ));
            }
        }
        let size = src.dtype().size();
        let addr = |t: &TensorView| t.base_addr() + (t.layout().offset() * size) as u64;
        let bytes = src.numel() * size;
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        // SAFETY: both ranges are `bytes` long inside live allocations of this context
        // (contiguous views of this device, checked above), borrowed for the call; the copy
        // is queued on this backend's stream, after the work queued before it.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                addr(&d),
                addr(src),
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(cuda_err("device copy"))
    }
}

fn blas_type(dt: DType, arg: &str) -> Result<blas::cudaDataType> {
    match dt {
        DType::F16 => Ok(blas::cudaDataType::CUDA_R_16F),
        DType::BF16 => Ok(blas::cudaDataType::CUDA_R_16BF),
        DType::F32 => Ok(blas::cudaDataType::CUDA_R_32F),
        DType::I32 => Err(Error::DType {
            arg: arg.into(),
            expected: "f16, bf16 or f32".into(),
            got: "i32".into(),
        }),
    }
}

/// Address of element 0 of a 2-D view with unit column stride, and its row stride.
fn matrix(arg: &str, t: &TensorView, loc: Location) -> Result<(u64, usize, usize, usize)> {
    if t.location() != loc {
        return Err(Error::device(
            arg,
            format!("is on {}, this device computes on {loc}", t.location()),
        ));
    }
    let (r, c) = match t.dims() {
        [r, c] => (*r, *c),
        d => return Err(Error::shape(arg, "rank 2 [rows, cols]", d)),
    };
    let (rs, cs) = (t.strides()[0], t.strides()[1]);
    if cs != 1 && c > 1 {
        return Err(Error::layout(
            arg,
            format!("matmul needs unit column stride, got {:?}", t.layout()),
        ));
    }
    let ld = if r <= 1 { c.max(1) } else { rs.max(c).max(1) };
    Ok((
        t.base_addr() + (t.layout().offset() * t.dtype().size()) as u64,
        r,
        c,
        ld,
    ))
}

impl KernelRunner for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let bytes = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::shape("tensor", "a size that fits in memory", shape))?;
        let buf = self.alloc(bytes, &format!("tensor {shape:?} {dtype}"))?;
        Tensor::from_device(Box::new(buf), shape, dtype)
    }
    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        let bytes = match host.location() {
            Location::Host => host.host_bytes()?.to_vec(),
            _ => host.to_bytes()?,
        };
        let mut buf = self.alloc(bytes.len(), &format!("upload of {:?}", host.dims()))?;
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(&bytes, &mut buf.buf)
                .map_err(cuda_err("host-to-device copy"))?;
        }
        Tensor::from_device(Box::new(buf), host.dims(), host.dtype())
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(t.dims(), t.dtype())?;
        let bytes = t.to_bytes()?;
        out.host_bytes_mut()?.copy_from_slice(&bytes);
        Ok(out)
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }
    fn memory(&self) -> Option<(usize, usize)> {
        Some((
            self.mem.now.load(Ordering::Relaxed),
            self.mem.peak.load(Ordering::Relaxed),
        ))
    }
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(cuda_err("event"))?;
        f()?;
        let end = self.stream.record_event(flags).map_err(cuda_err("event"))?;
        Ok(start.elapsed_ms(&end).map_err(cuda_err("event timing"))? as f64)
    }
    fn reset_peak_memory(&self) {
        self.mem
            .peak
            .store(self.mem.now.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    fn grid_cap(&self) -> GridCap {
        GridCap(8192)
    }

    /// Loads each entry's module and function (and so, once, the module's image).
    fn prepare(&self, entries: &[&'static str]) -> Result<()> {
        for e in entries {
            self.function(e)?;
        }
        Ok(())
    }

    /// On the caller's stream directly (checked to belong to this context); nothing is
    /// allocated, copied or waited for.
    unsafe fn launch_on<P: Copy + DeviceRepr>(
        &self,
        l: &KernelLaunch,
        params: &P,
        stream: Stream,
    ) -> Result<()> {
        match stream.raw() {
            None => self.launch(l, params),
            Some(raw) => self.launch_with(&*self.caller_stream(raw)?, l, params),
        }
    }

    /// Event ordering: an event recorded on the caller's stream that this backend's stream
    /// waits for before `f`'s work, and one recorded on this backend's stream after it that
    /// the caller's stream waits for. The host never waits. The second pair is queued even
    /// when `f` fails, so that whatever `f` queued stays ordered before the caller's later
    /// work.
    fn ordered_with<T>(&self, stream: Stream, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(raw) = stream.raw() else {
            return f();
        };
        let caller = self.caller_stream(raw)?;
        let before = caller.record_event(None).map_err(|e| {
            Error::device(
                "stream",
                format!("recording an event on the caller's stream: {e:?}"),
            )
        })?;
        self.stream
            .wait(&before)
            .map_err(cuda_err("waiting for the caller's stream"))?;
        let result = f();
        let after = self
            .stream
            .record_event(None)
            .map_err(cuda_err("recording the end of the call"))?;
        caller.wait(&after).map_err(|e| {
            Error::device(
                "stream",
                format!("making the caller's stream wait for this call: {e:?}"),
            )
        })?;
        result
    }

    /// The metadata is uploaded only when it differs from the last call's and the scratch
    /// grows but is reused (see `AttnCache`); the launches are queued without waiting.
    fn run_decode(&self, mut plan: DecodeLaunch) -> Result<()> {
        let mut cache = self.attn.lock().unwrap_or_else(|p| p.into_inner());
        let meta = if plan.meta_dev.iter().all(Option::is_some) {
            0
        } else {
            self.attn_meta(&mut cache, &plan.meta)?
        };
        // Partial outputs, then the partial LSEs at the next 256-byte boundary.
        let o_bytes = (4 * plan.part_o_len).next_multiple_of(256);
        let scratch = if plan.part_o_len > 0 {
            self.attn_scratch(&mut cache, o_bytes + 4 * plan.part_lse_len)?
        } else {
            0
        };
        plan.place(meta, scratch, scratch + o_bytes as u64);
        for l in &plan.launches {
            self.launch(l, &plan.params)?;
        }
        Ok(())
    }

    fn run_attn<P: AttnParams>(
        &self,
        meta: &[i32],
        meta_dev: [Option<u64>; 3],
        scratch_bytes: usize,
        scratch_split: usize,
        mut params: P,
        launches: &[KernelLaunch],
    ) -> Result<()> {
        let mut cache = self.attn.lock().unwrap_or_else(|p| p.into_inner());
        // All three arrays on the device: no host-to-device copy at all.
        let m = if meta_dev.iter().all(Option::is_some) {
            0
        } else {
            self.attn_meta(&mut cache, meta)?
        };
        let batch = meta.len() / 3;
        let mut addrs = meta_addrs(m, batch, meta_dev);
        if meta_dev.iter().any(Option::is_some) {
            // Device metadata: the kernels read the clamp's copy, never the caller's values.
            let bytes = 12 * batch.max(1);
            if cache.clamped.as_ref().is_none_or(|c| c.buf.len() < bytes) {
                cache.clamped = None;
                cache.clamped = Some(self.alloc(bytes, "clamped attention metadata")?);
            }
            let dst = cache.clamped.as_ref().expect("set above").addr;
            let (cp, l) = plan_meta_clamp(params.fwd(), addrs, dst)?;
            if batch > 0 {
                self.launch(&l, &cp)?;
            }
            addrs = meta_addrs(dst, batch, [None; 3]);
        }
        let scratch = if scratch_bytes > 0 {
            self.attn_scratch(&mut cache, scratch_bytes)?
        } else {
            0
        };
        params.place(addrs, scratch, scratch_split);
        for l in launches {
            self.launch(l, &params)?;
        }
        Ok(())
    }

    /// `cublasGemmEx` with `CUBLAS_COMPUTE_32F` (fp16/bf16 inputs, fp32 accumulation; f32
    /// inputs: plain fp32, no TF32). The bias is first broadcast into `out` by a copy
    /// kernel, then the product is added with `beta = 1`.
    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()> {
        let loc = Location::Cuda(self.ordinal);
        let (aa, ar, ac, lda) = matrix("matmul a", a, loc)?;
        let (ba, br, bc, ldb) = matrix("matmul b", b, loc)?;
        let (oa, or, oc, ldo) = matrix("matmul out", &out.as_view(), loc)?;
        let (m, k) = if opts.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if opts.trans_b { (bc, br) } else { (br, bc) };
        if kb != k || (or, oc) != (m, n) {
            return Err(Error::shape(
                "matmul",
                format!("op(a) [{m}, {k}] · op(b) [{kb}, {n}] into out [{m}, {n}]"),
                &[or, oc],
            ));
        }
        if a.dtype() != b.dtype() || (out.dtype() != a.dtype() && out.dtype() != DType::F32) {
            return Err(Error::DType {
                arg: "matmul".into(),
                expected: format!(
                    "a and b of one type and out of that type or f32 (got a {}, b {})",
                    a.dtype(),
                    b.dtype()
                ),
                got: out.dtype().name().into(),
            });
        }
        let mut beta = if opts.accumulate { 1.0f32 } else { 0.0 };
        if let Some(bias) = bias {
            if bias.dims() != [n] {
                return Err(Error::shape("matmul bias", format!("[{n}]"), bias.dims()));
            }
            let rows = bias.as_strided(&[m, n], &[0, 1], bias.layout().offset())?;
            let l = dense::copy(&rows, out, opts.accumulate, loc, self.grid_cap())?;
            self.run_dense(l)?;
            beta = 1.0;
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let int = |x: usize, what: &str| -> Result<i32> {
            i32::try_from(x).map_err(|_| Error::shape("matmul", format!("{what} < 2^31"), &[x]))
        };
        let alpha = opts.alpha;
        if k == 0 {
            // cuBLAS leaves C untouched for k = 0: scale by beta ourselves.
            let l = dense::axpby(out, 0.0, None, beta, loc, self.grid_cap())?;
            return self.run_dense(l);
        }
        // Row-major out = op(a) op(b) is column-major outᵀ = op(b)ᵀ op(a)ᵀ: cuBLAS's A is our
        // b and its B our a, each transposed exactly when ours is.
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let guard = self.blas()?;
        // This call may come from another thread than the handle's creation.
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        let handle = guard
            .as_ref()
            .ok_or_else(|| Error::device("cublas", "no handle"))?
            .0;
        // SAFETY: addresses and leading dimensions come from checked views of this device
        // that outlive the call; alpha/beta are host scalars (host pointer mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                handle,
                op(opts.trans_b),
                op(opts.trans_a),
                int(n, "n")?,
                int(m, "m")?,
                int(k, "k")?,
                &alpha as *const f32 as *const _,
                ba as usize as *const _,
                blas_type(b.dtype(), "matmul b")?,
                int(ldb, "ldb")?,
                aa as usize as *const _,
                blas_type(a.dtype(), "matmul a")?,
                int(lda, "lda")?,
                &beta as *const f32 as *const _,
                oa as usize as *mut _,
                blas_type(out.dtype(), "matmul out")?,
                int(ldo, "ldo")?,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Kernel {
            kernel: "cublasGemmEx".into(),
            msg: format!("{e:?} (m {m}, n {n}, k {k})"),
        })
    }

    fn run_dense(&self, mut l: DenseLaunch) -> Result<()> {
        let idx = match &l.idx {
            Some(v) => Some(self.upload_i32(v)?),
            None => None,
        };
        if let Some(i) = &idx {
            let (p, _sync) = i.device_ptr(&self.stream);
            l.params.idx = p;
        }
        let launch = KernelLaunch {
            entry: l.entry,
            grid: (l.blocks, 1, 1),
            threads: l.threads,
            smem_bytes: 0,
        };
        self.launch(&launch, &l.params)?;
        // The index buffer is freed in stream order, after the kernel.
        drop(idx);
        Ok(())
    }
}
