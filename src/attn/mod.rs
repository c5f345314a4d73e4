//! Prefix attention: the public argument types, their validation, and the CPU paths.
//!
//! # The contract (every backend computes exactly this)
//!
//! - `q: [B, Tq, Hq, D]`; sequence keys/values `k, v: [B, Tk, Hkv, D]`; prefix table
//!   `k_pre, v_pre: [NP, P, Hkv, D]` (NP prefixes of length P); `Hq = G * Hkv` (GQA/MQA).
//!   Every tensor is a strided view; only the last dimension must be contiguous.
//! - `prefix_index[b]` (default 0) picks the prefix sequence `b` uses; `-1` means none.
//! - `seqlen_q[b]`, `seqlen_k[b]` (defaults `Tq`, `Tk`) count the valid query rows and
//!   sequence keys of sequence `b` (right padding).
//! - The metadata may be host slices (checked) or i32 device tensors `[B]` ([`Meta`]),
//!   whose values every backend clamps the same way: lengths into `0..=Tq` / `0..=Tk`, a
//!   prefix index outside `0..NP` to none.
//! - Query row `i < seqlen_q[b]` sees every prefix key, and sequence key `j` iff
//!   `j < seqlen_k[b]` and, when causal, `j <= i + seqlen_k[b] - seqlen_q[b]`
//!   (bottom-right alignment: a decode step is the same call with a short `Tq`).
//! - Padding rows (`i >= seqlen_q[b]`) get `o = 0`, `lse = -inf`; their `dO` is ignored.
//! - `scale` defaults to `1/sqrt(D)`; `lse[b, h, i]` is the **natural-log** log-sum-exp of
//!   the scaled scores, in f32. A row that sees no key gets `o = 0`, `lse = -inf`.
//! - The backward returns `dQ, dK, dV` (skipped when `prefix_only`) and `dK_pre, dV_pre` in
//!   f32, **summed over every sequence that used that prefix**; results are deterministic.
//!
//! Modules: [`cpu`] is the fused CPU implementation (the reference backend), [`oracle`] the
//! f64 oracle. The naive-concat baseline that the benchmarks compare against runs on any
//! backend, so it is [`crate::bench::naive`].

pub mod cpu;
pub mod oracle;
pub mod paged;
pub mod shapes;
pub mod testing;

use crate::error::{Error, Result};
use crate::tensor::{DType, Location, TensorView, TensorViewMut};

/// Per-sequence metadata `[B]` (`prefix_index`, `seqlen_q` or `seqlen_k`): a host slice,
/// validated on the host, or an i32 tensor `[B]` on the backend's device, which a caller can
/// upload once per step or keep resident so that a launch copies nothing from the host (a
/// precondition for CUDA-graph capture).
///
/// Device values are not read by the host on a GPU; every backend makes them safe the same
/// way instead (docs/ARCHITECTURE.md §1): lengths are clamped to `0..=Tq` / `0..=Tk`, and a
/// prefix index outside `0..NP` means no prefix.
#[derive(Clone, Copy, Debug)]
pub enum Meta<'a> {
    /// Host values, checked on the host (an out-of-range value is an error).
    Host(&'a [i32]),
    /// An i32 tensor `[B]` on the backend's device (contiguous), clamped where it is read.
    Device(TensorView<'a>),
}

impl<'a> From<&'a [i32]> for Meta<'a> {
    fn from(v: &'a [i32]) -> Self {
        Meta::Host(v)
    }
}

impl<'a> Meta<'a> {
    /// The device tensor, if this metadata is one.
    pub fn device(&self) -> Option<&TensorView<'a>> {
        match self {
            Meta::Host(_) => None,
            Meta::Device(t) => Some(t),
        }
    }
}

/// The prefix table: `k_pre, v_pre: [NP, P, Hkv, D]`.
#[derive(Clone, Copy, Debug)]
pub struct PrefixKv<'a> {
    /// Prefix keys `[NP, P, Hkv, D]`.
    pub k: TensorView<'a>,
    /// Prefix values `[NP, P, Hkv, D]`.
    pub v: TensorView<'a>,
}

/// Inputs of the prefix-attention forward (and the shared part of the backward).
#[derive(Clone, Copy, Debug)]
pub struct AttnFwdArgs<'a> {
    /// Queries `[B, Tq, Hq, D]`.
    pub q: TensorView<'a>,
    /// Sequence keys `[B, Tk, Hkv, D]`.
    pub k: TensorView<'a>,
    /// Sequence values `[B, Tk, Hkv, D]`.
    pub v: TensorView<'a>,
    /// The prefix table, if any.
    pub prefix: Option<PrefixKv<'a>>,
    /// Per-sequence prefix choice `[B]` in `-1..NP` (default: 0 for all). Needs `prefix`.
    pub prefix_index: Option<Meta<'a>>,
    /// Valid query rows per sequence `[B]` (default: `Tq`).
    pub seqlen_q: Option<Meta<'a>>,
    /// Valid sequence keys per sequence `[B]` (default: `Tk`).
    pub seqlen_k: Option<Meta<'a>>,
    /// Causal masking with bottom-right alignment.
    pub causal: bool,
    /// Score scale (default `1/sqrt(D)`).
    pub scale: Option<f32>,
}

impl<'a> AttnFwdArgs<'a> {
    /// Arguments with no prefix, no padding, non-causal and the default scale.
    pub fn new(q: TensorView<'a>, k: TensorView<'a>, v: TensorView<'a>) -> Self {
        AttnFwdArgs {
            q,
            k,
            v,
            prefix: None,
            prefix_index: None,
            seqlen_q: None,
            seqlen_k: None,
            causal: false,
            scale: None,
        }
    }
    /// Sets the prefix table `[NP, P, Hkv, D]`.
    pub fn prefix(mut self, k_pre: TensorView<'a>, v_pre: TensorView<'a>) -> Self {
        self.prefix = Some(PrefixKv { k: k_pre, v: v_pre });
        self
    }
    /// Sets the per-sequence prefix index (`-1` = none).
    pub fn prefix_index(mut self, idx: &'a [i32]) -> Self {
        self.prefix_index = Some(Meta::Host(idx));
        self
    }
    /// Sets the valid lengths of every sequence (right padding).
    pub fn seqlens(mut self, seqlen_q: &'a [i32], seqlen_k: &'a [i32]) -> Self {
        self.seqlen_q = Some(Meta::Host(seqlen_q));
        self.seqlen_k = Some(Meta::Host(seqlen_k));
        self
    }
    /// Sets the per-sequence prefix index from an i32 tensor `[B]` on the backend's device
    /// (values outside `0..NP` mean no prefix; see [`Meta`]).
    pub fn prefix_index_device(mut self, idx: TensorView<'a>) -> Self {
        self.prefix_index = Some(Meta::Device(idx));
        self
    }
    /// Sets the valid lengths from i32 tensors `[B]` on the backend's device (clamped to
    /// `0..=Tq` and `0..=Tk`; see [`Meta`]).
    pub fn seqlens_device(mut self, seqlen_q: TensorView<'a>, seqlen_k: TensorView<'a>) -> Self {
        self.seqlen_q = Some(Meta::Device(seqlen_q));
        self.seqlen_k = Some(Meta::Device(seqlen_k));
        self
    }
    /// Turns causal masking on or off.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the score scale.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Validates shapes, dtypes, strides, devices and metadata, and returns the problem.
    pub fn check(&self) -> Result<AttnProblem> {
        AttnProblem::from_args(self)
    }
}

/// Outputs of the forward.
#[derive(Debug)]
pub struct AttnFwdOut<'a> {
    /// Output `[B, Tq, Hq, D]`, q's dtype.
    pub o: TensorViewMut<'a>,
    /// Natural-log LSE `[B, Hq, Tq]` in f32 (optional; the backward needs it).
    pub lse: Option<TensorViewMut<'a>>,
}

/// Inputs of the backward: the forward's inputs and outputs, and the output gradient.
#[derive(Clone, Copy, Debug)]
pub struct AttnBwdArgs<'a> {
    /// The forward's inputs.
    pub fwd: AttnFwdArgs<'a>,
    /// The forward's output `[B, Tq, Hq, D]`.
    pub o: TensorView<'a>,
    /// The forward's LSE `[B, Hq, Tq]`, f32.
    pub lse: TensorView<'a>,
    /// Gradient of the output `[B, Tq, Hq, D]`.
    pub d_o: TensorView<'a>,
    /// Compute only the prefix gradients (layer 0 of a frozen model).
    pub prefix_only: bool,
}

/// Outputs of the backward; each is overwritten.
#[derive(Debug, Default)]
pub struct AttnGrads<'a> {
    /// `dQ [B, Tq, Hq, D]`, q's dtype; required unless `prefix_only`.
    pub dq: Option<TensorViewMut<'a>>,
    /// `dK [B, Tk, Hkv, D]`; required unless `prefix_only`.
    pub dk: Option<TensorViewMut<'a>>,
    /// `dV [B, Tk, Hkv, D]`; required unless `prefix_only`.
    pub dv: Option<TensorViewMut<'a>>,
    /// `dK_pre [NP, P, Hkv, D]` in f32, summed over the sequences using each prefix.
    pub dk_pre: Option<TensorViewMut<'a>>,
    /// `dV_pre [NP, P, Hkv, D]` in f32, summed over the sequences using each prefix.
    pub dv_pre: Option<TensorViewMut<'a>>,
}

/// A validated attention problem: sizes and per-sequence metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnProblem {
    /// Batch size `B`.
    pub batch: usize,
    /// Query rows per sequence `Tq`.
    pub tq: usize,
    /// Sequence keys per sequence `Tk`.
    pub tk: usize,
    /// Query heads `Hq`.
    pub heads_q: usize,
    /// Key/value heads `Hkv` (`Hq` is a multiple).
    pub heads_kv: usize,
    /// Head dimension `D`.
    pub head_dim: usize,
    /// Prefix length `P` (0 without a prefix table).
    pub prefix_len: usize,
    /// Number of prefixes `NP` in the table (0 without one).
    pub num_prefixes: usize,
    /// Causal masking.
    pub causal: bool,
    /// Score scale.
    pub scale: f32,
    /// Element type of q, k, v, the prefix and o.
    pub dtype: DType,
    /// Where the tensors live.
    pub location: Location,
    /// Prefix used by each sequence (`None`: no prefix).
    pub prefix_of: Vec<Option<usize>>,
    /// Valid query rows of each sequence.
    pub lens_q: Vec<usize>,
    /// Valid sequence keys of each sequence.
    pub lens_k: Vec<usize>,
    /// Whether `prefix_of`, `lens_q` and `lens_k` are the values the kernels will use: true
    /// for host metadata and for device metadata in host memory (`cpu`, `emu`: read and
    /// clamped as the kernels clamp them); false for device metadata on a GPU, which the host
    /// never reads (the vectors then hold the defaults, and the device tensors decide).
    pub meta_on_host: bool,
}

impl AttnProblem {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Number of prefix keys sequence `b` sees (P, or 0 without a prefix).
    pub fn prefix_len_of(&self, b: usize) -> usize {
        if self.prefix_of[b].is_some() {
            self.prefix_len
        } else {
            0
        }
    }

    /// Number of sequence keys that valid query row `i` of sequence `b` sees; they are
    /// always keys `0..n`.
    pub fn visible_seq_keys(&self, b: usize, i: usize) -> usize {
        let (sq, sk) = (self.lens_q[b] as i64, self.lens_k[b] as i64);
        if !self.causal {
            return sk as usize;
        }
        (i as i64 + sk - sq + 1).clamp(0, sk) as usize
    }

    /// Exact count of visible (query, key) pairs over the batch and all query heads, the
    /// FLOP basis of docs/ARCHITECTURE.md §6 (forward FLOPs = `4 * D * pairs`).
    pub fn visible_pairs(&self) -> u64 {
        let mut pairs = 0u64;
        for b in 0..self.batch {
            for i in 0..self.lens_q[b] {
                pairs += (self.prefix_len_of(b) + self.visible_seq_keys(b, i)) as u64;
            }
        }
        pairs * self.heads_q as u64
    }

    fn from_args(a: &AttnFwdArgs) -> Result<AttnProblem> {
        let qd = a.q.dims();
        if qd.len() != 4 {
            return Err(Error::shape("q", "rank 4 [B, Tq, Hq, D]", qd));
        }
        let (batch, tq, heads_q, head_dim) = (qd[0], qd[1], qd[2], qd[3]);
        let kd = a.k.dims();
        if kd.len() != 4 || kd[0] != batch || kd[3] != head_dim {
            return Err(Error::shape(
                "k",
                format!("[B={batch}, Tk, Hkv, D={head_dim}] (B and D as in q)"),
                kd,
            ));
        }
        let (tk, heads_kv) = (kd[1], kd[2]);
        if a.v.dims() != kd {
            return Err(Error::shape("v", format!("{kd:?} like k"), a.v.dims()));
        }
        if heads_kv == 0 || heads_q % heads_kv != 0 {
            return Err(Error::shape(
                "q",
                format!("a head count Hq that is a positive multiple of k's Hkv={heads_kv}"),
                qd,
            ));
        }
        if head_dim == 0 {
            return Err(Error::shape("q", "head dimension D >= 1", qd));
        }
        let (dtype, location) = query_dtype(&a.q)?;
        check_input("q", &a.q, dtype, location)?;
        check_input("k", &a.k, dtype, location)?;
        check_input("v", &a.v, dtype, location)?;
        let (prefix_len, num_prefixes) =
            check_prefix_table(a.prefix.as_ref(), heads_kv, head_dim, dtype, location)?;

        let mut meta_on_host = true;
        // Device metadata the host can read (on `cpu`, `emu`); `None` for host metadata, and
        // for device metadata on a GPU (then `meta_on_host` turns false).
        let mut read_device = |arg: &str, m: Option<&Meta>| -> Result<Option<Vec<i32>>> {
            let Some(Meta::Device(t)) = m else {
                return Ok(None);
            };
            check_meta_tensor(arg, t, batch, location)?;
            if location != Location::Host {
                meta_on_host = false;
                return Ok(None);
            }
            Ok(Some(t.contiguous_slice::<i32>()?.to_vec()))
        };
        let dev_idx = read_device("prefix_index", a.prefix_index.as_ref())?;
        let dev_q = read_device("seqlen_q", a.seqlen_q.as_ref())?;
        let dev_k = read_device("seqlen_k", a.seqlen_k.as_ref())?;
        let prefix_of = match (a.prefix_index, &a.prefix) {
            (Some(_), None) => {
                return Err(Error::index(
                    "prefix_index",
                    "given without a prefix table (k_pre, v_pre)",
                ))
            }
            (None, None) => vec![None; batch],
            (None, Some(_)) => {
                if num_prefixes == 0 && batch > 0 {
                    return Err(Error::index(
                        "prefix_index",
                        "defaults to 0, but the prefix table has NP = 0 prefixes",
                    ));
                }
                vec![Some(0); batch]
            }
            (Some(Meta::Device(_)), Some(_)) => match dev_idx {
                // The kernels' rule: an index outside 0..NP means no prefix.
                Some(v) => v
                    .iter()
                    .map(|&n| (n >= 0 && (n as usize) < num_prefixes).then_some(n as usize))
                    .collect(),
                None => vec![None; batch],
            },
            (Some(Meta::Host(idx)), Some(_)) => {
                check_len("prefix_index", idx, batch)?;
                idx.iter()
                    .enumerate()
                    .map(|(b, &n)| match n {
                        -1 => Ok(None),
                        n if n >= 0 && (n as usize) < num_prefixes => Ok(Some(n as usize)),
                        n => Err(Error::index(
                            "prefix_index",
                            format!(
                                "prefix_index[{b}] = {n}, expected -1 (none) or 0..{num_prefixes}"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let lens_q = lengths("seqlen_q", a.seqlen_q, dev_q, batch, tq)?;
        let lens_k = lengths("seqlen_k", a.seqlen_k, dev_k, batch, tk)?;
        let scale = a.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(Error::index(
                "scale",
                format!("{scale}, expected a finite number"),
            ));
        }
        Ok(AttnProblem {
            batch,
            tq,
            tk,
            heads_q,
            heads_kv,
            head_dim,
            prefix_len,
            num_prefixes,
            causal: a.causal,
            scale,
            dtype,
            location,
            prefix_of,
            lens_q,
            lens_k,
            meta_on_host,
        })
    }

    /// Checks the forward outputs against this problem.
    pub fn check_fwd_out(&self, out: &AttnFwdOut) -> Result<()> {
        check_output("o", &out.o, &self.q_dims(), self.dtype, self.location)?;
        if let Some(lse) = &out.lse {
            check_output("lse", lse, &self.lse_dims(), DType::F32, self.location)?;
        }
        Ok(())
    }

    /// Checks the backward's extra inputs and its outputs against this problem.
    pub fn check_bwd(&self, a: &AttnBwdArgs, g: &AttnGrads) -> Result<()> {
        let qd = self.q_dims();
        for (name, t) in [("o", &a.o), ("d_o", &a.d_o)] {
            if t.dims() != qd {
                return Err(Error::shape(name, format!("{qd:?} like q"), t.dims()));
            }
            check_input(name, t, self.dtype, self.location)?;
        }
        if a.lse.dims() != self.lse_dims() {
            return Err(Error::shape(
                "lse",
                format!("{:?} = [B, Hq, Tq]", self.lse_dims()),
                a.lse.dims(),
            ));
        }
        check_input("lse", &a.lse, DType::F32, self.location)?;
        let kd = self.k_dims();
        for (name, t, dims) in [("dq", &g.dq, qd), ("dk", &g.dk, kd), ("dv", &g.dv, kd)] {
            match t {
                Some(t) => check_output(name, t, &dims, self.dtype, self.location)?,
                None if !a.prefix_only => {
                    return Err(Error::index(
                        name,
                        "missing: required unless prefix_only is set",
                    ))
                }
                None => {}
            }
        }
        let pd = self.prefix_dims();
        for (name, t) in [("dk_pre", &g.dk_pre), ("dv_pre", &g.dv_pre)] {
            if let Some(t) = t {
                if a.fwd.prefix.is_none() {
                    return Err(Error::index(
                        name,
                        "given, but the call has no prefix table",
                    ));
                }
                check_output(name, t, &pd, DType::F32, self.location)?;
            }
        }
        Ok(())
    }

    /// `[B, Tq, Hq, D]`.
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.tq, self.heads_q, self.head_dim]
    }
    /// `[B, Tk, Hkv, D]`.
    pub fn k_dims(&self) -> [usize; 4] {
        [self.batch, self.tk, self.heads_kv, self.head_dim]
    }
    /// `[NP, P, Hkv, D]`.
    pub fn prefix_dims(&self) -> [usize; 4] {
        [
            self.num_prefixes,
            self.prefix_len,
            self.heads_kv,
            self.head_dim,
        ]
    }
    /// `[B, Hq, Tq]`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.tq]
    }
}

fn check_len(arg: &str, v: &[i32], batch: usize) -> Result<()> {
    if v.len() != batch {
        return Err(Error::shape(arg, format!("[B={batch}]"), &[v.len()]));
    }
    Ok(())
}

/// Lengths from host metadata (checked: an out-of-range value is an error), from device
/// metadata read on the host (`dev`: clamped to `0..=max` as the kernels clamp), or the
/// default `max` (also the stand-in for device values the host does not read).
fn lengths(
    arg: &str,
    v: Option<Meta>,
    dev: Option<Vec<i32>>,
    batch: usize,
    max: usize,
) -> Result<Vec<usize>> {
    if let Some(d) = dev {
        return Ok(d.iter().map(|&n| (n.max(0) as usize).min(max)).collect());
    }
    let Some(Meta::Host(v)) = v else {
        return Ok(vec![max; batch]);
    };
    check_len(arg, v, batch)?;
    v.iter()
        .enumerate()
        .map(|(b, &n)| {
            if n < 0 || n as usize > max {
                Err(Error::index(
                    arg,
                    format!("{arg}[{b}] = {n}, expected 0..={max}"),
                ))
            } else {
                Ok(n as usize)
            }
        })
        .collect()
}

/// Device metadata: an i32 tensor `[B]`, contiguous, where the other tensors live.
fn check_meta_tensor(arg: &str, t: &TensorView, batch: usize, loc: Location) -> Result<()> {
    if t.dtype() != DType::I32 {
        return Err(Error::DType {
            arg: arg.into(),
            expected: "i32 (device metadata)".into(),
            got: t.dtype().name().into(),
        });
    }
    if t.dims() != [batch] {
        return Err(Error::shape(
            arg,
            format!("[B={batch}] (device metadata)"),
            t.dims(),
        ));
    }
    if t.location() != loc {
        return Err(Error::device(
            arg,
            format!(
                "device metadata lives on {}, the other arguments on {loc}",
                t.location()
            ),
        ));
    }
    if batch > 1 && t.strides()[0] != 1 {
        return Err(Error::layout(
            arg,
            format!(
                "device metadata must be contiguous, got stride {}",
                t.strides()[0]
            ),
        ));
    }
    Ok(())
}

fn check_common(
    arg: &str,
    dims: &[usize],
    strides: &[usize],
    dtype: DType,
    got: DType,
    loc: Location,
    got_loc: Location,
) -> Result<()> {
    if got != dtype {
        return Err(Error::DType {
            arg: arg.into(),
            expected: format!("{dtype} (the dtype this argument must have)"),
            got: got.name().into(),
        });
    }
    if got_loc != loc {
        return Err(Error::device(
            arg,
            format!("lives on {got_loc}, the other arguments on {loc}"),
        ));
    }
    let r = dims.len();
    if r > 0 && dims[r - 1] > 1 && strides[r - 1] != 1 {
        return Err(Error::layout(
            arg,
            format!(
                "last dimension must be contiguous (stride 1), got strides {strides:?} for shape {dims:?}"
            ),
        ));
    }
    Ok(())
}

fn check_input(arg: &str, t: &TensorView, dtype: DType, loc: Location) -> Result<()> {
    check_common(
        arg,
        t.dims(),
        t.strides(),
        dtype,
        t.dtype(),
        loc,
        t.location(),
    )
}

fn check_output(
    arg: &str,
    t: &TensorViewMut,
    dims: &[usize],
    dtype: DType,
    loc: Location,
) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::shape(arg, format!("{dims:?}"), t.dims()));
    }
    check_input(arg, &t.as_view(), dtype, loc)?;
    // Distinct output elements must not share memory: no zero stride over a size > 1.
    if t.numel() > 0
        && t.dims()
            .iter()
            .zip(t.strides())
            .any(|(&d, &s)| d > 1 && s == 0)
    {
        return Err(Error::layout(
            arg,
            format!(
                "an output may not broadcast (stride 0): strides {:?}",
                t.strides()
            ),
        ));
    }
    Ok(())
}

/// The element type and location every tensor of a call must share: the queries' (a float
/// type).
pub(crate) fn query_dtype(q: &TensorView) -> Result<(DType, Location)> {
    let dtype = q.dtype();
    if !dtype.is_float() {
        return Err(Error::DType {
            arg: "q".into(),
            expected: "f32, f16 or bf16".into(),
            got: dtype.name().into(),
        });
    }
    Ok((dtype, q.location()))
}

/// Checks a prefix table `[NP, P, Hkv, D]` (keys and values alike); returns `(P, NP)`,
/// `(0, 0)` without one.
pub(crate) fn check_prefix_table(
    prefix: Option<&PrefixKv>,
    heads_kv: usize,
    head_dim: usize,
    dtype: DType,
    location: Location,
) -> Result<(usize, usize)> {
    let Some(p) = prefix else {
        return Ok((0, 0));
    };
    let pd = p.k.dims();
    if pd.len() != 4 || pd[2] != heads_kv || pd[3] != head_dim {
        return Err(Error::shape(
            "k_pre",
            format!("[NP, P, Hkv={heads_kv}, D={head_dim}]"),
            pd,
        ));
    }
    if p.v.dims() != pd {
        return Err(Error::shape(
            "v_pre",
            format!("{pd:?} like k_pre"),
            p.v.dims(),
        ));
    }
    check_input("k_pre", &p.k, dtype, location)?;
    check_input("v_pre", &p.v, dtype, location)?;
    Ok((pd[1], pd[0]))
}
