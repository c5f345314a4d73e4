//! Layout arithmetic: a view's shape, element strides and element offset, and the
//! derivations (narrow, select, unsqueeze, reshape) that views are made with. Pure index
//! math: it knows nothing of dtypes or buffers.

use crate::error::{Error, Result};
use std::fmt;

/// The most dimensions a tensor may have (GPT-2's `qkv` view `[B, T, 3, H, D]` has five).
pub const MAX_RANK: usize = 6;

/// Shape, element strides and element offset of a view. The last dimension of every view
/// that a kernel reads must have stride 1; other strides are free (and may be 0 for a
/// broadcast read).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    rank: usize,
    dims: [usize; MAX_RANK],
    strides: [usize; MAX_RANK],
    offset: usize,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} strides {:?} offset {}",
            self.dims(),
            self.strides(),
            self.offset
        )
    }
}

impl Layout {
    /// A row-major contiguous layout of `shape`.
    pub fn contiguous(shape: &[usize]) -> Result<Layout> {
        if shape.len() > MAX_RANK {
            return Err(Error::shape(
                "tensor",
                format!("at most {MAX_RANK} dimensions"),
                shape,
            ));
        }
        let mut strides = vec![0usize; shape.len()];
        let mut s = 1usize;
        for d in (0..shape.len()).rev() {
            strides[d] = s;
            s = s
                .checked_mul(shape[d])
                .ok_or_else(|| Error::shape("tensor", "a size that fits in usize", shape))?;
        }
        Layout::new(shape, &strides, 0)
    }

    /// A layout with explicit strides (in elements) and offset.
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> Result<Layout> {
        if shape.len() > MAX_RANK || shape.len() != strides.len() {
            return Err(Error::shape(
                "tensor",
                format!(
                    "at most {MAX_RANK} dimensions and one stride per dimension (got {} strides)",
                    strides.len()
                ),
                shape,
            ));
        }
        let mut l = Layout {
            rank: shape.len(),
            dims: [0; MAX_RANK],
            strides: [0; MAX_RANK],
            offset,
        };
        l.dims[..shape.len()].copy_from_slice(shape);
        l.strides[..shape.len()].copy_from_slice(strides);
        l.checked_span()
            .ok_or_else(|| Error::shape("tensor", "a size that fits in usize", shape))?;
        Ok(l)
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Sizes of the dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
    /// Element strides of the dimensions.
    pub fn strides(&self) -> &[usize] {
        &self.strides[..self.rank]
    }
    /// Element offset of the first element.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    fn checked_span(&self) -> Option<usize> {
        let numel = self
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        if numel == 0 {
            return Some(self.offset);
        }
        let mut last = self.offset;
        for d in 0..self.rank {
            last = last.checked_add((self.dims[d] - 1).checked_mul(self.strides[d])?)?;
        }
        last.checked_add(1)
    }

    /// One past the largest element index this layout can address (its offset when empty).
    pub fn span(&self) -> usize {
        // Checked at construction; every derived layout addresses a subset.
        self.checked_span().unwrap_or(usize::MAX)
    }

    /// Whether the layout is row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        let mut s = 1;
        for d in (0..self.rank).rev() {
            if self.dims[d] != 1 && self.strides[d] != s {
                return false;
            }
            s *= self.dims[d];
        }
        true
    }

    /// Element index of the multi-index `idx` (one entry per dimension).
    pub fn index(&self, idx: &[usize]) -> usize {
        debug_assert_eq!(idx.len(), self.rank);
        self.offset
            + idx
                .iter()
                .zip(self.strides())
                .map(|(i, s)| i * s)
                .sum::<usize>()
    }

    fn check_dim(&self, what: &str, dim: usize) -> Result<()> {
        if dim >= self.rank {
            return Err(Error::index(
                what,
                format!("dimension {dim} of a rank-{} tensor", self.rank),
            ));
        }
        Ok(())
    }

    /// The layout of `narrow(dim, start, len)`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        self.check_dim("narrow", dim)?;
        if start.checked_add(len).is_none_or(|e| e > self.dims[dim]) {
            return Err(Error::index(
                "narrow",
                format!(
                    "range {start}..{} of dimension {dim} with size {}",
                    start.saturating_add(len),
                    self.dims[dim]
                ),
            ));
        }
        let mut l = *self;
        l.offset += start * self.strides[dim];
        l.dims[dim] = len;
        Ok(l)
    }

    /// The layout of `select(dim, index)`: dimension `dim` removed at `index`.
    pub fn select(&self, dim: usize, index: usize) -> Result<Layout> {
        self.check_dim("select", dim)?;
        if index >= self.dims[dim] {
            return Err(Error::index(
                "select",
                format!(
                    "index {index} of dimension {dim} with size {}",
                    self.dims[dim]
                ),
            ));
        }
        let mut l = *self;
        l.offset += index * self.strides[dim];
        for d in dim..self.rank - 1 {
            l.dims[d] = self.dims[d + 1];
            l.strides[d] = self.strides[d + 1];
        }
        l.rank -= 1;
        l.dims[l.rank] = 0;
        l.strides[l.rank] = 0;
        Ok(l)
    }

    /// The layout with a new dimension of size 1 inserted before `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Result<Layout> {
        if dim > self.rank || self.rank == MAX_RANK {
            return Err(Error::index(
                "unsqueeze",
                format!("dimension {dim} of a rank-{} tensor", self.rank),
            ));
        }
        let mut l = *self;
        for d in (dim..self.rank).rev() {
            l.dims[d + 1] = self.dims[d];
            l.strides[d + 1] = self.strides[d];
        }
        l.dims[dim] = 1;
        l.strides[dim] = if dim < self.rank {
            self.dims[dim] * self.strides[dim]
        } else {
            1
        };
        l.rank += 1;
        Ok(l)
    }

    /// The layout of a contiguous tensor seen with another shape of the same size.
    pub fn reshape(&self, shape: &[usize]) -> Result<Layout> {
        if !self.is_contiguous() {
            return Err(Error::layout(
                "reshape",
                format!("needs a contiguous view, got {self:?}"),
            ));
        }
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements like {:?}", self.numel(), self.dims()),
                shape,
            ));
        }
        let mut l = Layout::contiguous(shape)?;
        l.offset = self.offset;
        Ok(l)
    }
}
