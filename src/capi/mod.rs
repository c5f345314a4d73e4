//! The C ABI (`include/prefix_attn.h`): a context per device, the attention forward and
//! backward on caller-owned memory described by pointer + shape + strides + dtype, on the
//! crate's stream or the caller's, a workspace-size query, and plan/run: a plan made once for
//! a shape whose run allocates nothing, copies nothing from the host and never synchronises
//! (CUDA-graph capturable), with the metadata and the workspace in the caller's device memory.
//!
//! Every entry point returns a [`pa_status`]; on failure the calling thread's last-error
//! message ([`pa_last_error`]) names the argument, as the Rust errors do. Arguments are
//! validated before any memory is read, and no panic crosses the boundary: each entry point
//! runs under `catch_unwind`, and a panic becomes `PA_ERR_PANIC`.
//!
//! Memory: host pointers for the `cpu` context (`emu` too), device pointers for `cuda`.
//! Strides are in elements and must be non-negative; the last dimension must be contiguous;
//! every pointer must be aligned to its element size. Outputs must not overlap inputs.
//! Streams: a `CUstream` of the device's primary context (the CUDA runtime's), or NULL for
//! the crate's stream; the cpu and emu contexts take NULL only.

#![allow(non_camel_case_types)]
// The entry points are called from C, where `unsafe` means nothing: their pointer contract is
// the header's (valid or null, checked for null before any dereference), so they are plain
// `extern "C"` functions rather than `unsafe fn`s that Rust callers would have to wrap.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use crate::attn::paged::PagedAttnArgs;
use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, Meta, PrefixKv};
use crate::device::cpu::CpuBackend;
use crate::device::cuda::CudaBackend;
use crate::device::decode_plan::DecodePlan;
use crate::device::emu::EmuBackend;
use crate::device::kernel_device::{AttnOnStream, AttnPlan, Stream, Workspace};
use crate::device::{Backend, Device};
use crate::error::Error;
use crate::tensor::{DType, Layout, Location, TensorView, TensorViewMut, MAX_RANK};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Status code of every entry point (`PA_OK` = 0).
pub type pa_status = i32;
/// Success.
pub const PA_OK: pa_status = 0;
/// A required pointer argument is null.
pub const PA_ERR_NULL: pa_status = 1;
/// A shape is wrong (or negative).
pub const PA_ERR_SHAPE: pa_status = 2;
/// A dtype is wrong or unknown.
pub const PA_ERR_DTYPE: pa_status = 3;
/// Strides, alignment or extent are unusable.
pub const PA_ERR_LAYOUT: pa_status = 4;
/// An index, length or scalar is out of range.
pub const PA_ERR_INDEX: pa_status = 5;
/// The device is unavailable or arguments live on the wrong device.
pub const PA_ERR_DEVICE: pa_status = 6;
/// The request is not supported by this build or device.
pub const PA_ERR_UNSUPPORTED: pa_status = 7;
/// A kernel or CUDA call failed.
pub const PA_ERR_KERNEL: pa_status = 8;
/// A panic inside the library was caught.
pub const PA_ERR_PANIC: pa_status = 9;
/// Any other failure.
pub const PA_ERR_OTHER: pa_status = 10;

/// Every status and its name as the header spells it (checked against the header by
/// `tests/c_api.rs`).
pub const STATUS_NAMES: [(&str, pa_status); 11] = [
    ("PA_OK", PA_OK),
    ("PA_ERR_NULL", PA_ERR_NULL),
    ("PA_ERR_SHAPE", PA_ERR_SHAPE),
    ("PA_ERR_DTYPE", PA_ERR_DTYPE),
    ("PA_ERR_LAYOUT", PA_ERR_LAYOUT),
    ("PA_ERR_INDEX", PA_ERR_INDEX),
    ("PA_ERR_DEVICE", PA_ERR_DEVICE),
    ("PA_ERR_UNSUPPORTED", PA_ERR_UNSUPPORTED),
    ("PA_ERR_KERNEL", PA_ERR_KERNEL),
    ("PA_ERR_PANIC", PA_ERR_PANIC),
    ("PA_ERR_OTHER", PA_ERR_OTHER),
];

/// Dtype codes of [`pa_tensor::dtype`] and their names as the header spells them.
pub const DTYPE_NAMES: [(&str, i32); 4] =
    [("PA_F32", 0), ("PA_F16", 1), ("PA_BF16", 2), ("PA_I32", 3)];

/// Device kinds of [`pa_context_create`] and their names as the header spells them.
pub const DEVICE_NAMES: [(&str, i32); 3] = [
    ("PA_DEVICE_CPU", 0),
    ("PA_DEVICE_CUDA", 1),
    ("PA_DEVICE_EMU", 2),
];

/// A strided view of caller-owned memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pa_tensor {
    /// Address of element 0 (host pointer, or device pointer on a cuda context).
    pub data: *mut c_void,
    /// Element type code (`PA_F32`, `PA_F16`, `PA_BF16`, `PA_I32`).
    pub dtype: i32,
    /// Number of dimensions, 1..=4.
    pub rank: i32,
    /// Sizes, outermost first (the first `rank` are used).
    pub shape: [i64; 4],
    /// Strides in elements (the first `rank` are used), non-negative.
    pub strides: [i64; 4],
}

/// The inputs of the forward (and the shared part of the backward).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pa_attn_args {
    /// Queries `[B, Tq, Hq, D]`.
    pub q: *const pa_tensor,
    /// Sequence keys `[B, Tk, Hkv, D]`.
    pub k: *const pa_tensor,
    /// Sequence values `[B, Tk, Hkv, D]`.
    pub v: *const pa_tensor,
    /// Prefix keys `[NP, P, Hkv, D]`, or null for no prefix table.
    pub k_pre: *const pa_tensor,
    /// Prefix values `[NP, P, Hkv, D]`, or null.
    pub v_pre: *const pa_tensor,
    /// `[B]` prefix per sequence (`-1`: none), or null (0 for all).
    pub prefix_index: *const i32,
    /// `[B]` valid query rows, or null (`Tq`).
    pub seqlen_q: *const i32,
    /// `[B]` valid sequence keys, or null (`Tk`).
    pub seqlen_k: *const i32,
    /// Batch size of the metadata arrays (must equal q's B when any is given).
    pub batch: i64,
    /// Non-zero: causal masking, bottom-right aligned.
    pub causal: i32,
    /// Score scale; 0 means `1/sqrt(D)`.
    pub scale: f32,
}

/// The inputs of the paged decode ([`pa_attn_decode`]): new queries over `[prefix table ;
/// each sequence's paged cache]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pa_decode_args {
    /// New queries `[B, Tq, Hq, D]`, `Tq ≤ 16`, all valid.
    pub q: *const pa_tensor,
    /// Paged keys `[num_pages, page_size, Hkv, D]` (page size a power of two).
    pub k_cache: *const pa_tensor,
    /// Paged values `[num_pages, page_size, Hkv, D]`.
    pub v_cache: *const pa_tensor,
    /// Prefix keys `[NP, P, Hkv, D]`, or null for no prefix table.
    pub k_pre: *const pa_tensor,
    /// Prefix values `[NP, P, Hkv, D]`, or null.
    pub v_pre: *const pa_tensor,
    /// `[B, max_pages]` page numbers, row-major (host memory).
    pub block_table: *const i32,
    /// Row length of `block_table`.
    pub max_pages: i64,
    /// `[B]` tokens in each sequence's pages, the new ones included (host memory).
    pub seqlen_k: *const i32,
    /// `[B]` prefix per sequence (`-1`: none), or null (0 for all); needs the table.
    pub prefix_index: *const i32,
    /// `[NP]` valid rows of each prefix, or null (`P` for all); needs the table.
    pub prefix_len: *const i32,
    /// Length of the `[B]` arrays (q's B).
    pub batch: i64,
    /// Score scale; 0 means `1/sqrt(D)`.
    pub scale: f32,
}

/// An opaque context for one device.
pub struct pa_context {
    dev: Dev,
    location: Location,
}

/// A context's device.
enum Dev {
    Cpu(CpuBackend),
    Emu(EmuBackend),
    Cuda(Arc<CudaBackend>),
}

/// A plan of the C API with the kernel device it runs on: it holds that device, so it may
/// outlive its context.
pub struct PlanHandle<P> {
    plan: P,
    runner: Runner,
    location: Location,
}

/// An opaque plan: an attention forward or backward planned once for a shape on a kernel
/// device (emu or cuda), run many times by [`pa_attn_plan_run_fwd`] /
/// [`pa_attn_plan_run_bwd`].
pub type pa_attn_plan = PlanHandle<AttnPlan>;

/// An opaque plan: a paged decode planned once for a shape on a kernel device (emu or cuda),
/// run many times by [`pa_decode_plan_run`].
pub type pa_decode_plan = PlanHandle<DecodePlan>;

/// The kernel device of a plan.
enum Runner {
    Emu(EmuBackend),
    Cuda(Arc<CudaBackend>),
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &Error) -> pa_status {
    match e {
        Error::Shape { .. } => PA_ERR_SHAPE,
        Error::DType { .. } => PA_ERR_DTYPE,
        Error::Layout { .. } => PA_ERR_LAYOUT,
        Error::Index { .. } => PA_ERR_INDEX,
        Error::Device { .. } => PA_ERR_DEVICE,
        Error::Unsupported(_) => PA_ERR_UNSUPPORTED,
        Error::Kernel { .. } => PA_ERR_KERNEL,
        _ => PA_ERR_OTHER,
    }
}

/// A failure of the C layer itself: a status and its message.
struct Fail(pa_status, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail(status_of(&e), e.to_string())
    }
}

/// Runs `f` with panics caught; records the message of a failure.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> pa_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            PA_OK
        }
        Ok(Err(Fail(s, msg))) => {
            set_error(&msg);
            s
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".into());
            set_error(&format!("internal panic caught at the C boundary: {what}"));
            PA_ERR_PANIC
        }
    }
}

fn null(arg: &str) -> Fail {
    Fail(PA_ERR_NULL, format!("{arg}: null pointer"))
}

fn dtype_of(arg: &str, code: i32) -> Result<DType, Fail> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        3 => DType::I32,
        c => {
            return Err(Fail(
                PA_ERR_DTYPE,
                format!("{arg}: dtype code {c}, expected 0 (f32), 1 (f16), 2 (bf16) or 3 (i32)"),
            ))
        }
    })
}

/// Checks a `pa_tensor` and returns its address, extent (elements from `data`), dtype and
/// layout. Names the argument in every message.
fn describe(arg: &str, t: *const pa_tensor) -> Result<(u64, usize, DType, Layout), Fail> {
    if t.is_null() {
        return Err(null(arg));
    }
    // SAFETY: non-null; the caller promises it points to a pa_tensor.
    if unsafe { (*t).data.is_null() } {
        return Err(Fail(PA_ERR_NULL, format!("{arg}: data is a null pointer")));
    }
    describe_shape(arg, t)
}

/// As [`describe`] for a shapes-only description (a plan's): `data` may be null, and then
/// reads as address 0.
fn describe_shape(arg: &str, t: *const pa_tensor) -> Result<(u64, usize, DType, Layout), Fail> {
    if t.is_null() {
        return Err(null(arg));
    }
    // SAFETY: non-null; the caller promises it points to a pa_tensor.
    let t = unsafe { *t };
    let dtype = dtype_of(arg, t.dtype)?;
    if t.rank < 1 || t.rank as usize > 4.min(MAX_RANK) {
        return Err(Fail(
            PA_ERR_SHAPE,
            format!("{arg}: rank {}, expected 1..=4", t.rank),
        ));
    }
    let r = t.rank as usize;
    let mut dims = [0usize; 4];
    let mut strides = [0usize; 4];
    for i in 0..r {
        if t.shape[i] < 0 {
            return Err(Fail(
                PA_ERR_SHAPE,
                format!("{arg}: shape[{i}] = {}: expected >= 0", t.shape[i]),
            ));
        }
        if t.strides[i] < 0 {
            return Err(Fail(
                PA_ERR_LAYOUT,
                format!("{arg}: stride[{i}] = {}: expected >= 0", t.strides[i]),
            ));
        }
        dims[i] = t.shape[i] as usize;
        strides[i] = t.strides[i] as usize;
    }
    let addr = t.data as usize as u64;
    if addr % dtype.size() as u64 != 0 {
        return Err(Fail(
            PA_ERR_LAYOUT,
            format!(
                "{arg}: address {addr:#x} is not aligned to {} bytes for {dtype}",
                dtype.size()
            ),
        ));
    }
    let layout = Layout::new(&dims[..r], &strides[..r], 0).map_err(Fail::from)?;
    let cap = if layout.numel() == 0 {
        0
    } else {
        layout.span()
    };
    Ok((addr, cap, dtype, layout))
}

fn view<'a>(arg: &str, t: *const pa_tensor, loc: Location) -> Result<TensorView<'a>, Fail> {
    let (addr, cap, dtype, layout) = describe(arg, t)?;
    // SAFETY: the caller promises `data` addresses the elements its shape and strides reach
    // (the C contract of the header), valid for the call.
    Ok(unsafe { TensorView::from_raw_parts(addr, cap, loc, dtype, layout) }?)
}

/// Where a plan's shapes-only views point: aligned for every check the planners make.
const SHAPE_ONLY_ADDR: u64 = 1 << 12;

/// A view of a shapes-only description, for planning: its address is a placeholder.
fn shape_view<'a>(arg: &str, t: *const pa_tensor, loc: Location) -> Result<TensorView<'a>, Fail> {
    let (_, cap, dtype, layout) = describe_shape(arg, t)?;
    // SAFETY: the view goes only to `AttnPlan::fwd`/`bwd`, which read no element of their
    // arguments (only dims, strides, dtype, location and address alignment), and the plan
    // keeps no view: the placeholder address is never dereferenced.
    Ok(unsafe { TensorView::from_raw_parts(SHAPE_ONLY_ADDR, cap, loc, dtype, layout) }?)
}

fn view_mut<'a>(arg: &str, t: *const pa_tensor, loc: Location) -> Result<TensorViewMut<'a>, Fail> {
    let (addr, cap, dtype, layout) = describe(arg, t)?;
    // SAFETY: as `view`, and the caller gives the library exclusive use of the output.
    Ok(unsafe { TensorViewMut::from_raw_parts(addr, cap, loc, dtype, layout) }?)
}

fn opt_view_mut<'a>(
    arg: &str,
    t: *const pa_tensor,
    loc: Location,
) -> Result<Option<TensorViewMut<'a>>, Fail> {
    if t.is_null() {
        Ok(None)
    } else {
        view_mut(arg, t, loc).map(Some)
    }
}

/// A one-shot call's metadata: `batch` int32 values in host memory on every context (the
/// call uploads them where the device needs them), or none.
fn meta<'a>(arg: &str, p: *const i32, batch: i64) -> Result<Option<&'a [i32]>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    if batch < 0 {
        return Err(Fail(
            PA_ERR_SHAPE,
            format!("batch = {batch}: expected >= 0"),
        ));
    }
    if (p as usize) % 4 != 0 {
        return Err(Fail(
            PA_ERR_LAYOUT,
            format!(
                "{arg}: address {:#x} is not aligned to 4 bytes for i32",
                p as usize
            ),
        ));
    }
    // SAFETY: the caller promises `batch` readable i32 at `p`.
    Ok(Some(unsafe {
        std::slice::from_raw_parts(p, batch as usize)
    }))
}

/// What a `pa_attn_args` is read for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgsUse {
    /// A one-shot call: tensors with data, host metadata.
    Call,
    /// A plan: shapes only (data pointers, metadata and `batch` are not read).
    Plan,
    /// A plan's run: tensors with data; metadata comes as the run's device arrays, so the
    /// struct's metadata pointers must be null.
    Run,
}

/// The Rust arguments of a `pa_attn_args`.
fn fwd_args<'a>(
    a: *const pa_attn_args,
    loc: Location,
    using: ArgsUse,
) -> Result<AttnFwdArgs<'a>, Fail> {
    if a.is_null() {
        return Err(null("args"));
    }
    // SAFETY: non-null; the caller promises it points to a pa_attn_args.
    let a = unsafe { *a };
    let tensor = |arg: &str, t: *const pa_tensor| match using {
        ArgsUse::Plan => shape_view(arg, t, loc),
        _ => view(arg, t, loc),
    };
    let opt_tensor = |arg: &str, t: *const pa_tensor| match t.is_null() {
        true => Ok(None),
        false => tensor(arg, t).map(Some),
    };
    let mut args = AttnFwdArgs::new(tensor("q", a.q)?, tensor("k", a.k)?, tensor("v", a.v)?);
    match (opt_tensor("k_pre", a.k_pre)?, opt_tensor("v_pre", a.v_pre)?) {
        (Some(k), Some(v)) => args.prefix = Some(PrefixKv { k, v }),
        (None, None) => {}
        (Some(_), None) => return Err(null("v_pre (k_pre is given)")),
        (None, Some(_)) => return Err(null("k_pre (v_pre is given)")),
    }
    match using {
        ArgsUse::Call => {
            args.prefix_index = meta("prefix_index", a.prefix_index, a.batch)?.map(Into::into);
            args.seqlen_q = meta("seqlen_q", a.seqlen_q, a.batch)?.map(Into::into);
            args.seqlen_k = meta("seqlen_k", a.seqlen_k, a.batch)?.map(Into::into);
        }
        ArgsUse::Plan => {}
        ArgsUse::Run => {
            for (name, p) in [
                ("prefix_index", a.prefix_index),
                ("seqlen_q", a.seqlen_q),
                ("seqlen_k", a.seqlen_k),
            ] {
                if !p.is_null() {
                    return Err(Fail(
                        PA_ERR_UNSUPPORTED,
                        format!(
                            "args.{name}: must be NULL in a plan's run (host metadata); pass \
                             the device array as the run's {name} argument"
                        ),
                    ));
                }
            }
        }
    }
    args.causal = a.causal != 0;
    if a.scale != 0.0 {
        args.scale = Some(a.scale);
    }
    Ok(args)
}

/// What a `pa_decode_args` is read for, with a run's metadata.
#[derive(Clone, Copy, Debug)]
enum DecodeUse {
    /// A one-shot call: tensors with data, host metadata (`batch` values each).
    Call,
    /// A plan: shapes and `max_pages` only (data pointers, metadata and `batch` are not read).
    Plan,
    /// A plan's run: tensors with data; the struct's metadata pointers must be NULL, and the
    /// run's `[block_table, seqlen_k, prefix_index, prefix_len]` in the context's memory are
    /// used instead (the last two may be NULL: their defaults).
    Run([*const i32; 4]),
}

/// An i32 array of `dims` at `p` in the context's memory, as device metadata; `None` for
/// NULL.
fn dev_array<'a>(
    arg: &str,
    p: *const i32,
    dims: &[usize],
    loc: Location,
) -> Result<Option<Meta<'a>>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    if (p as usize) % 4 != 0 {
        return Err(Fail(
            PA_ERR_LAYOUT,
            format!(
                "{arg}: address {:#x} is not aligned to 4 bytes for i32",
                p as usize
            ),
        ));
    }
    let n = dims.iter().product();
    // SAFETY: the caller promises `n` int32 values at `p` in the context's memory (the
    // header's contract for a run's metadata), valid for the call.
    let t = unsafe {
        TensorView::from_raw_parts(
            p as usize as u64,
            n,
            loc,
            DType::I32,
            Layout::contiguous(dims)?,
        )
    }?;
    Ok(Some(Meta::Device(t)))
}

/// The Rust arguments of a `pa_decode_args`.
fn decode_args<'a>(
    args: *const pa_decode_args,
    loc: Location,
    using: DecodeUse,
) -> Result<PagedAttnArgs<'a>, Fail> {
    if args.is_null() {
        return Err(null("args"));
    }
    // SAFETY: non-null; the caller promises it points to a pa_decode_args.
    let a = unsafe { *args };
    if a.max_pages < 0 {
        return Err(Fail(
            PA_ERR_SHAPE,
            format!("max_pages = {}: expected >= 0", a.max_pages),
        ));
    }
    let tensor = |arg: &str, t: *const pa_tensor| match using {
        DecodeUse::Plan => shape_view(arg, t, loc),
        _ => view(arg, t, loc),
    };
    let q = tensor("q", a.q)?;
    let (k_cache, v_cache) = (tensor("k_cache", a.k_cache)?, tensor("v_cache", a.v_cache)?);
    let opt = |arg: &str, t: *const pa_tensor| match t.is_null() {
        true => Ok(None),
        false => tensor(arg, t).map(Some),
    };
    let prefix = match (opt("k_pre", a.k_pre)?, opt("v_pre", a.v_pre)?) {
        (Some(k), Some(v)) => Some((k, v)),
        (None, None) => None,
        (Some(_), None) => return Err(null("v_pre (k_pre is given)")),
        (None, Some(_)) => return Err(null("k_pre (v_pre is given)")),
    };
    let tables = prefix.map_or(0, |(k, _): (TensorView, TensorView)| k.dims()[0]);
    let max_pages = a.max_pages as usize;
    let (table, lens, idx, len) = match using {
        DecodeUse::Call => {
            let cells = a.batch.checked_mul(a.max_pages).ok_or_else(|| {
                Fail(
                    PA_ERR_SHAPE,
                    format!("batch {} × max_pages {} overflows", a.batch, a.max_pages),
                )
            })?;
            let table =
                meta("block_table", a.block_table, cells)?.ok_or_else(|| null("block_table"))?;
            let lens = meta("seqlen_k", a.seqlen_k, a.batch)?.ok_or_else(|| null("seqlen_k"))?;
            (
                Meta::Host(table),
                Meta::Host(lens),
                meta("prefix_index", a.prefix_index, a.batch)?.map(Meta::Host),
                meta("prefix_len", a.prefix_len, tables as i64)?.map(Meta::Host),
            )
        }
        DecodeUse::Plan => {
            // Only the block table's width is read; the planner never reads an element.
            let batch = q.dims().first().copied().unwrap_or(0);
            let dims = [batch, max_pages];
            // SAFETY: a placeholder view for the planner, which reads its dims only.
            let t = unsafe {
                TensorView::from_raw_parts(
                    SHAPE_ONLY_ADDR,
                    batch * max_pages,
                    loc,
                    DType::I32,
                    Layout::contiguous(&dims)?,
                )
            }?;
            let lens: &'a [i32] = &[];
            (Meta::Device(t), Meta::Host(lens), None, None)
        }
        DecodeUse::Run(m) => {
            for (name, p) in [
                ("block_table", a.block_table),
                ("seqlen_k", a.seqlen_k),
                ("prefix_index", a.prefix_index),
                ("prefix_len", a.prefix_len),
            ] {
                if !p.is_null() {
                    return Err(Fail(
                        PA_ERR_UNSUPPORTED,
                        format!(
                            "args.{name}: must be NULL in a plan's run (host metadata); pass \
                             the device array as the run's {name} argument"
                        ),
                    ));
                }
            }
            let batch = q.dims().first().copied().unwrap_or(0);
            (
                dev_array("block_table", m[0], &[batch, max_pages], loc)?
                    .ok_or_else(|| null("block_table"))?,
                dev_array("seqlen_k", m[1], &[batch], loc)?.ok_or_else(|| null("seqlen_k"))?,
                dev_array("prefix_index", m[2], &[batch], loc)?,
                dev_array("prefix_len", m[3], &[tables], loc)?,
            )
        }
    };
    let mut args = PagedAttnArgs::new(q, k_cache, v_cache, table, lens);
    if let Some((k, v)) = prefix {
        args = args.prefix(k, v);
    }
    args.prefix_index = idx;
    args.prefix_len = len;
    if a.scale != 0.0 {
        args = args.scale(a.scale);
    }
    Ok(args)
}

/// A run's device metadata array `[B]` (`B` = q's batch), or none for its default.
fn dev_meta<'a>(
    arg: &str,
    p: *const i32,
    args: &AttnFwdArgs,
    loc: Location,
) -> Result<Option<Meta<'a>>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    if (p as usize) % 4 != 0 {
        return Err(Fail(
            PA_ERR_LAYOUT,
            format!(
                "{arg}: address {:#x} is not aligned to 4 bytes for i32",
                p as usize
            ),
        ));
    }
    let batch = args.q.dims().first().copied().unwrap_or(0);
    // SAFETY: the caller promises `batch` int32 values at `p` in the context's memory (the
    // header's contract for a run's metadata), valid for the call.
    let t = unsafe {
        TensorView::from_raw_parts(
            p as usize as u64,
            batch,
            loc,
            DType::I32,
            Layout::contiguous(&[batch])?,
        )
    }?;
    Ok(Some(Meta::Device(t)))
}

/// The stream a C caller passed.
fn stream_of(stream: *mut c_void) -> Stream {
    // SAFETY: the header's contract: NULL or a valid CUstream of the device's primary
    // context, alive while the work queued on it runs.
    unsafe { Stream::from_raw(stream as cudarc::driver::sys::CUstream) }
}

/// The cpu context has no streams.
fn cpu_stream(stream: Stream) -> Result<(), Fail> {
    match stream.raw() {
        None => Ok(()),
        Some(_) => Err(Fail(
            PA_ERR_UNSUPPORTED,
            "stream: the cpu device has no CUDA streams; pass NULL".into(),
        )),
    }
}

/// A run's workspace.
fn workspace_of<'a>(ws: *mut c_void, bytes: u64, loc: Location) -> Result<Workspace<'a>, Fail> {
    if ws.is_null() {
        return Err(null("workspace"));
    }
    let bytes = usize::try_from(bytes).map_err(|_| {
        Fail(
            PA_ERR_LAYOUT,
            format!("workspace_bytes: {bytes} does not fit in memory"),
        )
    })?;
    // SAFETY: the header's contract: `workspace_bytes` writable bytes of the context's memory,
    // used by nothing else until the run's work has run.
    Ok(unsafe { Workspace::from_raw_parts(ws as usize as u64, bytes, loc) })
}

fn context<'a>(ctx: *const pa_context) -> Result<&'a pa_context, Fail> {
    if ctx.is_null() {
        return Err(null("ctx"));
    }
    // SAFETY: non-null; made by pa_context_create and not yet destroyed (the C contract).
    Ok(unsafe { &*ctx })
}

/// The tensors of a plan run (`args`, whose own metadata pointers must be NULL) with the
/// device metadata `[prefix_index, seqlen_q, seqlen_k]` (each NULL for its default).
fn run_args<'a>(
    args: *const pa_attn_args,
    loc: Location,
    meta: [*const i32; 3],
) -> Result<AttnFwdArgs<'a>, Fail> {
    let mut a = fwd_args(args, loc, ArgsUse::Run)?;
    a.prefix_index = dev_meta("prefix_index", meta[0], &a, loc)?;
    a.seqlen_q = dev_meta("seqlen_q", meta[1], &a, loc)?;
    a.seqlen_k = dev_meta("seqlen_k", meta[2], &a, loc)?;
    Ok(a)
}

/// Makes a plan on `ctx`'s kernel device with `make` and hands it to the caller in `*out`.
fn create_plan<P>(
    ctx: *const pa_context,
    out: *mut *mut PlanHandle<P>,
    make: impl FnOnce(&pa_context, &Runner) -> Result<P, Fail>,
) -> Result<(), Fail> {
    let ctx = context(ctx)?;
    if out.is_null() {
        return Err(null("out"));
    }
    let runner = plan_runner(ctx)?;
    let plan = make(ctx, &runner)?;
    let handle = Box::new(PlanHandle {
        plan,
        runner,
        location: ctx.location,
    });
    // SAFETY: `out` is non-null and writable (the C contract).
    unsafe { *out = Box::into_raw(handle) };
    Ok(())
}

/// A plan handle made by a `pa_*_plan_create` and not yet destroyed.
fn plan_ref<'a, T>(plan: *const T) -> Result<&'a T, Fail> {
    if plan.is_null() {
        return Err(null("plan"));
    }
    // SAFETY: non-null; made by its `pa_*_plan_create` and not yet destroyed (the C contract).
    Ok(unsafe { &*plan })
}

/// Writes a plan's workspace size to `*bytes`.
fn write_workspace_size(bytes: *mut u64, size: usize) -> Result<(), Fail> {
    if bytes.is_null() {
        return Err(null("bytes"));
    }
    // SAFETY: non-null and writable (the C contract).
    unsafe { *bytes = size as u64 };
    Ok(())
}

/// Destroys a plan handle made by `Box::into_raw` in its `pa_*_plan_create` (null: nothing).
fn destroy_plan<T>(plan: *mut T) {
    let _ = guard(|| {
        if !plan.is_null() {
            // SAFETY: made by Box::into_raw in its pa_*_plan_create, destroyed once (the C
            // contract).
            drop(unsafe { Box::from_raw(plan) });
        }
        Ok(())
    });
}

static VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();

/// The library version, a static NUL-terminated string (`"0.1.0"`).
#[no_mangle]
pub extern "C" fn pa_version() -> *const c_char {
    VERSION.as_ptr() as *const c_char
}

/// The calling thread's last error message (empty after a success). The pointer stays valid
/// until the next call of this library on the same thread.
#[no_mangle]
pub extern "C" fn pa_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates a context for a device: `kind` is `PA_DEVICE_CPU`, `PA_DEVICE_CUDA` (with
/// `ordinal`) or `PA_DEVICE_EMU`. On success `*out` holds a context to pass to
/// [`pa_context_destroy`].
#[no_mangle]
pub extern "C" fn pa_context_create(
    kind: i32,
    ordinal: i32,
    out: *mut *mut pa_context,
) -> pa_status {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        let device = match kind {
            0 => Device::Cpu,
            1 if ordinal >= 0 => Device::Cuda(ordinal as usize),
            1 => {
                return Err(Fail(
                    PA_ERR_DEVICE,
                    format!("ordinal: {ordinal}, expected >= 0"),
                ))
            }
            2 => Device::Emu,
            k => {
                return Err(Fail(
                    PA_ERR_DEVICE,
                    format!("kind: {k}, expected 0 (cpu), 1 (cuda) or 2 (emu)"),
                ))
            }
        };
        let dev = match device {
            Device::Cpu => Dev::Cpu(CpuBackend),
            Device::Emu => Dev::Emu(EmuBackend),
            Device::Cuda(i) => Dev::Cuda(Arc::new(CudaBackend::new(i)?)),
        };
        let ctx = Box::new(pa_context {
            dev,
            location: device.location(),
        });
        // SAFETY: `out` is non-null and writable (the C contract).
        unsafe { *out = Box::into_raw(ctx) };
        Ok(())
    })
}

/// Destroys a context made by [`pa_context_create`] (null is allowed and does nothing). The
/// work it queued on a caller's stream must have run (synchronise the stream first).
#[no_mangle]
pub extern "C" fn pa_context_destroy(ctx: *mut pa_context) {
    let _ = guard(|| {
        if !ctx.is_null() {
            // SAFETY: made by Box::into_raw in pa_context_create, destroyed once.
            drop(unsafe { Box::from_raw(ctx) });
        }
        Ok(())
    });
}

/// The attention forward: writes `o [B, Tq, Hq, D]` (q's dtype) and, if `lse` is not null,
/// the f32 natural-log LSE `[B, Hq, Tq]`. `stream`: NULL for the crate's stream, or (cuda) a
/// caller's `CUstream`, which the call is ordered against with events (after the work queued
/// on it so far, before the work it queues later; the host does not wait).
#[no_mangle]
pub extern "C" fn pa_attn_fwd(
    ctx: *const pa_context,
    args: *const pa_attn_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let ctx = context(ctx)?;
        let st = stream_of(stream);
        let loc = ctx.location;
        let a = fwd_args(args, loc, ArgsUse::Call)?;
        let out = AttnFwdOut {
            o: view_mut("o", o, loc)?,
            lse: opt_view_mut("lse", lse, loc)?,
        };
        match &ctx.dev {
            Dev::Cpu(be) => {
                cpu_stream(st)?;
                be.attn_fwd(&a, out)?
            }
            Dev::Emu(be) => be.attn_fwd_on(&a, out, st)?,
            Dev::Cuda(be) => be.attn_fwd_on(&a, out, st)?,
        }
        Ok(())
    })
}

/// The attention backward: from the forward's `o`, `lse` and the output gradient `d_o`,
/// writes `dq`, `dk`, `dv` (required unless `prefix_only` is non-zero) and, if given, the
/// f32 `dk_pre`, `dv_pre` summed over the sequences using each prefix. `stream` as for
/// [`pa_attn_fwd`].
#[no_mangle]
pub extern "C" fn pa_attn_bwd(
    ctx: *const pa_context,
    args: *const pa_attn_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    d_o: *const pa_tensor,
    dq: *const pa_tensor,
    dk: *const pa_tensor,
    dv: *const pa_tensor,
    dk_pre: *const pa_tensor,
    dv_pre: *const pa_tensor,
    prefix_only: i32,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let ctx = context(ctx)?;
        let st = stream_of(stream);
        let loc = ctx.location;
        let b = AttnBwdArgs {
            fwd: fwd_args(args, loc, ArgsUse::Call)?,
            o: view("o", o, loc)?,
            lse: view("lse", lse, loc)?,
            d_o: view("d_o", d_o, loc)?,
            prefix_only: prefix_only != 0,
        };
        let g = AttnGrads {
            dq: opt_view_mut("dq", dq, loc)?,
            dk: opt_view_mut("dk", dk, loc)?,
            dv: opt_view_mut("dv", dv, loc)?,
            dk_pre: opt_view_mut("dk_pre", dk_pre, loc)?,
            dv_pre: opt_view_mut("dv_pre", dv_pre, loc)?,
        };
        match &ctx.dev {
            Dev::Cpu(be) => {
                cpu_stream(st)?;
                be.attn_bwd(&b, g)?
            }
            Dev::Emu(be) => be.attn_bwd_on(&b, g, st)?,
            Dev::Cuda(be) => be.attn_bwd_on(&b, g, st)?,
        }
        Ok(())
    })
}

/// The paged decode: each sequence's `Tq` new queries attend over its prefix (rows past the
/// prefix's `prefix_len` masked) and the `seqlen_k` tokens in its pages (causal among the new
/// ones, bottom-right). Writes `o [B, Tq, Hq, D]` (q's dtype) and, if `lse` is not null, the
/// f32 LSE `[B, Hq, Tq]`. Metadata in host memory (on cuda it is uploaded by the call).
/// `stream` as for [`pa_attn_fwd`].
#[no_mangle]
pub extern "C" fn pa_attn_decode(
    ctx: *const pa_context,
    args: *const pa_decode_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let ctx = context(ctx)?;
        let st = stream_of(stream);
        let loc = ctx.location;
        let args = decode_args(args, loc, DecodeUse::Call)?;
        let out = AttnFwdOut {
            o: view_mut("o", o, loc)?,
            lse: opt_view_mut("lse", lse, loc)?,
        };
        match &ctx.dev {
            Dev::Cpu(be) => {
                cpu_stream(st)?;
                be.attn_decode(&args, out)?
            }
            Dev::Emu(be) => be.attn_decode_on(&args, out, st)?,
            Dev::Cuda(be) => be.attn_decode_on(&args, out, st)?,
        }
        Ok(())
    })
}

/// Validates `args` and writes to `*bytes` the workspace the one-shot call
/// ([`pa_attn_fwd`], [`pa_attn_bwd`]) needs from the caller: 0 on every device (the cpu
/// backend needs none; the cuda backend keeps its own grow-only scratch). A plan's run takes
/// its workspace from the caller: see [`pa_attn_plan_workspace_size`]. Validation errors are
/// reported as by [`pa_attn_fwd`].
#[no_mangle]
pub extern "C" fn pa_workspace_size(
    ctx: *const pa_context,
    args: *const pa_attn_args,
    backward: i32,
    bytes: *mut u64,
) -> pa_status {
    guard(|| {
        let ctx = context(ctx)?;
        if bytes.is_null() {
            return Err(null("bytes"));
        }
        let _ = backward;
        fwd_args(args, ctx.location, ArgsUse::Call)?.check()?;
        // SAFETY: non-null and writable (the C contract).
        unsafe { *bytes = 0 };
        Ok(())
    })
}

/// Plans the forward (`backward` zero) or the backward (non-zero) for calls shaped like
/// `args`, on an emu or cuda context: validates the shapes, dtypes and strides with every
/// check of the one-shot call, fixes the kernel launches, sizes the workspace and loads the
/// kernels. `args` is read for shapes only: its data pointers may be NULL, and its metadata
/// pointers and `batch` are not read. A backward plan covers the largest run (sequence and,
/// with a prefix table, prefix gradients). On success `*out` holds a plan for
/// [`pa_attn_plan_destroy`]; it keeps its device, so it may outlive `ctx`.
#[no_mangle]
pub extern "C" fn pa_attn_plan_create(
    ctx: *const pa_context,
    args: *const pa_attn_args,
    backward: i32,
    out: *mut *mut pa_attn_plan,
) -> pa_status {
    guard(|| {
        create_plan(ctx, out, |ctx, runner| {
            let a = fwd_args(args, ctx.location, ArgsUse::Plan)?;
            let backward = backward != 0;
            let plan = match runner {
                Runner::Emu(be) if backward => AttnPlan::bwd(be, &a)?,
                Runner::Emu(be) => AttnPlan::fwd(be, &a)?,
                Runner::Cuda(be) if backward => AttnPlan::bwd(&**be, &a)?,
                Runner::Cuda(be) => AttnPlan::fwd(&**be, &a)?,
            };
            Ok(plan)
        })
    })
}

/// Writes to `*bytes` the workspace a run of `plan` needs (device memory of the plan's
/// context, 16-byte aligned).
#[no_mangle]
pub extern "C" fn pa_attn_plan_workspace_size(
    plan: *const pa_attn_plan,
    bytes: *mut u64,
) -> pa_status {
    guard(|| {
        let plan = plan_ref(plan)?;
        write_workspace_size(bytes, plan.plan.workspace_bytes())
    })
}

/// Runs a forward plan: the tensors of `args`, `o` and `lse` (as for [`pa_attn_fwd`]) must
/// have the plan's shapes and dtype; `args`' metadata pointers must be NULL. `prefix_index`,
/// `seqlen_q`, `seqlen_k`: int32 `[B]` arrays in the context's memory (device pointers on
/// cuda), each NULL for its default, values clamped as for device metadata. `workspace`:
/// `workspace_bytes` bytes (at least [`pa_attn_plan_workspace_size`]), 16-byte aligned, in
/// the context's memory. `stream`: NULL (the crate's stream) or the caller's `CUstream`, on
/// which the kernels are launched directly. No allocation, host copy or synchronisation:
/// a CUDA graph may capture it.
#[no_mangle]
pub extern "C" fn pa_attn_plan_run_fwd(
    plan: *const pa_attn_plan,
    args: *const pa_attn_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    prefix_index: *const i32,
    seqlen_q: *const i32,
    seqlen_k: *const i32,
    workspace: *mut c_void,
    workspace_bytes: u64,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let p = plan_ref(plan)?;
        let loc = p.location;
        let a = run_args(args, loc, [prefix_index, seqlen_q, seqlen_k])?;
        let out = AttnFwdOut {
            o: view_mut("o", o, loc)?,
            lse: opt_view_mut("lse", lse, loc)?,
        };
        let ws = workspace_of(workspace, workspace_bytes, loc)?;
        let st = stream_of(stream);
        match &p.runner {
            Runner::Emu(be) => p.plan.run_fwd(be, &a, out, ws, st)?,
            Runner::Cuda(be) => p.plan.run_fwd(&**be, &a, out, ws, st)?,
        }
        Ok(())
    })
}

/// Runs a backward plan: tensors as for [`pa_attn_bwd`] with the plan's shapes and dtype;
/// metadata, workspace and stream as for [`pa_attn_plan_run_fwd`].
#[no_mangle]
pub extern "C" fn pa_attn_plan_run_bwd(
    plan: *const pa_attn_plan,
    args: *const pa_attn_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    d_o: *const pa_tensor,
    dq: *const pa_tensor,
    dk: *const pa_tensor,
    dv: *const pa_tensor,
    dk_pre: *const pa_tensor,
    dv_pre: *const pa_tensor,
    prefix_only: i32,
    prefix_index: *const i32,
    seqlen_q: *const i32,
    seqlen_k: *const i32,
    workspace: *mut c_void,
    workspace_bytes: u64,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let p = plan_ref(plan)?;
        let loc = p.location;
        let a = run_args(args, loc, [prefix_index, seqlen_q, seqlen_k])?;
        let b = AttnBwdArgs {
            fwd: a,
            o: view("o", o, loc)?,
            lse: view("lse", lse, loc)?,
            d_o: view("d_o", d_o, loc)?,
            prefix_only: prefix_only != 0,
        };
        let g = AttnGrads {
            dq: opt_view_mut("dq", dq, loc)?,
            dk: opt_view_mut("dk", dk, loc)?,
            dv: opt_view_mut("dv", dv, loc)?,
            dk_pre: opt_view_mut("dk_pre", dk_pre, loc)?,
            dv_pre: opt_view_mut("dv_pre", dv_pre, loc)?,
        };
        let ws = workspace_of(workspace, workspace_bytes, loc)?;
        let st = stream_of(stream);
        match &p.runner {
            Runner::Emu(be) => p.plan.run_bwd(be, &b, g, ws, st)?,
            Runner::Cuda(be) => p.plan.run_bwd(&**be, &b, g, ws, st)?,
        }
        Ok(())
    })
}

/// Destroys a plan made by [`pa_attn_plan_create`] (null is allowed and does nothing). The
/// work its runs queued must have run (synchronise the stream first).
#[no_mangle]
pub extern "C" fn pa_attn_plan_destroy(plan: *mut pa_attn_plan) {
    destroy_plan(plan);
}

/// The kernel device of a context that plans, or the refusal of the cpu context.
fn plan_runner(ctx: &pa_context) -> Result<Runner, Fail> {
    match &ctx.dev {
        Dev::Cpu(_) => Err(Fail(
            PA_ERR_UNSUPPORTED,
            "ctx: plan/run needs a kernel device (PA_DEVICE_CUDA or PA_DEVICE_EMU); the cpu \
             context runs the one-shot calls only"
                .into(),
        )),
        Dev::Emu(be) => Ok(Runner::Emu(*be)),
        Dev::Cuda(be) => Ok(Runner::Cuda(be.clone())),
    }
}

/// Plans paged decodes shaped like `args` on an emu or cuda context: validates the shapes,
/// dtypes and strides with every check of [`pa_attn_decode`], fixes the kernel launches (the
/// key splits depend on the shapes and `max_pages`, never on the lengths), sizes the
/// workspace and loads the kernels. `args` is read for its tensors' shapes and `max_pages`
/// only: data pointers may be NULL, metadata pointers and `batch` are not read. On success
/// `*out` holds a plan for [`pa_decode_plan_destroy`]; it may outlive `ctx`.
#[no_mangle]
pub extern "C" fn pa_decode_plan_create(
    ctx: *const pa_context,
    args: *const pa_decode_args,
    out: *mut *mut pa_decode_plan,
) -> pa_status {
    guard(|| {
        create_plan(ctx, out, |ctx, runner| {
            let a = decode_args(args, ctx.location, DecodeUse::Plan)?;
            Ok(match runner {
                Runner::Emu(be) => DecodePlan::new(be, &a)?,
                Runner::Cuda(be) => DecodePlan::new(&**be, &a)?,
            })
        })
    })
}

/// Writes to `*bytes` the workspace a run of `plan` needs: the key splits' partials (context
/// memory, 16-byte aligned), 0 when the plan does not split.
#[no_mangle]
pub extern "C" fn pa_decode_plan_workspace_size(
    plan: *const pa_decode_plan,
    bytes: *mut u64,
) -> pa_status {
    guard(|| {
        let plan = plan_ref(plan)?;
        write_workspace_size(bytes, plan.plan.workspace_bytes())
    })
}

/// Runs a decode plan: the tensors of `args`, `o` and `lse` (as for [`pa_attn_decode`]) must
/// have the plan's shapes and dtype, and `args.max_pages` the plan's; `args`' metadata
/// pointers must be NULL. `block_table` (`[B, max_pages]`), `seqlen_k` (`[B]`),
/// `prefix_index` (`[B]`, NULL: 0 for all) and `prefix_len` (`[NP]`, NULL: `P` for all):
/// int32 arrays in the context's memory (device pointers on cuda), values clamped where the
/// kernel reads them. `workspace`: `workspace_bytes` bytes (at least
/// [`pa_decode_plan_workspace_size`]; NULL when that is 0), 16-byte aligned, in the context's
/// memory. `stream` as for [`pa_attn_plan_run_fwd`]: no allocation, host copy or
/// synchronisation, so a CUDA graph may capture it.
#[no_mangle]
pub extern "C" fn pa_decode_plan_run(
    plan: *const pa_decode_plan,
    args: *const pa_decode_args,
    o: *const pa_tensor,
    lse: *const pa_tensor,
    block_table: *const i32,
    seqlen_k: *const i32,
    prefix_index: *const i32,
    prefix_len: *const i32,
    workspace: *mut c_void,
    workspace_bytes: u64,
    stream: *mut c_void,
) -> pa_status {
    guard(|| {
        let p = plan_ref(plan)?;
        let loc = p.location;
        let meta = [block_table, seqlen_k, prefix_index, prefix_len];
        let a = decode_args(args, loc, DecodeUse::Run(meta))?;
        let out = AttnFwdOut {
            o: view_mut("o", o, loc)?,
            lse: opt_view_mut("lse", lse, loc)?,
        };
        let ws = if workspace.is_null() && p.plan.workspace_bytes() == 0 {
            // SAFETY: an empty workspace, which a run that does not split never touches.
            unsafe { Workspace::from_raw_parts(0, 0, loc) }
        } else {
            workspace_of(workspace, workspace_bytes, loc)?
        };
        let st = stream_of(stream);
        match &p.runner {
            Runner::Emu(be) => p.plan.run(be, &a, out, ws, st)?,
            Runner::Cuda(be) => p.plan.run(&**be, &a, out, ws, st)?,
        }
        Ok(())
    })
}

/// Destroys a plan made by [`pa_decode_plan_create`] (null is allowed and does nothing). The
/// work its runs queued must have run (synchronise the stream first).
#[no_mangle]
pub extern "C" fn pa_decode_plan_destroy(plan: *mut pa_decode_plan) {
    destroy_plan(plan);
}

/// A test hook: panics inside the library, which the boundary turns into `PA_ERR_PANIC`.
#[no_mangle]
pub extern "C" fn pa_test_panic() -> pa_status {
    guard(|| panic!("pa_test_panic: a deliberate panic"))
}
