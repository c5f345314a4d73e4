//! What a model family reads and writes when it serves requests: the paged K/V cache of
//! every layer, the prefix table of the loaded adapters, and the sequences of one step.
//! The serving engine (`crate::engine`) decides which pages and slots each sequence gets;
//! a family's [`super::PrefixLm::step_paged`] only follows the block table.
//!
//! Layouts (the attention contract's): a layer's cache is `[num_pages · page_size, Hkv · D]`
//! rows (`[num_pages, page_size, Hkv, D]`), row `page · page_size + pos % page_size` holding
//! position `pos` of the sequence whose block table names `page` at `pos / page_size`. The
//! prefix table is `[NP, P, L · 2 · Hkv · D]`: slot `np` holds one adapter's
//! `prompt_embeddings` as PEFT lays them out (`[P][layer][key, value][kv head][head dim]`), so
//! a layer's prefix keys are a strided `[NP, P, Hkv, D]` view of it.

use super::Geometry;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorView, TensorViewMut};

/// The shape of the K/V a model caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl KvShape {
    /// The cached K/V shape of a model.
    pub fn of(g: &Geometry) -> KvShape {
        KvShape {
            layers: g.layers,
            kv_heads: g.kv_heads,
            head_dim: g.head_dim,
        }
    }

    /// `Hkv · D`.
    pub fn width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One sequence of a model step: feed `tokens[cached..]` (positions `cached..` after the
/// prefix) into the cache pages `pages` and return the logits of the last fed token.
#[derive(Debug)]
pub struct PagedSeq<'a> {
    /// All the sequence's tokens (prompt, then generated).
    pub tokens: &'a [u32],
    /// How many of them the cache already holds (`< tokens.len()`).
    pub cached: usize,
    /// Its pages (room for all of `tokens`): the row of the block table.
    pub pages: &'a [u32],
    /// Its prefix-table slot.
    pub adapter: Option<u32>,
}

/// A copy of the first `rows` token rows of page `src` into page `dst` (copy-on-write of a
/// page that beams shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCopy {
    /// The shared page being copied.
    pub src: u32,
    /// The sequence's fresh private page.
    pub dst: u32,
    /// Rows of `src` in use by the sequence.
    pub rows: usize,
}

/// How adapters' prefixes reach attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrefixMode {
    /// One shared prefix table, read by attention beside each sequence's pages (ours).
    #[default]
    Table,
    /// The naive method, for comparison: each sequence's cache holds its own copy of its
    /// prefix in its first `P` positions (its prompt starts with `P` placeholder tokens).
    CopiedIntoCache,
}

/// Every layer's paged keys and values.
#[derive(Debug)]
pub struct PagedKv {
    shape: KvShape,
    dtype: DType,
    page_size: usize,
    num_pages: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl PagedKv {
    /// Zeroed caches of `num_pages` pages of `page_size` tokens per layer, in `dtype`.
    pub fn new(
        be: &dyn Backend,
        shape: KvShape,
        dtype: DType,
        num_pages: usize,
        page_size: usize,
    ) -> Result<PagedKv> {
        let rows = num_pages * page_size;
        let mk = || -> Result<Vec<Tensor>> {
            (0..shape.layers)
                .map(|_| be.zeros(&[rows, shape.width()], dtype))
                .collect()
        };
        Ok(PagedKv {
            shape,
            dtype,
            page_size,
            num_pages,
            k: mk()?,
            v: mk()?,
        })
    }

    /// The K/V shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }
    /// The cached keys' and values' dtype (the model's).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages per layer.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    /// Layer `l`'s keys and values `[num_pages · page_size, Hkv · D]`.
    pub fn layer(&self, l: usize) -> (&Tensor, &Tensor) {
        (&self.k[l], &self.v[l])
    }

    /// The cache row of position `pos` of a sequence with block-table row `pages`.
    pub fn row(&self, pages: &[u32], pos: usize) -> usize {
        pages[pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }

    /// Cache rows of positions `0..len` of each sequence, padded to `len_max` with row 0
    /// (padding keys are masked by the lengths): the gather list of the attention keys.
    pub fn rows_of(&self, seqs: &[&PagedSeq], len_max: usize) -> Vec<i32> {
        let mut rows = Vec::with_capacity(seqs.len() * len_max);
        for s in seqs {
            for pos in 0..len_max {
                rows.push(if pos < s.tokens.len() {
                    self.row(s.pages, pos) as i32
                } else {
                    0
                });
            }
        }
        rows
    }

    /// Performs the scheduler's copy-on-write copies in every layer.
    pub fn copy_pages(&mut self, be: &dyn Backend, copies: &[PageCopy]) -> Result<()> {
        let ps = self.page_size;
        for c in copies {
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                // src and dst are different pages of one tensor: copy through a scratch
                // buffer rather than two views of one allocation.
                let src = t.view().narrow(0, c.src as usize * ps, c.rows)?;
                let tmp = be.zeros(&[c.rows, self.shape.width()], t.dtype())?;
                let mut tmp = tmp;
                be.copy(&src, &mut tmp.view_mut())?;
                be.copy(
                    &tmp.view(),
                    &mut t.view_mut().narrow(0, c.dst as usize * ps, c.rows)?,
                )?;
            }
        }
        Ok(())
    }

    /// Appends layer `l`'s new keys and values (`[B, t, Hkv, D]` views, any strides) to each
    /// sequence at positions `start[b] .. start[b] + t` through its block-table row
    /// (`block_table [B · width]`): [`crate::device::kv_append`] on this layer's pages.
    pub fn append(
        &mut self,
        be: &dyn Backend,
        l: usize,
        k_new: &TensorView,
        v_new: &TensorView,
        block_table: &[i32],
        start: &[i32],
    ) -> Result<()> {
        let dims = [
            self.num_pages,
            self.page_size,
            self.shape.kv_heads,
            self.shape.head_dim,
        ];
        let (k, v) = (&mut self.k[l], &mut self.v[l]);
        crate::device::kv_append(
            be,
            k_new,
            v_new,
            &mut k.view_mut().reshape(&dims)?,
            &mut v.view_mut().reshape(&dims)?,
            block_table,
            start,
        )
    }
}

/// The loaded adapters' prefixes on the device, one slot each (which adapter is in which
/// slot is the engine's business).
#[derive(Debug)]
pub struct PrefixTable {
    shape: KvShape,
    prefix_len: usize,
    /// Valid rows of each slot (0: empty).
    lens: Vec<usize>,
    table: Tensor,
}

impl PrefixTable {
    /// A zeroed table of `capacity` slots of up to `prefix_len` virtual tokens.
    pub fn new(
        be: &dyn Backend,
        shape: KvShape,
        dtype: DType,
        capacity: usize,
        prefix_len: usize,
    ) -> Result<PrefixTable> {
        let width = shape.layers * 2 * shape.width();
        Ok(PrefixTable {
            shape,
            prefix_len,
            lens: vec![0; capacity],
            table: be.zeros(&[capacity, prefix_len, width], dtype)?,
        })
    }

    /// Rows of every slot: the longest prefix the table takes (`P`).
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }
    /// Valid rows of the adapter in `slot` (`≤ P`; 0 for an empty or unknown slot).
    pub fn slot_len(&self, slot: u32) -> usize {
        self.lens.get(slot as usize).copied().unwrap_or(0)
    }
    /// Valid rows of every slot, as the paged attention's `prefix_len [NP]` metadata.
    pub fn slot_lens(&self) -> Vec<i32> {
        self.lens.iter().map(|&n| n as i32).collect()
    }
    /// Slots.
    pub fn capacity(&self) -> usize {
        self.table.dims()[0]
    }
    /// The table's dtype (the model's).
    pub fn dtype(&self) -> DType {
        self.table.dtype()
    }

    /// Writes adapter `name`'s prefix `[p, L·2·Hkv·D]` (`p ≤ P`, on the backend, in the
    /// table's dtype) into the first `p` rows of `slot`; rows past `p` are masked wherever
    /// the slot is read.
    pub fn write(
        &mut self,
        be: &dyn Backend,
        slot: u32,
        name: &str,
        prefix: &Tensor,
    ) -> Result<()> {
        let width = self.table.dims()[2];
        let d = prefix.dims();
        if d.len() != 2 || d[1] != width {
            return Err(Error::shape(
                &format!("adapter {name:?} prefix"),
                format!("[P, L*2*Hkv*D = {width}]"),
                d,
            ));
        }
        if d[0] == 0 || d[0] > self.prefix_len {
            return Err(Error::index(
                &format!("adapter {name:?}"),
                format!(
                    "{} virtual tokens; the prefix table takes 1..={} (its P)",
                    d[0], self.prefix_len
                ),
            ));
        }
        if prefix.dtype() != self.table.dtype() {
            return Err(Error::DType {
                arg: format!("adapter {name:?} prefix"),
                expected: self.table.dtype().name().into(),
                got: prefix.dtype().name().into(),
            });
        }
        if slot as usize >= self.capacity() {
            return Err(Error::index(
                "slot",
                format!("{slot}: the table has {} slots", self.capacity()),
            ));
        }
        be.copy(
            &prefix.view(),
            &mut self
                .table
                .view_mut()
                .select(0, slot as usize)?
                .narrow(0, 0, d[0])?,
        )?;
        self.lens[slot as usize] = d[0];
        Ok(())
    }

    /// Layer `l`'s prefix keys and values, `[NP, P, Hkv, D]` views.
    pub fn layer(&self, l: usize) -> Result<(TensorView<'_>, TensorView<'_>)> {
        let s = self.shape;
        let np = self.table.dims()[0];
        let v = self
            .table
            .view()
            .reshape(&[np, self.prefix_len, s.layers, 2, s.kv_heads, s.head_dim])?
            .select(2, l)?;
        Ok((v.select(2, 0)?, v.select(2, 1)?))
    }
}

/// The most new tokens a sequence may feed to the paged decode kernel (its contract's `Tq`);
/// longer feeds (prompts) gather their keys and take the prefill kernel.
pub const MAX_DECODE_TOKENS: usize = 16;

/// A model step as passes: the sequences that feed the same number of tokens `t` run as one
/// `[B, t]` pass (`pass(members, t)` returns their last-position logits in member order),
/// each pass's members sorted by prefix length so that [`Pass::attend`] attends per run of
/// equal lengths. Returns every sequence's logits in the order of `seqs`.
pub fn step_in_passes(
    seqs: &[PagedSeq],
    prefixes: &PrefixTable,
    mode: PrefixMode,
    mut pass: impl FnMut(&[&PagedSeq], usize) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let start = |s: &PagedSeq| match (mode, s.adapter) {
        (PrefixMode::CopiedIntoCache, Some(a)) => s.cached.max(prefixes.slot_len(a)),
        _ => s.cached,
    };
    let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
    let mut fed: Vec<usize> = seqs
        .iter()
        .map(|s| s.tokens.len().saturating_sub(start(s)))
        .collect();
    fed.sort_unstable();
    fed.dedup();
    for t in fed {
        if t == 0 {
            return Err(Error::index(
                "sequence",
                "nothing to feed (every token is cached, or the prompt holds only the copied prefix)",
            ));
        }
        let mut group: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].tokens.len().saturating_sub(start(&seqs[i])) == t)
            .collect();
        group.sort_by_key(|&i| seqs[i].adapter.map(|a| prefixes.slot_len(a)));
        let members: Vec<&PagedSeq> = group.iter().map(|&i| &seqs[i]).collect();
        let logits = pass(&members, t)?;
        if logits.len() != group.len() {
            return Err(Error::index(
                "step",
                format!("{} logits for {} sequences", logits.len(), group.len()),
            ));
        }
        for (i, l) in group.into_iter().zip(logits) {
            out[i] = Some(l);
        }
    }
    out.into_iter()
        .map(|l| l.ok_or_else(|| Error::index("sequence", "was fed in no pass")))
        .collect()
}

/// One pass of `B` sequences that each feed `t` tokens: what every layer's attention needs
/// beside the model (block table, lengths, prefix slots and lengths, the key-gather list and
/// its scratch), built once per pass. A family computes its queries and new keys/values per
/// layer (rotated, for rotary models) and calls [`Pass::attend`].
#[derive(Debug)]
pub struct Pass {
    b: usize,
    t: usize,
    /// Token ids fed, `[B · t]`, sequence-major.
    pub ids: Vec<i32>,
    /// Their positions, after each sequence's own prefix (`P_n ..`; from 0 in the naive
    /// copied-prefix mode, where the prefix occupies the first cache positions).
    pub positions: Vec<i32>,
    width: usize,
    block_table: Vec<i32>,
    starts: Vec<i32>,
    lens_q: Vec<i32>,
    lens_k: Vec<i32>,
    prefix_index: Vec<i32>,
    plen: Vec<usize>,
    slot_lens: Vec<i32>,
    /// Runs `[b0, b1)` of sequences with one prefix length.
    runs: Vec<(usize, usize)>,
    /// (sequence, slot, first row) of prefix rows to copy into the cache (naive mode).
    prefix_copies: Vec<(usize, usize, usize)>,
    decode: bool,
    key_rows: Vec<i32>,
    len_max: usize,
    k_all: Tensor,
    v_all: Tensor,
}

impl Pass {
    /// The pass of `seqs` (sorted by prefix length, as [`step_in_passes`] hands them) feeding
    /// `t` tokens each; an error if a sequence would run past `max_positions` (the context,
    /// prefix included).
    pub fn new(
        be: &dyn Backend,
        seqs: &[&PagedSeq],
        t: usize,
        kv: &PagedKv,
        prefixes: &PrefixTable,
        mode: PrefixMode,
        max_positions: usize,
    ) -> Result<Pass> {
        let b = seqs.len();
        let copied = mode == PrefixMode::CopiedIntoCache;
        let plen: Vec<usize> = seqs
            .iter()
            .map(|s| s.adapter.map_or(0, |a| prefixes.slot_len(a)))
            .collect();
        let width = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1).max(1);
        let mut block_table = vec![0i32; b * width];
        let mut ids = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        let mut prefix_copies = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            for (j, &pg) in s.pages.iter().enumerate() {
                block_table[i * width + j] = pg as i32;
            }
            if t == 0 || t > s.tokens.len() {
                return Err(Error::index(
                    "sequence",
                    format!("feeds {t} of its {} tokens", s.tokens.len()),
                ));
            }
            let offset = if copied { 0 } else { plen[i] };
            if let (true, Some(a)) = (copied, s.adapter) {
                if s.cached < plen[i] {
                    prefix_copies.push((i, a as usize, s.cached));
                }
            }
            if offset + s.tokens.len() > max_positions {
                return Err(Error::index(
                    "sequence",
                    format!(
                        "{} tokens after a prefix of {offset} exceed the context ({max_positions} positions)",
                        s.tokens.len()
                    ),
                ));
            }
            for pos in s.tokens.len() - t..s.tokens.len() {
                ids.push(s.tokens[pos] as i32);
                positions.push((offset + pos) as i32);
            }
        }
        let decode = t <= MAX_DECODE_TOKENS;
        let (key_rows, len_max) = if decode {
            (Vec::new(), 1)
        } else {
            let len_max = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
            (kv.rows_of(seqs, len_max), len_max)
        };
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..b {
            match runs.last_mut() {
                Some(r) if plen[r.0] == plen[i] => r.1 = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        let scratch = || be.zeros(&[b * len_max, kv.shape().width()], kv.dtype());
        Ok(Pass {
            b,
            t,
            ids,
            positions,
            width,
            starts: seqs.iter().map(|s| (s.tokens.len() - t) as i32).collect(),
            lens_q: vec![t as i32; b],
            lens_k: seqs.iter().map(|s| s.tokens.len() as i32).collect(),
            prefix_index: seqs
                .iter()
                .map(|s| match s.adapter {
                    Some(a) if !copied => a as i32,
                    _ => -1,
                })
                .collect(),
            block_table,
            plen,
            slot_lens: prefixes.slot_lens(),
            runs,
            prefix_copies,
            decode,
            key_rows,
            len_max,
            k_all: scratch()?,
            v_all: scratch()?,
        })
    }

    /// The rows of each sequence's last fed token, `[B]` (what goes through the head).
    pub fn last_rows(&self) -> Vec<i32> {
        (0..self.b)
            .map(|i| (i * self.t + self.t - 1) as i32)
            .collect()
    }

    /// Layer `l`'s attention for the pass: writes the new keys and values (`[B, t, Hkv, D]`
    /// views, already rotated for a rotary model) into their pages (in the naive mode also
    /// the copied prefix rows), then attends the queries `q [B, t, Hq, D]` over each
    /// sequence's prefix and cached keys into `out [B, t, Hq, D]`: the decode kernel on the
    /// pages in place for `t ≤ 16` (each slot's rows past its length masked), otherwise the
    /// keys gathered from the pages and one prefill call per run of equal prefix lengths over
    /// the table narrowed to that length (causal, bottom-right).
    pub fn attend(
        &mut self,
        be: &dyn Backend,
        kv: &mut PagedKv,
        prefixes: &PrefixTable,
        l: usize,
        q: &TensorView,
        k_new: &TensorView,
        v_new: &TensorView,
        out: TensorViewMut,
        scale: f32,
    ) -> Result<()> {
        use crate::attn::paged::PagedAttnArgs;
        use crate::attn::{AttnFwdArgs, AttnFwdOut, Meta};
        let (b, t, w) = (self.b, self.t, self.width);
        let (kp, vp) = prefixes.layer(l)?;
        for &(i, a, from) in &self.prefix_copies {
            let n = self.plen[i] - from;
            let kr = kp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
            let vr = vp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
            let row = &self.block_table[i * w..(i + 1) * w];
            kv.append(be, l, &kr, &vr, row, &[from as i32])?;
        }
        kv.append(be, l, k_new, v_new, &self.block_table, &self.starts)?;
        let s = kv.shape();
        let (hkv, d) = (s.kv_heads, s.head_dim);
        let (kc, vc) = kv.layer(l);
        if self.decode {
            let (pages, ps) = (kv.num_pages(), kv.page_size());
            let args = PagedAttnArgs::new(
                *q,
                kc.view().reshape(&[pages, ps, hkv, d])?,
                vc.view().reshape(&[pages, ps, hkv, d])?,
                Meta::Host(&self.block_table),
                Meta::Host(&self.lens_k),
            )
            .prefix(kp, vp)
            .prefix_index(Meta::Host(&self.prefix_index))
            .prefix_len(Meta::Host(&self.slot_lens))
            .scale(scale);
            return be.attn_decode(&args, AttnFwdOut { o: out, lse: None });
        }
        be.gather_rows(&kc.view(), &self.key_rows, &mut self.k_all.view_mut())?;
        be.gather_rows(&vc.view(), &self.key_rows, &mut self.v_all.view_mut())?;
        let keys = [b, self.len_max, hkv, d];
        let mut out = out;
        for &(b0, b1) in &self.runs {
            let n = b1 - b0;
            let args = AttnFwdArgs::new(
                q.narrow(0, b0, n)?,
                self.k_all.view().reshape(&keys)?.narrow(0, b0, n)?,
                self.v_all.view().reshape(&keys)?.narrow(0, b0, n)?,
            )
            .seqlens(&self.lens_q[b0..b1], &self.lens_k[b0..b1])
            .causal(true)
            .scale(scale);
            // A run without an adapter attends over no prefix at all.
            let args = match self.plen[b0] {
                0 => args,
                pl => args
                    .prefix(kp.narrow(1, 0, pl)?, vp.narrow(1, 0, pl)?)
                    .prefix_index(&self.prefix_index[b0..b1]),
            };
            let o = out.reborrow().narrow(0, b0, n)?;
            debug_assert_eq!(o.dims()[1], t);
            be.attn_fwd(&args, AttnFwdOut { o, lse: None })?;
        }
        Ok(())
    }
}
