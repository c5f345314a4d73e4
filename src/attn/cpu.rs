//! Fused prefix attention on the CPU: the reference backend and the CPU training path.
//!
//! Work is split into one task per `(sequence b, key/value head h)`. A task gathers the keys
//! and values that sequence `b` can see into an f32 scratch laid out `[prefix ; sequence]`
//! (the prefix rows read straight from the prefix table, never copied per batch in memory
//! that outlives the task), so the keys a causal row `i` sees are always rows
//! `0 .. P + visible_seq_keys(b, i)` of the scratch. Every query head of the group then
//! streams its rows through it. Tasks own disjoint output rows; the prefix gradients come
//! back per task and are summed over the batch in a fixed order, so results are
//! deterministic and independent of the thread count.

use super::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, AttnProblem};
use crate::error::{Error, Result};
use crate::simd::{self, multiversion};
use crate::tensor::{Location, RowWriter, TensorView, TensorViewMut};
use rayon::prelude::*;

/// Runs the forward on host tensors.
pub fn forward(args: &AttnFwdArgs, mut out: AttnFwdOut) -> Result<()> {
    let pr = args.check()?;
    pr.check_fwd_out(&out)?;
    require_host(&pr)?;
    let o = out.o.row_writer()?;
    let lse = match out.lse.as_mut() {
        Some(l) => Some(l.row_writer()?),
        None => None,
    };
    (0..pr.batch * pr.heads_kv)
        .into_par_iter()
        .try_for_each(|task| fwd_task(args, &pr, &o, lse.as_ref(), task))
}

multiversion! {
    /// One forward task: sequence `task / Hkv`, key/value head `task % Hkv`, all its query
    /// heads. Per head: `S = (scale Q) Kᵀ` over the keys the sequence can see, a row-wise
    /// softmax over each row's visible prefix of `S` (masked entries are 0), `O = P V`; the
    /// products run through `gemm`. Compiled for AVX2+FMA where the CPU has it.
    fn fwd_task(
        args: &AttnFwdArgs,
        pr: &AttnProblem,
        o: &RowWriter,
        lse: Option<&RowWriter>,
        task: usize,
    ) -> Result<()> {
        let d = pr.head_dim;
        let (b, hkv) = (task / pr.heads_kv, task % pr.heads_kv);
        let kv = gather_keys(args, pr, b, hkv)?;
        let (sq, nk) = (pr.lens_q[b], kv.rows);
        let mut q = vec![0f32; sq * d];
        let mut s = vec![0f32; sq * nk];
        let mut out = vec![0f32; sq * d];
        let mut lse_row = vec![f32::NEG_INFINITY; pr.tq];
        let zero = vec![0f32; d];
        for g in 0..pr.group() {
            let h = hkv * pr.group() + g;
            lse_row.fill(f32::NEG_INFINITY);
            gather_rows(&args.q, b, h, sq, pr.scale, &mut q)?;
            mm(sq, nk, d, &q, false, &kv.k, true, &mut s, false, 1.0);
            for i in 0..sq {
                let n = kv.prefix_rows + pr.visible_seq_keys(b, i);
                let row = &mut s[i * nk..(i + 1) * nk];
                row[n..].fill(0.0);
                if n == 0 {
                    continue;
                }
                let vis = &mut row[..n];
                let m = simd::max(vis);
                simd::exp_shift(vis, m);
                let l = simd::sum(vis);
                let inv = 1.0 / l;
                vis.iter_mut().for_each(|x| *x *= inv);
                lse_row[i] = m + l.ln();
            }
            mm(sq, d, nk, &s, false, &kv.v, false, &mut out, false, 1.0);
            for i in 0..pr.tq {
                let row = if i < sq { &out[i * d..(i + 1) * d] } else { &zero[..] };
                // SAFETY: row (b, i, h) belongs to this task alone.
                unsafe { o.write_row(o.index(&[b, i, h, 0]), row) };
            }
            if let Some(lse) = lse {
                // SAFETY: lse row (b, h) belongs to this task alone.
                unsafe { lse.write_row(lse.index(&[b, h, 0]), &lse_row) };
            }
        }
        Ok(())
    }
}

/// Runs the backward on host tensors.
pub fn backward(args: &AttnBwdArgs, mut grads: AttnGrads) -> Result<()> {
    let fwd = &args.fwd;
    let pr = fwd.check()?;
    pr.check_bwd(args, &grads)?;
    require_host(&pr)?;
    let d = pr.head_dim;
    let seq_grads = !args.prefix_only;
    let (dq_w, dk_w, dv_w) = (
        seq_writer(&mut grads.dq, seq_grads)?,
        seq_writer(&mut grads.dk, seq_grads)?,
        seq_writer(&mut grads.dv, seq_grads)?,
    );

    // Per task: the f32 gradient of its prefix rows, `[P, D]` for keys and for values.
    let partials: Vec<PrefixPartial> = (0..pr.batch * pr.heads_kv)
        .into_par_iter()
        .map(|task| {
            bwd_task(
                args,
                &pr,
                seq_grads,
                [dq_w.as_ref(), dk_w.as_ref(), dv_w.as_ref()],
                task,
            )
        })
        .collect::<Result<_>>()?;

    // Sum each prefix's gradient over the sequences that used it, in batch order.
    let (p, hkvs) = (pr.prefix_len, pr.heads_kv);
    for (which, out) in [(0, grads.dk_pre.as_mut()), (1, grads.dv_pre.as_mut())] {
        let Some(out) = out else { continue };
        let mut sum = vec![0f32; p * d];
        for n in 0..pr.num_prefixes {
            for h in 0..hkvs {
                sum.fill(0.0);
                for b in 0..pr.batch {
                    if pr.prefix_of[b] != Some(n) {
                        continue;
                    }
                    if let Some(part) = &partials[b * hkvs + h] {
                        let part = if which == 0 { &part.0 } else { &part.1 };
                        sum.iter_mut().zip(part).for_each(|(s, x)| *s += x);
                    }
                }
                for j in 0..p {
                    let e = out.layout().index(&[n, j, h, 0]);
                    out.write_f32(e, &sum[j * d..(j + 1) * d])?;
                }
            }
        }
    }
    Ok(())
}

/// The f32 gradient of one task's prefix rows, `[P, D]` for keys and for values.
type PrefixPartial = Option<(Vec<f32>, Vec<f32>)>;

multiversion! {
    /// One backward task: sequence `task / Hkv`, key/value head `task % Hkv`. Recomputes
    /// `P = exp(S - lse)` (masked entries 0), then `dP = dO Vᵀ`, `dS = P ∘ (dP - D)` with
    /// `D = rowsum(dO ∘ O)`, `dQ = scale dS K`, `dK += dSᵀ (scale Q)`, `dV += Pᵀ dO`, all
    /// through `gemm`. With `prefix_only` only the prefix columns are computed. Writes the
    /// task's dQ/dK/dV rows (when `seq_grads`) and returns its prefix-gradient partial.
    fn bwd_task(
        args: &AttnBwdArgs,
        pr: &AttnProblem,
        seq_grads: bool,
        writers: [Option<&RowWriter>; 3],
        task: usize,
    ) -> Result<PrefixPartial> {
        let fwd = &args.fwd;
        let d = pr.head_dim;
        let [dq_w, dk_w, dv_w] = writers;
        let (b, hkv) = (task / pr.heads_kv, task % pr.heads_kv);
        let kv = gather_keys(fwd, pr, b, hkv)?;
        // Keys this task differentiates: the prefix only, or prefix and sequence.
        let nk = if seq_grads { kv.rows } else { kv.prefix_rows };
        let sq = pr.lens_q[b];
        let mut dk = vec![0f32; nk * d];
        let mut dv = vec![0f32; nk * d];
        let (mut q, mut d_o, mut o) = (vec![0f32; sq * d], vec![0f32; sq * d], vec![0f32; sq * d]);
        let mut dq = vec![0f32; sq * d];
        let (mut p, mut ds) = (vec![0f32; sq * nk], vec![0f32; sq * nk]);
        let mut lse = vec![0f32; pr.tq];
        let mut di = vec![0f32; sq];
        let zero = vec![0f32; d];
        for g in 0..pr.group() {
            let h = hkv * pr.group() + g;
            if sq > 0 && nk > 0 {
                gather_rows(&fwd.q, b, h, sq, pr.scale, &mut q)?;
                gather_rows(&args.d_o, b, h, sq, 1.0, &mut d_o)?;
                gather_rows(&args.o, b, h, sq, 1.0, &mut o)?;
                args.lse.read_f32(args.lse.layout().index(&[b, h, 0]), &mut lse)?;
                for i in 0..sq {
                    // D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term.
                    di[i] = dot(&d_o[i * d..(i + 1) * d], &o[i * d..(i + 1) * d]);
                }
                mm(sq, nk, d, &q, false, &kv.k[..nk * d], true, &mut p, false, 1.0);
                mm(sq, nk, d, &d_o, false, &kv.v[..nk * d], true, &mut ds, false, 1.0);
                for i in 0..sq {
                    let n = (kv.prefix_rows + pr.visible_seq_keys(b, i)).min(nk);
                    let (prow, dsrow) = (&mut p[i * nk..(i + 1) * nk], &mut ds[i * nk..(i + 1) * nk]);
                    // A row that saw no key in the forward has lse = -inf and no gradient.
                    let n = if lse[i] == f32::NEG_INFINITY { 0 } else { n };
                    prow[n..].fill(0.0);
                    dsrow[n..].fill(0.0);
                    simd::exp_shift(&mut prow[..n], lse[i]);
                    for (s, &pj) in dsrow[..n].iter_mut().zip(prow[..n].iter()) {
                        *s = pj * (*s - di[i]);
                    }
                }
                if seq_grads {
                    mm(sq, d, nk, &ds, false, &kv.k[..nk * d], false, &mut dq, false, pr.scale);
                }
                mm(nk, d, sq, &ds, true, &q, false, &mut dk, true, 1.0);
                mm(nk, d, sq, &p, true, &d_o, false, &mut dv, true, 1.0);
            }
            if let Some(w) = dq_w {
                for i in 0..pr.tq {
                    let row = if i < sq && nk > 0 { &dq[i * d..(i + 1) * d] } else { &zero[..] };
                    // SAFETY: row (b, i, h) belongs to this task alone.
                    unsafe { w.write_row(w.index(&[b, i, h, 0]), row) };
                }
            }
        }
        if let (Some(dk_w), Some(dv_w)) = (dk_w, dv_w) {
            for j in 0..pr.tk {
                let (kr, vr) = if j < pr.lens_k[b] {
                    let r = kv.prefix_rows + j;
                    (&dk[r * d..(r + 1) * d], &dv[r * d..(r + 1) * d])
                } else {
                    (&zero[..], &zero[..])
                };
                // SAFETY: rows (b, j, hkv) belong to this task alone.
                unsafe {
                    dk_w.write_row(dk_w.index(&[b, j, hkv, 0]), kr);
                    dv_w.write_row(dv_w.index(&[b, j, hkv, 0]), vr);
                }
            }
        }
        if kv.prefix_rows == 0 {
            return Ok(None);
        }
        dk.truncate(kv.prefix_rows * d);
        dv.truncate(kv.prefix_rows * d);
        Ok(Some((dk, dv)))
    }
}

/// Reads rows `0..n` of head `h` of sequence `b` of a `[B, T, H, D]` view into `out [n, D]`,
/// multiplied by `scale`.
fn gather_rows(
    t: &TensorView,
    b: usize,
    h: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let d = out.len() / n.max(1);
    for i in 0..n {
        let row = &mut out[i * d..(i + 1) * d];
        t.read_f32(t.layout().index(&[b, i, h, 0]), row)?;
        if scale != 1.0 {
            row.iter_mut().for_each(|x| *x *= scale);
        }
    }
    Ok(())
}

/// `c [m, n] (+)= alpha · op(a) op(b)` for row-major slices: `op(a)` is `a [m, k]`, or
/// `a [k, m]` transposed; `op(b)` is `b [k, n]`, or `b [n, k]` transposed. Single-threaded:
/// the tasks are the parallelism.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "mm operand sizes"
    );
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every element the strides address; `c` is exclusive.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn seq_writer<'a>(
    t: &'a mut Option<TensorViewMut<'_>>,
    wanted: bool,
) -> Result<Option<RowWriter<'a>>> {
    match t {
        Some(t) if wanted => Ok(Some(t.row_writer()?)),
        _ => Ok(None),
    }
}

fn require_host(pr: &AttnProblem) -> Result<()> {
    if pr.location != Location::Host {
        return Err(Error::device(
            "q",
            format!(
                "the cpu backend needs host tensors, these are on {}",
                pr.location
            ),
        ));
    }
    Ok(())
}

/// The keys and values one sequence and one key/value head can see, in f32, laid out
/// `[prefix rows ; sequence rows]`.
struct KvScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    rows: usize,
    prefix_rows: usize,
}

fn gather_keys(a: &AttnFwdArgs, pr: &AttnProblem, b: usize, hkv: usize) -> Result<KvScratch> {
    let d = pr.head_dim;
    let prefix_rows = pr.prefix_len_of(b);
    let rows = prefix_rows + pr.lens_k[b];
    let mut s = KvScratch {
        k: vec![0f32; rows * d],
        v: vec![0f32; rows * d],
        rows,
        prefix_rows,
    };
    let mut fill = |src_k: &TensorView,
                    src_v: &TensorView,
                    first: usize,
                    n: usize,
                    idx: &dyn Fn(usize) -> [usize; 4]|
     -> Result<()> {
        for j in 0..n {
            let r = first + j;
            src_k.read_f32(src_k.layout().index(&idx(j)), &mut s.k[r * d..(r + 1) * d])?;
            src_v.read_f32(src_v.layout().index(&idx(j)), &mut s.v[r * d..(r + 1) * d])?;
        }
        Ok(())
    };
    if let (Some(n), Some(pre)) = (pr.prefix_of[b], &a.prefix) {
        fill(&pre.k, &pre.v, 0, prefix_rows, &|j| [n, j, hkv, 0])?;
    }
    fill(&a.k, &a.v, prefix_rows, pr.lens_k[b], &|j| [b, j, hkv, 0])?;
    Ok(s)
}

/// Dot product with eight independent partial sums (vectorises, and keeps a fixed order).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = (a.chunks_exact(8), a.chunks_exact(8).remainder());
    let bc = b.chunks_exact(8);
    let br = bc.remainder();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
