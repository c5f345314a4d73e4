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
use crate::tensor::{DType, Tensor, TensorView};

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
