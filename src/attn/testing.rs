//! Random attention problems for tests, checks and benchmarks, in the layouts real callers
//! use: GPT-2's fused `qkv` buffer, a PEFT-layout prefix tensor, padded (strided) rows.

use super::paged::PagedAttnArgs;
use super::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, Meta};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor, TensorView};

/// How the tensors of a random problem are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// Separate contiguous `q`, `k`, `v`.
    Separate,
    /// One GPT-2 `qkv [B, T, 3, H, D]` buffer (needs `Tq == Tk`, `Hq == Hkv`).
    FusedQkv,
    /// Separate tensors whose rows are padded by a few elements (non-trivial strides).
    Padded,
}

/// Sizes, metadata and layout of a random problem.
#[derive(Clone, Debug)]
pub struct ProblemSpec {
    /// Batch size.
    pub batch: usize,
    /// Query rows.
    pub tq: usize,
    /// Sequence keys.
    pub tk: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Prefix length (0 allowed).
    pub prefix_len: usize,
    /// Number of prefixes in the table; 0 means no table at all.
    pub num_prefixes: usize,
    /// Causal masking.
    pub causal: bool,
    /// Element type.
    pub dtype: DType,
    /// Per-sequence prefix index.
    pub prefix_index: Option<Vec<i32>>,
    /// Per-sequence valid query rows.
    pub seqlen_q: Option<Vec<i32>>,
    /// Per-sequence valid keys.
    pub seqlen_k: Option<Vec<i32>>,
    /// Tensor layout.
    pub layout: KvLayout,
    /// Read the prefix from a PEFT `[P, L, 2, Hkv, D]` tensor at this layer of `L` (needs
    /// `num_prefixes == 1`).
    pub peft_layer: Option<(usize, usize)>,
}

impl ProblemSpec {
    /// A plain spec: one prefix, no padding, separate tensors, f32.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        tq: usize,
        tk: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        prefix_len: usize,
        causal: bool,
    ) -> ProblemSpec {
        ProblemSpec {
            batch,
            tq,
            tk,
            heads_q,
            heads_kv,
            head_dim,
            prefix_len,
            num_prefixes: 1,
            causal,
            dtype: DType::F32,
            prefix_index: None,
            seqlen_q: None,
            seqlen_k: None,
            layout: KvLayout::Separate,
            peft_layer: None,
        }
    }
}

/// A random problem: owned input tensors and an output gradient, drawn from a seed.
#[derive(Debug)]
pub struct RandomProblem {
    /// The spec it was drawn from.
    pub spec: ProblemSpec,
    q: Tensor,
    k: Option<Tensor>,
    v: Option<Tensor>,
    prefix: Option<Tensor>,
    /// Output gradient `[B, Tq, Hq, D]`.
    pub d_o: Tensor,
}

/// Extra elements per row of `Padded` layouts: keeps rows 16-byte aligned for the kernels
/// while making every stride differ from the contiguous one.
const PAD: usize = 8;

impl RandomProblem {
    /// Draws standard-normal inputs (and `dO`) for `spec`.
    pub fn new(spec: ProblemSpec, rng: &mut Rng) -> Result<RandomProblem> {
        let s = &spec;
        let dt = s.dtype;
        let mut rand = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_f32(shape, &rng.normal_vec(n, 1.0), dt)
        };
        let (q, k, v) = match s.layout {
            KvLayout::FusedQkv => {
                if s.tq != s.tk || s.heads_q != s.heads_kv {
                    return Err(Error::Unsupported(
                        "a fused qkv buffer needs Tq == Tk and Hq == Hkv".into(),
                    ));
                }
                (
                    rand(&[s.batch, s.tq, 3, s.heads_q, s.head_dim])?,
                    None,
                    None,
                )
            }
            KvLayout::Separate => (
                rand(&[s.batch, s.tq, s.heads_q, s.head_dim])?,
                Some(rand(&[s.batch, s.tk, s.heads_kv, s.head_dim])?),
                Some(rand(&[s.batch, s.tk, s.heads_kv, s.head_dim])?),
            ),
            KvLayout::Padded => (
                rand(&[s.batch, s.tq, s.heads_q, s.head_dim + PAD])?,
                Some(rand(&[s.batch, s.tk, s.heads_kv, s.head_dim + PAD])?),
                Some(rand(&[s.batch, s.tk, s.heads_kv, s.head_dim + PAD])?),
            ),
        };
        let prefix = match (s.num_prefixes, s.peft_layer) {
            (0, _) => None,
            (1, Some((layers, _))) => {
                Some(rand(&[s.prefix_len, layers, 2, s.heads_kv, s.head_dim])?)
            }
            (_, Some(_)) => {
                return Err(Error::Unsupported(
                    "a PEFT-layout prefix holds one prefix (num_prefixes = 1)".into(),
                ))
            }
            (np, None) => Some(rand(&[2, np, s.prefix_len, s.heads_kv, s.head_dim])?),
        };
        let d_o = rand(&[s.batch, s.tq, s.heads_q, s.head_dim])?;
        Ok(RandomProblem {
            spec,
            q,
            k,
            v,
            prefix,
            d_o,
        })
    }

    fn qkv_views(&self) -> Result<[TensorView<'_>; 3]> {
        let d = self.spec.head_dim;
        Ok(match self.spec.layout {
            KvLayout::FusedQkv => {
                let t = self.q.view();
                [t.select(2, 0)?, t.select(2, 1)?, t.select(2, 2)?]
            }
            KvLayout::Separate => [
                self.q.view(),
                self.k.as_ref().map(|t| t.view()).ok_or_else(missing)?,
                self.v.as_ref().map(|t| t.view()).ok_or_else(missing)?,
            ],
            KvLayout::Padded => {
                fn narrow(t: &Tensor, d: usize) -> Result<TensorView<'_>> {
                    t.view().narrow(3, 0, d)
                }
                [
                    narrow(&self.q, d)?,
                    narrow(self.k.as_ref().ok_or_else(missing)?, d)?,
                    narrow(self.v.as_ref().ok_or_else(missing)?, d)?,
                ]
            }
        })
    }

    fn prefix_views(&self) -> Result<Option<[TensorView<'_>; 2]>> {
        let Some(p) = &self.prefix else {
            return Ok(None);
        };
        let pv = p.view();
        Ok(Some(match self.spec.peft_layer {
            Some((_, layer)) => {
                let l = pv.select(1, layer)?; // [P, 2, H, D]
                [l.select(1, 0)?.unsqueeze(0)?, l.select(1, 1)?.unsqueeze(0)?]
            }
            None => [pv.select(0, 0)?, pv.select(0, 1)?],
        }))
    }

    /// The forward arguments (views into this problem's tensors).
    pub fn args(&self) -> Result<AttnFwdArgs<'_>> {
        let [q, k, v] = self.qkv_views()?;
        let mut a = AttnFwdArgs::new(q, k, v).causal(self.spec.causal);
        if let Some([kp, vp]) = self.prefix_views()? {
            a = a.prefix(kp, vp);
        }
        a.prefix_index = self.spec.prefix_index.as_deref().map(Meta::Host);
        a.seqlen_q = self.spec.seqlen_q.as_deref().map(Meta::Host);
        a.seqlen_k = self.spec.seqlen_k.as_deref().map(Meta::Host);
        Ok(a)
    }

    /// The forward arguments with the metadata taken from `meta` (device tensors) instead of
    /// the spec's host slices.
    pub fn args_device_meta<'a>(&'a self, meta: &'a MetaTensors) -> Result<AttnFwdArgs<'a>> {
        let mut a = self.args()?;
        a.prefix_index = meta.prefix_index.as_ref().map(|t| Meta::Device(t.view()));
        a.seqlen_q = Some(Meta::Device(meta.seqlen_q.view()));
        a.seqlen_k = Some(Meta::Device(meta.seqlen_k.view()));
        Ok(a)
    }

    /// The backward arguments for a forward result `(o, lse)`.
    pub fn bwd_args<'a>(
        &'a self,
        o: &'a Tensor,
        lse: &'a Tensor,
        prefix_only: bool,
    ) -> Result<AttnBwdArgs<'a>> {
        Ok(AttnBwdArgs {
            fwd: self.args()?,
            o: o.view(),
            lse: lse.view(),
            d_o: self.d_o.view(),
            prefix_only,
        })
    }
}

/// A problem's metadata as i32 tensors `[B]` (host memory: the `cpu` and `emu` devices'),
/// with the spec's defaults filled in, for calls that pass device metadata.
#[derive(Debug)]
pub struct MetaTensors {
    /// `prefix_index` (absent when the problem has no prefix table).
    pub prefix_index: Option<Tensor>,
    /// `seqlen_q`.
    pub seqlen_q: Tensor,
    /// `seqlen_k`.
    pub seqlen_k: Tensor,
}

impl MetaTensors {
    /// The spec's metadata (defaults: prefix 0, full lengths).
    pub fn of(spec: &ProblemSpec) -> Result<MetaTensors> {
        let b = spec.batch;
        let idx = spec.prefix_index.clone().unwrap_or_else(|| vec![0; b]);
        let lq = spec
            .seqlen_q
            .clone()
            .unwrap_or_else(|| vec![spec.tq as i32; b]);
        let lk = spec
            .seqlen_k
            .clone()
            .unwrap_or_else(|| vec![spec.tk as i32; b]);
        MetaTensors::from_values(spec.num_prefixes > 0, &idx, &lq, &lk)
    }

    /// Tensors holding exactly these values (which may be out of range: device metadata is
    /// clamped where it is read).
    pub fn from_values(
        with_prefix: bool,
        prefix_index: &[i32],
        seqlen_q: &[i32],
        seqlen_k: &[i32],
    ) -> Result<MetaTensors> {
        let t = |v: &[i32]| Tensor::from_slice(&[v.len()], v);
        Ok(MetaTensors {
            prefix_index: if with_prefix {
                Some(t(prefix_index)?)
            } else {
                None
            },
            seqlen_q: t(seqlen_q)?,
            seqlen_k: t(seqlen_k)?,
        })
    }
}

fn missing() -> Error {
    Error::Unsupported("tensor missing for this layout".into())
}

/// Forward outputs, poisoned with NaN so that an unwritten element cannot pass a check.
#[derive(Debug)]
pub struct FwdBuffers {
    /// `[B, Tq, Hq, D]`
    pub o: Tensor,
    /// `[B, Hq, Tq]`, f32
    pub lse: Tensor,
}

impl FwdBuffers {
    /// NaN-filled buffers for `spec`.
    pub fn poisoned(spec: &ProblemSpec) -> Result<FwdBuffers> {
        let s = spec;
        Ok(FwdBuffers {
            o: nan(&[s.batch, s.tq, s.heads_q, s.head_dim], s.dtype)?,
            lse: nan(&[s.batch, s.heads_q, s.tq], DType::F32)?,
        })
    }
    /// Output views for a forward call.
    pub fn out(&mut self) -> AttnFwdOut<'_> {
        AttnFwdOut {
            o: self.o.view_mut(),
            lse: Some(self.lse.view_mut()),
        }
    }
}

/// Backward outputs, poisoned with NaN.
#[derive(Debug)]
pub struct GradBuffers {
    /// `[B, Tq, Hq, D]`
    pub dq: Tensor,
    /// `[B, Tk, Hkv, D]`
    pub dk: Tensor,
    /// `[B, Tk, Hkv, D]`
    pub dv: Tensor,
    /// `[NP, P, Hkv, D]`, f32
    pub dk_pre: Tensor,
    /// `[NP, P, Hkv, D]`, f32
    pub dv_pre: Tensor,
}

impl GradBuffers {
    /// NaN-filled buffers for `spec`.
    pub fn poisoned(spec: &ProblemSpec) -> Result<GradBuffers> {
        let s = spec;
        let kd = [s.batch, s.tk, s.heads_kv, s.head_dim];
        let pd = [s.num_prefixes, s.prefix_len, s.heads_kv, s.head_dim];
        Ok(GradBuffers {
            dq: nan(&[s.batch, s.tq, s.heads_q, s.head_dim], s.dtype)?,
            dk: nan(&kd, s.dtype)?,
            dv: nan(&kd, s.dtype)?,
            dk_pre: nan(&pd, DType::F32)?,
            dv_pre: nan(&pd, DType::F32)?,
        })
    }
    /// Gradient views; the prefix ones only when the problem has a prefix table.
    pub fn grads(&mut self, has_prefix: bool, prefix_only: bool) -> AttnGrads<'_> {
        let seq = !prefix_only;
        AttnGrads {
            dq: seq.then(|| self.dq.view_mut()),
            dk: seq.then(|| self.dk.view_mut()),
            dv: seq.then(|| self.dv.view_mut()),
            dk_pre: has_prefix.then(|| self.dk_pre.view_mut()),
            dv_pre: has_prefix.then(|| self.dv_pre.view_mut()),
        }
    }
}

fn nan(shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_f32(shape, &vec![f32::NAN; n], dtype)
}

/// Draws a random spec for property tests: sizes, GQA ratio, prefix count, padding,
/// decode-style `Tq < Tk`, mixed and missing prefixes, layouts.
pub fn random_spec(rng: &mut Rng, dtype: DType) -> ProblemSpec {
    let pick = |rng: &mut Rng, xs: &[usize]| xs[rng.below(xs.len() as u64) as usize];
    let batch = 1 + rng.below(4) as usize;
    let heads_kv = pick(rng, &[1, 2, 3]);
    let group = pick(rng, &[1, 2, 4]);
    let head_dim = pick(rng, &[8, 16, 64, 128]);
    let tk = 1 + rng.below(24) as usize;
    let decode = rng.below(3) == 0;
    let tq = if decode {
        1 + rng.below(tk as u64) as usize
    } else {
        tk
    };
    let prefix_len = pick(rng, &[0, 1, 2, 5, 10]);
    let num_prefixes = pick(rng, &[0, 1, 1, 2, 3]);
    let causal = rng.below(4) != 0;
    let mut s = ProblemSpec::new(
        batch,
        tq,
        tk,
        heads_kv * group,
        heads_kv,
        head_dim,
        prefix_len,
        causal,
    );
    s.dtype = dtype;
    s.num_prefixes = num_prefixes;
    if num_prefixes > 0 && rng.below(2) == 0 {
        s.prefix_index = Some(
            (0..batch)
                .map(|_| rng.below(num_prefixes as u64 + 1) as i32 - 1)
                .collect(),
        );
    }
    if rng.below(2) == 0 {
        // Right padding with seqlen_q <= seqlen_k (the training and decoding regimes).
        let lk: Vec<i32> = (0..batch)
            .map(|_| rng.below(tk as u64 + 1) as i32)
            .collect();
        let lq: Vec<i32> = lk
            .iter()
            .map(|&k| {
                let cap = k.min(tq as i32);
                if decode {
                    rng.below(cap as u64 + 1) as i32
                } else {
                    cap
                }
            })
            .collect();
        s.seqlen_k = Some(lk);
        s.seqlen_q = Some(lq);
    }
    s.layout = if tq == tk && group == 1 && rng.below(2) == 0 {
        KvLayout::FusedQkv
    } else if rng.below(3) == 0 {
        KvLayout::Padded
    } else {
        KvLayout::Separate
    };
    if num_prefixes == 1 && rng.below(2) == 0 {
        let layers = 1 + rng.below(3) as usize;
        s.peft_layer = Some((layers, rng.below(layers as u64) as usize));
    }
    s
}

/// A random paged-decode problem: queries, a paged cache whose pages are handed out in a
/// shuffled order (so consecutive pages of a sequence are not adjacent), a block table with
/// unused entries set to -1, a prefix table with adapters of different lengths and mixed
/// prefix indices.
#[derive(Debug)]
pub struct RandomPaged {
    /// Queries `[B, Tq, Hq, D]`.
    pub q: Tensor,
    /// Key pages `[num_pages, page_size, Hkv, D]`.
    pub k_cache: Tensor,
    /// Value pages.
    pub v_cache: Tensor,
    /// Prefix table `[2, NP, P, Hkv, D]` (keys, values), if any.
    pub prefix: Option<Tensor>,
    /// Block table `[B, max_pages]`, row-major.
    pub block_table: Vec<i32>,
    /// Keys per sequence.
    pub seqlen_k: Vec<i32>,
    /// Prefix per sequence (-1: none).
    pub prefix_index: Vec<i32>,
    /// Valid rows per prefix.
    pub prefix_len: Vec<i32>,
}

/// Sizes of a [`RandomPaged`] problem.
#[derive(Clone, Debug)]
pub struct PagedSpec {
    /// Batch.
    pub batch: usize,
    /// New query rows.
    pub tq: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Keys per page.
    pub page_size: usize,
    /// Keys of each sequence.
    pub seqlen_k: Vec<i32>,
    /// Prefix rows `P` of the table (0 with `num_prefixes == 0`: no table).
    pub prefix_rows: usize,
    /// Prefixes in the table.
    pub num_prefixes: usize,
    /// Prefix per sequence.
    pub prefix_index: Vec<i32>,
    /// Valid rows of each prefix.
    pub prefix_len: Vec<i32>,
    /// Element type.
    pub dtype: DType,
}

impl RandomPaged {
    /// Draws the problem of `s`: standard-normal values, pages shuffled, two spare pages.
    pub fn new(s: &PagedSpec, rng: &mut Rng) -> Result<RandomPaged> {
        let dt = s.dtype;
        let mut rand = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_f32(shape, &rng.normal_vec(n, 1.0), dt)
        };
        let pages_of: Vec<usize> = s
            .seqlen_k
            .iter()
            .map(|&n| (n as usize).div_ceil(s.page_size))
            .collect();
        let max_pages = pages_of.iter().copied().max().unwrap_or(0) + 1;
        let num_pages = pages_of.iter().sum::<usize>() + 2;
        let q = rand(&[s.batch, s.tq, s.heads_q, s.head_dim])?;
        let k_cache = rand(&[num_pages, s.page_size, s.heads_kv, s.head_dim])?;
        let v_cache = rand(&[num_pages, s.page_size, s.heads_kv, s.head_dim])?;
        let prefix = if s.num_prefixes > 0 {
            Some(rand(&[
                2,
                s.num_prefixes,
                s.prefix_rows,
                s.heads_kv,
                s.head_dim,
            ])?)
        } else {
            None
        };
        let mut order: Vec<i32> = (0..num_pages as i32).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let mut next = order.into_iter();
        let mut block_table = vec![-1; s.batch * max_pages];
        for (b, &n) in pages_of.iter().enumerate() {
            for c in 0..n {
                block_table[b * max_pages + c] = next.next().expect("enough pages");
            }
        }
        Ok(RandomPaged {
            q,
            k_cache,
            v_cache,
            prefix,
            block_table,
            seqlen_k: s.seqlen_k.clone(),
            prefix_index: s.prefix_index.clone(),
            prefix_len: s.prefix_len.clone(),
        })
    }

    /// The decode arguments (host metadata).
    pub fn args(&self) -> Result<PagedAttnArgs<'_>> {
        let mut a = PagedAttnArgs::new(
            self.q.view(),
            self.k_cache.view(),
            self.v_cache.view(),
            Meta::Host(&self.block_table),
            Meta::Host(&self.seqlen_k),
        );
        if let Some(p) = &self.prefix {
            let pv = p.view();
            a = a
                .prefix(pv.select(0, 0)?, pv.select(0, 1)?)
                .prefix_index(Meta::Host(&self.prefix_index))
                .prefix_len(Meta::Host(&self.prefix_len));
        }
        Ok(a)
    }
}

/// A random paged spec: page size 4, 8 or 16, lengths across page boundaries (0 included),
/// `Tq` 1..=16 (at most the shortest... any: rows past the cache see only the prefix), GQA,
/// mixed prefix lengths and indices (-1 included).
pub fn random_paged_spec(rng: &mut Rng, dtype: DType, head_dims: &[usize]) -> PagedSpec {
    let pick = |rng: &mut Rng, xs: &[usize]| xs[rng.below(xs.len() as u64) as usize];
    let batch = 1 + rng.below(4) as usize;
    let heads_kv = pick(rng, &[1, 2]);
    let group = pick(rng, &[1, 2, 4]);
    let page_size = pick(rng, &[4, 8, 16]);
    let tq = pick(rng, &[1, 1, 2, 5, 16]);
    let num_prefixes = pick(rng, &[0, 1, 3]);
    let prefix_rows = if num_prefixes > 0 {
        pick(rng, &[1, 5, 12])
    } else {
        0
    };
    let seqlen_k = (0..batch)
        .map(|_| (tq as u64 + rng.below(40)) as i32 - if rng.below(6) == 0 { tq as i32 } else { 0 })
        .map(|n| n.max(0))
        .collect();
    let prefix_index = (0..batch)
        .map(|_| {
            if num_prefixes == 0 {
                -1
            } else {
                rng.below(num_prefixes as u64 + 1) as i32 - 1
            }
        })
        .collect();
    let prefix_len = (0..num_prefixes)
        .map(|_| rng.below(prefix_rows as u64 + 1) as i32)
        .collect();
    PagedSpec {
        batch,
        tq,
        heads_q: heads_kv * group,
        heads_kv,
        head_dim: pick(rng, head_dims),
        page_size,
        seqlen_k,
        prefix_rows,
        num_prefixes,
        prefix_index,
        prefix_len,
        dtype,
    }
}
