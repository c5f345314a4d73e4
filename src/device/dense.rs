//! Launch plans of the dense GPT-2 kernels (`kernels/dense.cu`), shared by the `emu` and
//! `cuda` devices: every argument check (shapes, dtypes, contiguity, locations, index ranges)
//! happens here, before a launch. The devices only place the index array (if any) and launch.
//!
//! Dense kernels take contiguous `[rows, cols]` tensors (a `narrow` along the first dimension
//! of a contiguous tensor is contiguous); only [`copy`] takes strides. Storage may be f16, bf16
//! or f32; arithmetic is f32.

use super::check::{
    cross_entropy_args, dims2, embed_args, rows_in_range as check_rows, same_shape as same,
};
use super::AdamWStep;
use crate::error::{Error, Result};
use crate::tensor::{check_dtype, DType, Location, TensorView, TensorViewMut, MAX_RANK};

/// Mirror of `DenseParams` (kernels/common/params.h), passed by value to every dense kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DenseParams {
    /// Input addresses (meaning per kernel, see kernels/dense.cu).
    pub in0: u64,
    /// See `in0`.
    pub in1: u64,
    /// See `in0`.
    pub in2: u64,
    /// See `in0`.
    pub in3: u64,
    /// See `in0`.
    pub in4: u64,
    /// Output addresses.
    pub out0: u64,
    /// See `out0`.
    pub out1: u64,
    /// See `out0`.
    pub out2: u64,
    /// int32 index array (filled in by the device).
    pub idx: u64,
    /// Rows.
    pub rows: i64,
    /// Columns.
    pub cols: i64,
    /// `dense_copy`: shape.
    pub dims: [i64; MAX_RANK],
    /// `dense_copy`: element strides of the source.
    pub in_str: [i64; MAX_RANK],
    /// `dense_copy`: element strides of the destination.
    pub out_str: [i64; MAX_RANK],
    /// `dense_copy`: element offset of the source.
    pub in_off: i64,
    /// `dense_copy`: element offset of the destination.
    pub out_off: i64,
    /// Element type of the main input (0 f16, 1 bf16, 2 f32).
    pub in_dt: i32,
    /// Element type of the second input (weights of layer norm).
    pub in1_dt: i32,
    /// Element type of the main output.
    pub out_dt: i32,
    /// Bit 0: accumulate into `out0`.
    pub flags: i32,
    /// `dense_embed`: tokens per sequence.
    pub seq_len: i32,
    /// `dense_embed`: position of the first token.
    pub pos_offset: i32,
    /// `dense_copy`: number of dims.
    pub rank: i32,
    /// Padding.
    pub pad0: i32,
    /// Scalars.
    pub f: [f32; 8],
}

/// Size and field offsets of [`DenseParams`] as Rust lays it out, in the order the C side
/// reports them (`pa_dense_params_layout`).
pub fn params_rust_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<DenseParams>(),
        offset_of!(DenseParams, in0),
        offset_of!(DenseParams, out0),
        offset_of!(DenseParams, idx),
        offset_of!(DenseParams, rows),
        offset_of!(DenseParams, dims),
        offset_of!(DenseParams, in_str),
        offset_of!(DenseParams, out_str),
        offset_of!(DenseParams, in_off),
        offset_of!(DenseParams, in_dt),
        offset_of!(DenseParams, flags),
        offset_of!(DenseParams, seq_len),
        offset_of!(DenseParams, rank),
        offset_of!(DenseParams, f),
    ]
}

/// One checked dense launch.
#[derive(Clone, Debug)]
pub struct DenseLaunch {
    /// Kernel entry name.
    pub entry: &'static str,
    /// Parameters (`idx` still to be filled by the device when `idx` below is set).
    pub params: DenseParams,
    /// Blocks (1-D grid).
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// The int32 index array the kernel reads through `params.idx`.
    pub idx: Option<Vec<i32>>,
}

/// Grid limits of a device: the dense kernels are grid-stride loops, so the result does not
/// depend on the grid; the emulator uses a small cap (fewer fibers, and every loop runs
/// several iterations), a GPU a large one.
#[derive(Clone, Copy, Debug)]
pub struct GridCap(pub u32);

const THREADS: u32 = 256;
/// Rows per block of the warp-per-row kernels.
const ROW_WARPS: u32 = 4;

fn code(dt: DType, arg: &str) -> Result<i32> {
    match dt {
        DType::F16 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F32 => Ok(2),
        DType::I32 => Err(Error::DType {
            arg: arg.into(),
            expected: "f16, bf16 or f32".into(),
            got: "i32".into(),
        }),
    }
}

/// A contiguous view at `loc`: address of its first element and its dims.
fn contig<'v>(arg: &str, t: &'v TensorView, loc: Location) -> Result<(u64, &'v [usize])> {
    if t.location() != loc {
        return Err(Error::device(
            arg,
            format!("is on {}, this device computes on {loc}", t.location()),
        ));
    }
    if !t.layout().is_contiguous() {
        return Err(Error::layout(
            arg,
            format!("dense kernels need a contiguous view, got {:?}", t.layout()),
        ));
    }
    Ok((
        t.base_addr() + (t.layout().offset() * t.dtype().size()) as u64,
        t.dims(),
    ))
}

fn contig_mut<'v>(arg: &str, t: &'v TensorViewMut, loc: Location) -> Result<(u64, &'v [usize])> {
    let v = t.as_view();
    let (a, _) = contig(arg, &v, loc)?;
    Ok((a, t.dims()))
}

/// [`contig`], then the shape (and the dtype, when given) it must have: its address.
fn input(
    arg: &str,
    t: &TensorView,
    loc: Location,
    dims: &[usize],
    dtype: Option<DType>,
) -> Result<u64> {
    let (a, d) = contig(arg, t, loc)?;
    same(arg, d, dims)?;
    if let Some(dt) = dtype {
        check_dtype(arg, t.dtype(), dt)?;
    }
    Ok(a)
}

/// [`input`] for an output.
fn output(
    arg: &str,
    t: &TensorViewMut,
    loc: Location,
    dims: &[usize],
    dtype: Option<DType>,
) -> Result<u64> {
    input(arg, &t.as_view(), loc, dims, dtype)
}

fn flat_blocks(n: usize, cap: GridCap) -> u32 {
    (n.div_ceil(THREADS as usize).max(1)).min(cap.0 as usize) as u32
}

fn launch(entry: &'static str, params: DenseParams, blocks: u32, threads: u32) -> DenseLaunch {
    DenseLaunch {
        entry,
        params,
        blocks: blocks.max(1),
        threads,
        idx: None,
    }
}

/// A row-wise kernel's launch: one warp a row, `ROW_WARPS` rows a block, at most the grid cap.
fn row_launch(entry: &'static str, params: DenseParams, rows: usize, cap: GridCap) -> DenseLaunch {
    let blocks = (rows.div_ceil(ROW_WARPS as usize).max(1)).min(cap.0 as usize) as u32;
    launch(entry, params, blocks, ROW_WARPS * 32)
}

/// Elementwise `out = op(x)` (`dense_gelu`, `dense_tanh`).
pub fn unary(
    entry: &'static str,
    x: &TensorView,
    out: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig("x", x, loc)?;
    let (oa, od) = contig_mut("out", out, loc)?;
    same("out", od, xd)?;
    let n = x.numel();
    let p = DenseParams {
        in0: xa,
        out0: oa,
        rows: 1,
        cols: n as i64,
        in_dt: code(x.dtype(), "x")?,
        out_dt: code(out.dtype(), "out")?,
        ..Default::default()
    };
    Ok(launch(entry, p, flat_blocks(n, cap), THREADS))
}

/// Elementwise `out = op(a, b)` (`dense_gelu_bwd`: a = x, b = dy; `dense_tanh_bwd`: a = y).
pub fn binary(
    entry: &'static str,
    a: &TensorView,
    b: &TensorView,
    out: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (aa, ad) = contig("x", a, loc)?;
    let (ba, bd) = contig("dy", b, loc)?;
    let (oa, od) = contig_mut("dx", out, loc)?;
    same("dy", bd, ad)?;
    same("dx", od, ad)?;
    check_dtype("dy", b.dtype(), a.dtype())?;
    let n = a.numel();
    let p = DenseParams {
        in0: aa,
        in1: ba,
        out0: oa,
        rows: 1,
        cols: n as i64,
        in_dt: code(a.dtype(), "x")?,
        out_dt: code(out.dtype(), "dx")?,
        ..Default::default()
    };
    Ok(launch(entry, p, flat_blocks(n, cap), THREADS))
}

/// `h += bias` (row broadcast), `out = gelu(h)`.
pub fn bias_gelu(
    h: &mut TensorViewMut,
    bias: &TensorView,
    out: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (ha, hd) = contig_mut("bias_gelu h", h, loc)?;
    let (m, n) = dims2("bias_gelu h", hd)?;
    let ba = input("bias_gelu bias", bias, loc, &[n], None)?;
    let oa = output("bias_gelu out", out, loc, &[m, n], Some(h.dtype()))?;
    let p = DenseParams {
        in0: ba,
        out0: ha,
        out1: oa,
        rows: m as i64,
        cols: n as i64,
        in_dt: code(bias.dtype(), "bias_gelu bias")?,
        out_dt: code(h.dtype(), "bias_gelu h")?,
        ..Default::default()
    };
    Ok(launch(
        "dense_bias_gelu",
        p,
        flat_blocks(m * n, cap),
        THREADS,
    ))
}

/// `out += bias + residual`.
pub fn bias_residual(
    out: &mut TensorViewMut,
    bias: &TensorView,
    residual: &TensorView,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (oa, od) = contig_mut("bias_residual out", out, loc)?;
    let (m, n) = dims2("bias_residual out", od)?;
    let ba = input("bias_residual bias", bias, loc, &[n], None)?;
    let ra = input(
        "bias_residual residual",
        residual,
        loc,
        &[m, n],
        Some(out.dtype()),
    )?;
    let p = DenseParams {
        in0: ba,
        in1: ra,
        out0: oa,
        rows: m as i64,
        cols: n as i64,
        in_dt: code(bias.dtype(), "bias_residual bias")?,
        out_dt: code(out.dtype(), "bias_residual out")?,
        ..Default::default()
    };
    Ok(launch(
        "dense_bias_residual",
        p,
        flat_blocks(m * n, cap),
        THREADS,
    ))
}

/// `out = alpha · x + beta · out` (`x` absent: `out = beta · out`).
pub fn axpby(
    out: &mut TensorViewMut,
    alpha: f32,
    x: Option<&TensorView>,
    beta: f32,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (oa, od) = contig_mut("out", out, loc)?;
    let od = od.to_vec();
    let mut p = DenseParams {
        out0: oa,
        rows: 1,
        cols: out.numel() as i64,
        out_dt: code(out.dtype(), "out")?,
        ..Default::default()
    };
    p.in_dt = p.out_dt;
    if let Some(x) = x {
        let (xa, xd) = contig("x", x, loc)?;
        same("x", xd, &od)?;
        p.in0 = xa;
        p.in_dt = code(x.dtype(), "x")?;
    }
    p.f[0] = alpha;
    p.f[1] = beta;
    Ok(launch(
        "dense_axpby",
        p,
        flat_blocks(out.numel(), cap),
        THREADS,
    ))
}

/// Layer norm forward over rows.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(
    x: &TensorView,
    weight: &TensorView,
    bias: &TensorView,
    eps: f32,
    out: &mut TensorViewMut,
    mean: &mut TensorViewMut,
    rstd: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig("layernorm x", x, loc)?;
    let (m, c) = dims2("layernorm x", xd)?;
    let wa = input("layernorm weight", weight, loc, &[c], None)?;
    let ba = input("layernorm bias", bias, loc, &[c], Some(weight.dtype()))?;
    let oa = output("layernorm out", out, loc, &[m, c], Some(x.dtype()))?;
    let ma = output("layernorm mean", mean, loc, &[m], Some(DType::F32))?;
    let ra = output("layernorm rstd", rstd, loc, &[m], Some(DType::F32))?;
    let mut p = DenseParams {
        in0: xa,
        in1: wa,
        in2: ba,
        out0: oa,
        out1: ma,
        out2: ra,
        rows: m as i64,
        cols: c as i64,
        in_dt: code(x.dtype(), "layernorm x")?,
        in1_dt: code(weight.dtype(), "layernorm weight")?,
        out_dt: code(out.dtype(), "layernorm out")?,
        ..Default::default()
    };
    p.f[0] = eps;
    Ok(row_launch("dense_layernorm", p, m, cap))
}

/// Input gradient of layer norm.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dy: &TensorView,
    x: &TensorView,
    weight: &TensorView,
    mean: &TensorView,
    rstd: &TensorView,
    dx: &mut TensorViewMut,
    accumulate: bool,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig("layernorm_bwd x", x, loc)?;
    let (m, c) = dims2("layernorm_bwd x", xd)?;
    let ga = input("layernorm_bwd dy", dy, loc, &[m, c], Some(x.dtype()))?;
    let wa = input("layernorm_bwd weight", weight, loc, &[c], None)?;
    let ma = input("layernorm_bwd mean", mean, loc, &[m], Some(DType::F32))?;
    let ra = input("layernorm_bwd rstd", rstd, loc, &[m], Some(DType::F32))?;
    let da = output("layernorm_bwd dx", dx, loc, &[m, c], None)?;
    let p = DenseParams {
        in0: ga,
        in1: xa,
        in2: wa,
        in3: ma,
        in4: ra,
        out0: da,
        rows: m as i64,
        cols: c as i64,
        in_dt: code(x.dtype(), "layernorm_bwd x")?,
        in1_dt: code(weight.dtype(), "layernorm_bwd weight")?,
        out_dt: code(dx.dtype(), "layernorm_bwd dx")?,
        flags: accumulate as i32,
        ..Default::default()
    };
    Ok(row_launch("dense_layernorm_bwd", p, m, cap))
}

/// RMS norm forward over rows (`dense_rmsnorm`).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    x: &TensorView,
    weight: &TensorView,
    eps: f32,
    out: &mut TensorViewMut,
    rstd: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig("rmsnorm x", x, loc)?;
    let (m, c) = dims2("rmsnorm x", xd)?;
    let wa = input("rmsnorm weight", weight, loc, &[c], None)?;
    let oa = output("rmsnorm out", out, loc, &[m, c], Some(x.dtype()))?;
    let ra = output("rmsnorm rstd", rstd, loc, &[m], Some(DType::F32))?;
    let mut p = DenseParams {
        in0: xa,
        in1: wa,
        out0: oa,
        out1: ra,
        rows: m as i64,
        cols: c as i64,
        in_dt: code(x.dtype(), "rmsnorm x")?,
        in1_dt: code(weight.dtype(), "rmsnorm weight")?,
        out_dt: code(out.dtype(), "rmsnorm out")?,
        ..Default::default()
    };
    p.f[0] = eps;
    Ok(row_launch("dense_rmsnorm", p, m, cap))
}

/// Input gradient of RMS norm (`dense_rmsnorm_bwd`).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    dy: &TensorView,
    x: &TensorView,
    weight: &TensorView,
    rstd: &TensorView,
    dx: &mut TensorViewMut,
    accumulate: bool,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig("rmsnorm_bwd x", x, loc)?;
    let (m, c) = dims2("rmsnorm_bwd x", xd)?;
    let ga = input("rmsnorm_bwd dy", dy, loc, &[m, c], Some(x.dtype()))?;
    let wa = input("rmsnorm_bwd weight", weight, loc, &[c], None)?;
    let ra = input("rmsnorm_bwd rstd", rstd, loc, &[m], Some(DType::F32))?;
    let da = output("rmsnorm_bwd dx", dx, loc, &[m, c], None)?;
    let p = DenseParams {
        in0: ga,
        in1: xa,
        in2: wa,
        in3: ra,
        out0: da,
        rows: m as i64,
        cols: c as i64,
        in_dt: code(x.dtype(), "rmsnorm_bwd x")?,
        in1_dt: code(weight.dtype(), "rmsnorm_bwd weight")?,
        out_dt: code(dx.dtype(), "rmsnorm_bwd dx")?,
        flags: accumulate as i32,
        ..Default::default()
    };
    Ok(row_launch("dense_rmsnorm_bwd", p, m, cap))
}

/// Rotary embedding in place of `x [B, T, H, D]` with `cos, sin [T, D/2]` or `[B, T, D/2]`
/// (f32) (`dense_rope`); `sign = -1.0` rotates back (the backward).
pub fn rope(
    x: &mut TensorViewMut,
    cos: &TensorView,
    sin: &TensorView,
    sign: f32,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (xa, xd) = contig_mut("rope x", x, loc)?;
    let (b, t, h, d) = match xd {
        [b, t, h, d] if d % 2 == 0 => (*b, *t, *h, *d),
        other => return Err(Error::shape("rope x", "[B, T, H, D] with D even", other)),
    };
    let half = d / 2;
    // One table for the batch, or one per sequence (the serving step).
    let (table, period) = if cos.dims() == [b, t, half] {
        (vec![b, t, half], b * t)
    } else {
        (vec![t, half], t)
    };
    let ca = input("rope cos", cos, loc, &table, Some(DType::F32))?;
    let sa = input("rope sin", sin, loc, &table, Some(DType::F32))?;
    let mut p = DenseParams {
        in0: ca,
        in1: sa,
        out0: xa,
        rows: (b * t) as i64,
        cols: (h * d) as i64,
        seq_len: period.max(1) as i32,
        out_dt: code(x.dtype(), "rope x")?,
        ..Default::default()
    };
    p.dims[0] = h as i64;
    p.dims[1] = d as i64;
    p.f[0] = sign;
    Ok(launch(
        "dense_rope",
        p,
        flat_blocks(b * t * h * half, cap),
        THREADS,
    ))
}

/// `out = silu(gate) · up` (`dense_swiglu`).
pub fn swiglu(
    gate: &TensorView,
    up: &TensorView,
    out: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (ga, gd) = contig("swiglu gate", gate, loc)?;
    dims2("swiglu gate", gd)?;
    let ua = input("swiglu up", up, loc, gd, Some(gate.dtype()))?;
    let oa = output("swiglu out", out, loc, gd, None)?;
    let n = gate.numel();
    let p = DenseParams {
        in0: ga,
        in1: ua,
        out0: oa,
        rows: 1,
        cols: n as i64,
        in_dt: code(gate.dtype(), "swiglu gate")?,
        out_dt: code(out.dtype(), "swiglu out")?,
        ..Default::default()
    };
    Ok(launch("dense_swiglu", p, flat_blocks(n, cap), THREADS))
}

/// The gradients of `silu(gate) · up` (`dense_swiglu_bwd`).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_bwd(
    gate: &TensorView,
    up: &TensorView,
    dy: &TensorView,
    d_gate: &mut TensorViewMut,
    d_up: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (ga, gd) = contig("swiglu_bwd gate", gate, loc)?;
    dims2("swiglu_bwd gate", gd)?;
    let ua = input("swiglu_bwd up", up, loc, gd, Some(gate.dtype()))?;
    let ya = input("swiglu_bwd dy", dy, loc, gd, Some(gate.dtype()))?;
    let dga = output("swiglu_bwd d_gate", d_gate, loc, gd, None)?;
    let dua = output("swiglu_bwd d_up", d_up, loc, gd, Some(d_gate.dtype()))?;
    let n = gate.numel();
    let p = DenseParams {
        in0: ga,
        in1: ua,
        in2: ya,
        out0: dga,
        out1: dua,
        rows: 1,
        cols: n as i64,
        in_dt: code(gate.dtype(), "swiglu_bwd gate")?,
        out_dt: code(d_gate.dtype(), "swiglu_bwd d_gate")?,
        ..Default::default()
    };
    Ok(launch("dense_swiglu_bwd", p, flat_blocks(n, cap), THREADS))
}

/// `out[n] (+)= Σ_rows x[., n]`.
pub fn sum_rows(
    x: &TensorView,
    out: &mut TensorViewMut,
    accumulate: bool,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    // Rows may be strided (e.g. the prefix part of every sequence of a concatenated K/V
    // gradient); each row itself is contiguous.
    let (m, n) = dims2("sum_rows x", x.dims())?;
    let (xa, row_stride) = if m <= 1 || x.layout().is_contiguous() {
        (contig("sum_rows x", x, loc)?.0, n)
    } else {
        let row = x.narrow(0, 0, 1)?;
        let a = contig("sum_rows x row", &row, loc)?.0;
        (a, x.strides()[0])
    };
    let oa = output("sum_rows out", out, loc, &[n], None)?;
    let mut p = DenseParams {
        in0: xa,
        out0: oa,
        rows: m as i64,
        cols: n as i64,
        in_dt: code(x.dtype(), "sum_rows x")?,
        out_dt: code(out.dtype(), "sum_rows out")?,
        flags: accumulate as i32,
        ..Default::default()
    };
    p.in_str[0] = row_stride as i64;
    Ok(launch("dense_sum_rows", p, flat_blocks(n, cap), THREADS))
}

/// Strided copy with dtype conversion (`src` and `dst` of the same shape, rank ≤ 6; `src`
/// strides may be 0 to broadcast); with `accumulate`, `dst += src`.
pub fn copy(
    src: &TensorView,
    dst: &mut TensorViewMut,
    accumulate: bool,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    same("copy dst", dst.dims(), src.dims())?;
    for (arg, l) in [("copy src", src.location()), ("copy dst", dst.location())] {
        if l != loc {
            return Err(Error::device(
                arg,
                format!("is on {l}, this device computes on {loc}"),
            ));
        }
    }
    let rank = src.dims().len();
    let mut p = DenseParams {
        in0: src.base_addr(),
        out0: dst.base_addr(),
        in_off: src.layout().offset() as i64,
        out_off: dst.layout().offset() as i64,
        rank: rank as i32,
        flags: accumulate as i32,
        in_dt: code(src.dtype(), "copy src")?,
        out_dt: code(dst.dtype(), "copy dst")?,
        ..Default::default()
    };
    for d in 0..rank {
        p.dims[d] = src.dims()[d] as i64;
        p.in_str[d] = src.strides()[d] as i64;
        p.out_str[d] = dst.strides()[d] as i64;
    }
    Ok(launch(
        "dense_copy",
        p,
        flat_blocks(src.numel(), cap),
        THREADS,
    ))
}

/// `dst` row `i` = `src` row `rows[i]`.
pub fn gather_rows(
    src: &TensorView,
    rows: &[i32],
    dst: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (sa, sd) = contig("gather_rows src", src, loc)?;
    let (m, c) = dims2("gather_rows src", sd)?;
    let da = output("gather_rows dst", dst, loc, &[rows.len(), c], None)?;
    check_rows(rows, m)?;
    gather_launch(sa, src.dtype(), da, dst.dtype(), rows.to_vec(), c, cap)
}

/// `dst` row `rows[i]` = `src` row `i`, other rows of `dst` zero (a gather through the inverse
/// map, so every output row is written once: no races, no separate clear).
pub fn scatter_rows(
    src: &TensorView,
    rows: &[i32],
    dst: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (da, dd) = contig_mut("scatter_rows dst", dst, loc)?;
    let (m, c) = dims2("scatter_rows dst", dd)?;
    let sa = input("scatter_rows src", src, loc, &[rows.len(), c], None)?;
    check_rows(rows, m)?;
    let mut inverse = vec![-1i32; m];
    for (i, &r) in rows.iter().enumerate() {
        inverse[r as usize] = i as i32;
    }
    gather_launch(sa, src.dtype(), da, dst.dtype(), inverse, c, cap)
}

fn gather_launch(
    sa: u64,
    sdt: DType,
    da: u64,
    ddt: DType,
    idx: Vec<i32>,
    c: usize,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let p = DenseParams {
        in0: sa,
        out0: da,
        rows: idx.len() as i64,
        cols: c as i64,
        in_dt: code(sdt, "src")?,
        out_dt: code(ddt, "dst")?,
        ..Default::default()
    };
    let mut l = launch(
        "dense_gather_rows",
        p,
        flat_blocks(idx.len() * c, cap),
        THREADS,
    );
    l.idx = Some(idx);
    Ok(l)
}

/// Token + position embedding.
#[allow(clippy::too_many_arguments)]
pub fn embed(
    ids: &[i32],
    seq_len: usize,
    wte: &TensorView,
    wpe: &TensorView,
    pos_offset: usize,
    out: &mut TensorViewMut,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (ta, td) = contig("wte", wte, loc)?;
    let (pa, pd) = contig("wpe", wpe, loc)?;
    let (oa, od) = contig_mut("embed out", out, loc)?;
    let c = embed_args(ids, seq_len, td, pd, pos_offset, od)?;
    check_dtype("wpe", wpe.dtype(), wte.dtype())?;
    let p = DenseParams {
        in0: ta,
        in1: pa,
        out0: oa,
        rows: ids.len() as i64,
        cols: c as i64,
        in_dt: code(wte.dtype(), "wte")?,
        out_dt: code(out.dtype(), "embed out")?,
        seq_len: seq_len as i32,
        pos_offset: pos_offset as i32,
        ..Default::default()
    };
    let mut l = launch("dense_embed", p, flat_blocks(ids.len() * c, cap), THREADS);
    l.idx = Some(ids.to_vec());
    Ok(l)
}

/// Where the logit gradient of [`cross_entropy`] goes.
pub enum CeGrad<'a, 'b> {
    /// No gradient.
    None,
    /// Into this `[M, V]` buffer.
    Into(&'a mut TensorViewMut<'b>),
    /// Over the logits themselves.
    InPlace,
}

/// Softmax cross-entropy per row (see [`super::Backend::cross_entropy`]).
pub fn cross_entropy(
    logits: &TensorView,
    targets: &[i32],
    losses: &mut TensorViewMut,
    grad: CeGrad,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (la, ld) = contig("logits", logits, loc)?;
    let (sa, sd) = contig_mut("losses", losses, loc)?;
    let (m, v) = cross_entropy_args(ld, targets, sd)?;
    check_dtype("losses", losses.dtype(), DType::F32)?;
    let in_dt = code(logits.dtype(), "logits")?;
    let (out0, out_dt) = match grad {
        CeGrad::None => (0, in_dt),
        CeGrad::InPlace => (la, in_dt),
        CeGrad::Into(d) => {
            let (da, dd) = contig_mut("dlogits", d, loc)?;
            same("dlogits", dd, &[m, v])?;
            (da, code(d.dtype(), "dlogits")?)
        }
    };
    let p = DenseParams {
        in0: la,
        out0,
        out1: sa,
        rows: m as i64,
        cols: v as i64,
        in_dt,
        out_dt,
        ..Default::default()
    };
    let mut l = launch(
        "dense_cross_entropy",
        p,
        (m.max(1)).min(cap.0 as usize) as u32,
        THREADS,
    );
    l.idx = Some(targets.to_vec());
    Ok(l)
}

/// One AdamW update (f32 tensors), with the constants computed as the CPU backend does.
pub fn adamw(
    param: &mut TensorViewMut,
    grad: &TensorView,
    m: &mut TensorViewMut,
    v: &mut TensorViewMut,
    hp: AdamWStep,
    loc: Location,
    cap: GridCap,
) -> Result<DenseLaunch> {
    let (pa, pd) = contig_mut("adamw param", param, loc)?;
    let pd = pd.to_vec();
    let ga = input("adamw grad", grad, loc, &pd, None)?;
    let ma = output("adamw m", m, loc, &pd, None)?;
    let va = output("adamw v", v, loc, &pd, None)?;
    for (arg, dt) in [
        ("adamw param", param.dtype()),
        ("adamw grad", grad.dtype()),
        ("adamw m", m.dtype()),
        ("adamw v", v.dtype()),
    ] {
        check_dtype(arg, dt, DType::F32)?;
    }
    let mut p = DenseParams {
        in0: ga,
        out0: pa,
        out1: ma,
        out2: va,
        rows: 1,
        cols: param.numel() as i64,
        in_dt: 2,
        out_dt: 2,
        ..Default::default()
    };
    p.f = hp.constants();
    Ok(launch(
        "dense_adamw",
        p,
        flat_blocks(param.numel(), cap),
        THREADS,
    ))
}
