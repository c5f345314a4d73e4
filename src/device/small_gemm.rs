//! A small-M f32 matmul fast path for the CPU backend (AVX-512).
//!
//! Decode steps multiply a few rows of activations (`a [M, K]`, M ≤ 128) by large frozen
//! weight matrices. The `gemm` crate packs the operands on every call, which at small M costs
//! about as much as the product itself. These kernels read the weights in place instead:
//!
//! - `b [K, N]` row-major (`y = x · W`, GPT-2's Conv1D weights): a register tile of
//!   [`NN_MR`] rows × [`NN_NR`] columns; each k step loads four contiguous vectors of
//!   `b[k, j0..j0 + 64]` and multiplies them by broadcasts of `a[i, k]`. With more than one
//!   row block, K is split into blocks of [`NN_KC`] so that a panel of `b` stays in L2 while
//!   every row block of `a` goes over it, one panel per task; with one row block, each task
//!   sweeps a wide column range [`NN_STREAM_KC`] rows at a time, so the memory sees long
//!   sequential pieces of `b`. Panels start on cache-line boundaries where rows allow.
//! - `b [N, K]` (`a · bᵀ`, the tied output head, torch-Linear weights): dot products, a tile
//!   of [`NT_MR`] rows of `a` × [`NT_NJ`] rows of `b`, vector accumulators over k and one
//!   horizontal sum per output at the end. Groups of rows of `b` (about [`NT_GROUP_BYTES`])
//!   stay in L2 while every row block of `a` goes over them; groups are split over rayon
//!   threads.
//!
//! [`preferred`] says where they beat `gemm` (measured with `benches/matmul.rs`).
//! Both add `alpha · (a · b)` into `out` (the caller has already written the bias or kept the
//! accumulated values), the same contract as the `gemm` call they replace. Sums run in
//! another order than `gemm`'s, so results agree to f32 rounding, not bit for bit.

// Elsewhere than x86-64 only `available() == false` is used.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::packed::{PackedWeight, PACKED_KC, PANEL};
use rayon::prelude::*;

/// The most rows of `a` the fast path takes for `b [K, N]`; above it `gemm`'s packing pays
/// off.
const NN_MAX_M: usize = 128;
/// The row range of `a` the fast path takes for `a · bᵀ`: at one row `gemm` streams `b` as
/// fast, from 32 rows on its packed kernels are faster than dot products.
const NT_M: std::ops::RangeInclusive<usize> = 2..=31;
/// The fewest columns of `out` (N) and the shortest inner dimension (K) the fast path takes
/// (the kernels themselves handle any size).
const MIN_KN: usize = 32;

/// Whether [`matmul_small_m`] is the faster choice for an `[m, k] · [k, n]` product (`b`
/// transposed when `trans_b`), as measured on a 2-core AVX-512 EPYC against `gemm` 0.19.
pub(crate) fn preferred(m: usize, n: usize, k: usize, trans_b: bool) -> bool {
    let rows = if trans_b {
        NT_M.contains(&m)
    } else {
        (1..=NN_MAX_M).contains(&m)
    };
    rows && n >= MIN_KN && k >= MIN_KN
}

/// Rows of `a` per register tile, `b [K, N]` layout.
const NN_MR: usize = 6;
/// Columns per register tile (four 16-lane vectors), `b [K, N]` layout.
const NN_NR: usize = 64;
/// Inner-dimension block, `b [K, N]` layout: a `NN_KC × NN_NR` panel of `b` is 128 KiB.
const NN_KC: usize = 512;
/// Inner-dimension block of the `b [K, N]` kernel when `a` has at most [`NN_MR`] rows.
const NN_STREAM_KC: usize = 16;
/// Rows of `a` per register tile, `a · bᵀ` layout.
const NT_MR: usize = 6;
/// Rows of `b` per register tile, `a · bᵀ` layout.
const NT_NJ: usize = 4;
/// Bytes of `b` rows per parallel task, `a · bᵀ` layout (kept in L2 across row blocks).
const NT_GROUP_BYTES: usize = 96 * 1024;

/// Whether the running CPU has the instructions the kernels use.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out [m, n] += alpha · a [m, k] · b`, where `b` is `[k, n]` row-major, or `[n, k]` when
/// `trans_b` (then the product is `a · bᵀ`). All three are contiguous row-major slices.
///
/// Returns `false`, leaving `out` untouched, when the fast path does not apply: the CPU lacks
/// AVX-512, the slice lengths do not match the sizes, or a size is zero. Any m works, but the
/// kernels are meant for few rows (see [`preferred`]).
pub(crate) fn matmul_small_m(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    trans_b: bool,
    alpha: f32,
    out: &mut [f32],
) -> bool {
    if m == 0 || n == 0 || k == 0 || !available() {
        return false;
    }
    let (Some(mk), Some(nk), Some(mn)) = (m.checked_mul(k), n.checked_mul(k), m.checked_mul(n))
    else {
        return false;
    };
    if a.len() != mk || b.len() != nk || out.len() != mn {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if trans_b {
            nt(m, n, k, a, b, alpha, out);
        } else {
            nn(m, n, k, a, b, alpha, out);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = alpha;
        false
    }
}

/// The output pointer shared by the parallel tasks, each of which writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks that share an `OutPtr` write disjoint elements (each its own column
// range of `out`), and `out` is exclusively borrowed for the duration of the parallel loop.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether a product is large enough to split over threads.
fn parallel(m: usize, n: usize, k: usize, tasks: usize) -> bool {
    tasks > 1
        && rayon::current_num_threads() > 1
        && m.saturating_mul(n).saturating_mul(k) >= 64 * 64 * 64
}

/// `b [K, N]` row-major: parallel over panels of [`NN_NR`] columns.
#[cfg(target_arch = "x86_64")]
fn nn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], alpha: f32, out: &mut [f32]) {
    // When every row of `b` starts at the same place in a cache line (n a multiple of 16), a
    // first narrow panel of `lead` columns makes all the others start on a 64-byte boundary,
    // so that no vector load of `b` straddles two cache lines.
    let lead = if n % 16 == 0 {
        (64 - (b.as_ptr() as usize) % 64) % 64 / 4
    } else {
        0
    };
    let lead = if lead < n { lead } else { 0 };
    let first = usize::from(lead > 0);
    let panels = first + (n - lead).div_ceil(NN_NR);
    let geom = PanelGeometry { n, lead, first };
    // Up to one row block: the product is a stream of `b`, read in row order over a wide
    // range of columns, [`NN_STREAM_KC`] rows at a time (long sequential pieces for the
    // memory). More rows: one panel per task, K in blocks of [`NN_KC`] (kept in L2).
    let (per_task, kc) = if m <= NN_MR {
        let tasks = 2 * rayon::current_num_threads();
        (panels.div_ceil(tasks).max(1), NN_STREAM_KC)
    } else {
        (1, NN_KC)
    };
    let tasks = panels.div_ceil(per_task);
    let o = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let p0 = t * per_task;
        let p1 = (p0 + per_task).min(panels);
        // SAFETY: `available()` checked AVX-512F; the slices hold the [m, k], [k, n], [m, n]
        // matrices (lengths checked by the caller), and task `t` writes only the columns of
        // panels `p0 .. p1` of `out`, which no other task writes.
        unsafe {
            nn_panels(
                m,
                k,
                a.as_ptr(),
                b.as_ptr(),
                alpha,
                o.get(),
                geom,
                p0,
                p1,
                kc,
            )
        }
    };
    if parallel(m, n, k, tasks) {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Where the column panels of `b [K, N]` lie: a first one `lead` wide when `first == 1`, then
/// [`NN_NR`] wide from `lead` on (the last one narrower).
#[derive(Clone, Copy)]
struct PanelGeometry {
    n: usize,
    lead: usize,
    first: usize,
}

impl PanelGeometry {
    /// First column and width of panel `p`.
    fn panel(self, p: usize) -> (usize, usize) {
        if p < self.first {
            (0, self.lead)
        } else {
            let j0 = self.lead + (p - self.first) * NN_NR;
            (j0, (self.n - j0).min(NN_NR))
        }
    }
}

/// Lane masks of the four vectors of a panel `w` columns wide (`w ≤ 64`).
fn panel_masks(w: usize) -> [u16; 4] {
    let mut masks = [0u16; 4];
    for (v, mask) in masks.iter_mut().enumerate() {
        let lo = v * 16;
        *mask = if w >= lo + 16 {
            0xFFFF
        } else if w > lo {
            ((1u32 << (w - lo)) - 1) as u16
        } else {
            0
        };
    }
    masks
}

/// Column panels `p0 .. p1` of `out += alpha · a · b`, `b [K, N]`, K in blocks of `kcb`.
///
/// # Safety
/// AVX-512F must be available; `a`, `b`, `out` must point to the contiguous [m, k],
/// [k, geom.n], [m, geom.n] matrices, panels `p0 .. p1` must exist in `geom` (each at most
/// 64 wide, within `n`), and no other thread may access their columns of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn nn_panels(
    m: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    alpha: f32,
    out: *mut f32,
    geom: PanelGeometry,
    p0: usize,
    p1: usize,
    kcb: usize,
) {
    let n = geom.n;
    let mut k0 = 0;
    while k0 < k {
        let kc = (k - k0).min(kcb);
        for p in p0..p1 {
            let (j0, w) = geom.panel(p);
            let masks = panel_masks(w);
            let full = w == NN_NR;
            // SAFETY: rows k0 .. k0 + kc and columns j0 .. j0 + w of `b` (stride n), of
            // which `masks` selects the lanes, and columns j0 .. j0 + w of `out` are in
            // bounds and belong to this task.
            row_blocks(
                m,
                k,
                a.add(k0),
                b.add(k0 * n + j0),
                n,
                kc,
                out.add(j0),
                n,
                masks,
                full,
                alpha,
            );
        }
        k0 += kc;
    }
}

/// Every row block of `a` over one panel piece: `out[i, 0..w] += alpha · Σ_{kk < kc}
/// a[i, kk] · b[kk, 0..w]` for all `m` rows, [`NN_MR`] rows per register tile.
///
/// # Safety
/// AVX-512F; `a` points to `m` rows (stride `lda`) of `kc` readable floats, `b` to `kc` rows
/// (stride `ldb`) whose lanes selected by `masks` (all 64 when `full`) are readable, `out`
/// to `m` rows (stride `ldo`) whose masked lanes are writable and not accessed by other
/// threads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_blocks(
    m: usize,
    lda: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    masks: [u16; 4],
    full: bool,
    alpha: f32,
) {
    let mut i = 0;
    while i < m {
        let r = (m - i).min(NN_MR);
        let (ap, op) = (a.add(i * lda), out.add(i * ldo));
        // SAFETY (all arms): rows i .. i + r of `a` and `out` are within the m rows.
        match (r, full) {
            (6, true) => nn_tile::<6, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (6, false) => nn_tile::<6, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (5, true) => nn_tile::<5, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (5, false) => nn_tile::<5, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (4, true) => nn_tile::<4, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (4, false) => nn_tile::<4, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (3, true) => nn_tile::<3, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (3, false) => nn_tile::<3, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (2, true) => nn_tile::<2, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (2, false) => nn_tile::<2, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (_, true) => nn_tile::<1, true>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
            (_, false) => nn_tile::<1, false>(ap, lda, b, ldb, kc, op, ldo, masks, alpha),
        }
        i += r;
    }
}

/// Loads lanes `mask` of the 16 floats at `p` (all of them when `FULL`).
///
/// # Safety
/// AVX-512F; the selected lanes must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load<const FULL: bool>(mask: u16, p: *const f32) -> __m512 {
    if FULL {
        _mm512_loadu_ps(p)
    } else {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

/// An `R × 64` register tile: `out[r, 0..w] += alpha · Σ_{kk < kc} a[r, kk] · b[kk, 0..w]`.
///
/// # Safety
/// AVX-512F; `a` points to R rows (stride `lda`) of `kc` readable floats, `b` to `kc` rows
/// (stride `ldb`) whose lanes selected by `masks` (all 64 when `FULL`) are readable, `out` to
/// R rows (stride `ldo`) whose masked lanes are writable and not accessed by other threads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn nn_tile<const R: usize, const FULL: bool>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    masks: [u16; 4],
    alpha: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for kk in 0..kc {
        // Vectors past the panel's width may start beyond `b`'s end: wrapping offsets, and
        // their loads are masked off entirely.
        let bp = b.add(kk * ldb);
        let b0 = load::<FULL>(masks[0], bp);
        let b1 = load::<FULL>(masks[1], bp.wrapping_add(16));
        let b2 = load::<FULL>(masks[2], bp.wrapping_add(32));
        let b3 = load::<FULL>(masks[3], bp.wrapping_add(48));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
            acc_r[2] = _mm512_fmadd_ps(av, b2, acc_r[2]);
            acc_r[3] = _mm512_fmadd_ps(av, b3, acc_r[3]);
        }
    }
    let al = _mm512_set1_ps(alpha);
    for (r, acc_r) in acc.iter().enumerate() {
        let orow = out.add(r * ldo);
        for (v, &x) in acc_r.iter().enumerate() {
            let p = orow.wrapping_add(v * 16);
            if FULL {
                _mm512_storeu_ps(p, _mm512_fmadd_ps(x, al, _mm512_loadu_ps(p)));
            } else {
                let o = _mm512_maskz_loadu_ps(masks[v], p);
                _mm512_mask_storeu_ps(p, masks[v], _mm512_fmadd_ps(x, al, o));
            }
        }
    }
}

/// `out [m, n] += a [m, k] · W` with `W` packed ([`PackedWeight`]): parallel over panels
/// of 64 columns, each task going over its panels with every row block of `a`, K in blocks
/// of [`PACKED_KC`] (a choice that depends on K only, so that each output element is the
/// same sum in the same order whatever `m`).
///
/// Returns `false`, leaving `out` untouched, when the CPU lacks AVX-512 or the slice lengths
/// do not match `m` and the weight's sizes.
pub(crate) fn matmul_packed(m: usize, a: &[f32], w: &PackedWeight, out: &mut [f32]) -> bool {
    let (k, n) = (w.k(), w.n());
    if !available() || m.checked_mul(k) != Some(a.len()) || m.checked_mul(n) != Some(out.len()) {
        return false;
    }
    if m == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let panels = n.div_ceil(PANEL);
        // One row block: a pure stream of the weight, a few panels per task; more rows: one
        // panel per task (it stays in L2 while the row blocks go over it).
        let per_task = if m <= NN_MR {
            panels.div_ceil(2 * rayon::current_num_threads()).max(1)
        } else {
            1
        };
        let tasks = panels.div_ceil(per_task);
        let o = OutPtr(out.as_mut_ptr());
        let run = |t: usize| {
            let p0 = t * per_task;
            let p1 = (p0 + per_task).min(panels);
            // SAFETY: `available()` checked AVX-512F; `a` and `out` hold [m, k] and [m, n]
            // (checked above), `w` holds `panels` panels of [k, 64]; task `t` writes only the
            // columns of panels `p0 .. p1` of `out`, which no other task writes.
            unsafe { packed_panels(m, k, n, a.as_ptr(), w.as_ptr(), o.get(), p0, p1) }
        };
        if parallel(m, n, k, tasks) {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Panels `p0 .. p1` of `out += a · W`, `W` packed.
///
/// # Safety
/// AVX-512F; `a`, `out` point to the contiguous [m, k], [m, n] matrices, `w` to the packed
/// panels of a `[k, n]` weight, panels `p0 .. p1` exist, and no other thread accesses their
/// columns of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_panels(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    w: *const f32,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    for p in p0..p1 {
        let j0 = p * PANEL;
        let width = (n - j0).min(PANEL);
        let masks = panel_masks(width);
        let full = width == PANEL;
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(PACKED_KC);
            // SAFETY: rows k0 .. k0 + kc of panel p (64 floats each, padded) and columns
            // j0 .. j0 + width of `out` are in bounds and belong to this task.
            row_blocks(
                m,
                k,
                a.add(k0),
                w.add((p * k + k0) * PANEL),
                PANEL,
                kc,
                out.add(j0),
                n,
                masks,
                full,
                1.0,
            );
            k0 += kc;
        }
    }
}

/// `b [N, K]` (`a · bᵀ`): parallel over groups of rows of `b`.
#[cfg(target_arch = "x86_64")]
fn nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], alpha: f32, out: &mut [f32]) {
    let group = (NT_GROUP_BYTES / (k * 4)).max(1).div_ceil(NT_NJ) * NT_NJ;
    let groups = n.div_ceil(group);
    let o = OutPtr(out.as_mut_ptr());
    let run = |g: usize| {
        let j0 = g * group;
        let j1 = (j0 + group).min(n);
        // SAFETY: `available()` checked AVX-512F; the slices hold the [m, k], [n, k], [m, n]
        // matrices (lengths checked by the caller), and group `g` writes only columns
        // `j0 .. j1` of `out`, which no other task writes.
        unsafe { nt_group(m, n, k, a.as_ptr(), b.as_ptr(), alpha, o.get(), j0, j1) }
    };
    if parallel(m, n, k, groups) {
        (0..groups).into_par_iter().for_each(run);
    } else {
        (0..groups).for_each(run);
    }
}

/// Columns `j0 .. j1` of `out += alpha · a · bᵀ`, `b [N, K]`.
///
/// # Safety
/// AVX-512F; `a`, `b`, `out` point to the contiguous [m, k], [n, k], [m, n] matrices,
/// `j0 < j1 ≤ n`, and no other thread accesses columns `j0 .. j1` of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn nt_group(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    alpha: f32,
    out: *mut f32,
    j0: usize,
    j1: usize,
) {
    let mut i = 0;
    while i < m {
        let r = (m - i).min(NT_MR);
        let ap = a.add(i * k);
        let mut j = j0;
        while j < j1 {
            let nj = (j1 - j).min(NT_NJ);
            // Fewer than NT_NJ rows of `b` left: the missing ones repeat the last row, and
            // their sums are not stored.
            let mut brows = [b; NT_NJ];
            for (q, row) in brows.iter_mut().enumerate() {
                *row = b.add((j + q.min(nj - 1)) * k);
            }
            let op = out.add(i * n + j);
            // SAFETY (all arms): rows i .. i + r of `a`, rows j .. j + nj of `b` and the
            // [r, nj] block of `out` at (i, j) are in bounds.
            match r {
                6 => nt_tile::<6>(ap, k, brows, k, op, n, nj, alpha),
                5 => nt_tile::<5>(ap, k, brows, k, op, n, nj, alpha),
                4 => nt_tile::<4>(ap, k, brows, k, op, n, nj, alpha),
                3 => nt_tile::<3>(ap, k, brows, k, op, n, nj, alpha),
                2 => nt_tile::<2>(ap, k, brows, k, op, n, nj, alpha),
                _ => nt_tile::<1>(ap, k, brows, k, op, n, nj, alpha),
            }
            j += nj;
        }
        i += r;
    }
}

/// The sums of one k range of an `R × NT_NJ` dot-product tile: `acc[r][q] += a[r, kk..kk +
/// 16] · brows[q][kk..kk + 16]` over the vectors of `kk0 .. kk1` (a multiple of 16 long, or
/// one vector with lanes `mask`).
///
/// # Safety
/// AVX-512F; the lanes read are in bounds of `a`'s R rows (stride `lda`) and of `brows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn nt_masked_step<const R: usize>(
    acc: &mut [[__m512; NT_NJ]; R],
    a: *const f32,
    lda: usize,
    brows: &[*const f32; NT_NJ],
    kk: usize,
    mask: u16,
) {
    let mut bv = [_mm512_setzero_ps(); NT_NJ];
    for q in 0..NT_NJ {
        bv[q] = _mm512_maskz_loadu_ps(mask, brows[q].add(kk));
    }
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let av = _mm512_maskz_loadu_ps(mask, a.add(r * lda + kk));
        for q in 0..NT_NJ {
            acc_r[q] = _mm512_fmadd_ps(av, bv[q], acc_r[q]);
        }
    }
}

/// An `R × 4` tile of dot products: `out[r, q] += alpha · Σ_k a[r, k] · brows[q][k]` for
/// `q < nj`. The last `k % 16` elements are one masked vector. (No alignment peel as in the
/// `b [K, N]` kernel: it would make the order of the sums depend on where `b` lies in
/// memory, and results must not change between runs.)
///
/// # Safety
/// AVX-512F; `a` points to R rows (stride `lda`) of `k` floats, each of `brows` to `k`
/// floats, `out` to R rows (stride `ldo`) of `nj` writable floats no other thread accesses;
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn nt_tile<const R: usize>(
    a: *const f32,
    lda: usize,
    brows: [*const f32; NT_NJ],
    k: usize,
    out: *mut f32,
    ldo: usize,
    nj: usize,
    alpha: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); NT_NJ]; R];
    let kfull = k / 16 * 16;
    let mut kk = 0;
    while kk < kfull {
        let mut bv = [_mm512_setzero_ps(); NT_NJ];
        for q in 0..NT_NJ {
            bv[q] = _mm512_loadu_ps(brows[q].add(kk));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_loadu_ps(a.add(r * lda + kk));
            for q in 0..NT_NJ {
                acc_r[q] = _mm512_fmadd_ps(av, bv[q], acc_r[q]);
            }
        }
        kk += 16;
    }
    if kfull < k {
        let tail = k - kfull;
        nt_masked_step::<R>(&mut acc, a, lda, &brows, kfull, ((1u32 << tail) - 1) as u16);
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let orow = out.add(r * ldo);
        for (q, &x) in acc_r.iter().enumerate().take(nj) {
            *orow.add(q) += alpha * _mm512_reduce_add_ps(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
        // Uniform in ±[0.5, 1.5): fresh values, never zero.
        (0..len)
            .map(|_| {
                let x = 0.5 + rng.uniform() as f32;
                if rng.below(2) == 0 {
                    x
                } else {
                    -x
                }
            })
            .collect()
    }

    /// `out + alpha · a · b` in f64, and the sum of |terms| per element (the error scale).
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        trans_b: bool,
        alpha: f32,
        out: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let mut want = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    let bv = if trans_b {
                        b[j * k + kk]
                    } else {
                        b[kk * n + j]
                    };
                    let t = a[i * k + kk] as f64 * bv as f64;
                    s += t;
                    abs += t.abs();
                }
                want[i * n + j] = out[i * n + j] as f64 + alpha as f64 * s;
                scale[i * n + j] = out[i * n + j].abs() as f64 + (alpha as f64).abs() * abs;
            }
        }
        (want, scale)
    }

    #[test]
    fn small_m_kernels_match_f64_reference() {
        if !available() {
            eprintln!("no AVX-512F: the fast path is off on this CPU, nothing to test");
            return;
        }
        let mut rng = Rng::new(7);
        let mut checked = 0;
        for &m in &[1usize, 2, 3, 7, 8, 9, 16, 31, 33, 64, 100, 128] {
            for &(k, n) in &[
                (13usize, 13usize),
                (100, 771),
                (771, 100),
                (768, 768),
                (17, 1029),
                (1100, 65),
                (64, 208),
            ] {
                if k * n >= 500_000 && ![1, 9, 64].contains(&m) {
                    // Keep the debug-build test quick: the largest shape at a few M.
                    continue;
                }
                for trans_b in [false, true] {
                    for &(alpha, fill) in &[(1.0f32, false), (0.37, true), (-1.5, true)] {
                        let a = random(&mut rng, m * k);
                        // `b` at any offset from a cache line (the kernels align their
                        // loads to it when rows allow).
                        let off = rng.below(16) as usize;
                        let bbuf = random(&mut rng, n * k + off);
                        let b = &bbuf[off..];
                        let init = if fill {
                            random(&mut rng, m * n)
                        } else {
                            vec![0.0; m * n]
                        };
                        let mut out = init.clone();
                        assert!(matmul_small_m(m, n, k, &a, b, trans_b, alpha, &mut out));
                        let (want, scale) = reference(m, n, k, &a, b, trans_b, alpha, &init);
                        for idx in 0..m * n {
                            let err = (out[idx] as f64 - want[idx]).abs();
                            let tol = 1e-6 * (k as f64).sqrt().max(4.0) * scale[idx] + 1e-30;
                            assert!(
                                err <= tol,
                                "m {m} n {n} k {k} trans_b {trans_b} alpha {alpha} at \
                                 ({}, {}): got {} want {} (err {err:e}, tol {tol:e})",
                                idx / n,
                                idx % n,
                                out[idx],
                                want[idx]
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100);
    }

    #[test]
    fn small_m_results_do_not_depend_on_addresses() {
        // Training resumes and workspace reuse expect bit-identical results run to run, so
        // the order of the sums must not follow where the operands lie in memory.
        if !available() {
            return;
        }
        let mut rng = Rng::new(11);
        for &(m, n, k) in &[(3usize, 768usize, 768usize), (20, 1024, 768), (5, 300, 96)] {
            let a = random(&mut rng, m * k);
            let b = random(&mut rng, n * k);
            for trans_b in [false, true] {
                let mut first: Option<Vec<f32>> = None;
                for off in 0..16 {
                    let mut buf = vec![0.0f32; off];
                    buf.extend_from_slice(&b);
                    let mut out = vec![0.25f32; m * n];
                    assert!(matmul_small_m(
                        m,
                        n,
                        k,
                        &a,
                        &buf[off..],
                        trans_b,
                        0.5,
                        &mut out
                    ));
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert!(
                            f.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "m {m} n {n} k {k} trans_b {trans_b}: offset {off} changes bits"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn packed_kernel_matches_f64_reference_in_both_layouts() {
        if !available() {
            eprintln!("no AVX-512F: packed weights are off on this CPU, nothing to test");
            return;
        }
        let mut rng = Rng::new(23);
        // A K past PACKED_KC (two K blocks), widths around a panel, a wide head-like N.
        for &(m, k, n) in &[
            (1usize, 13usize, 13usize),
            (6, 64, 64),
            (7, 100, 771),
            (16, 768, 2304),
            (3, PACKED_KC + 37, 70),
            (130, 96, 129),
            (2, 31, 5000),
        ] {
            for trans in [false, true] {
                let a = random(&mut rng, m * k);
                let w = random(&mut rng, k * n);
                let packed = PackedWeight::new("w", &w, k, n, trans).unwrap();
                let init = random(&mut rng, m * n);
                let mut out = init.clone();
                assert!(matmul_packed(m, &a, &packed, &mut out));
                let (want, scale) = reference(m, n, k, &a, &w, trans, 1.0, &init);
                for idx in 0..m * n {
                    let err = (out[idx] as f64 - want[idx]).abs();
                    let tol = 1e-6 * (k as f64).sqrt().max(4.0) * scale[idx];
                    assert!(
                        err <= tol,
                        "m {m} k {k} n {n} trans {trans} at {idx}: got {} want {} \
                         (err {err:e}, tol {tol:e})",
                        out[idx],
                        want[idx]
                    );
                }
            }
        }
    }

    #[test]
    fn packed_rows_do_not_depend_on_the_batch() {
        // A token's output must be the same bits alone, in a batch, and at any row of it
        // (batched serving then gives each request what it gets alone).
        if !available() {
            return;
        }
        let mut rng = Rng::new(29);
        for &(k, n) in &[(768usize, 300usize), (PACKED_KC + 5, 64)] {
            let w = random(&mut rng, k * n);
            let packed = PackedWeight::new("w", &w, k, n, false).unwrap();
            let m = 37;
            let a = random(&mut rng, m * k);
            let mut all = vec![0.5f32; m * n];
            assert!(matmul_packed(m, &a, &packed, &mut all));
            for (i0, rows) in [(0usize, 1usize), (5, 1), (36, 1), (3, 6), (10, 13)] {
                let mut part = vec![0.5f32; rows * n];
                assert!(matmul_packed(
                    rows,
                    &a[i0 * k..(i0 + rows) * k],
                    &packed,
                    &mut part
                ));
                let same = part
                    .iter()
                    .zip(&all[i0 * n..(i0 + rows) * n])
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "k {k} n {n}: rows {i0}..{} differ", i0 + rows);
            }
        }
    }

    #[test]
    fn small_m_declines_bad_sizes() {
        let a = [1.0f32; 6];
        let b = [1.0f32; 6];
        let mut out = [0.0f32; 4];
        // a is [2, 3], b must be [3, 2]: a wrong output length is declined, untouched.
        assert!(!matmul_small_m(2, 3, 3, &a, &b, false, 1.0, &mut out));
        assert!(!matmul_small_m(0, 2, 3, &a, &b, false, 1.0, &mut out));
        assert_eq!(out, [0.0; 4]);
    }
}
