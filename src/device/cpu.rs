//! The CPU backend: plain Rust, the reference every other backend is checked against.
//!
//! Dense operations take contiguous f32 host views (the model converts weights to f32 at
//! load); matmuls go through the `gemm` crate, row-wise operations are split over rows with
//! rayon. Attention takes any float dtype and strides (see [`crate::attn::cpu`]).

use super::check::{
    cross_entropy_args, dims2, embed_args, rows_in_range as check_rows, same_shape,
};
use super::packed::PackedWeight;
use super::{small_gemm, AdamWStep, Backend, Device, MatmulOpts};
use crate::attn::paged::PagedAttnArgs;
use crate::attn::{cpu, AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::simd;
use crate::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// The CPU backend (multi-threaded through rayon).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// A process-wide on/off switch read from an environment variable on first use (on unless
/// the variable is `0`) and settable from code.
struct Switch {
    /// 0 = unset (read the environment), 1 = on, 2 = off.
    state: AtomicU8,
    var: &'static str,
}

impl Switch {
    const fn new(var: &'static str) -> Switch {
        Switch {
            state: AtomicU8::new(0),
            var,
        }
    }
    fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
    fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v != "0");
                self.set(on);
                on
            }
        }
    }
}

/// Whether [`CpuBackend::matmul`] may use the small-M fast path.
static SMALL_M_FAST_PATH: Switch = Switch::new("PREFIX_ATTN_CPU_SMALL_M");
/// Whether [`CpuBackend::pack_weight`] packs.
static PACKED_WEIGHTS: Switch = Switch::new("PREFIX_ATTN_CPU_PACKED");

/// Turns the small-M matmul fast path (AVX-512 kernels for `a` with at most 128 rows) on or
/// off for the whole process; it is on by default unless `PREFIX_ATTN_CPU_SMALL_M=0` is set.
/// For benchmarks and comparisons against the `gemm` path: both compute the same product, to
/// f32 rounding.
pub fn set_small_m_fast_path(enabled: bool) {
    SMALL_M_FAST_PATH.set(enabled);
}

/// Whether the small-M matmul fast path is on ([`set_small_m_fast_path`]).
pub fn small_m_fast_path() -> bool {
    SMALL_M_FAST_PATH.get()
}

/// Turns weight packing ([`Backend::pack_weight`]) on or off for the whole process; it is on
/// by default (on CPUs with AVX-512) unless `PREFIX_ATTN_CPU_PACKED=0` is set. Off, models
/// keep no packed copies and multiply their weights in place: half the weight memory, slower
/// decoding. Weights packed before the switch stay packed.
pub fn set_packed_weights(enabled: bool) {
    PACKED_WEIGHTS.set(enabled);
}

/// Whether weight packing is on ([`set_packed_weights`]).
pub fn packed_weights() -> bool {
    PACKED_WEIGHTS.get()
}

/// Up to this many rows of `a`, `a · bᵀ` is computed as `(b · aᵀ)ᵀ` ([`matmul`]'s note).
const SMALL_M: usize = 32;

/// Rows per parallel task for row-wise operations: large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

fn f32_in<'a>(arg: &str, t: &TensorView<'a>) -> Result<&'a [f32]> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            arg: arg.into(),
            expected: "f32 (the cpu backend computes dense ops in f32)".into(),
            got: t.dtype().name().into(),
        });
    }
    t.contiguous_slice::<f32>().map_err(|e| {
        Error::layout(
            arg,
            format!("cpu dense ops need a contiguous host view: {e}"),
        )
    })
}

fn f32_out<'b>(arg: &str, t: &'b mut TensorViewMut) -> Result<&'b mut [f32]> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            arg: arg.into(),
            expected: "f32 (the cpu backend computes dense ops in f32)".into(),
            got: t.dtype().name().into(),
        });
    }
    t.contiguous_slice_mut::<f32>().map_err(|e| {
        Error::layout(
            arg,
            format!("cpu dense ops need a contiguous host view: {e}"),
        )
    })
}

/// A product's optional bias, checked to be `[n]` f32.
fn bias_in<'a>(bias: Option<&TensorView<'a>>, n: usize) -> Result<Option<&'a [f32]>> {
    bias.map(|t| {
        same_shape("matmul bias", t.dims(), &[n])?;
        f32_in("matmul bias", t)
    })
    .transpose()
}

/// The start of a product `out [·, n]`: the bias in every row (or zeros), or, accumulating,
/// the old values plus the bias.
fn init_out(out: &mut [f32], bias: Option<&[f32]>, n: usize, accumulate: bool) {
    if !accumulate {
        match bias {
            Some(bv) => out
                .chunks_exact_mut(n.max(1))
                .for_each(|r| r.copy_from_slice(bv)),
            None => out.fill(0.0),
        }
    } else if let Some(bv) = bias {
        out.chunks_exact_mut(n.max(1))
            .for_each(|r| r.iter_mut().zip(bv).for_each(|(o, b)| *o += b));
    }
}

/// Elements per parallel task for elementwise operations.
const ELEMS_PER_TASK: usize = 16 * 1024;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros(shape, dtype)
    }
    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        Ok(host.clone())
    }
    fn upload_owned(&self, host: Tensor) -> Result<Tensor> {
        if host.location() != Location::Host {
            return self.upload(&host);
        }
        Ok(host)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        if t.location() != Location::Host {
            return Err(Error::device(
                "tensor",
                format!(
                    "lives on {}, the cpu backend reads host tensors",
                    t.location()
                ),
            ));
        }
        Ok(t.clone())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        cpu::forward(args, out)
    }
    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
        cpu::backward(args, grads)
    }
    fn attn_decode(&self, args: &PagedAttnArgs, out: AttnFwdOut) -> Result<()> {
        crate::attn::paged::cpu_forward(args, out)
    }

    fn matmul(
        &self,
        a: &TensorView,
        b: &TensorView,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()> {
        let (ar, ac) = dims2("matmul a", a.dims())?;
        let (br, bc) = dims2("matmul b", b.dims())?;
        let (m, k) = if opts.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if opts.trans_b { (bc, br) } else { (br, bc) };
        if kb != k {
            return Err(Error::shape(
                "matmul b",
                format!("inner dimension {k} to match a {:?}", a.dims()),
                b.dims(),
            ));
        }
        same_shape("matmul out", out.dims(), &[m, n])?;
        let av = f32_in("matmul a", a)?;
        let bv = f32_in("matmul b", b)?;
        let bias = bias_in(bias, n)?;
        let ov = f32_out("matmul out", out)?;
        init_out(ov, bias, n, opts.accumulate);
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        // Few rows against a large matrix (decode steps): the AVX-512 kernels of
        // `small_gemm`, which read `b` in place instead of packing it (1.0–1.6× faster than
        // `gemm` on `[K, N]` weights, 1.5–3× on the output head at M = 2–16; see
        // docs/ARCHITECTURE.md). Other CPUs, shapes and layouts fall through to `gemm`.
        if !opts.trans_a
            && small_gemm::preferred(m, n, k, opts.trans_b)
            && small_m_fast_path()
            && small_gemm::matmul_small_m(m, n, k, av, bv, opts.trans_b, opts.alpha, ov)
        {
            return Ok(());
        }
        // Row-major strides: element (i, j) of a [r, c] matrix is at i * c + j.
        let (a_rs, a_cs) = if opts.trans_a {
            (1, ac as isize)
        } else {
            (ac as isize, 1)
        };
        let (b_rs, b_cs) = if opts.trans_b {
            (1, bc as isize)
        } else {
            (bc as isize, 1)
        };
        let threads = rayon::current_num_threads();
        let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // A few rows against a transposed wide matrix (a decode step's tokens against the tied
        // output embedding `wte [V, C]`): computed as `outᵀ = b · aᵀ` with the wide matrix as
        // the left operand, which the GEMM streams instead of packing all of it first (2×
        // faster at V = 50,257, 16 rows). Same sums, other loop order.
        if opts.trans_b && !opts.trans_a && m <= SMALL_M && n > 4 * SMALL_M {
            // out[i, j] = sum_k b[j, k] a[i, k]: dst (j, i) at i*n + j; lhs b [n, k]; rhs a
            // viewed as [k, m].
            // SAFETY: the same three matrices as below, described by swapped strides.
            unsafe {
                gemm::gemm(
                    n,
                    m,
                    k,
                    ov.as_mut_ptr(),
                    n as isize,
                    1,
                    true,
                    bv.as_ptr(),
                    1,
                    bc as isize,
                    av.as_ptr(),
                    ac as isize,
                    1,
                    1.0f32,
                    opts.alpha,
                    false,
                    false,
                    false,
                    par,
                );
            }
            return Ok(());
        }

        // SAFETY: the slices hold exactly the [m,k], [k,n], [m,n] matrices described by the
        // strides (checked above); `ov` is exclusively borrowed and distinct from the inputs.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                ov.as_mut_ptr(),
                1,
                n as isize,
                true,
                av.as_ptr(),
                a_cs,
                a_rs,
                bv.as_ptr(),
                b_cs,
                b_rs,
                1.0f32,
                opts.alpha,
                false,
                false,
                false,
                par,
            );
        }
        Ok(())
    }

    fn packs_weights(&self) -> bool {
        packed_weights() && small_gemm::available()
    }

    fn pack_weight(&self, w: &TensorView, trans: bool, what: &str) -> Result<Option<PackedWeight>> {
        if !self.packs_weights() {
            return Ok(None);
        }
        let (r, c) = dims2(what, w.dims())?;
        let (k, n) = if trans { (c, r) } else { (r, c) };
        if k == 0 || n == 0 {
            return Ok(None);
        }
        PackedWeight::new(what, f32_in(what, w)?, k, n, trans).map(Some)
    }

    fn matmul_packed(
        &self,
        a: &TensorView,
        w: &PackedWeight,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        accumulate: bool,
    ) -> Result<()> {
        let (m, k) = dims2("matmul a", a.dims())?;
        let n = w.n();
        if k != w.k() {
            return Err(Error::shape(
                "matmul a",
                format!("[M, {}] (the packed weight is {w:?})", w.k()),
                a.dims(),
            ));
        }
        same_shape("matmul out", out.dims(), &[m, n])?;
        let av = f32_in("matmul a", a)?;
        let bias = bias_in(bias, n)?;
        let ov = f32_out("matmul out", out)?;
        init_out(ov, bias, n, accumulate);
        if small_gemm::matmul_packed(m, av, w, ov) {
            Ok(())
        } else {
            Err(Error::Unsupported(
                "matmul_packed: this CPU lacks AVX-512F, which packed weights need".into(),
            ))
        }
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
        let (m, c) = dims2("layernorm x", x.dims())?;
        same_shape("layernorm weight", weight.dims(), &[c])?;
        same_shape("layernorm bias", bias.dims(), &[c])?;
        same_shape("layernorm out", out.dims(), &[m, c])?;
        same_shape("layernorm mean", mean.dims(), &[m])?;
        same_shape("layernorm rstd", rstd.dims(), &[m])?;
        let (xv, w, b) = (
            f32_in("layernorm x", x)?,
            f32_in("layernorm weight", weight)?,
            f32_in("layernorm bias", bias)?,
        );
        let (ov, mv, rv) = (
            f32_out("layernorm out", out)?,
            f32_out("layernorm mean", mean)?,
            f32_out("layernorm rstd", rstd)?,
        );
        if c == 0 {
            return Ok(());
        }
        ov.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(mv.par_chunks_mut(ROWS_PER_TASK))
            .zip(rv.par_chunks_mut(ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, ((orows, ms), rs))| {
                for (r, orow) in orows.chunks_exact_mut(c).enumerate() {
                    let row = task * ROWS_PER_TASK + r;
                    let xr = &xv[row * c..(row + 1) * c];
                    let mu = xr.iter().sum::<f32>() / c as f32;
                    let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
                    let rs_ = 1.0 / (var + eps).sqrt();
                    for j in 0..c {
                        orow[j] = (xr[j] - mu) * rs_ * w[j] + b[j];
                    }
                    ms[r] = mu;
                    rs[r] = rs_;
                }
            });
        Ok(())
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
        let (m, c) = dims2("layernorm_bwd x", x.dims())?;
        same_shape("layernorm_bwd dy", dy.dims(), &[m, c])?;
        same_shape("layernorm_bwd weight", weight.dims(), &[c])?;
        same_shape("layernorm_bwd mean", mean.dims(), &[m])?;
        same_shape("layernorm_bwd rstd", rstd.dims(), &[m])?;
        same_shape("layernorm_bwd dx", dx.dims(), &[m, c])?;
        let (dyv, xv, w, mv, rv) = (
            f32_in("layernorm_bwd dy", dy)?,
            f32_in("layernorm_bwd x", x)?,
            f32_in("layernorm_bwd weight", weight)?,
            f32_in("layernorm_bwd mean", mean)?,
            f32_in("layernorm_bwd rstd", rstd)?,
        );
        let dxv = f32_out("layernorm_bwd dx", dx)?;
        if c == 0 {
            return Ok(());
        }
        dxv.par_chunks_mut(c).enumerate().for_each(|(row, dxr)| {
            let (xr, dyr) = (&xv[row * c..(row + 1) * c], &dyv[row * c..(row + 1) * c]);
            let (mu, rs) = (mv[row], rv[row]);
            // With xhat = (x - mu) rstd and g = dy * w:
            // dx = rstd (g - mean(g) - xhat mean(g xhat)).
            let mut mg = 0f32;
            let mut mgx = 0f32;
            for j in 0..c {
                let g = dyr[j] * w[j];
                mg += g;
                mgx += g * (xr[j] - mu) * rs;
            }
            mg /= c as f32;
            mgx /= c as f32;
            for j in 0..c {
                let xhat = (xr[j] - mu) * rs;
                let v = rs * (dyr[j] * w[j] - mg - xhat * mgx);
                if accumulate {
                    dxr[j] += v;
                } else {
                    dxr[j] = v;
                }
            }
        });
        Ok(())
    }

    fn gelu(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        same_shape("gelu out", out.dims(), x.dims())?;
        let xv = f32_in("gelu x", x)?;
        let ov = f32_out("gelu out", out)?;
        ov.par_chunks_mut(ELEMS_PER_TASK)
            .zip(xv.par_chunks(ELEMS_PER_TASK))
            .for_each(|(o, x)| simd::gelu(x, o));
        Ok(())
    }

    fn bias_gelu(
        &self,
        h: &mut TensorViewMut,
        bias: &TensorView,
        out: &mut TensorViewMut,
    ) -> Result<()> {
        let (_, n) = dims2("bias_gelu h", h.dims())?;
        same_shape("bias_gelu bias", bias.dims(), &[n])?;
        same_shape("bias_gelu out", out.dims(), h.dims())?;
        let b = f32_in("bias_gelu bias", bias)?;
        let hv = f32_out("bias_gelu h", h)?;
        let ov = f32_out("bias_gelu out", out)?;
        if n == 0 {
            return Ok(());
        }
        let rows = (ELEMS_PER_TASK / n).max(1) * n;
        hv.par_chunks_mut(rows)
            .zip(ov.par_chunks_mut(rows))
            .for_each(|(h, o)| {
                for r in h.chunks_exact_mut(n) {
                    r.iter_mut().zip(b).for_each(|(x, b)| *x += b);
                }
                simd::gelu(h, o);
            });
        Ok(())
    }

    fn bias_residual(
        &self,
        out: &mut TensorViewMut,
        bias: &TensorView,
        residual: &TensorView,
    ) -> Result<()> {
        let (_, n) = dims2("bias_residual out", out.dims())?;
        same_shape("bias_residual bias", bias.dims(), &[n])?;
        same_shape("bias_residual residual", residual.dims(), out.dims())?;
        let b = f32_in("bias_residual bias", bias)?;
        let rv = f32_in("bias_residual residual", residual)?;
        let ov = f32_out("bias_residual out", out)?;
        if n == 0 {
            return Ok(());
        }
        let rows = (ELEMS_PER_TASK / n).max(1) * n;
        ov.par_chunks_mut(rows)
            .zip(rv.par_chunks(rows))
            .for_each(|(o, r)| {
                for (orow, rrow) in o.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                    for j in 0..n {
                        orow[j] += b[j] + rrow[j];
                    }
                }
            });
        Ok(())
    }

    fn gelu_bwd(&self, x: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()> {
        same_shape("gelu_bwd dy", dy.dims(), x.dims())?;
        same_shape("gelu_bwd dx", dx.dims(), x.dims())?;
        let (xv, dyv) = (f32_in("gelu_bwd x", x)?, f32_in("gelu_bwd dy", dy)?);
        let dxv = f32_out("gelu_bwd dx", dx)?;
        dxv.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                xv.par_chunks(ELEMS_PER_TASK)
                    .zip(dyv.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(d, (x, g))| simd::gelu_bwd(x, g, d));
        Ok(())
    }

    fn tanh(&self, x: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        same_shape("tanh out", out.dims(), x.dims())?;
        let xv = f32_in("tanh x", x)?;
        let ov = f32_out("tanh out", out)?;
        simd::tanh_slice(xv, ov);
        Ok(())
    }

    fn tanh_bwd(&self, y: &TensorView, dy: &TensorView, dx: &mut TensorViewMut) -> Result<()> {
        same_shape("tanh_bwd dy", dy.dims(), y.dims())?;
        same_shape("tanh_bwd dx", dx.dims(), y.dims())?;
        let (yv, dyv) = (f32_in("tanh_bwd y", y)?, f32_in("tanh_bwd dy", dy)?);
        let dxv = f32_out("tanh_bwd dx", dx)?;
        for ((d, y), g) in dxv.iter_mut().zip(yv).zip(dyv) {
            *d = (1.0 - y * y) * g;
        }
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut TensorViewMut,
        grad: &TensorView,
        m: &mut TensorViewMut,
        v: &mut TensorViewMut,
        hp: AdamWStep,
    ) -> Result<()> {
        same_shape("adamw grad", grad.dims(), param.dims())?;
        same_shape("adamw m", m.dims(), param.dims())?;
        same_shape("adamw v", v.dims(), param.dims())?;
        let g = f32_in("adamw grad", grad)?;
        let (p, mv, vv) = (
            f32_out("adamw param", param)?,
            f32_out("adamw m", m)?,
            f32_out("adamw v", v)?,
        );
        // The order of operations follows torch's single-tensor AdamW: scalars are computed in
        // f64 (Python floats there), the tensor arithmetic in f32.
        let [decay, one_b1, b2, one_b2, step_size, bc2_sqrt, eps, _] = hp.constants();
        for i in 0..p.len() {
            p[i] *= decay;
            mv[i] += (g[i] - mv[i]) * one_b1;
            vv[i] = vv[i] * b2 + one_b2 * g[i] * g[i];
            let denom = vv[i].sqrt() / bc2_sqrt + eps;
            p[i] -= step_size * mv[i] / denom;
        }
        Ok(())
    }

    fn axpy(&self, y: &mut TensorViewMut, alpha: f32, x: &TensorView) -> Result<()> {
        same_shape("axpy x", x.dims(), y.dims())?;
        let xv = f32_in("axpy x", x)?;
        let yv = f32_out("axpy y", y)?;
        yv.iter_mut().zip(xv).for_each(|(y, x)| *y += alpha * x);
        Ok(())
    }

    fn scale(&self, x: &mut TensorViewMut, alpha: f32) -> Result<()> {
        f32_out("scale x", x)?.iter_mut().for_each(|v| *v *= alpha);
        Ok(())
    }

    fn add_assign(&self, out: &mut TensorViewMut, x: &TensorView) -> Result<()> {
        same_shape("add_assign x", x.dims(), out.dims())?;
        let xv = f32_in("add_assign x", x)?;
        let ov = f32_out("add_assign out", out)?;
        ov.par_chunks_mut(4096)
            .zip(xv.par_chunks(4096))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o += x));
        Ok(())
    }

    fn sum_rows(&self, x: &TensorView, out: &mut TensorViewMut, accumulate: bool) -> Result<()> {
        let (_, n) = dims2("sum_rows x", x.dims())?;
        same_shape("sum_rows out", out.dims(), &[n])?;
        // Like the kernels, rows may be strided and 16-bit (the prefix part of every
        // sequence of a concatenated K/V gradient): those are gathered into f32 first.
        let gathered;
        let xv = if x.dtype() == DType::F32 && x.layout().is_contiguous() {
            f32_in("sum_rows x", x)?
        } else {
            let mut buf = vec![0f32; x.numel()];
            x.gather_f32(&mut buf)?;
            gathered = buf;
            &gathered
        };
        let ov = f32_out("sum_rows out", out)?;
        if !accumulate {
            ov.fill(0.0);
        }
        if n > 0 {
            for row in xv.chunks_exact(n) {
                ov.iter_mut().zip(row).for_each(|(o, x)| *o += x);
            }
        }
        Ok(())
    }

    fn copy(&self, src: &TensorView, dst: &mut TensorViewMut) -> Result<()> {
        same_shape("copy dst", dst.dims(), src.dims())?;
        let mut buf = vec![0f32; src.numel()];
        src.gather_f32(&mut buf)?;
        dst.scatter_f32(&buf)
    }

    fn gather_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()> {
        let (m, c) = dims2("gather_rows src", src.dims())?;
        same_shape("gather_rows dst", dst.dims(), &[rows.len(), c])?;
        check_rows(rows, m)?;
        let sv = f32_in("gather_rows src", src)?;
        let dv = f32_out("gather_rows dst", dst)?;
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            dv[i * c..(i + 1) * c].copy_from_slice(&sv[r * c..(r + 1) * c]);
        }
        Ok(())
    }

    fn scatter_rows(&self, src: &TensorView, rows: &[i32], dst: &mut TensorViewMut) -> Result<()> {
        let (m, c) = dims2("scatter_rows dst", dst.dims())?;
        same_shape("scatter_rows src", src.dims(), &[rows.len(), c])?;
        check_rows(rows, m)?;
        let sv = f32_in("scatter_rows src", src)?;
        let dv = f32_out("scatter_rows dst", dst)?;
        dv.fill(0.0);
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            dv[r * c..(r + 1) * c].copy_from_slice(&sv[i * c..(i + 1) * c]);
        }
        Ok(())
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
        let c = embed_args(ids, seq_len, wte.dims(), wpe.dims(), pos_offset, out.dims())?;
        let (te, pe) = (f32_in("wte", wte)?, f32_in("wpe", wpe)?);
        let ov = f32_out("embed out", out)?;
        for (r, row) in ov.chunks_exact_mut(c.max(1)).enumerate() {
            let id = ids[r] as usize;
            let pos = pos_offset + r % seq_len;
            for j in 0..c {
                row[j] = te[id * c + j] + pe[pos * c + j];
            }
        }
        Ok(())
    }

    fn cross_entropy_inplace(
        &self,
        logits: &mut TensorViewMut,
        targets: &[i32],
        losses: &mut TensorViewMut,
    ) -> Result<()> {
        let mut src = Tensor::zeros(logits.dims(), logits.dtype())?;
        self.copy(&logits.as_view(), &mut src.view_mut())?;
        self.cross_entropy(&src.view(), targets, losses, Some(logits))
    }

    fn cross_entropy(
        &self,
        logits: &TensorView,
        targets: &[i32],
        losses: &mut TensorViewMut,
        dlogits: Option<&mut TensorViewMut>,
    ) -> Result<()> {
        let (m, v) = cross_entropy_args(logits.dims(), targets, losses.dims())?;
        let lv = f32_in("logits", logits)?;
        let loss = f32_out("losses", losses)?;
        let dl = match dlogits {
            Some(d) => {
                same_shape("dlogits", d.dims(), &[m, v])?;
                Some(f32_out("dlogits", d)?)
            }
            None => None,
        };
        let row_loss = |r: usize, d: Option<&mut [f32]>, scratch: &mut Vec<f32>| -> f32 {
            let t = targets[r];
            let row = &lv[r * v..(r + 1) * v];
            if t == -100 {
                if let Some(d) = d {
                    d.fill(0.0);
                }
                return 0.0;
            }
            let mx = simd::max(row);
            // exp(x - max) once, into the gradient row when there is one.
            let e: &mut [f32] = match d {
                Some(d) => d,
                None => {
                    scratch.resize(v, 0.0);
                    &mut scratch[..]
                }
            };
            e.copy_from_slice(row);
            simd::exp_shift(e, mx);
            let sum = simd::sum(e);
            let inv = 1.0 / sum;
            e.iter_mut().for_each(|x| *x *= inv);
            e[t as usize] -= 1.0;
            mx + sum.ln() - row[t as usize]
        };
        match dl {
            Some(d) if v > 0 => d
                .par_chunks_mut(v)
                .zip(loss.par_iter_mut())
                .enumerate()
                .for_each_init(Vec::new, |s, (r, (d, l))| *l = row_loss(r, Some(d), s)),
            _ => loss
                .par_iter_mut()
                .enumerate()
                .for_each_init(Vec::new, |s, (r, l)| *l = row_loss(r, None, s)),
        }
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &TensorView,
        weight: &TensorView,
        eps: f32,
        out: &mut TensorViewMut,
        rstd: &mut TensorViewMut,
    ) -> Result<()> {
        let (m, c) = dims2("rmsnorm x", x.dims())?;
        same_shape("rmsnorm weight", weight.dims(), &[c])?;
        same_shape("rmsnorm out", out.dims(), &[m, c])?;
        same_shape("rmsnorm rstd", rstd.dims(), &[m])?;
        let (xv, w) = (f32_in("rmsnorm x", x)?, f32_in("rmsnorm weight", weight)?);
        let (ov, rv) = (f32_out("rmsnorm out", out)?, f32_out("rmsnorm rstd", rstd)?);
        if c == 0 {
            return Ok(());
        }
        ov.par_chunks_mut(c)
            .zip(rv.par_iter_mut())
            .enumerate()
            .for_each(|(row, (orow, r))| {
                let xr = &xv[row * c..(row + 1) * c];
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for j in 0..c {
                    orow[j] = w[j] * (xr[j] * *r);
                }
            });
        Ok(())
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
        let (m, c) = dims2("rmsnorm_bwd x", x.dims())?;
        same_shape("rmsnorm_bwd dy", dy.dims(), &[m, c])?;
        same_shape("rmsnorm_bwd weight", weight.dims(), &[c])?;
        same_shape("rmsnorm_bwd rstd", rstd.dims(), &[m])?;
        same_shape("rmsnorm_bwd dx", dx.dims(), &[m, c])?;
        let (dyv, xv, w, rv) = (
            f32_in("rmsnorm_bwd dy", dy)?,
            f32_in("rmsnorm_bwd x", x)?,
            f32_in("rmsnorm_bwd weight", weight)?,
            f32_in("rmsnorm_bwd rstd", rstd)?,
        );
        let dxv = f32_out("rmsnorm_bwd dx", dx)?;
        if c == 0 {
            return Ok(());
        }
        dxv.par_chunks_mut(c).enumerate().for_each(|(row, dxr)| {
            let (xr, dyr) = (&xv[row * c..(row + 1) * c], &dyv[row * c..(row + 1) * c]);
            let rs = rv[row];
            // y = w x rs, rs = (mean(x²) + eps)^(-1/2): dx = rs g - x rs³ mean(g x), g = w dy.
            let mgx = (0..c).map(|j| w[j] * dyr[j] * xr[j]).sum::<f32>() / c as f32;
            let k = rs * rs * rs * mgx;
            for j in 0..c {
                let v = rs * w[j] * dyr[j] - xr[j] * k;
                if accumulate {
                    dxr[j] += v;
                } else {
                    dxr[j] = v;
                }
            }
        });
        Ok(())
    }

    fn rope(&self, x: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        rope_rotate("rope", x, cos, sin, 1.0)
    }

    fn rope_bwd(&self, dx: &mut TensorViewMut, cos: &TensorView, sin: &TensorView) -> Result<()> {
        rope_rotate("rope_bwd", dx, cos, sin, -1.0)
    }

    fn swiglu(&self, gate: &TensorView, up: &TensorView, out: &mut TensorViewMut) -> Result<()> {
        dims2("swiglu gate", gate.dims())?;
        same_shape("swiglu up", up.dims(), gate.dims())?;
        same_shape("swiglu out", out.dims(), gate.dims())?;
        let (gv, uv) = (f32_in("swiglu gate", gate)?, f32_in("swiglu up", up)?);
        let ov = f32_out("swiglu out", out)?;
        ov.par_chunks_mut(ELEMS_PER_TASK)
            .zip(
                gv.par_chunks(ELEMS_PER_TASK)
                    .zip(uv.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(o, (g, u))| {
                for i in 0..o.len() {
                    o[i] = silu(g[i]) * u[i];
                }
            });
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        gate: &TensorView,
        up: &TensorView,
        dy: &TensorView,
        d_gate: &mut TensorViewMut,
        d_up: &mut TensorViewMut,
    ) -> Result<()> {
        dims2("swiglu_bwd gate", gate.dims())?;
        same_shape("swiglu_bwd up", up.dims(), gate.dims())?;
        same_shape("swiglu_bwd dy", dy.dims(), gate.dims())?;
        same_shape("swiglu_bwd d_gate", d_gate.dims(), gate.dims())?;
        same_shape("swiglu_bwd d_up", d_up.dims(), gate.dims())?;
        let (gv, uv, dyv) = (
            f32_in("swiglu_bwd gate", gate)?,
            f32_in("swiglu_bwd up", up)?,
            f32_in("swiglu_bwd dy", dy)?,
        );
        let dgv = f32_out("swiglu_bwd d_gate", d_gate)?;
        let duv = f32_out("swiglu_bwd d_up", d_up)?;
        dgv.par_chunks_mut(ELEMS_PER_TASK)
            .zip(duv.par_chunks_mut(ELEMS_PER_TASK))
            .enumerate()
            .for_each(|(task, (dg, du))| {
                let base = task * ELEMS_PER_TASK;
                for i in 0..dg.len() {
                    let (g, u, d) = (gv[base + i], uv[base + i], dyv[base + i]);
                    let s = 1.0 / (1.0 + (-g).exp());
                    du[i] = d * g * s;
                    dg[i] = d * u * s * (1.0 + g * (1.0 - s));
                }
            });
        Ok(())
    }
}

/// `x · σ(x)`.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The rotate-half rotation of [`Backend::rope`] on `x [B, T, H, D]` by `sign ·` the angles
/// of `cos, sin [T, D/2]` (`sign = -1`: the backward).
fn rope_rotate(
    op: &str,
    x: &mut TensorViewMut,
    cos: &TensorView,
    sin: &TensorView,
    sign: f32,
) -> Result<()> {
    let (b, t, h, d) = match x.dims() {
        [b, t, h, d] if d % 2 == 0 => (*b, *t, *h, *d),
        other => {
            return Err(Error::shape(
                &format!("{op} x"),
                "[B, T, H, D] with D even",
                other,
            ))
        }
    };
    let half = d / 2;
    // Tables shared by the batch repeat every T rows; per-sequence tables never repeat.
    let period = if cos.dims() == [b, t, half] {
        b * t
    } else {
        same_shape(&format!("{op} cos"), cos.dims(), &[t, half])?;
        t
    };
    same_shape(&format!("{op} sin"), sin.dims(), cos.dims())?;
    let (cv, sv) = (f32_in("rope cos", cos)?, f32_in("rope sin", sin)?);
    let xv = f32_out("rope x", x)?;
    if d == 0 || h == 0 {
        return Ok(());
    }
    // One chunk per (b, t) row of H heads.
    xv.par_chunks_mut(h * d).enumerate().for_each(|(bt, row)| {
        let tt = bt % period.max(1);
        let (c, s) = (
            &cv[tt * half..(tt + 1) * half],
            &sv[tt * half..(tt + 1) * half],
        );
        for head in row.chunks_exact_mut(d) {
            let (lo, hi) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b, sj) = (lo[j], hi[j], sign * s[j]);
                lo[j] = a * c[j] - b * sj;
                hi[j] = b * c[j] + a * sj;
            }
        }
    });
    Ok(())
}
