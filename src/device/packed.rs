//! Frozen weights repacked for the CPU's matmul kernels ([`PackedWeight`]).
//!
//! A decode step multiplies a few rows of activations by every weight matrix of the model,
//! and the matrices no longer fit any cache: each product streams its weight from memory.
//! Read in place, a row-major `W [K, N]` is streamed in pieces of 256 bytes (one 64-column
//! panel of one row), each in another 4 KiB page, which the hardware prefetchers do not
//! follow: the kernel waits for memory and then computes, and the two do not overlap (at 16
//! rows, 100–118 GFLOP/s against 184–212 with the same weights in the L3 cache). Packed, each
//! 64-column panel `[K, 64]` is one contiguous, 64-byte-aligned run of memory that the
//! prefetchers stream ahead of the arithmetic (docs/ARCHITECTURE.md, "Packed weights").
//!
//! Every output element is then one sum over `k` in ascending order (in blocks of
//! [`PACKED_KC`] rows of `W` when `K` is larger), whatever the number of rows of `a` and
//! whichever row an element is in: a token's result does not depend on what else shares its
//! batch.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Columns per panel.
pub(crate) const PANEL: usize = 64;
/// The most rows of `W` one pass of the kernel sums before adding into the output (a panel
/// block of at most 1 MiB, which stays in L2 while every row block of `a` goes over it).
pub(crate) const PACKED_KC: usize = 4096;

/// One cache line of a panel (16 floats, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [f32; 16]);

/// A frozen f32 weight `W [K, N]` in panels of [`PANEL`] columns, each `[K, 64]` contiguous
/// (the last one zero-padded), made by [`crate::device::Backend::pack_weight`] and multiplied
/// by [`crate::device::Backend::matmul_packed`]. It is a copy: it costs the weight's size
/// again in memory, and it does not follow later changes of the tensor it was made from.
pub struct PackedWeight {
    k: usize,
    n: usize,
    /// Panel `p`, row `kk` is lines `(p · K + kk) · 4 .. + 4`.
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}]", self.k, self.n)
    }
}

impl PackedWeight {
    /// Packs `w`: `[K, N]` row-major, or `[N, K]` (a torch `Linear` weight, the product then
    /// being `a · wᵀ`) when `trans`. `what` names the weight in errors.
    pub(crate) fn new(what: &str, w: &[f32], k: usize, n: usize, trans: bool) -> Result<Self> {
        if k == 0 || n == 0 || k.checked_mul(n) != Some(w.len()) {
            return Err(Error::shape(
                what,
                format!(
                    "{} with K = {k}, N = {n}: {} elements, none of K and N zero",
                    if trans { "[N, K]" } else { "[K, N]" },
                    k.saturating_mul(n)
                ),
                &[w.len()],
            ));
        }
        let panels = n.div_ceil(PANEL);
        let per_panel = k * PANEL / 16;
        let mut lines = vec![Line([0.0; 16]); panels * per_panel];
        lines
            .par_chunks_mut(per_panel)
            .enumerate()
            .for_each(|(p, panel)| {
                let j0 = p * PANEL;
                let width = (n - j0).min(PANEL);
                // SAFETY: a `Line` is 16 plain f32 with no padding, so the panel's lines are
                // `per_panel · 16 = k · 64` contiguous f32.
                let dst: &mut [f32] = unsafe {
                    std::slice::from_raw_parts_mut(panel.as_mut_ptr().cast::<f32>(), k * PANEL)
                };
                if trans {
                    // Row j of `w [N, K]` is column j of `W`: read each row once, in order.
                    for j in 0..width {
                        let row = &w[(j0 + j) * k..(j0 + j + 1) * k];
                        for (kk, &x) in row.iter().enumerate() {
                            dst[kk * PANEL + j] = x;
                        }
                    }
                } else {
                    for kk in 0..k {
                        dst[kk * PANEL..kk * PANEL + width]
                            .copy_from_slice(&w[kk * n + j0..kk * n + j0 + width]);
                    }
                }
            });
        Ok(PackedWeight { k, n, lines })
    }

    /// `K`: the rows of `W` (the inner dimension of the product).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `N`: the columns of `W` (of the product).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of memory the packed copy takes.
    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// Bytes a packed copy of a `[K, N]` weight takes (N rounded up to whole panels).
    pub fn bytes_for(k: usize, n: usize) -> usize {
        n.div_ceil(PANEL)
            .saturating_mul(k)
            .saturating_mul(PANEL * 4)
    }

    /// The first float of panel 0 (panels follow each other, `K · 64` floats each).
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.lines.as_ptr().cast::<f32>()
    }

    /// `W[kk, j]`, for tests.
    #[cfg(test)]
    pub(crate) fn at(&self, kk: usize, j: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        self.lines[(p * self.k + kk) * 4 + c / 16].0[c % 16]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_every_element_in_both_layouts() {
        let (k, n) = (5usize, 131usize);
        let w: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.5 + 1.0).collect();
        let kn = PackedWeight::new("w", &w, k, n, false).unwrap();
        // The same numbers read as [N, K].
        let nk = PackedWeight::new("w", &w, k, n, true).unwrap();
        for kk in 0..k {
            for j in 0..n {
                assert_eq!(kn.at(kk, j), w[kk * n + j]);
                assert_eq!(nk.at(kk, j), w[j * k + kk]);
            }
        }
        // Three panels; the padding of the last is zero.
        assert_eq!(kn.bytes(), 3 * k * PANEL * 4);
        assert_eq!(PackedWeight::bytes_for(k, n), kn.bytes());
        assert_eq!(kn.at(0, 131), 0.0);
        assert_eq!(kn.as_ptr() as usize % 64, 0);
        let err = PackedWeight::new("layer 3 fc", &w, k, n + 1, false).unwrap_err();
        assert!(err.to_string().contains("layer 3 fc"), "{err}");
    }
}
