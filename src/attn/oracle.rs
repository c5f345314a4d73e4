//! The f64 oracle of prefix attention: plain loops over contiguous f64 arrays, written to be
//! obviously right rather than fast. It shares no code with the fused CPU path except the
//! argument validation ([`AttnProblem`]).
//!
//! The same loops, with every stored intermediate rounded to a lower precision
//! ([`Precision::Round`]), are the "naive implementation in the same precision" of the
//! tolerance rule (docs/ARCHITECTURE.md §5): a kernel's error against the exact oracle must stay within
//! twice that naive implementation's error.

use super::{AttnFwdArgs, AttnProblem};
use crate::error::Result;
use crate::tensor::{DType, TensorView};

/// How the oracle stores intermediates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f64.
    Exact,
    /// Scores, probabilities, outputs and gradients rounded to this type as they are
    /// stored (sums are accumulated in f64 and rounded once, as with fp32 accumulation).
    Round(DType),
}

impl Precision {
    pub(crate) fn r(self, x: f64) -> f64 {
        match self {
            Precision::Exact => x,
            Precision::Round(dt) => dt.round_f32(x as f32) as f64,
        }
    }
    pub(crate) fn r32(self, x: f64) -> f64 {
        match self {
            Precision::Exact => x,
            Precision::Round(_) => x as f32 as f64,
        }
    }
}

/// A problem with every tensor gathered into a contiguous f64 array.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Sizes and metadata.
    pub pr: AttnProblem,
    /// `[B, Tq, Hq, D]`
    pub q: Vec<f64>,
    /// `[B, Tk, Hkv, D]`
    pub k: Vec<f64>,
    /// `[B, Tk, Hkv, D]`
    pub v: Vec<f64>,
    /// `[NP, P, Hkv, D]`
    pub k_pre: Vec<f64>,
    /// `[NP, P, Hkv, D]`
    pub v_pre: Vec<f64>,
}

/// Oracle forward outputs.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// `[B, Tq, Hq, D]`
    pub o: Vec<f64>,
    /// `[B, Hq, Tq]`, natural log.
    pub lse: Vec<f64>,
}

/// Oracle gradients.
#[derive(Clone, Debug)]
pub struct Grads {
    /// `[B, Tq, Hq, D]`
    pub dq: Vec<f64>,
    /// `[B, Tk, Hkv, D]`
    pub dk: Vec<f64>,
    /// `[B, Tk, Hkv, D]`
    pub dv: Vec<f64>,
    /// `[NP, P, Hkv, D]`, summed over the sequences using each prefix.
    pub dk_pre: Vec<f64>,
    /// `[NP, P, Hkv, D]`, summed over the sequences using each prefix.
    pub dv_pre: Vec<f64>,
}

/// Reads a strided view into a contiguous f64 vector (row-major over its shape).
pub fn to_f64(t: &TensorView) -> Result<Vec<f64>> {
    let mut v = vec![0f32; t.numel()];
    t.gather_f32(&mut v)?;
    Ok(v.into_iter().map(f64::from).collect())
}

impl Dense {
    /// Validates `args` and gathers its tensors.
    pub fn from_args(args: &AttnFwdArgs) -> Result<Dense> {
        let pr = args.check()?;
        let (k_pre, v_pre) = match &args.prefix {
            Some(p) => (to_f64(&p.k)?, to_f64(&p.v)?),
            None => (vec![], vec![]),
        };
        Ok(Dense {
            q: to_f64(&args.q)?,
            k: to_f64(&args.k)?,
            v: to_f64(&args.v)?,
            k_pre,
            v_pre,
            pr,
        })
    }

    fn qi(&self, b: usize, i: usize, h: usize) -> usize {
        let p = &self.pr;
        ((b * p.tq + i) * p.heads_q + h) * p.head_dim
    }
    fn ki(&self, b: usize, j: usize, h: usize) -> usize {
        let p = &self.pr;
        ((b * p.tk + j) * p.heads_kv + h) * p.head_dim
    }
    fn pi(&self, n: usize, j: usize, h: usize) -> usize {
        let p = &self.pr;
        ((n * p.prefix_len + j) * p.heads_kv + h) * p.head_dim
    }

    /// Every query row `(h, hk, i)` of sequence `b` that sees a key, with its keys, in the
    /// order both passes walk them (heads outer, rows inner; `hk` is `h`'s key/value head).
    fn visible_rows(&self, b: usize) -> Vec<(usize, usize, usize, Vec<Key>)> {
        let p = &self.pr;
        (0..p.heads_q)
            .flat_map(|h| (0..p.tq).map(move |i| (h, i)))
            .filter_map(|(h, i)| {
                let keys = self.keys(b, i);
                (!keys.is_empty()).then(|| (h, h / p.group(), i, keys))
            })
            .collect()
    }

    /// The keys row `i` of sequence `b` sees, by the contract's rule, one by one.
    fn keys(&self, b: usize, i: usize) -> Vec<Key> {
        let p = &self.pr;
        let mut keys = vec![];
        if i >= p.lens_q[b] {
            return keys;
        }
        if let Some(n) = p.prefix_of[b] {
            keys.extend((0..p.prefix_len).map(|j| Key::Prefix(n, j)));
        }
        let (sq, sk) = (p.lens_q[b] as i64, p.lens_k[b] as i64);
        for j in 0..p.tk {
            let visible = (j as i64) < sk && (!p.causal || j as i64 <= i as i64 + sk - sq);
            if visible {
                keys.push(Key::Seq(j));
            }
        }
        keys
    }

    fn key_index(&self, b: usize, h: usize, key: Key) -> (bool, usize) {
        match key {
            Key::Prefix(n, j) => (true, self.pi(n, j, h)),
            Key::Seq(j) => (false, self.ki(b, j, h)),
        }
    }

    /// The forward in the given precision.
    pub fn forward(&self, prec: Precision) -> Outputs {
        let p = &self.pr;
        let d = p.head_dim;
        let mut o = vec![0.0; p.batch * p.tq * p.heads_q * d];
        let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * p.tq];
        for b in 0..p.batch {
            for (h, hk, i, keys) in self.visible_rows(b) {
                let q = &self.q[self.qi(b, i, h)..][..d];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&key| {
                        let (pre, at) = self.key_index(b, hk, key);
                        let kr = if pre { &self.k_pre } else { &self.k };
                        prec.r(p.scale as f64 * dot(q, &kr[at..at + d]))
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[(b * p.heads_q + h) * p.tq + i] = prec.r32(m + l.ln());
                let out = &mut o[self.qi(b, i, h)..][..d];
                for (s, &key) in scores.iter().zip(&keys) {
                    let prob = prec.r((s - m).exp() / l);
                    let (pre, at) = self.key_index(b, hk, key);
                    let vr = if pre { &self.v_pre } else { &self.v };
                    for c in 0..d {
                        out[c] += prob * vr[at + c];
                    }
                }
                out.iter_mut().for_each(|x| *x = prec.r(*x));
            }
        }
        Outputs { o, lse }
    }

    /// The backward in the given precision, for output gradient `d_o [B, Tq, Hq, D]`
    /// (padding rows of `d_o` are ignored). Probabilities are recomputed from scratch.
    pub fn backward(&self, d_o: &[f64], prec: Precision) -> Grads {
        let fwd = self.forward(prec);
        self.backward_with_o(d_o, &fwd.o, prec)
    }

    /// The backward with the softmax correction `D_i = rowsum(dO ∘ O)` taken from a given
    /// forward output `o` (e.g. the one a kernel stored in f16), as the contract's backward
    /// does; everything else is recomputed.
    pub fn backward_with_o(&self, d_o: &[f64], o: &[f64], prec: Precision) -> Grads {
        let p = &self.pr;
        let d = p.head_dim;
        let fwd = self.forward(prec);
        let mut g = Grads {
            dq: vec![0.0; self.q.len()],
            dk: vec![0.0; self.k.len()],
            dv: vec![0.0; self.v.len()],
            dk_pre: vec![0.0; self.k_pre.len()],
            dv_pre: vec![0.0; self.v_pre.len()],
        };
        // Per-sequence prefix gradients, rounded as a naive implementation would store them
        // in its expanded `[B, P, Hkv, D]` buffer before the batch reduction.
        for b in 0..p.batch {
            let mut dk_pre_b = vec![0.0; self.k_pre.len()];
            let mut dv_pre_b = vec![0.0; self.v_pre.len()];
            let mut dk_b = vec![0.0; self.k.len()];
            let mut dv_b = vec![0.0; self.v.len()];
            for (h, hk, i, keys) in self.visible_rows(b) {
                let qa = self.qi(b, i, h);
                let q = &self.q[qa..qa + d];
                let go = &d_o[qa..qa + d];
                let lse = fwd.lse[(b * p.heads_q + h) * p.tq + i];
                // D_i = sum_c dO_c * O_c
                let di = prec.r32(dot(go, &o[qa..qa + d]));
                for &key in &keys {
                    let (pre, at) = self.key_index(b, hk, key);
                    let (kr, vr) = if pre {
                        (&self.k_pre, &self.v_pre)
                    } else {
                        (&self.k, &self.v)
                    };
                    let s = prec.r(p.scale as f64 * dot(q, &kr[at..at + d]));
                    let prob = prec.r((s - lse).exp());
                    let dp = prec.r(dot(go, &vr[at..at + d]));
                    let ds = prec.r(prob * (dp - di));
                    let (dkr, dvr) = if pre {
                        (&mut dk_pre_b, &mut dv_pre_b)
                    } else {
                        (&mut dk_b, &mut dv_b)
                    };
                    for c in 0..d {
                        g.dq[qa + c] += p.scale as f64 * ds * kr[at + c];
                        dkr[at + c] += p.scale as f64 * ds * q[c];
                        dvr[at + c] += prob * go[c];
                    }
                }
                for c in 0..d {
                    g.dq[qa + c] = prec.r(g.dq[qa + c]);
                }
            }
            for (acc, part) in [
                (&mut g.dk, &dk_b),
                (&mut g.dv, &dv_b),
                (&mut g.dk_pre, &dk_pre_b),
                (&mut g.dv_pre, &dv_pre_b),
            ] {
                for (a, x) in acc.iter_mut().zip(part) {
                    *a = prec.r32(*a + prec.r(*x));
                }
            }
        }
        g
    }
}

#[derive(Clone, Copy, Debug)]
enum Key {
    Prefix(usize, usize),
    Seq(usize),
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
