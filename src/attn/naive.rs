//! The naive-concat baseline: what a framework without a fused kernel does.
//!
//! The forward expands each sequence's prefix into a fresh `[B, P + Tk, Hkv, D]` key and
//! value buffer, copies the sequence keys behind it, and runs plain (prefix-free) attention
//! on the concatenation. The backward runs plain attention's backward on the same
//! concatenation, then splits the expanded key/value gradient: the sequence part is copied
//! out, and the prefix part is reduced over the batch. Every byte of the expanded buffers is
//! avoidable traffic; [`extra_bytes`] counts it.
//!
//! With causal masking, bottom-right alignment over the concatenation reproduces the
//! contract exactly when `seqlen_q[b] <= seqlen_k[b]` (training and decoding both satisfy
//! it); for other inputs the concatenation would hide prefix keys, and these functions
//! return an error instead of a different answer.

use super::{cpu, AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, AttnProblem};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Bytes the naive method allocates beyond the fused one: the expanded keys and values,
/// and in the backward their gradients.
pub fn extra_bytes(pr: &AttnProblem, backward: bool) -> usize {
    let kv = 2 * pr.batch * (pr.prefix_len + pr.tk) * pr.heads_kv * pr.head_dim * pr.dtype.size();
    if backward {
        2 * kv
    } else {
        kv
    }
}

/// The concatenated keys and values, and each sequence's concatenated length.
struct Concat {
    k: Tensor,
    v: Tensor,
    lens_k: Vec<i32>,
    lens_q: Vec<i32>,
}

fn concat(args: &AttnFwdArgs, pr: &AttnProblem) -> Result<Concat> {
    if pr.causal {
        if let Some(b) = (0..pr.batch).find(|&b| pr.lens_q[b] > pr.lens_k[b]) {
            return Err(Error::index(
                "seqlen_q",
                format!(
                    "the naive concat baseline needs seqlen_q <= seqlen_k with causal masking, \
                     sequence {b} has {} > {}",
                    pr.lens_q[b], pr.lens_k[b]
                ),
            ));
        }
    }
    let (d, hkv, len) = (pr.head_dim, pr.heads_kv, pr.prefix_len + pr.tk);
    let dims = [pr.batch, len, hkv, d];
    let mut k = Tensor::zeros(&dims, pr.dtype)?;
    let mut v = Tensor::zeros(&dims, pr.dtype)?;
    let mut row = vec![0f32; d];
    let mut lens_k = vec![0i32; pr.batch];
    {
        let mut kw = k.view_mut();
        let mut vw = v.view_mut();
        for b in 0..pr.batch {
            let p = pr.prefix_len_of(b);
            lens_k[b] = (p + pr.lens_k[b]) as i32;
            for h in 0..hkv {
                for j in 0..p + pr.tk {
                    let dst = kw.layout().index(&[b, j, h, 0]);
                    let sources = [
                        (&args.k, args.prefix.map(|p| p.k), &mut kw),
                        (&args.v, args.prefix.map(|p| p.v), &mut vw),
                    ];
                    for (seq, pre, out) in sources {
                        match (pr.prefix_of[b], pre) {
                            (Some(n), Some(pre)) if j < p => {
                                pre.read_f32(pre.layout().index(&[n, j, h, 0]), &mut row)?;
                            }
                            _ if j >= p && j - p < pr.tk => {
                                seq.read_f32(seq.layout().index(&[b, j - p, h, 0]), &mut row)?;
                            }
                            _ => row.fill(0.0),
                        }
                        out.write_f32(dst, &row)?;
                    }
                }
            }
        }
    }
    Ok(Concat {
        k,
        v,
        lens_k,
        lens_q: pr.lens_q.iter().map(|&n| n as i32).collect(),
    })
}

/// Naive forward: expand, concatenate, plain attention.
pub fn forward(args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
    let pr = args.check()?;
    pr.check_fwd_out(&out)?;
    let c = concat(args, &pr)?;
    let plain = AttnFwdArgs::new(args.q, c.k.view(), c.v.view())
        .seqlens(&c.lens_q, &c.lens_k)
        .causal(pr.causal)
        .scale(pr.scale);
    cpu::forward(&plain, out)
}

/// Naive backward: plain attention's backward on the concatenation, then the prefix part of
/// the expanded gradient reduced over the batch (in f32, in batch order).
pub fn backward(args: &AttnBwdArgs, mut grads: AttnGrads) -> Result<()> {
    let pr = args.fwd.check()?;
    pr.check_bwd(args, &grads)?;
    let c = concat(&args.fwd, &pr)?;
    let cat_dims = c.k.dims().to_vec();
    let mut dk_cat = Tensor::zeros(&cat_dims, pr.dtype)?;
    let mut dv_cat = Tensor::zeros(&cat_dims, pr.dtype)?;
    let mut dq_scratch = Tensor::zeros(&pr.q_dims(), pr.dtype)?;
    let plain = AttnBwdArgs {
        fwd: AttnFwdArgs::new(args.fwd.q, c.k.view(), c.v.view())
            .seqlens(&c.lens_q, &c.lens_k)
            .causal(pr.causal)
            .scale(pr.scale),
        prefix_only: false,
        ..*args
    };
    let dq = match grads.dq.as_mut() {
        Some(dq) if !args.prefix_only => dq.reborrow(),
        _ => dq_scratch.view_mut(),
    };
    cpu::backward(
        &plain,
        AttnGrads {
            dq: Some(dq),
            dk: Some(dk_cat.view_mut()),
            dv: Some(dv_cat.view_mut()),
            dk_pre: None,
            dv_pre: None,
        },
    )?;

    let d = pr.head_dim;
    let mut row = vec![0f32; d];
    let (dk_cat, dv_cat) = (dk_cat.view(), dv_cat.view());
    if !args.prefix_only {
        for (cat, out) in [(&dk_cat, grads.dk.as_mut()), (&dv_cat, grads.dv.as_mut())] {
            let Some(out) = out else { continue };
            for b in 0..pr.batch {
                let p = pr.prefix_len_of(b);
                for j in 0..pr.tk {
                    for h in 0..pr.heads_kv {
                        cat.read_f32(cat.layout().index(&[b, p + j, h, 0]), &mut row)?;
                        out.write_f32(out.layout().index(&[b, j, h, 0]), &row)?;
                    }
                }
            }
        }
    }
    let mut sum = vec![0f32; d];
    for (cat, out) in [
        (&dk_cat, grads.dk_pre.as_mut()),
        (&dv_cat, grads.dv_pre.as_mut()),
    ] {
        let Some(out) = out else { continue };
        for n in 0..pr.num_prefixes {
            for j in 0..pr.prefix_len {
                for h in 0..pr.heads_kv {
                    sum.fill(0.0);
                    for b in (0..pr.batch).filter(|&b| pr.prefix_of[b] == Some(n)) {
                        cat.read_f32(cat.layout().index(&[b, j, h, 0]), &mut row)?;
                        sum.iter_mut().zip(&row).for_each(|(s, x)| *s += x);
                    }
                    out.write_f32(out.layout().index(&[n, j, h, 0]), &sum)?;
                }
            }
        }
    }
    Ok(())
}
