//! The vocabulary projection, the token loss and the projection's input gradient, a few rows
//! at a time.
//!
//! A training step needs the logits only long enough to turn them into a loss and a gradient,
//! and the gradient only long enough to project it back through the head: `d_in = dlogits · W`.
//! Kept whole, logits and their gradient are the largest activations of a model with a big
//! vocabulary (Qwen2's 151,936 entries: 311 MB each at 512 f32 rows, more than all the
//! per-layer activations of a 0.5B model together). [`HeadChunks`] runs the three steps over
//! chunks of rows sized to a byte budget, so that only one chunk's logits (and, for an f32
//! model, one chunk's logit gradient) ever exist. The sums are the same as one pass over all
//! rows: every row's loss and input gradient depend on that row only.

use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};

/// The byte budget of one chunk's logits when the caller gives no chunk size.
pub const HEAD_CHUNK_BYTES: usize = 32 << 20;

/// Chunk buffers for [`HeadChunks::run`].
#[derive(Debug)]
pub struct HeadChunks {
    rows: usize,
    logits: Tensor,
    /// The logit gradient of an f32 model (a half-precision one writes it over the logits).
    dlogits: Option<Tensor>,
    with_grad: bool,
}

impl HeadChunks {
    /// Buffers for chunks of `chunk_rows` rows (`None`: as many rows as fit
    /// [`HEAD_CHUNK_BYTES`], at least one, at most `max_rows`) of a `vocab`-wide head in
    /// `dtype`; `with_grad` adds what the input gradient needs.
    pub fn new(
        be: &dyn Backend,
        vocab: usize,
        dtype: DType,
        max_rows: usize,
        chunk_rows: Option<usize>,
        with_grad: bool,
    ) -> Result<HeadChunks> {
        let rows = match chunk_rows {
            Some(0) => return Err(Error::index("head chunk", "a chunk needs at least one row")),
            Some(r) => r,
            None => HEAD_CHUNK_BYTES / (vocab.max(1) * dtype.size()),
        }
        .clamp(1, max_rows.max(1));
        Ok(HeadChunks {
            rows,
            logits: be.zeros(&[rows, vocab], dtype)?,
            dlogits: if with_grad && dtype == DType::F32 {
                Some(be.zeros(&[rows, vocab], DType::F32)?)
            } else {
                None
            },
            with_grad,
        })
    }

    /// Rows per chunk.
    pub fn chunk_rows(&self) -> usize {
        self.rows
    }

    /// Whether [`HeadChunks::run`] can write the input gradient.
    pub fn with_grad(&self) -> bool {
        self.with_grad
    }

    /// For the `n` rows of `head_in [n, C]` with `targets [n]`: `losses [n]` (f32, the
    /// token cross-entropy; 0 where the target is [`crate::lm::IGNORE`]) and, when `d_in` is
    /// given, `d_in [n, C] = (softmax − onehot) · W`, the gradient of the summed loss with
    /// respect to `head_in`. `w_head` is `[V, C]` (logits = `head_in · w_headᵀ`).
    pub fn run(
        &mut self,
        be: &dyn Backend,
        head_in: &TensorView,
        w_head: &TensorView,
        targets: &[i32],
        losses: &mut TensorViewMut,
        mut d_in: Option<&mut TensorViewMut>,
    ) -> Result<()> {
        let n = head_in.dims()[0];
        if targets.len() != n || losses.dims() != [n] {
            return Err(Error::shape(
                "losses",
                format!("[{n}] with {n} targets, one per head input row"),
                losses.dims(),
            ));
        }
        if d_in.is_some() && !self.with_grad {
            return Err(Error::index(
                "head chunks",
                "built without gradient buffers (with_grad = false)",
            ));
        }
        let mut start = 0;
        while start < n {
            let len = self.rows.min(n - start);
            let x = head_in.narrow(0, start, len)?;
            let mut logits = self.logits.view_mut().narrow(0, 0, len)?;
            be.matmul(&x, w_head, None, &mut logits, MatmulOpts::nt())?;
            let tg = &targets[start..start + len];
            let mut loss = losses.reborrow().narrow(0, start, len)?;
            let Some(d_in) = d_in.as_deref_mut() else {
                be.cross_entropy(&logits.as_view(), tg, &mut loss, None)?;
                start += len;
                continue;
            };
            match self.dlogits.as_mut() {
                Some(dl) => {
                    let mut dl = dl.view_mut().narrow(0, 0, len)?;
                    be.cross_entropy(&logits.as_view(), tg, &mut loss, Some(&mut dl))?;
                }
                None => be.cross_entropy_inplace(&mut logits, tg, &mut loss)?,
            }
            let grad = self.dlogits.as_ref().unwrap_or(&self.logits);
            let grad = grad.view().narrow(0, 0, len)?;
            be.matmul(
                &grad,
                w_head,
                None,
                &mut d_in.reborrow().narrow(0, start, len)?,
                MatmulOpts::default(),
            )?;
            start += len;
        }
        Ok(())
    }
}
