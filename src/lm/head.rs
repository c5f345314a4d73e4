//! The output side of a forward pass, for every model family: the vocabulary projection of
//! the final hidden rows, the token losses, and the gradient the backward starts from.
//!
//! [`Logits::Whole`] keeps every projected row's logits (callers read them: parity tests,
//! decoding). [`Logits::Streamed`] is for training and evaluation, which need the logits only
//! long enough to turn them into a loss and a gradient, and the gradient only long enough to
//! project it back through the head (`d_in = dlogits · W`). Kept whole, logits and their
//! gradient are the largest activations of a model with a big vocabulary (Qwen2's 151,936
//! entries: 311 MB each at 512 f32 rows, more than all the per-layer activations of a 0.5B
//! model together). Streamed, the three steps run over chunks of rows sized to a byte budget,
//! so that only one chunk's logits (and, for an f32 model, one chunk's logit gradient) ever
//! exist, and the forward keeps the gradient at the head's input instead. Every row's loss
//! and input gradient depend on that row only, so the sums are those of one pass.
//!
//! Either way, with `counted_only` the projection runs only at rows whose target counts
//! (prompts and padding cost no `V`-wide work): they are gathered first, and the gradient is
//! scattered back to their rows (the other rows' gradient is 0).

use super::IGNORE;
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};

/// The byte budget of one chunk's logits when the caller gives no chunk size. Each chunk
/// reads the whole head weight once forward and once backward (for Qwen2's 545 MB tied head
/// that is the cost that matters on a CPU): at Qwen2-0.5B's training shape (512 rows) 32 MiB
/// chunks (10 of them) made a step 9 % slower than 128 MiB ones (3), for 192 MB less memory.
pub const HEAD_CHUNK_BYTES: usize = 128 << 20;

/// Buffers and results of the output side of one forward (see the module docs).
#[derive(Debug)]
pub struct Head {
    /// Logits: `[rows, V]` whole, `[chunk, V]` streamed. A half-precision model writes the
    /// gradient of a training forward over them.
    logits: Tensor,
    /// The logit gradient of an f32 model, the size of `logits`.
    dlogits: Option<Tensor>,
    /// A half-precision model with a gradient: written over `logits`.
    grad_in_place: bool,
    /// Streamed: rows per chunk.
    chunk: Option<usize>,
    /// Streamed with a gradient: the gradient at the head's input rows `[rows, C]`.
    d_in: Option<Tensor>,
    /// The counted rows, gathered `[rows, C]`.
    head_in: Tensor,
    losses: Tensor,
    counted_rows: Vec<i32>,
    counted_only: bool,
}

/// How a [`Head`] keeps its logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every projected row's logits, for callers that read them.
    Whole,
    /// Chunks of this many counted rows (`None`: as many as fit [`HEAD_CHUNK_BYTES`], at
    /// least one), no logits kept; with a gradient, the gradient at the head's input instead.
    /// Counts only the rows whose target counts.
    Streamed(Option<usize>),
}

impl Head {
    /// Buffers for up to `rows` rows of width `width` and a `vocab`-wide head in `dtype`;
    /// `with_grad` adds what the backward starts from.
    pub fn new(
        be: &dyn Backend,
        rows: usize,
        width: usize,
        vocab: usize,
        dtype: DType,
        with_grad: bool,
        logits: Logits,
    ) -> Result<Head> {
        let chunk = match logits {
            Logits::Whole => None,
            Logits::Streamed(Some(0)) => {
                return Err(Error::index("head chunk", "a chunk needs at least one row"))
            }
            Logits::Streamed(r) => Some(
                r.unwrap_or(HEAD_CHUNK_BYTES / (vocab.max(1) * dtype.size()))
                    .clamp(1, rows.max(1)),
            ),
        };
        let logit_rows = chunk.unwrap_or(rows);
        Ok(Head {
            logits: be.zeros(&[logit_rows, vocab], dtype)?,
            dlogits: if with_grad && dtype == DType::F32 {
                Some(be.zeros(&[logit_rows, vocab], DType::F32)?)
            } else {
                None
            },
            grad_in_place: with_grad && dtype != DType::F32,
            chunk,
            d_in: match (with_grad, chunk) {
                (true, Some(_)) => Some(be.zeros(&[rows, width], dtype)?),
                _ => None,
            },
            head_in: be.zeros(&[rows, width], dtype)?,
            losses: be.zeros(&[rows], DType::F32)?,
            counted_rows: vec![],
            counted_only: chunk.is_some(),
        })
    }

    /// Projects only the rows whose target counts (see the module docs).
    pub fn set_counted_only(&mut self) {
        self.counted_only = true;
    }

    /// Whether the forward keeps what the backward starts from.
    pub fn with_grad(&self) -> bool {
        self.dlogits.is_some() || self.grad_in_place
    }

    /// Whole: the logits of the last forward (with `counted_only`, the counted rows first).
    /// Streamed: the last chunk's buffer.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The rows (`b·T + t`) whose targets counted in the last forward, in order.
    pub fn counted_rows(&self) -> &[i32] {
        &self.counted_rows
    }

    /// Whether the last forward over `m` rows projected the counted rows only.
    fn compact(&self, m: usize) -> bool {
        self.counted_only && self.counted_rows.len() < m
    }

    /// The summed loss of the rows of `x [m, C]` (the final hidden rows) against `targets
    /// [m]` ([`IGNORE`]: not counted) under the head `w [V, C]` (logits = `x · wᵀ`), keeping
    /// what the backward needs when built with a gradient.
    pub fn forward(
        &mut self,
        be: &dyn Backend,
        x: &TensorView,
        w: &TensorView,
        targets: &[i32],
    ) -> Result<f64> {
        let m = x.dims()[0];
        if targets.len() != m || m > self.losses.dims()[0] {
            return Err(Error::shape(
                "head input",
                format!(
                    "at most {} rows, one per target ({} targets)",
                    self.losses.dims()[0],
                    targets.len()
                ),
                x.dims(),
            ));
        }
        self.counted_rows = (0..m as i32)
            .filter(|&r| targets[r as usize] != IGNORE)
            .collect();
        let compact = self.compact(m);
        let (n, targets): (usize, Vec<i32>) = if compact {
            let t = self.counted_rows.iter().map(|&r| targets[r as usize]);
            (self.counted_rows.len(), t.collect())
        } else {
            (m, targets.to_vec())
        };
        if n == 0 {
            return Ok(0.0);
        }
        if compact {
            be.gather_rows(
                x,
                &self.counted_rows,
                &mut self.head_in.view_mut().narrow(0, 0, n)?,
            )?;
        }
        let input = if compact {
            self.head_in.view().narrow(0, 0, n)?
        } else {
            *x
        };
        let chunk = self.chunk.unwrap_or(n);
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let rows = input.narrow(0, start, len)?;
            let mut logits = self.logits.view_mut().narrow(0, 0, len)?;
            be.matmul(&rows, w, None, &mut logits, MatmulOpts::nt())?;
            let tg = &targets[start..start + len];
            let mut loss = self.losses.view_mut().narrow(0, start, len)?;
            if self.grad_in_place {
                be.cross_entropy_inplace(&mut logits, tg, &mut loss)?;
            } else {
                let mut dl = match self.dlogits.as_mut() {
                    Some(d) => Some(d.view_mut().narrow(0, 0, len)?),
                    None => None,
                };
                be.cross_entropy(&logits.as_view(), tg, &mut loss, dl.as_mut())?;
            }
            // Streamed: back through the head while this chunk's gradient exists.
            if let Some(d_in) = self.d_in.as_mut() {
                let grad = self.dlogits.as_ref().unwrap_or(&self.logits);
                be.matmul(
                    &grad.view().narrow(0, 0, len)?,
                    w,
                    None,
                    &mut d_in.view_mut().narrow(0, start, len)?,
                    MatmulOpts::default(),
                )?;
            }
            start += len;
        }
        let losses = be.download(&self.losses)?.to_f32_vec();
        Ok(targets
            .iter()
            .zip(&losses[..n])
            .filter(|(&tg, _)| tg != IGNORE)
            .map(|(_, &x)| x as f64)
            .sum())
    }

    /// The gradient of the last forward's summed loss (over its `m` rows) with respect to
    /// its input rows: `d_x [m, C]` (0 at rows whose target did not count). `scratch` (at
    /// least the counted rows × C) holds the counted rows' gradient before it is scattered.
    pub fn backward(
        &self,
        be: &dyn Backend,
        w: &TensorView,
        d_x: &mut TensorViewMut,
        scratch: &mut TensorViewMut,
    ) -> Result<()> {
        if !self.with_grad() {
            return Err(Error::index(
                "activations",
                "the forward kept no logit gradient (with_grad = false)",
            ));
        }
        let m = d_x.dims()[0];
        let counted = &self.counted_rows;
        let n = if self.compact(m) { counted.len() } else { m };
        if let Some(d_in) = &self.d_in {
            let d_in = d_in.view().narrow(0, 0, n)?;
            return if n < m {
                be.scatter_rows(&d_in, counted, d_x)
            } else {
                be.copy(&d_in, d_x)
            };
        }
        let dl = self.dlogits.as_ref().unwrap_or(&self.logits);
        if n < m {
            let mut part = scratch.reborrow().narrow(0, 0, n)?;
            if n > 0 {
                let g = dl.view().narrow(0, 0, n)?;
                be.matmul(&g, w, None, &mut part, MatmulOpts::default())?;
            }
            be.scatter_rows(&part.as_view(), counted, d_x)
        } else {
            let g = dl.view().narrow(0, 0, m)?;
            be.matmul(&g, w, None, d_x, MatmulOpts::default())
        }
    }
}
