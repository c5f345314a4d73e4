//! The `emu` device: the CUDA kernels compiled for the host and run by the CPU emulator
//! (`kernels/emu/`), a test instrument that makes the kernels testable without a GPU. It runs
//! the very same launches as the `cuda` device (same parameter structs and geometry, from
//! [`super::kernels`]). Tensors live in host memory. Operations that have no CUDA kernel yet
//! return [`Error::Unsupported`] rather than falling back to another implementation.

use super::cpu::CpuBackend;
use super::dense::{DenseLaunch, GridCap};
use super::kernel_device::{meta_addrs, AttnParams, KernelRunner, Stream};
use super::kernels::{plan_meta_clamp, DecodeLaunch, KernelLaunch};
use super::{Backend, Device, MatmulOpts};
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

thread_local! {
    /// Buffers the emulator has allocated as device memory on this thread, and their bytes.
    static DEVICE_ALLOCS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Counts one buffer of `bytes` that stands for device memory.
fn count_alloc(bytes: usize) {
    DEVICE_ALLOCS.with(|c| {
        let (n, b) = c.get();
        c.set((n + 1, b + bytes as u64));
    });
}

/// The buffers the `emu` device has allocated as device memory on the calling thread so far
/// (tensors from `zeros` and `upload`, attention and decode scratch, metadata copies): their
/// number and their bytes. The emulator runs on the calling thread, so the difference across
/// a call counts exactly that call's allocations; a plan's run makes none.
pub fn device_allocations() -> (u64, u64) {
    DEVICE_ALLOCS.with(Cell::get)
}

/// The `emu` device has no streams: a caller's stream is an error naming it.
fn no_stream(stream: Stream) -> Result<()> {
    match stream.raw() {
        None => Ok(()),
        Some(_) => Err(Error::Unsupported(
            "stream: the emu device has no CUDA streams; pass none (a null stream)".into(),
        )),
    }
}

extern "C" {
    fn pa_emu_launch(
        name: *const c_char,
        params: *const c_void,
        params_size: usize,
        gx: u32,
        gy: u32,
        gz: u32,
        threads: u32,
        smem: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn pa_fwd_params_layout(out: *mut usize, n: usize) -> usize;
    fn pa_meta_clamp_params_layout(out: *mut usize, n: usize) -> usize;
    fn pa_decode_params_layout(out: *mut usize, n: usize) -> usize;
    fn pa_emu_selftest(name: *const c_char, err: *mut c_char, err_len: usize) -> c_int;
    fn pa_emu_selftest_names() -> *const c_char;
    fn pa_emu_planted_oob(write_out_of_bounds: c_int) -> c_int;
    fn pa_emu_planted_race(race: c_int, lines: *mut u32, err: *mut c_char, err_len: usize)
        -> c_int;
    fn pa_emu_set_schedule_reverse(reverse: c_int);
    fn pa_emu_set_drop_sync(site: *const c_char);
    fn pa_emu_dropped_syncs() -> u64;
    fn pa_emu_racecheck_enabled() -> c_int;
    fn pa_bwd_params_layout(out: *mut usize, n: usize) -> usize;
    fn pa_dense_params_layout(out: *mut usize, n: usize) -> usize;
}

/// Size and field offsets of the kernels' `DenseParams` as the C++ compiler lays it out
/// (compare with [`super::dense::params_rust_layout`]).
pub fn dense_params_layout() -> Vec<usize> {
    read_layout(pa_dense_params_layout)
}

/// Runs one planned dense kernel on the emulator (host tensors).
pub fn run_dense(mut l: DenseLaunch) -> Result<()> {
    if let Some(idx) = &l.idx {
        l.params.idx = idx.as_ptr() as u64;
    }
    // SAFETY: the planner derived every address from checked host views that the caller
    // borrows for the duration of the call; `idx` lives in `l`.
    unsafe { launch(l.entry, &l.params, (l.blocks, 1, 1), l.threads, 0) }
}

/// Launches the registered kernel `entry` on the emulator with `params` (its parameter struct)
/// and the plan's geometry. The registry checks the struct size and the block size against
/// the kernel's own.
///
/// # Safety
/// Every address in `params` must point to host memory that the kernel may read and write
/// within the shapes and strides its planner validated, alive for the call.
unsafe fn launch<P>(
    entry: &str,
    params: &P,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
) -> Result<()> {
    let name = CString::new(entry).map_err(|_| Error::index("kernel", "name with a NUL byte"))?;
    run_emu(entry, |err, len| {
        // SAFETY: as the caller promised; `params` is a live struct of size_of::<P>() bytes.
        unsafe {
            pa_emu_launch(
                name.as_ptr(),
                (params as *const P).cast(),
                std::mem::size_of::<P>(),
                grid.0,
                grid.1,
                grid.2,
                threads,
                smem,
                err,
                len,
            )
        }
    })
}

/// Size and field offsets of the kernels' `PrefixAttnBwdParams` as the C++ compiler lays it
/// out (compare with [`super::kernels::bwd_params_rust_layout`]).
pub fn bwd_params_layout() -> Vec<usize> {
    read_layout(pa_bwd_params_layout)
}

/// Calls a C `*_params_layout(out, n)` reporter (which writes at most `n` values and returns
/// how many it has).
fn read_layout(report: unsafe extern "C" fn(*mut usize, usize) -> usize) -> Vec<usize> {
    let mut v = vec![0usize; 64];
    // SAFETY: the C side writes at most `n` values.
    let n = unsafe { report(v.as_mut_ptr(), v.len()) };
    v.truncate(n.min(64));
    v
}

/// The backward kernels on the emulator (the `emu` device's [`Backend::attn_bwd`]).
pub fn attn_bwd(args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
    EmuBackend.attn_bwd(args, grads)
}

/// Chooses the emulator's fiber schedule for launches from the calling thread: round robin in
/// thread order (default) or in reverse order. A correct kernel gives the same result under
/// both; a missing barrier or a race usually does not.
pub fn set_schedule_reverse(reverse: bool) {
    // SAFETY: sets a thread-local flag.
    unsafe { pa_emu_set_schedule_reverse(reverse as c_int) }
}

/// A test instrument for proving every synchronisation necessary: launches from the calling
/// thread skip each `__syncthreads()`, `__syncwarp()` and `cp_async_wait<N>()` written at
/// `site` (`"file:line"`, the file's base name, e.g. `"prefix_attn_fwd.cu:223"`), as if that line
/// had been deleted from the kernel; `None` restores normal operation. Resets
/// [`dropped_syncs`]. (`PREFIX_ATTN_EMU_DROP_SYNC=file:line` does the same for threads that
/// never call this.)
pub fn set_drop_sync(site: Option<&str>) -> Result<()> {
    let c = CString::new(site.unwrap_or(""))
        .map_err(|_| Error::index("drop site", "a name with a NUL byte"))?;
    // SAFETY: valid C string; sets thread-local state.
    unsafe { pa_emu_set_drop_sync(c.as_ptr()) };
    Ok(())
}

/// How many synchronisation calls [`set_drop_sync`] has skipped in the calling thread's
/// launches since it was last called (per CUDA thread, not per block).
pub fn dropped_syncs() -> u64 {
    // SAFETY: reads thread-local state.
    unsafe { pa_emu_dropped_syncs() }
}

/// Whether the emulator was built with racecheck (feature `emu-racecheck`).
pub fn racecheck_enabled() -> bool {
    // SAFETY: no arguments.
    unsafe { pa_emu_racecheck_enabled() != 0 }
}

/// Runs the planted-race kernel: two warps exchange values through a `__shared__` array, with
/// (`race == false`) or without the barrier between the write and the read. Returns the
/// launch's result and the source lines (in `kernels/emu/selftest.cpp`) of the write and the
/// read, which a racecheck report must name.
pub fn planted_race(race: bool) -> (Result<()>, [u32; 2]) {
    let mut lines = [0u32; 2];
    let r = run_emu("planted_race", |err, len| {
        // SAFETY: `lines` has room for the two values; valid error buffer.
        unsafe { pa_emu_planted_race(race as c_int, lines.as_mut_ptr(), err, len) }
    });
    (r, lines)
}

/// The emulator runs one launch at a time: kernels' `__shared__` arrays are static storage.
static EMU_LOCK: Mutex<()> = Mutex::new(());

fn run_emu(kernel: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let _guard = EMU_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Room for a racecheck report (up to eight distinct hazards with their source lines).
    let mut err = vec![0u8; 16384];
    let rc = f(err.as_mut_ptr() as *mut c_char, err.len());
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown emulator error".into());
    Err(Error::Kernel {
        kernel: kernel.into(),
        msg,
    })
}

/// Size and field offsets of the paged-decode kernels' `PrefixAttnDecodeParams` as the C++
/// compiler lays it out (compare with [`super::kernels::decode_params_rust_layout`]).
pub fn decode_params_layout() -> Vec<usize> {
    read_layout(pa_decode_params_layout)
}

/// Size and field offsets of the metadata clamp's `AttnMetaClampParams` as the C++ compiler
/// lays it out (compare with [`super::kernels::meta_clamp_params_rust_layout`]).
pub fn meta_clamp_params_layout() -> Vec<usize> {
    read_layout(pa_meta_clamp_params_layout)
}

/// Size and field offsets of the kernels' `PrefixAttnFwdParams` as the C++ compiler lays it
/// out (compare with [`super::kernels::fwd_params_rust_layout`]).
pub fn fwd_params_layout() -> Vec<usize> {
    read_layout(pa_fwd_params_layout)
}

/// Names of the emulator's self-tests (one per emulated primitive and behaviour).
pub fn selftest_names() -> Vec<String> {
    // SAFETY: returns a static NUL-terminated string.
    let s = unsafe { CStr::from_ptr(pa_emu_selftest_names()) };
    s.to_string_lossy()
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Runs one emulator self-test.
pub fn selftest(name: &str) -> Result<()> {
    let c = CString::new(name).map_err(|_| Error::index("selftest", "name with a NUL byte"))?;
    // SAFETY: valid C string and error buffer.
    run_emu(name, |err, len| unsafe {
        pa_emu_selftest(c.as_ptr(), err, len)
    })
}

/// Runs the planted out-of-bounds kernel (it writes one element past a shared array when
/// `write_out_of_bounds`); the sanitizer mode must catch it.
pub fn planted_oob(write_out_of_bounds: bool) -> Result<()> {
    run_emu("planted_oob", |_, _| {
        // SAFETY: no pointers cross the boundary.
        unsafe { pa_emu_planted_oob(write_out_of_bounds as c_int) }
    })
}

/// The forward kernel on the emulator (the `emu` device's [`Backend::attn_fwd`]).
pub fn attn_fwd(args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
    EmuBackend.attn_fwd(args, out)
}

/// The `emu` device.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuBackend;

impl KernelRunner for EmuBackend {
    fn device(&self) -> Device {
        Device::Emu
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = Tensor::zeros(shape, dtype)?;
        count_alloc(t.numel() * dtype.size());
        Ok(t)
    }
    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        count_alloc(host.numel() * host.dtype().size());
        Ok(host.clone())
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    fn reset_peak_memory(&self) {}
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let t0 = std::time::Instant::now();
        f()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }
    fn grid_cap(&self) -> GridCap {
        // Few blocks: fewer fibers, and every grid-stride loop runs several iterations.
        GridCap(16)
    }
    fn run_dense(&self, l: DenseLaunch) -> Result<()> {
        run_dense(l)
    }

    /// Checks that the registry has every entry (the emulator loads nothing).
    fn prepare(&self, entries: &[&'static str]) -> Result<()> {
        for e in entries {
            super::registry::kernel(e)?;
        }
        Ok(())
    }

    unsafe fn launch_on<P: Copy + cudarc::driver::DeviceRepr>(
        &self,
        l: &KernelLaunch,
        params: &P,
        stream: Stream,
    ) -> Result<()> {
        no_stream(stream)?;
        // SAFETY: the caller's promise (host memory on this device).
        unsafe { launch(l.entry, params, l.grid, l.threads, l.smem_bytes) }
    }

    fn ordered_with<T>(&self, stream: Stream, f: impl FnOnce() -> Result<T>) -> Result<T> {
        no_stream(stream)?;
        f()
    }

    /// The split partials are fresh and NaN-poisoned at every call.
    fn run_decode(&self, mut plan: DecodeLaunch) -> Result<()> {
        let meta = std::mem::take(&mut plan.meta);
        let part_o = vec![f32::NAN; plan.part_o_len.max(2)];
        let part_lse = vec![f32::NAN; plan.part_lse_len.max(1)];
        count_alloc(4 * (part_o.len() + part_lse.len()));
        plan.place(
            meta.as_ptr() as u64,
            part_o.as_ptr() as u64,
            part_lse.as_ptr() as u64,
        );
        for l in &plan.launches {
            // SAFETY: every address in the parameters was derived from checked views that
            // the caller borrows for the call (the device metadata among them) or points into
            // `meta` and the partials, alive until the end of this function; the kernels
            // clamp every metadata value before using it as an index.
            unsafe { launch(l.entry, &plan.params, l.grid, l.threads, l.smem_bytes)? };
        }
        Ok(())
    }

    /// The metadata is passed from the caller's slice; the scratch is fresh and poisoned
    /// (all bits set: NaN as f32) at every call, so a kernel that read scratch it had not
    /// written would give NaN rather than a stale value.
    fn run_attn<P: AttnParams>(
        &self,
        meta: &[i32],
        meta_dev: [Option<u64>; 3],
        scratch_bytes: usize,
        scratch_split: usize,
        mut params: P,
        launches: &[KernelLaunch],
    ) -> Result<()> {
        // u64 storage: the prefix kernel writes its f32 partials in 8-byte pairs.
        let scratch = vec![u64::MAX; scratch_bytes.div_ceil(8).max(1)];
        let batch = meta.len() / 3;
        let mut addrs = meta_addrs(meta.as_ptr() as u64, batch, meta_dev);
        // Device metadata: the kernels read the clamp's copy, never the caller's values.
        let clamped = vec![0i32; 3 * batch.max(1)];
        count_alloc(8 * scratch.len() + 4 * clamped.len());
        if meta_dev.iter().any(Option::is_some) {
            let (cp, l) = plan_meta_clamp(params.fwd(), addrs, clamped.as_ptr() as u64)?;
            if batch > 0 {
                // SAFETY: `addrs` point to 3 arrays of `batch` int32 values (the checked
                // device tensors, alive for the call, or `meta`), `clamped` holds 3B values.
                unsafe { launch(l.entry, &cp, l.grid, l.threads, l.smem_bytes)? };
            }
            addrs = meta_addrs(clamped.as_ptr() as u64, batch, [None; 3]);
        }
        params.place(addrs, scratch.as_ptr() as u64, scratch_split);
        for l in launches {
            // SAFETY: every address in `params` was derived from checked views that the
            // caller borrows for the duration of the call (the device metadata among them),
            // or points into `meta` and `scratch`, which live until the end of this function; the kernels read and
            // write only within the shapes and strides the plan validated.
            unsafe { launch(l.entry, &params, l.grid, l.threads, l.smem_bytes)? };
        }
        Ok(())
    }

    /// fp16/bf16 inputs are widened exactly to f32, multiplied by `gemm` with f32
    /// accumulation and rounded once to the output type (with the bias and, when
    /// accumulating, the old output added before the rounding), as cuBLAS does with
    /// `CUBLAS_COMPUTE_32F`.
    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()> {
        let widen = |arg: &str, t: &TensorView| -> Result<Tensor> {
            if t.location() != Location::Host {
                return Err(Error::device(
                    arg,
                    format!(
                        "is on {}, the emu device computes on the host",
                        t.location()
                    ),
                ));
            }
            let mut buf = vec![0f32; t.numel()];
            t.gather_f32(&mut buf)?;
            Tensor::from_f32(t.dims(), &buf, DType::F32)
        };
        let (a32, b32) = (widen("matmul a", a)?, widen("matmul b", b)?);
        let bias32 = bias.map(|t| widen("matmul bias", t)).transpose()?;
        let mut o32 = if opts.accumulate {
            widen("matmul out", &out.as_view())?
        } else {
            Tensor::zeros(out.dims(), DType::F32)?
        };
        CpuBackend.matmul(
            &a32.view(),
            &b32.view(),
            bias32.as_ref().map(|t| t.view()).as_ref(),
            &mut o32.view_mut(),
            opts,
        )?;
        out.scatter_f32(o32.as_slice::<f32>()?)
    }
}
