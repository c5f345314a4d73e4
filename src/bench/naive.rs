//! The naive-concat baseline: what a framework without a fused kernel does, on any backend.
//!
//! The forward expands each sequence's prefix into a `[B, P + Tk, Hkv, D]` key and value
//! buffer, copies the sequence keys behind it, and runs the backend's plain (prefix-free)
//! attention on the concatenation. The backward runs plain attention's backward on the same
//! concatenation, then splits the expanded key/value gradient: the sequence part is copied
//! out, and the prefix part is reduced over the batch (in f32, in batch order). Every byte of
//! the expanded buffers is avoidable traffic; [`extra_bytes`] counts it.
//!
//! Everything goes through [`Backend`] primitives (strided copies, attention, row sums), so
//! the same code is the baseline on the cpu, the emulator and a GPU. [`NaiveConcat`] holds
//! the expanded buffers, allocated once, so that a benchmark times the method and not the
//! allocator; [`forward`] and [`backward`] are one-shot calls for tests and checks.
//!
//! With causal masking, bottom-right alignment over the concatenation reproduces the
//! contract exactly when `seqlen_q[b] <= seqlen_k[b]` (training and decoding both satisfy
//! it); for other inputs the concatenation would hide prefix keys, and these functions
//! return an error instead of a different answer.

use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, AttnProblem};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};

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

/// The expanded buffers of one problem size, on one backend.
pub struct NaiveConcat {
    /// `[B, P + Tk, Hkv, D]` keys, then values.
    k: Tensor,
    v: Tensor,
    /// Their gradients.
    dk: Tensor,
    dv: Tensor,
    /// `dQ` when the caller does not want it (prefix-only backward).
    dq: Tensor,
    /// Zeros `[P, Hkv, D]` f32: the gradient of a prefix that no sequence uses.
    zero_pre: Tensor,
    /// The problem the concatenation currently holds (set by [`NaiveConcat::forward`]).
    held: Option<AttnProblem>,
}

impl NaiveConcat {
    /// Allocates the buffers for problems of `pr`'s sizes and dtype on `be`.
    pub fn new(be: &dyn Backend, pr: &AttnProblem) -> Result<NaiveConcat> {
        let cat = [pr.batch, pr.prefix_len + pr.tk, pr.heads_kv, pr.head_dim];
        let pre = [pr.prefix_len, pr.heads_kv, pr.head_dim];
        Ok(NaiveConcat {
            k: be.zeros(&cat, pr.dtype)?,
            v: be.zeros(&cat, pr.dtype)?,
            dk: be.zeros(&cat, pr.dtype)?,
            dv: be.zeros(&cat, pr.dtype)?,
            dq: be.zeros(&pr.q_dims(), pr.dtype)?,
            zero_pre: be.zeros(&pre, DType::F32)?,
            held: None,
        })
    }

    /// Refuses problems these buffers were not made for, and those the concatenation cannot
    /// express.
    fn fit(&self, pr: &AttnProblem) -> Result<()> {
        let want = [pr.batch, pr.prefix_len + pr.tk, pr.heads_kv, pr.head_dim];
        if self.k.dims() != want || self.k.dtype() != pr.dtype || self.dq.dims() != pr.q_dims() {
            return Err(Error::shape(
                "naive concat buffers",
                format!(
                    "[B, P + Tk, Hkv, D] = {want:?} in {} with q {:?}",
                    pr.dtype,
                    pr.q_dims()
                ),
                self.k.dims(),
            ));
        }
        if !pr.meta_on_host {
            return Err(Error::index(
                "seqlens",
                "the naive concat baseline needs host metadata (it copies per sequence)",
            ));
        }
        if pr.causal {
            if let Some(b) = (0..pr.batch).find(|&b| pr.lens_q[b] > pr.lens_k[b]) {
                return Err(Error::index(
                    "seqlen_q",
                    format!(
                        "the naive concat baseline needs seqlen_q <= seqlen_k with causal \
                         masking, sequence {b} has {} > {}",
                        pr.lens_q[b], pr.lens_k[b]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The plain attention arguments over the concatenation, and its per-sequence lengths.
    fn plain<'a>(
        &'a self,
        args: &AttnFwdArgs<'a>,
        pr: &AttnProblem,
        lens: &'a (Vec<i32>, Vec<i32>),
    ) -> AttnFwdArgs<'a> {
        AttnFwdArgs::new(args.q, self.k.view(), self.v.view())
            .seqlens(&lens.0, &lens.1)
            .causal(pr.causal)
            .scale(pr.scale)
    }

    /// Writes `[prefix ; sequence]` of every sequence into the key and value buffers. When
    /// every sequence uses the same full prefix (training's shape) the prefix is one
    /// broadcast copy and the sequences one strided copy, as a framework would issue them.
    fn concat(&mut self, be: &dyn Backend, args: &AttnFwdArgs, pr: &AttnProblem) -> Result<()> {
        let (b, p, tk) = (pr.batch, pr.prefix_len, pr.tk);
        let shared = shared_prefix(pr);
        let pre = args.prefix.map(|t| (t.k, t.v));
        for (seq, pre, cat) in [
            (&args.k, pre.map(|t| t.0), &mut self.k),
            (&args.v, pre.map(|t| t.1), &mut self.v),
        ] {
            match (shared, pre) {
                (Some(n), Some(pre)) => {
                    let mut st = pre.strides().to_vec();
                    st[0] = 0;
                    let at = pre.layout().index(&[n, 0, 0, 0]);
                    let bcast = pre.as_strided(&[b, p, pr.heads_kv, pr.head_dim], &st, at)?;
                    be.copy(&bcast, &mut cat.view_mut().narrow(1, 0, p)?)?;
                    be.copy(seq, &mut cat.view_mut().narrow(1, p, tk)?)?;
                }
                _ => {
                    for i in 0..b {
                        let pi = pr.prefix_len_of(i);
                        if let (Some(n), Some(pre)) = (pr.prefix_of[i], pre) {
                            let src = pre.narrow(0, n, 1)?;
                            let mut dst = cat.view_mut().narrow(0, i, 1)?.narrow(1, 0, pi)?;
                            be.copy(&src, &mut dst)?;
                        }
                        let mut dst = cat.view_mut().narrow(0, i, 1)?.narrow(1, pi, tk)?;
                        be.copy(&seq.narrow(0, i, 1)?, &mut dst)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Naive forward: expand, concatenate, plain attention. The concatenation stays held for
    /// [`NaiveConcat::backward`], as a framework's autograd keeps it.
    pub fn forward(&mut self, be: &dyn Backend, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        let pr = args.check()?;
        pr.check_fwd_out(&out)?;
        self.fit(&pr)?;
        self.held = None;
        self.concat(be, args, &pr)?;
        let lens = cat_lens(&pr);
        be.attn_fwd(&self.plain(args, &pr, &lens), out)?;
        self.held = Some(pr);
        Ok(())
    }

    /// Naive backward over the concatenation held from the last [`NaiveConcat::forward`]
    /// (which must have run on the same inputs: the problem is checked, the data cannot be):
    /// plain attention's backward, then the sequence part of the expanded gradient copied
    /// out and its prefix part reduced over the batch.
    pub fn backward(
        &mut self,
        be: &dyn Backend,
        args: &AttnBwdArgs,
        grads: AttnGrads,
    ) -> Result<()> {
        let pr = args.fwd.check()?;
        pr.check_bwd(args, &grads)?;
        self.fit(&pr)?;
        if self.held.as_ref() != Some(&pr) {
            return Err(Error::index(
                "naive concat backward",
                "needs the forward of the same problem first (it reuses its concatenation)",
            ));
        }
        let AttnGrads {
            dq,
            dk,
            dv,
            dk_pre,
            dv_pre,
        } = grads;
        // The buffers are fields of `self`; borrow them apart so that the plain arguments
        // (reading k, v) and the gradients (writing dq, dk, dv) can coexist.
        let NaiveConcat {
            k,
            v,
            dk: dk_cat,
            dv: dv_cat,
            dq: dq_scratch,
            zero_pre,
            ..
        } = self;
        let dq = match dq {
            Some(dq) if !args.prefix_only => dq,
            _ => dq_scratch.view_mut(),
        };
        let lens = cat_lens(&pr);
        let plain = AttnBwdArgs {
            fwd: AttnFwdArgs::new(args.fwd.q, k.view(), v.view())
                .seqlens(&lens.0, &lens.1)
                .causal(pr.causal)
                .scale(pr.scale),
            prefix_only: false,
            ..*args
        };
        be.attn_bwd(
            &plain,
            AttnGrads {
                dq: Some(dq),
                dk: Some(dk_cat.view_mut()),
                dv: Some(dv_cat.view_mut()),
                dk_pre: None,
                dv_pre: None,
            },
        )?;
        for (cat, seq, pre) in [(&*dk_cat, dk, dk_pre), (&*dv_cat, dv, dv_pre)] {
            let cat = cat.view();
            if let Some(seq) = seq.filter(|_| !args.prefix_only) {
                split_sequence(be, &cat, &pr, seq)?;
            }
            if let Some(pre) = pre {
                reduce_prefix(be, &cat, &pr, &zero_pre.view(), pre)?;
            }
        }
        Ok(())
    }
}

/// The prefix every sequence uses with its full length, if there is one.
fn shared_prefix(pr: &AttnProblem) -> Option<usize> {
    let first = *pr.prefix_of.first()?;
    (first.is_some() && pr.prefix_of.iter().all(|&n| n == first)).then_some(first?)
}

/// `seqlen_q`, and each sequence's concatenated key count.
fn cat_lens(pr: &AttnProblem) -> (Vec<i32>, Vec<i32>) {
    (
        pr.lens_q.iter().map(|&n| n as i32).collect(),
        (0..pr.batch)
            .map(|b| (pr.prefix_len_of(b) + pr.lens_k[b]) as i32)
            .collect(),
    )
}

/// Copies the sequence rows of an expanded gradient into `[B, Tk, Hkv, D]`.
fn split_sequence(
    be: &dyn Backend,
    cat: &TensorView,
    pr: &AttnProblem,
    mut out: TensorViewMut,
) -> Result<()> {
    let p = if pr.batch > 0 { pr.prefix_len_of(0) } else { 0 };
    if (0..pr.batch).all(|b| pr.prefix_len_of(b) == p) {
        return be.copy(&cat.narrow(1, p, pr.tk)?, &mut out);
    }
    for b in 0..pr.batch {
        let src = cat.narrow(0, b, 1)?.narrow(1, pr.prefix_len_of(b), pr.tk)?;
        be.copy(&src, &mut out.reborrow().narrow(0, b, 1)?)?;
    }
    Ok(())
}

/// Sums the prefix rows of an expanded gradient over the sequences using each prefix, into
/// `[NP, P, Hkv, D]` f32 (zeros for a prefix no sequence uses).
fn reduce_prefix(
    be: &dyn Backend,
    cat: &TensorView,
    pr: &AttnProblem,
    zeros: &TensorView,
    mut out: TensorViewMut,
) -> Result<()> {
    let (p, tk, hkv, d) = (pr.prefix_len, pr.tk, pr.heads_kv, pr.head_dim);
    let row = p * hkv * d;
    let seq_stride = (p + tk) * hkv * d;
    if row == 0 {
        return Ok(()); // an empty prefix has an empty gradient
    }
    if let (Some(0), 1) = (shared_prefix(pr), pr.num_prefixes) {
        // One strided row per sequence, one launch.
        let rows = cat.as_strided(&[pr.batch, row], &[seq_stride, 1], cat.layout().offset())?;
        return be.sum_rows(&rows, &mut out.reshape(&[row])?, false);
    }
    for n in 0..pr.num_prefixes {
        let mut dst = out.reborrow().narrow(0, n, 1)?.reshape(&[row])?;
        let users: Vec<usize> = (0..pr.batch)
            .filter(|&b| pr.prefix_of[b] == Some(n))
            .collect();
        if users.is_empty() {
            be.copy(&zeros.reshape(&[row])?, &mut dst)?;
        }
        for (i, &b) in users.iter().enumerate() {
            let at = cat.layout().offset() + b * seq_stride;
            let src = cat.as_strided(&[1, row], &[row, 1], at)?;
            be.sum_rows(&src, &mut dst, i > 0)?;
        }
    }
    Ok(())
}

/// One-shot naive forward on `be` (allocates its buffers; benchmarks hold a
/// [`NaiveConcat`] instead).
pub fn forward(be: &dyn Backend, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
    let pr = args.check()?;
    NaiveConcat::new(be, &pr)?.forward(be, args, out)
}

/// One-shot naive backward on `be`: concatenates (the forward's first half) and runs
/// [`NaiveConcat::backward`].
pub fn backward(be: &dyn Backend, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
    let pr = args.fwd.check()?;
    pr.check_bwd(args, &grads)?;
    let mut nc = NaiveConcat::new(be, &pr)?;
    nc.fit(&pr)?;
    nc.concat(be, &args.fwd, &pr)?;
    nc.held = Some(pr);
    nc.backward(be, args, grads)
}
