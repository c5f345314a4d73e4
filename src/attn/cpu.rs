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
use crate::device::simd;
use crate::error::{Error, Result};
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
    let d = pr.head_dim;
    (0..pr.batch * pr.heads_kv)
        .into_par_iter()
        .try_for_each(|task| -> Result<()> {
            let (b, hkv) = (task / pr.heads_kv, task % pr.heads_kv);
            let kv = gather_keys(args, &pr, b, hkv)?;
            let mut q = vec![0f32; d];
            let mut acc = vec![0f32; d];
            let mut scores = vec![0f32; kv.rows];
            let mut lse_row = vec![f32::NEG_INFINITY; pr.tq];
            for g in 0..pr.group() {
                let h = hkv * pr.group() + g;
                lse_row.fill(f32::NEG_INFINITY);
                for i in 0..pr.tq {
                    acc.fill(0.0);
                    let nkeys = if i < pr.lens_q[b] {
                        kv.prefix_rows + pr.visible_seq_keys(b, i)
                    } else {
                        0
                    };
                    if nkeys > 0 {
                        args.q
                            .read_f32(args.q.layout().index(&[b, i, h, 0]), &mut q)?;
                        let s = &mut scores[..nkeys];
                        for (j, sj) in s.iter_mut().enumerate() {
                            *sj = pr.scale * dot(&q, kv.k_row(j));
                        }
                        let m = simd::max(s);
                        simd::exp_shift(s, m);
                        let l = simd::sum(s);
                        for (j, &p) in s.iter().enumerate() {
                            axpy(&mut acc, p, kv.v_row(j));
                        }
                        let inv = 1.0 / l;
                        acc.iter_mut().for_each(|x| *x *= inv);
                        lse_row[i] = m + l.ln();
                    }
                    // SAFETY: row (b, i, h) belongs to this task alone.
                    unsafe { o.write_row(o.index(&[b, i, h, 0]), &acc) };
                }
                if let Some(lse) = &lse {
                    // SAFETY: lse row (b, h) belongs to this task alone.
                    unsafe { lse.write_row(lse.index(&[b, h, 0]), &lse_row) };
                }
            }
            Ok(())
        })
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
    let partials: Vec<Option<(Vec<f32>, Vec<f32>)>> = (0..pr.batch * pr.heads_kv)
        .into_par_iter()
        .map(|task| -> Result<Option<(Vec<f32>, Vec<f32>)>> {
            let (b, hkv) = (task / pr.heads_kv, task % pr.heads_kv);
            let kv = gather_keys(fwd, &pr, b, hkv)?;
            // Keys this task differentiates: the prefix only, or prefix and sequence.
            let grad_rows = if seq_grads { kv.rows } else { kv.prefix_rows };
            let mut dk = vec![0f32; grad_rows * d];
            let mut dv = vec![0f32; grad_rows * d];
            let (mut q, mut d_o, mut o, mut dq) =
                (vec![0f32; d], vec![0f32; d], vec![0f32; d], vec![0f32; d]);
            let mut lse = [0f32];
            let mut scores = vec![0f32; kv.rows];
            for g in 0..pr.group() {
                let h = hkv * pr.group() + g;
                for i in 0..pr.tq {
                    dq.fill(0.0);
                    let nkeys = if i < pr.lens_q[b] {
                        kv.prefix_rows + pr.visible_seq_keys(b, i)
                    } else {
                        0
                    };
                    let nkeys = nkeys.min(grad_rows);
                    if nkeys > 0 {
                        args.lse
                            .read_f32(args.lse.layout().index(&[b, h, i]), &mut lse)?;
                    }
                    // A row that saw no key in the forward has lse = -inf and no gradient.
                    if nkeys > 0 && lse[0] != f32::NEG_INFINITY {
                        let lse = lse[0];
                        let row = fwd.q.layout().index(&[b, i, h, 0]);
                        fwd.q.read_f32(row, &mut q)?;
                        args.d_o
                            .read_f32(args.d_o.layout().index(&[b, i, h, 0]), &mut d_o)?;
                        args.o
                            .read_f32(args.o.layout().index(&[b, i, h, 0]), &mut o)?;
                        // D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term.
                        let di = dot(&d_o, &o);
                        let probs = &mut scores[..nkeys];
                        for (j, p) in probs.iter_mut().enumerate() {
                            *p = pr.scale * dot(&q, kv.k_row(j));
                        }
                        simd::exp_shift(probs, lse);
                        for (j, &p) in probs.iter().enumerate() {
                            let dp = dot(&d_o, kv.v_row(j));
                            let ds = pr.scale * p * (dp - di);
                            if seq_grads {
                                axpy(&mut dq, ds, kv.k_row(j));
                            }
                            axpy(&mut dk[j * d..(j + 1) * d], ds, &q);
                            axpy(&mut dv[j * d..(j + 1) * d], p, &d_o);
                        }
                    }
                    if let Some(w) = &dq_w {
                        // SAFETY: row (b, i, h) belongs to this task alone.
                        unsafe { w.write_row(w.index(&[b, i, h, 0]), &dq) };
                    }
                }
            }
            if let (Some(dk_w), Some(dv_w)) = (&dk_w, &dv_w) {
                let zero = vec![0f32; d];
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
    d: usize,
    rows: usize,
    prefix_rows: usize,
}

impl KvScratch {
    fn k_row(&self, j: usize) -> &[f32] {
        &self.k[j * self.d..(j + 1) * self.d]
    }
    fn v_row(&self, j: usize) -> &[f32] {
        &self.v[j * self.d..(j + 1) * self.d]
    }
}

fn gather_keys(a: &AttnFwdArgs, pr: &AttnProblem, b: usize, hkv: usize) -> Result<KvScratch> {
    let d = pr.head_dim;
    let prefix_rows = pr.prefix_len_of(b);
    let rows = prefix_rows + pr.lens_k[b];
    let mut s = KvScratch {
        k: vec![0f32; rows * d],
        v: vec![0f32; rows * d],
        d,
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

/// `y += a * x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
