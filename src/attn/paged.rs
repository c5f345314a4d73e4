//! Paged-KV decode: attention of `Tq ≤ 16` new queries per sequence over
//! `[prefix table ; paged sequence K/V]` (docs/ARCHITECTURE.md §1, "paged decode").
//!
//! - `q [B, Tq, Hq, D]`; the sequence keys and values live in pages
//!   `k_cache, v_cache [num_pages, page_size, Hkv, D]` (page size a power of two, 16 by
//!   default as in vLLM and FlashInfer), sequence `b`'s key `j` in page
//!   `block_table[b, j / page_size]` at slot `j % page_size`; `seqlen_k[b]` keys.
//! - The prefix table `[NP, P, Hkv, D]` may hold adapters of different lengths:
//!   `prefix_len[n] ≤ P` valid rows of prefix `n` (default `P`); rows past it are masked.
//! - Query row `i` sees its whole prefix and the sequence keys `j < seqlen_k[b] - Tq + i + 1`
//!   (clamped to `0..=seqlen_k[b]`): causal, bottom-right aligned, as the dense contract with
//!   `seqlen_q = Tq`. The same output, LSE (natural log, f32) and no-NaN rules: a row that
//!   sees no key gets `o = 0`, `lse = -inf`.
//! - Metadata (`block_table`, `seqlen_k`, `prefix_index`, `prefix_len`) are host slices
//!   (checked: out-of-range values are errors) or i32 device tensors, made safe where they are
//!   read: `seqlen_k[b]` clamped to `0..=max_pages · page_size`, a page number clamped to
//!   `0..num_pages`, `prefix_len[n]` to `0..=P`, a prefix index outside `0..NP` means none.
//!
//! [`kv_append_plan`] plans the write of new keys and values into the pages (prefill and each
//! decode step); the `Backend` runs it with strided copies.

use super::oracle::{to_f64, Outputs, Precision};
use super::{
    check_input, check_meta_tensor, check_output, check_prefix_table, query_dtype, AttnFwdOut,
    Meta, PrefixKv,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, TensorView};
use rayon::prelude::*;

/// Most new query rows per sequence a paged-decode call takes.
pub const MAX_DECODE_TQ: usize = 16;

/// The paged sequence K/V of a decode call.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    /// Key pages `[num_pages, page_size, Hkv, D]`.
    pub k_cache: TensorView<'a>,
    /// Value pages `[num_pages, page_size, Hkv, D]`.
    pub v_cache: TensorView<'a>,
    /// Page numbers `[B, max_pages]`, row-major (a host slice holds `B · max_pages` values;
    /// a device tensor has that shape). Entries past a sequence's last page are not read.
    pub block_table: Meta<'a>,
    /// Keys per sequence `[B]` (the tokens in its pages).
    pub seqlen_k: Meta<'a>,
}

/// Inputs of a paged-decode call.
#[derive(Clone, Copy, Debug)]
pub struct PagedAttnArgs<'a> {
    /// New queries `[B, Tq, Hq, D]`, `Tq ≤ 16`, all valid.
    pub q: TensorView<'a>,
    /// The paged keys and values.
    pub kv: PagedKv<'a>,
    /// The prefix table `[NP, P, Hkv, D]`, if any.
    pub prefix: Option<PrefixKv<'a>>,
    /// Per-sequence prefix `[B]` in `-1..NP` (default 0). Needs `prefix`.
    pub prefix_index: Option<Meta<'a>>,
    /// Valid rows of each prefix `[NP]`, each `≤ P` (default `P`). Needs `prefix`.
    pub prefix_len: Option<Meta<'a>>,
    /// Score scale (default `1/sqrt(D)`).
    pub scale: Option<f32>,
}

impl<'a> PagedAttnArgs<'a> {
    /// A call over paged K/V with no prefix and the default scale.
    pub fn new(
        q: TensorView<'a>,
        k_cache: TensorView<'a>,
        v_cache: TensorView<'a>,
        block_table: Meta<'a>,
        seqlen_k: Meta<'a>,
    ) -> Self {
        PagedAttnArgs {
            q,
            kv: PagedKv {
                k_cache,
                v_cache,
                block_table,
                seqlen_k,
            },
            prefix: None,
            prefix_index: None,
            prefix_len: None,
            scale: None,
        }
    }
    /// Sets the prefix table `[NP, P, Hkv, D]`.
    pub fn prefix(mut self, k_pre: TensorView<'a>, v_pre: TensorView<'a>) -> Self {
        self.prefix = Some(PrefixKv { k: k_pre, v: v_pre });
        self
    }
    /// Sets the per-sequence prefix index (`-1` = none).
    pub fn prefix_index(mut self, idx: Meta<'a>) -> Self {
        self.prefix_index = Some(idx);
        self
    }
    /// Sets the valid rows of each prefix of the table.
    pub fn prefix_len(mut self, len: Meta<'a>) -> Self {
        self.prefix_len = Some(len);
        self
    }
    /// Sets the score scale.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Validates shapes, dtypes, strides, devices and metadata, and returns the problem.
    pub fn check(&self) -> Result<PagedProblem> {
        PagedProblem::from_args(self)
    }
}

/// A validated paged-decode problem.
#[derive(Clone, Debug, PartialEq)]
pub struct PagedProblem {
    /// Batch `B`.
    pub batch: usize,
    /// New query rows per sequence `Tq`.
    pub tq: usize,
    /// Query heads `Hq`.
    pub heads_q: usize,
    /// Key/value heads `Hkv`.
    pub heads_kv: usize,
    /// Head dimension `D`.
    pub head_dim: usize,
    /// Pages in the cache.
    pub num_pages: usize,
    /// Keys per page (a power of two).
    pub page_size: usize,
    /// Block-table columns.
    pub max_pages: usize,
    /// Rows of the prefix table `P` (0 without one).
    pub prefix_rows: usize,
    /// Prefixes in the table `NP` (0 without one).
    pub num_prefixes: usize,
    /// Score scale.
    pub scale: f32,
    /// Element type of q, the caches, the prefix and o.
    pub dtype: DType,
    /// Where the tensors live.
    pub location: Location,
    /// Prefix of each sequence (`None`: none).
    pub prefix_of: Vec<Option<usize>>,
    /// Valid rows of each prefix.
    pub prefix_lens: Vec<usize>,
    /// Keys of each sequence.
    pub lens_k: Vec<usize>,
    /// The block table `[B, max_pages]` (device values clamped into `0..num_pages`).
    pub pages: Vec<i32>,
    /// Whether the metadata vectors are the values the kernels use (false only for device
    /// metadata on a GPU; then they hold defaults and the device tensors decide).
    pub meta_on_host: bool,
}

impl PagedProblem {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    /// Prefix rows sequence `b` sees.
    pub fn prefix_rows_of(&self, b: usize) -> usize {
        self.prefix_of[b].map_or(0, |n| self.prefix_lens[n])
    }
    /// Sequence keys query row `i` of sequence `b` sees: keys `0..n`.
    pub fn visible_seq_keys(&self, b: usize, i: usize) -> usize {
        let sk = self.lens_k[b] as i64;
        (sk - self.tq as i64 + i as i64 + 1).clamp(0, sk) as usize
    }
    /// `(page, slot)` of sequence `b`'s key `j`.
    pub fn slot(&self, b: usize, j: usize) -> (usize, usize) {
        let page = self.pages[b * self.max_pages + j / self.page_size] as usize;
        (page, j % self.page_size)
    }
    /// Exact count of visible (query, key) pairs over the batch and the query heads.
    pub fn visible_pairs(&self) -> u64 {
        let mut pairs = 0u64;
        for b in 0..self.batch {
            for i in 0..self.tq {
                pairs += (self.prefix_rows_of(b) + self.visible_seq_keys(b, i)) as u64;
            }
        }
        pairs * self.heads_q as u64
    }
    /// `[B, Tq, Hq, D]`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.tq, self.heads_q, self.head_dim]
    }
    /// `[B, Hq, Tq]`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.tq]
    }

    /// Checks the outputs against this problem.
    pub fn check_out(&self, out: &AttnFwdOut) -> Result<()> {
        check_output("o", &out.o, &self.q_dims(), self.dtype, self.location)?;
        if let Some(lse) = &out.lse {
            check_output("lse", lse, &self.lse_dims(), DType::F32, self.location)?;
        }
        Ok(())
    }

    fn from_args(a: &PagedAttnArgs) -> Result<PagedProblem> {
        let qd = a.q.dims();
        if qd.len() != 4 {
            return Err(Error::shape("q", "rank 4 [B, Tq, Hq, D]", qd));
        }
        let (batch, tq, heads_q, head_dim) = (qd[0], qd[1], qd[2], qd[3]);
        if tq > MAX_DECODE_TQ {
            return Err(Error::shape(
                "q",
                format!("[B, Tq <= {MAX_DECODE_TQ}, Hq, D] (paged decode takes at most {MAX_DECODE_TQ} new rows)"),
                qd,
            ));
        }
        let kd = a.kv.k_cache.dims();
        if kd.len() != 4 || kd[3] != head_dim {
            return Err(Error::shape(
                "k_cache",
                format!("[num_pages, page_size, Hkv, D={head_dim}]"),
                kd,
            ));
        }
        if a.kv.v_cache.dims() != kd {
            return Err(Error::shape(
                "v_cache",
                format!("{kd:?} like k_cache"),
                a.kv.v_cache.dims(),
            ));
        }
        let (num_pages, page_size, heads_kv) = (kd[0], kd[1], kd[2]);
        if !page_size.is_power_of_two() {
            return Err(Error::shape(
                "k_cache",
                format!("a page size (dimension 1) that is a power of two, got {page_size}"),
                kd,
            ));
        }
        if heads_kv == 0 || heads_q % heads_kv != 0 {
            return Err(Error::shape(
                "q",
                format!("a head count Hq that is a positive multiple of k_cache's Hkv={heads_kv}"),
                qd,
            ));
        }
        if head_dim == 0 {
            return Err(Error::shape("q", "head dimension D >= 1", qd));
        }
        let (dtype, location) = query_dtype(&a.q)?;
        check_input("q", &a.q, dtype, location)?;
        check_input("k_cache", &a.kv.k_cache, dtype, location)?;
        check_input("v_cache", &a.kv.v_cache, dtype, location)?;
        let (prefix_rows, num_prefixes) =
            check_prefix_table(a.prefix.as_ref(), heads_kv, head_dim, dtype, location)?;
        let mut meta_on_host = true;
        // Host values of a metadata argument of `n` values: `Ok(None)` for device values a
        // GPU holds (the host does not read them).
        let mut values =
            |arg: &str, m: &Meta, dims: &[usize]| -> Result<Option<(Vec<i32>, bool)>> {
                match m {
                    Meta::Host(v) => {
                        let n: usize = dims.iter().product();
                        if v.len() != n {
                            return Err(Error::shape(
                                arg,
                                format!("{dims:?} ({n} values)"),
                                &[v.len()],
                            ));
                        }
                        Ok(Some((v.to_vec(), false)))
                    }
                    Meta::Device(t) => {
                        check_meta_dims(arg, t, dims, location)?;
                        if location != Location::Host {
                            meta_on_host = false;
                            return Ok(None);
                        }
                        Ok(Some((read_i32(t)?, true)))
                    }
                }
            };
        if a.prefix.is_none() && (a.prefix_index.is_some() || a.prefix_len.is_some()) {
            return Err(Error::index(
                "prefix_index",
                "prefix_index or prefix_len given without a prefix table (k_pre, v_pre)",
            ));
        }
        let max_pages = match &a.kv.block_table {
            Meta::Host(v) => {
                if batch == 0 || v.len() % batch != 0 {
                    return Err(Error::shape(
                        "block_table",
                        format!("[B={batch}, max_pages] (a multiple of B values)"),
                        &[v.len()],
                    ));
                }
                v.len() / batch
            }
            Meta::Device(t) => {
                if t.dims().len() != 2 {
                    return Err(Error::shape(
                        "block_table",
                        format!("[B={batch}, max_pages]"),
                        t.dims(),
                    ));
                }
                t.dims()[1]
            }
        };
        let cap = max_pages * page_size;
        let lens_k: Vec<usize> = match values("seqlen_k", &a.kv.seqlen_k, &[batch])? {
            None => vec![0; batch],
            Some((v, true)) => v.iter().map(|&n| (n.max(0) as usize).min(cap)).collect(),
            Some((v, false)) => v
                .iter()
                .enumerate()
                .map(|(b, &n)| {
                    if n < 0 || n as usize > cap {
                        Err(Error::index(
                            "seqlen_k",
                            format!("seqlen_k[{b}] = {n}, expected 0..={cap} (max_pages {max_pages} x page size {page_size})"),
                        ))
                    } else {
                        Ok(n as usize)
                    }
                })
                .collect::<Result<_>>()?,
        };
        let pages: Vec<i32> = match values("block_table", &a.kv.block_table, &[batch, max_pages])? {
            None => vec![0; batch * max_pages],
            Some((v, true)) => v
                .iter()
                .map(|&p| p.clamp(0, num_pages.max(1) as i32 - 1))
                .collect(),
            Some((v, false)) => {
                for b in 0..batch {
                    for c in 0..lens_k[b].div_ceil(page_size) {
                        let p = v[b * max_pages + c];
                        if p < 0 || p as usize >= num_pages {
                            return Err(Error::index(
                                "block_table",
                                format!("block_table[{b}, {c}] = {p}, expected a page in 0..{num_pages}"),
                            ));
                        }
                    }
                }
                v
            }
        };
        if num_pages == 0 && lens_k.iter().any(|&n| n > 0) {
            return Err(Error::index("seqlen_k", "keys in a cache with no pages"));
        }
        let prefix_of = match (&a.prefix_index, &a.prefix) {
            (_, None) => vec![None; batch],
            (None, Some(_)) => {
                if num_prefixes == 0 && batch > 0 {
                    return Err(Error::index(
                        "prefix_index",
                        "defaults to 0, but the prefix table has NP = 0 prefixes",
                    ));
                }
                vec![Some(0); batch]
            }
            (Some(m), Some(_)) => match values("prefix_index", m, &[batch])? {
                None => vec![None; batch],
                Some((v, dev)) => v
                    .iter()
                    .enumerate()
                    .map(|(b, &n)| match n {
                        n if n >= 0 && (n as usize) < num_prefixes => Ok(Some(n as usize)),
                        _ if dev || n == -1 => Ok(None),
                        n => Err(Error::index(
                            "prefix_index",
                            format!(
                                "prefix_index[{b}] = {n}, expected -1 (none) or 0..{num_prefixes}"
                            ),
                        )),
                    })
                    .collect::<Result<_>>()?,
            },
        };
        let prefix_lens = match &a.prefix_len {
            None => vec![prefix_rows; num_prefixes],
            Some(m) => match values("prefix_len", m, &[num_prefixes])? {
                None => vec![prefix_rows; num_prefixes],
                Some((v, true)) => v
                    .iter()
                    .map(|&n| (n.max(0) as usize).min(prefix_rows))
                    .collect(),
                Some((v, false)) => v
                    .iter()
                    .enumerate()
                    .map(|(n, &l)| {
                        if l < 0 || l as usize > prefix_rows {
                            Err(Error::index(
                                "prefix_len",
                                format!("prefix_len[{n}] = {l}, expected 0..={prefix_rows} (P)"),
                            ))
                        } else {
                            Ok(l as usize)
                        }
                    })
                    .collect::<Result<_>>()?,
            },
        };
        let scale = a.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::index(
                "scale",
                format!("{scale}, expected a finite number"),
            ));
        }
        Ok(PagedProblem {
            batch,
            tq,
            heads_q,
            heads_kv,
            head_dim,
            num_pages,
            page_size,
            max_pages,
            prefix_rows,
            num_prefixes,
            scale,
            dtype,
            location,
            prefix_of,
            prefix_lens,
            lens_k,
            pages,
            meta_on_host,
        })
    }
}

/// Device metadata of shape `dims`: i32, contiguous, where the other tensors live.
fn check_meta_dims(arg: &str, t: &TensorView, dims: &[usize], loc: Location) -> Result<()> {
    if dims.len() == 1 {
        return check_meta_tensor(arg, t, dims[0], loc);
    }
    if t.dims() != dims {
        return Err(Error::shape(
            arg,
            format!("{dims:?} (device metadata)"),
            t.dims(),
        ));
    }
    check_meta_tensor(arg, &t.reshape(&[t.numel()])?, t.numel(), loc)
}

/// The values of a contiguous host i32 tensor.
fn read_i32(t: &TensorView) -> Result<Vec<i32>> {
    Ok(t.contiguous_slice::<i32>()?.to_vec())
}

/// The keys row `i` of sequence `b` sees, in order: `(true, n, j)` prefix `n` row `j`, then
/// `(false, page, slot)` sequence keys.
fn keys_of(pr: &PagedProblem, b: usize, i: usize) -> Vec<(bool, usize, usize)> {
    let mut keys = vec![];
    if let Some(n) = pr.prefix_of[b] {
        keys.extend((0..pr.prefix_lens[n]).map(|j| (true, n, j)));
    }
    for j in 0..pr.visible_seq_keys(b, i) {
        let (page, slot) = pr.slot(b, j);
        keys.push((false, page, slot));
    }
    keys
}

/// The f64 oracle of paged decode (plain loops over the pages; with [`Precision::Round`] the
/// naive implementation in a lower precision of the tolerance rule). Outputs `[B, Tq, Hq, D]`
/// and `[B, Hq, Tq]`.
pub fn oracle(args: &PagedAttnArgs, prec: Precision) -> Result<Outputs> {
    let pr = args.check()?;
    let (kc, vc) = (to_f64(&args.kv.k_cache)?, to_f64(&args.kv.v_cache)?);
    let (kp, vp) = match &args.prefix {
        Some(p) => (to_f64(&p.k)?, to_f64(&p.v)?),
        None => (vec![], vec![]),
    };
    let q = to_f64(&args.q)?;
    let d = pr.head_dim;
    let at = |pre: bool, n: usize, j: usize, h: usize| {
        if pre {
            ((n * pr.prefix_rows + j) * pr.heads_kv + h) * d
        } else {
            ((n * pr.page_size + j) * pr.heads_kv + h) * d
        }
    };
    let mut o = vec![0.0; pr.batch * pr.tq * pr.heads_q * d];
    let mut lse = vec![f64::NEG_INFINITY; pr.batch * pr.heads_q * pr.tq];
    for b in 0..pr.batch {
        for h in 0..pr.heads_q {
            let hk = h / pr.group();
            for i in 0..pr.tq {
                let keys = keys_of(&pr, b, i);
                if keys.is_empty() {
                    continue;
                }
                let qi = ((b * pr.tq + i) * pr.heads_q + h) * d;
                let qr = &q[qi..qi + d];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&(pre, n, j)| {
                        let kr = if pre { &kp } else { &kc };
                        let k = &kr[at(pre, n, j, hk)..][..d];
                        prec.r(pr.scale as f64 * qr.iter().zip(k).map(|(a, b)| a * b).sum::<f64>())
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[(b * pr.heads_q + h) * pr.tq + i] = prec.r32(m + l.ln());
                let out = &mut o[qi..qi + d];
                for (s, &(pre, n, j)) in scores.iter().zip(&keys) {
                    let p = prec.r((s - m).exp() / l);
                    let vr = if pre { &vp } else { &vc };
                    let v = &vr[at(pre, n, j, hk)..][..d];
                    out.iter_mut().zip(v).for_each(|(x, y)| *x += p * y);
                }
                out.iter_mut().for_each(|x| *x = prec.r(*x));
            }
        }
    }
    Ok(Outputs { o, lse })
}

/// The paged decode on host tensors (the `cpu` backend). One task per sequence and range of
/// KV heads (ranges only as narrow as the threads need: a batch of 16 runs one task per
/// sequence): the task walks its keys in cache order, reading each key and value row once,
/// in place when the cache is f32, for all `G · Tq` query rows of each of its heads, so the
/// memory sees each page's rows in sequence. f32 scores (8-lane dot products), softmax and
/// accumulation; a head's result does not depend on how heads are grouped into tasks.
pub fn cpu_forward(args: &PagedAttnArgs, mut out: AttnFwdOut) -> Result<()> {
    let pr = args.check()?;
    pr.check_out(&out)?;
    if pr.location != Location::Host {
        return Err(Error::device(
            "q",
            format!(
                "the cpu backend needs host tensors, these are on {}",
                pr.location
            ),
        ));
    }
    let o = out.o.row_writer()?;
    let lse = match out.lse.as_mut() {
        Some(l) => Some(l.row_writer()?),
        None => None,
    };
    let d = pr.head_dim;
    let hkv_n = pr.heads_kv;
    let chunks = (2 * rayon::current_num_threads())
        .div_ceil(pr.batch.max(1))
        .clamp(1, hkv_n.max(1));
    (0..pr.batch * chunks)
        .into_par_iter()
        .try_for_each(|task| -> Result<()> {
            let b = task / chunks;
            let c = task % chunks;
            let (h0, h1) = (c * hkv_n / chunks, (c + 1) * hkv_n / chunks);
            let nh = h1 - h0;
            let (g, tq) = (pr.group(), pr.tq);
            let rows = g * tq;
            // Queries, pre-scaled: head hkv's row r = (query head hkv·G + r / Tq, query r % Tq).
            let mut q = vec![0f32; nh * rows * d];
            for (hh, hkv) in (h0..h1).enumerate() {
                for r in 0..rows {
                    let (h, i) = (hkv * g + r / tq, r % tq);
                    let qv = &args.q;
                    let at = (hh * rows + r) * d;
                    qv.read_f32(qv.layout().index(&[b, i, h, 0]), &mut q[at..at + d])?;
                }
            }
            q.iter_mut().for_each(|x| *x *= pr.scale);
            let plen = pr.prefix_rows_of(b);
            let nk = plen + pr.lens_k[b];
            // Key j of the task: prefix row j (j < plen), then sequence key j - plen in its page.
            let row_of = |j: usize, hkv: usize| -> (bool, [usize; 4]) {
                if j < plen {
                    (true, [pr.prefix_of[b].unwrap_or(0), j, hkv, 0])
                } else {
                    let (page, slot) = pr.slot(b, j - plen);
                    (false, [page, slot, hkv, 0])
                }
            };
            let tensor = |pre: bool, key: bool| -> Result<&TensorView> {
                match (pre, &args.prefix) {
                    (false, _) => Ok(if key {
                        &args.kv.k_cache
                    } else {
                        &args.kv.v_cache
                    }),
                    (true, Some(p)) => Ok(if key { &p.k } else { &p.v }),
                    (true, None) => {
                        Err(Error::index("prefix_index", "a prefix row without a table"))
                    }
                }
            };
            // Row `idx` of `t` as f32: in place for an f32 tensor, else converted into `buf`.
            fn row<'a>(
                t: &TensorView<'a>,
                idx: &[usize; 4],
                buf: &'a mut Vec<f32>,
                d: usize,
            ) -> Result<&'a [f32]> {
                let at = t.layout().index(idx);
                if t.dtype() == DType::F32 {
                    return t.host_row::<f32>(at, d);
                }
                buf.resize(d, 0.0);
                t.read_f32(at, buf)?;
                Ok(buf)
            }
            // Scores [head][query row][key].
            let mut s = vec![0f32; nh * rows * nk];
            let mut buf = Vec::new();
            for j in 0..nk {
                for (hh, hkv) in (h0..h1).enumerate() {
                    let (pre, idx) = row_of(j, hkv);
                    let kr = row(tensor(pre, true)?, &idx, &mut buf, d)?;
                    for r in 0..rows {
                        let at = (hh * rows + r) * d;
                        s[(hh * rows + r) * nk + j] = super::cpu::dot(&q[at..at + d], kr);
                    }
                }
            }
            let mut lse_rows = vec![f32::NEG_INFINITY; nh * rows];
            for (hr, sr) in s.chunks_exact_mut(nk.max(1)).enumerate().take(nh * rows) {
                let n = plen + pr.visible_seq_keys(b, hr % rows % tq);
                sr[n..].fill(0.0);
                if n == 0 {
                    continue;
                }
                let m = crate::simd::max(&sr[..n]);
                crate::simd::exp_shift(&mut sr[..n], m);
                let l = crate::simd::sum(&sr[..n]);
                sr[..n].iter_mut().for_each(|x| *x /= l);
                lse_rows[hr] = m + l.ln();
            }
            let mut acc = vec![0f32; nh * rows * d];
            for j in 0..nk {
                for (hh, hkv) in (h0..h1).enumerate() {
                    let (pre, idx) = row_of(j, hkv);
                    let vr = row(tensor(pre, false)?, &idx, &mut buf, d)?;
                    for r in 0..rows {
                        let p = s[(hh * rows + r) * nk + j];
                        if p == 0.0 {
                            continue;
                        }
                        let at = (hh * rows + r) * d;
                        acc[at..at + d]
                            .iter_mut()
                            .zip(vr)
                            .for_each(|(x, y)| *x += p * y);
                    }
                }
            }
            for (hh, hkv) in (h0..h1).enumerate() {
                for r in 0..rows {
                    let (h, i) = (hkv * g + r / tq, r % tq);
                    let at = (hh * rows + r) * d;
                    // SAFETY: output row (b, i, h) belongs to this task alone.
                    unsafe { o.write_row(o.index(&[b, i, h, 0]), &acc[at..at + d]) };
                    if let Some(lse) = &lse {
                        let x = &lse_rows[hh * rows + r..hh * rows + r + 1];
                        // SAFETY: lse element (b, h, i) belongs to this task alone.
                        unsafe { lse.write_row(lse.index(&[b, h, i]), x) };
                    }
                }
            }
            Ok(())
        })
}

/// One contiguous run of a [`kv_append_plan`]: new rows `t0 .. t0 + len` of sequence `b` go
/// to page `page`, slots `slot0 .. slot0 + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendRun {
    /// Sequence.
    pub b: usize,
    /// First new row.
    pub t0: usize,
    /// Page number.
    pub page: usize,
    /// First slot in the page.
    pub slot0: usize,
    /// Rows in the run.
    pub len: usize,
}

/// Plans writing `t_new` new rows per sequence at positions `seqlen_k[b] ..` of a paged
/// cache with `num_pages` pages of `page_size` slots and block table `[B, max_pages]`
/// (host metadata, checked): the runs of consecutive slots within one page, in order.
pub fn kv_append_plan(
    t_new: usize,
    num_pages: usize,
    page_size: usize,
    block_table: &[i32],
    seqlen_k: &[i32],
) -> Result<Vec<AppendRun>> {
    let batch = seqlen_k.len();
    if !page_size.is_power_of_two() {
        return Err(Error::index(
            "k_cache",
            format!("page size {page_size}, expected a power of two"),
        ));
    }
    if batch == 0 || block_table.len() % batch != 0 {
        return Err(Error::shape(
            "block_table",
            format!("[B={batch}, max_pages] (a multiple of B values)"),
            &[block_table.len()],
        ));
    }
    let max_pages = block_table.len() / batch;
    let mut runs = vec![];
    for (b, &start) in seqlen_k.iter().enumerate() {
        if start < 0 || start as usize + t_new > max_pages * page_size {
            return Err(Error::index(
                "seqlen_k",
                format!(
                    "seqlen_k[{b}] = {start}: {t_new} new rows from there need 0..={} slots (max_pages {max_pages} x page size {page_size})",
                    max_pages * page_size
                ),
            ));
        }
        let mut t = 0;
        while t < t_new {
            let pos = start as usize + t;
            let (col, slot0) = (pos / page_size, pos % page_size);
            let page = block_table[b * max_pages + col];
            if page < 0 || page as usize >= num_pages {
                return Err(Error::index(
                    "block_table",
                    format!("block_table[{b}, {col}] = {page}, expected a page in 0..{num_pages}"),
                ));
            }
            let len = (page_size - slot0).min(t_new - t);
            runs.push(AppendRun {
                b,
                t0: t,
                page: page as usize,
                slot0,
                len,
            });
            t += len;
        }
    }
    Ok(runs)
}
