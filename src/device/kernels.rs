//! The CUDA kernels' parameter structs (mirrors of `kernels/common/params.h`), the embedded
//! fatbins, and the launch plans that the `emu` and `cuda` devices share: every check on
//! shapes, strides, alignment and dtypes happens here, before any launch.

use super::registry::kernel;
use crate::attn::{AttnFwdArgs, AttnFwdOut, AttnProblem, Meta};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The fatbin of the kernel file with stem `file` (`prefix_attn_fwd`, ...): `None` when nvcc
/// was not found at build time; an error for a file the build does not know.
pub fn fatbin(file: &str) -> Result<Option<&'static [u8]>> {
    fatbins::FATBINS
        .iter()
        .find(|(stem, _)| *stem == file)
        .map(|(_, image)| *image)
        .ok_or_else(|| Error::Unsupported(format!("kernel file {file}: not in build.rs's KERNELS")))
}

/// Mirror of `PrefixAttnFwdParams` (kernels/common/params.h), passed by value to the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FwdParams {
    /// Addresses of q, k, v, k_pre, v_pre, o, lse.
    pub q: u64,
    /// See `q`.
    pub k: u64,
    /// See `q`.
    pub v: u64,
    /// See `q`.
    pub k_pre: u64,
    /// See `q`.
    pub v_pre: u64,
    /// See `q`.
    pub o: u64,
    /// See `q`.
    pub lse: u64,
    /// int32 `[B]` arrays.
    pub prefix_index: u64,
    /// See `prefix_index`.
    pub seqlen_q: u64,
    /// See `prefix_index`.
    pub seqlen_k: u64,
    /// Element strides.
    pub q_batch_stride: i64,
    /// See `q_batch_stride`.
    pub q_row_stride: i64,
    /// See `q_batch_stride`.
    pub q_head_stride: i64,
    /// See `q_batch_stride`.
    pub k_batch_stride: i64,
    /// See `q_batch_stride`.
    pub k_row_stride: i64,
    /// See `q_batch_stride`.
    pub k_head_stride: i64,
    /// See `q_batch_stride`.
    pub v_batch_stride: i64,
    /// See `q_batch_stride`.
    pub v_row_stride: i64,
    /// See `q_batch_stride`.
    pub v_head_stride: i64,
    /// See `q_batch_stride`.
    pub kp_prefix_stride: i64,
    /// See `q_batch_stride`.
    pub kp_row_stride: i64,
    /// See `q_batch_stride`.
    pub kp_head_stride: i64,
    /// See `q_batch_stride`.
    pub vp_prefix_stride: i64,
    /// See `q_batch_stride`.
    pub vp_row_stride: i64,
    /// See `q_batch_stride`.
    pub vp_head_stride: i64,
    /// See `q_batch_stride`.
    pub o_batch_stride: i64,
    /// See `q_batch_stride`.
    pub o_row_stride: i64,
    /// See `q_batch_stride`.
    pub o_head_stride: i64,
    /// See `q_batch_stride`.
    pub lse_batch_stride: i64,
    /// See `q_batch_stride`.
    pub lse_head_stride: i64,
    /// Sizes.
    pub batch: i32,
    /// See `batch`.
    pub tq: i32,
    /// See `batch`.
    pub tk: i32,
    /// See `batch`.
    pub heads_q: i32,
    /// See `batch`.
    pub heads_kv: i32,
    /// See `batch`.
    pub head_dim: i32,
    /// See `batch`.
    pub prefix_len: i32,
    /// See `batch`.
    pub num_prefixes: i32,
    /// 0 or 1.
    pub causal: i32,
    /// 0 = f16, 1 = bf16.
    pub dtype: i32,
    /// Softmax scale.
    pub scale: f32,
    /// `scale · log2(e)`.
    pub scale_log2: f32,
}

/// Field offsets reported by [`fwd_params_layout`], in the order the C side reports them.
pub fn fwd_params_rust_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<FwdParams>(),
        offset_of!(FwdParams, q),
        offset_of!(FwdParams, lse),
        offset_of!(FwdParams, prefix_index),
        offset_of!(FwdParams, seqlen_k),
        offset_of!(FwdParams, q_batch_stride),
        offset_of!(FwdParams, kp_prefix_stride),
        offset_of!(FwdParams, lse_head_stride),
        offset_of!(FwdParams, batch),
        offset_of!(FwdParams, num_prefixes),
        offset_of!(FwdParams, causal),
        offset_of!(FwdParams, dtype),
        offset_of!(FwdParams, scale),
        offset_of!(FwdParams, scale_log2),
    ]
}

/// A checked forward launch: parameters (metadata addresses still to be filled by the device),
/// geometry, and the metadata arrays `[prefix_index; seqlen_q; seqlen_k]`.
#[derive(Clone, Debug)]
pub struct FwdLaunch {
    /// Parameters.
    pub params: FwdParams,
    /// Grid `(ceil(Tq / block_m), Hq, B)`.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub smem_bytes: usize,
    /// Kernel entry name.
    pub entry: &'static str,
    /// `3B` int32 values: prefix_index, seqlen_q, seqlen_k (host metadata and defaults).
    pub meta: Vec<i32>,
    /// Device addresses of the arrays passed as device tensors (`[prefix_index, seqlen_q,
    /// seqlen_k]`); they replace the matching third of `meta`.
    pub meta_dev: [Option<u64>; 3],
    /// The validated problem.
    pub problem: AttnProblem,
}

/// The `[prefix_index; seqlen_q; seqlen_k]` values a launch uploads (host metadata and
/// defaults; entries given as device tensors are placeholders), and the device addresses of
/// those given as device tensors.
fn launch_meta(args: &AttnFwdArgs, pr: &AttnProblem) -> (Vec<i32>, [Option<u64>; 3]) {
    let mut meta = Vec::with_capacity(3 * pr.batch);
    meta.extend(pr.prefix_of.iter().map(|p| p.map_or(-1, |n| n as i32)));
    meta.extend(pr.lens_q.iter().map(|&n| n as i32));
    meta.extend(pr.lens_k.iter().map(|&n| n as i32));
    let dev = |m: &Option<Meta>| m.as_ref().and_then(|m| m.device()).map(addr_of);
    (
        meta,
        [
            dev(&args.prefix_index),
            dev(&args.seqlen_q),
            dev(&args.seqlen_k),
        ],
    )
}

impl FwdLaunch {
    /// Whether there is anything to launch.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    /// The forward kernel's launch (entry and geometry).
    pub fn kernel_launch(&self) -> KernelLaunch {
        KernelLaunch {
            entry: self.entry,
            grid: self.grid,
            threads: self.threads,
            smem_bytes: self.smem_bytes,
        }
    }
}

fn addr_of(t: &TensorView) -> u64 {
    t.base_addr() + (t.layout().offset() * t.dtype().size()) as u64
}

fn i64s(arg: &str, strides: &[usize]) -> Result<Vec<i64>> {
    strides
        .iter()
        .map(|&s| i64::try_from(s).map_err(|_| Error::layout(arg, format!("stride {s} too large"))))
        .collect()
}

/// Checks that a 16-bit input can be read in 16-byte chunks: address and every outer stride
/// aligned to 16 bytes (8 elements).
fn check_vec16(arg: &str, t: &TensorView) -> Result<()> {
    if addr_of(t) % 16 != 0 {
        return Err(Error::layout(
            arg,
            format!(
                "address {:#x} is not 16-byte aligned (the kernels read 16-byte chunks)",
                addr_of(t)
            ),
        ));
    }
    let r = t.strides().len();
    if let Some(s) = t.strides()[..r - 1]
        .iter()
        .zip(t.dims())
        .find(|(&s, &d)| d > 1 && s % 8 != 0)
    {
        return Err(Error::layout(
            arg,
            format!(
                "stride {} (elements) is not a multiple of 8: rows must start on 16-byte boundaries; strides {:?}",
                s.0,
                t.strides()
            ),
        ));
    }
    Ok(())
}

fn i32s(arg: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::index(arg, format!("{v} does not fit in 32 bits")))
}

/// The parameters every kernel shares: checked addresses and strides of q, k, v, the prefix
/// table, o and lse, and the sizes.
fn base_params(
    args: &AttnFwdArgs,
    pr: &AttnProblem,
    o: &TensorView,
    lse: Option<&TensorView>,
) -> Result<FwdParams> {
    let dtype = match pr.dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        other => {
            return Err(Error::DType {
                arg: "q".into(),
                expected: "f16 or bf16 (the CUDA kernels' input types)".into(),
                got: other.name().into(),
            })
        }
    };
    let d = pr.head_dim;
    if d != 64 && d != 128 {
        return Err(Error::Unsupported(format!(
            "head dim {d}: the CUDA kernels are built for head dims 64 and 128"
        )));
    }
    check_vec16("q", &args.q)?;
    check_vec16("k", &args.k)?;
    check_vec16("v", &args.v)?;
    let (kp, vp) = match &args.prefix {
        Some(p) => {
            check_vec16("k_pre", &p.k)?;
            check_vec16("v_pre", &p.v)?;
            (p.k, p.v)
        }
        None => (args.q, args.q),
    };
    // The kernel writes o in pairs of elements (4 bytes).
    if addr_of(o) % 4 != 0 || o.strides()[..3].iter().any(|s| s % 2 != 0) {
        return Err(Error::layout(
            "o",
            format!(
                "address and strides must be 4-byte aligned (pairs of elements), strides {:?}",
                o.strides()
            ),
        ));
    }
    let (q_s, k_s, v_s, o_s) = (
        i64s("q", args.q.strides())?,
        i64s("k", args.k.strides())?,
        i64s("v", args.v.strides())?,
        i64s("o", o.strides())?,
    );
    let (kp_s, vp_s) = if args.prefix.is_some() {
        (i64s("k_pre", kp.strides())?, i64s("v_pre", vp.strides())?)
    } else {
        (vec![0; 4], vec![0; 4])
    };
    let (lse_addr, lse_s) = match lse {
        Some(v) => (addr_of(v), i64s("lse", v.strides())?),
        None => (0, vec![0; 3]),
    };
    let scale = pr.scale;
    let params = FwdParams {
        q: addr_of(&args.q),
        k: addr_of(&args.k),
        v: addr_of(&args.v),
        k_pre: addr_of(&kp),
        v_pre: addr_of(&vp),
        o: addr_of(o),
        lse: lse_addr,
        prefix_index: 0,
        seqlen_q: 0,
        seqlen_k: 0,
        q_batch_stride: q_s[0],
        q_row_stride: q_s[1],
        q_head_stride: q_s[2],
        k_batch_stride: k_s[0],
        k_row_stride: k_s[1],
        k_head_stride: k_s[2],
        v_batch_stride: v_s[0],
        v_row_stride: v_s[1],
        v_head_stride: v_s[2],
        kp_prefix_stride: kp_s[0],
        kp_row_stride: kp_s[1],
        kp_head_stride: kp_s[2],
        vp_prefix_stride: vp_s[0],
        vp_row_stride: vp_s[1],
        vp_head_stride: vp_s[2],
        o_batch_stride: o_s[0],
        o_row_stride: o_s[1],
        o_head_stride: o_s[2],
        lse_batch_stride: lse_s[0],
        lse_head_stride: lse_s[1],
        batch: i32s("B", pr.batch)?,
        tq: i32s("Tq", pr.tq)?,
        tk: i32s("Tk", pr.tk)?,
        heads_q: i32s("Hq", pr.heads_q)?,
        heads_kv: i32s("Hkv", pr.heads_kv)?,
        head_dim: d as i32,
        prefix_len: i32s("P", pr.prefix_len)?,
        num_prefixes: i32s("NP", pr.num_prefixes)?,
        causal: pr.causal as i32,
        dtype,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
    };
    Ok(params)
}

/// Block size of the prefix-gradient reduction (one thread per element).
const REDUCE_THREADS: u32 = 256;

/// Largest grid y and z a CUDA device accepts.
const MAX_GRID_YZ: usize = 65_535;

/// `v` as a grid dimension, or an error naming what overflowed.
fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32> {
    if v > max {
        return Err(Error::index(
            what,
            format!("{v} blocks in one grid dimension, a CUDA device takes at most {max}"),
        ));
    }
    Ok(v as u32)
}

/// Validates a forward call for the CUDA kernels and plans its launch.
pub fn plan_fwd(args: &AttnFwdArgs, out: &AttnFwdOut) -> Result<FwdLaunch> {
    let pr = args.check()?;
    pr.check_fwd_out(out)?;
    let o = out.o.as_view();
    let lse = out.lse.as_ref().map(|l| l.as_view());
    let params = base_params(args, &pr, &o, lse.as_ref())?;
    let d = pr.head_dim;
    let (meta, meta_dev) = launch_meta(args, &pr);
    let k = kernel(match (d, params.dtype) {
        (64, 0) => "prefix_attn_fwd_d64_f16",
        (128, 0) => "prefix_attn_fwd_d128_f16",
        (64, _) => "prefix_attn_fwd_d64_bf16",
        _ => "prefix_attn_fwd_d128_bf16",
    })?;
    let grid = (
        grid_dim("Tq", pr.tq.div_ceil(k.block_m), u32::MAX as usize)?,
        grid_dim("Hq", pr.heads_q, MAX_GRID_YZ)?,
        grid_dim("B", pr.batch, MAX_GRID_YZ)?,
    );
    Ok(FwdLaunch {
        params,
        grid,
        threads: k.threads,
        smem_bytes: k.smem_bytes,
        entry: k.name,
        meta,
        meta_dev,
        problem: pr,
    })
}

/// Mirror of `AttnMetaClampParams` (kernels/common/params.h): the metadata clamp that makes
/// device metadata safe before the attention kernels read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MetaClampParams {
    /// int32 `[B]` device arrays as the caller passed them (unchecked values).
    pub src_prefix_index: u64,
    /// See `src_prefix_index`.
    pub src_seqlen_q: u64,
    /// See `src_prefix_index`.
    pub src_seqlen_k: u64,
    /// int32 `[3B]` destination: clamped prefix_index; seqlen_q; seqlen_k.
    pub dst: u64,
    /// Sizes the values are clamped against.
    pub batch: i32,
    /// See `batch`.
    pub tq: i32,
    /// See `batch`.
    pub tk: i32,
    /// See `batch`.
    pub num_prefixes: i32,
}

/// Field offsets of [`MetaClampParams`], in the order the C side reports them.
pub fn meta_clamp_params_rust_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<MetaClampParams>(),
        offset_of!(MetaClampParams, src_seqlen_k),
        offset_of!(MetaClampParams, dst),
        offset_of!(MetaClampParams, batch),
        offset_of!(MetaClampParams, num_prefixes),
    ]
}

/// Entry name of the metadata clamp.
pub const META_CLAMP_KERNEL: &str = "prefix_attn_meta_clamp";

/// The launch of the metadata clamp for a problem of `f`'s sizes, reading `src` (the three
/// metadata arrays; a zero address stands for the default values: prefix 0, `Tq`, `Tk`) and
/// writing the clamped `[3B]` copy to `dst`.
pub fn plan_meta_clamp(
    f: &FwdParams,
    src: [u64; 3],
    dst: u64,
) -> Result<(MetaClampParams, KernelLaunch)> {
    let k = kernel(META_CLAMP_KERNEL)?;
    let params = MetaClampParams {
        src_prefix_index: src[0],
        src_seqlen_q: src[1],
        src_seqlen_k: src[2],
        dst,
        batch: f.batch,
        tq: f.tq,
        tk: f.tk,
        num_prefixes: f.num_prefixes,
    };
    let blocks = (f.batch.max(0) as usize).div_ceil(k.threads as usize);
    Ok((
        params,
        KernelLaunch {
            entry: k.name,
            grid: (grid_dim("B", blocks, u32::MAX as usize)?, 1, 1),
            threads: k.threads,
            smem_bytes: k.smem_bytes,
        },
    ))
}

/// Mirror of `PrefixAttnBwdParams` (kernels/common/params.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BwdParams {
    /// The forward's inputs and outputs (o and lse are read).
    pub f: FwdParams,
    /// Addresses of dO, dQ, dK, dV (16-bit), dK_pre, dV_pre (f32).
    pub d_o: u64,
    /// See `d_o`.
    pub dq: u64,
    /// See `d_o`.
    pub dk: u64,
    /// See `d_o`.
    pub dv: u64,
    /// See `d_o`.
    pub dk_pre: u64,
    /// See `d_o`.
    pub dv_pre: u64,
    /// f32 scratch `[B, Hq, Tq]`.
    pub delta: u64,
    /// f32 scratch `[splits, 2, NP, P, Hkv, D]`.
    pub partial: u64,
    /// Element strides.
    pub do_batch_stride: i64,
    /// See `do_batch_stride`.
    pub do_row_stride: i64,
    /// See `do_batch_stride`.
    pub do_head_stride: i64,
    /// See `do_batch_stride`.
    pub dq_batch_stride: i64,
    /// See `do_batch_stride`.
    pub dq_row_stride: i64,
    /// See `do_batch_stride`.
    pub dq_head_stride: i64,
    /// See `do_batch_stride`.
    pub dk_batch_stride: i64,
    /// See `do_batch_stride`.
    pub dk_row_stride: i64,
    /// See `do_batch_stride`.
    pub dk_head_stride: i64,
    /// See `do_batch_stride`.
    pub dv_batch_stride: i64,
    /// See `do_batch_stride`.
    pub dv_row_stride: i64,
    /// See `do_batch_stride`.
    pub dv_head_stride: i64,
    /// See `do_batch_stride`.
    pub dkp_prefix_stride: i64,
    /// See `do_batch_stride`.
    pub dkp_row_stride: i64,
    /// See `do_batch_stride`.
    pub dkp_head_stride: i64,
    /// See `do_batch_stride`.
    pub dvp_prefix_stride: i64,
    /// See `do_batch_stride`.
    pub dvp_row_stride: i64,
    /// See `do_batch_stride`.
    pub dvp_head_stride: i64,
    /// 0 or 1.
    pub prefix_only: i32,
    /// Splits of the prefix dK/dV work, each with its own partial (see `split_batch`).
    pub splits: i32,
    /// Split `s` takes the sequences `b ≡ s % split_batch`, the query heads
    /// `hh ≡ (s / split_batch) % split_heads` of the group, and the query tiles
    /// `[c · split_qtiles, (c + 1) · split_qtiles)` with `c = s / (split_batch · split_heads)`.
    pub split_batch: i32,
    /// See `split_batch`.
    pub split_heads: i32,
    /// See `split_batch`.
    pub split_qtiles: i32,
}

/// Field offsets of [`BwdParams`], in the order the C side reports them.
pub fn bwd_params_rust_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<BwdParams>(),
        offset_of!(BwdParams, d_o),
        offset_of!(BwdParams, dv_pre),
        offset_of!(BwdParams, partial),
        offset_of!(BwdParams, do_batch_stride),
        offset_of!(BwdParams, dvp_head_stride),
        offset_of!(BwdParams, prefix_only),
        offset_of!(BwdParams, splits),
        offset_of!(BwdParams, split_qtiles),
    ]
}

/// One kernel launch of the backward.
#[derive(Clone, Debug)]
pub struct KernelLaunch {
    /// Entry name.
    pub entry: &'static str,
    /// Grid.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory, bytes.
    pub smem_bytes: usize,
}

/// A checked backward: parameters (scratch and metadata addresses still to be filled by the
/// device), the launches in order, and the sizes of the scratch buffers.
#[derive(Clone, Debug)]
pub struct BwdLaunch {
    /// Parameters.
    pub params: BwdParams,
    /// Kernels in launch order.
    pub launches: Vec<KernelLaunch>,
    /// f32 elements of the `delta` scratch.
    pub delta_len: usize,
    /// f32 elements of the prefix partial scratch.
    pub partial_len: usize,
    /// Metadata `[prefix_index; seqlen_q; seqlen_k]` (as [`FwdLaunch::meta`]).
    pub meta: Vec<i32>,
    /// Device metadata addresses (as [`FwdLaunch::meta_dev`]).
    pub meta_dev: [Option<u64>; 3],
    /// The validated problem.
    pub problem: AttnProblem,
}

impl BwdLaunch {
    /// Bytes of device scratch the launches need and where the prefix partials start in it:
    /// `delta` first, then the partials at the next 256-byte boundary (the prefix kernel
    /// writes 8-byte pairs).
    pub fn scratch_bytes(&self) -> (usize, usize) {
        let delta_bytes = (4 * self.delta_len).next_multiple_of(256);
        (delta_bytes + 4 * self.partial_len.max(1), delta_bytes)
    }
}

fn dims_of(arg: &str, t: &TensorView, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::shape(arg, format!("{want:?}"), t.dims()));
    }
    Ok(())
}

/// Blocks the prefix dK/dV kernel aims for: two per SM of an H100/H200 (132 SMs), so that
/// small prefixes (P = 10 with 12 heads is only 12 key tiles) still fill the device.
const PREFIX_FILL_BLOCKS: usize = 264;

/// How the prefix dK/dV work of one (key tile, KV head, prefix) is split over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixSplit {
    /// Ways the batch is split (sequences `b ≡ s mod batch`).
    pub batch: usize,
    /// Ways the query heads of a KV head's group are split.
    pub heads: usize,
    /// Query tiles per chunk.
    pub qtiles: usize,
    /// Chunks of query tiles.
    pub chunks: usize,
}

impl PrefixSplit {
    /// Splits in all, one partial each: `batch · heads · chunks`.
    pub fn splits(&self) -> usize {
        self.batch * self.heads * self.chunks
    }
}

/// Splits the prefix gradient work until `base` (key tiles × KV heads × prefixes) blocks times
/// the splits reach [`PREFIX_FILL_BLOCKS`]: first over the batch, then over the query heads of
/// a group, then over chunks of the `q_tiles` query tiles. The split depends on the shape
/// only, and the partials are reduced in split order, so results stay bit-identical.
pub fn prefix_split(base: usize, batch: usize, group: usize, q_tiles: usize) -> PrefixSplit {
    let want = |have: usize| PREFIX_FILL_BLOCKS.div_ceil(base.max(1) * have).max(1);
    let sb = batch.clamp(1, want(1));
    let sh = group.clamp(1, want(sb));
    let chunks = q_tiles.clamp(1, want(sb * sh));
    // Whole chunks of at most q_tiles / chunks tiles: at least the chunks wanted.
    let qtiles = (q_tiles / chunks).max(1);
    PrefixSplit {
        batch: sb,
        heads: sh,
        qtiles,
        chunks: q_tiles.max(1).div_ceil(qtiles),
    }
}

/// Validates a backward call for the CUDA kernels and plans its launches.
pub fn plan_bwd(
    args: &crate::attn::AttnBwdArgs,
    grads: &crate::attn::AttnGrads,
) -> Result<BwdLaunch> {
    let pr = args.fwd.check()?;
    pr.check_bwd(args, grads)?;
    let f = base_params(&args.fwd, &pr, &args.o, Some(&args.lse))?;
    check_vec16("o", &args.o)?;
    check_vec16("d_o", &args.d_o)?;
    let d = pr.head_dim;
    let suffix = match (d, f.dtype) {
        (64, 0) => "d64_f16",
        (128, 0) => "d128_f16",
        (64, _) => "d64_bf16",
        _ => "d128_bf16",
    };
    let out16 = |arg: &str, t: &Option<crate::tensor::TensorViewMut>| -> Result<(u64, Vec<i64>)> {
        match t {
            Some(t) => {
                let v = t.as_view();
                if addr_of(&v) % 4 != 0 || v.strides()[..3].iter().any(|s| s % 2 != 0) {
                    return Err(Error::layout(
                        arg,
                        "address and strides must be 4-byte aligned (pairs of elements)",
                    ));
                }
                Ok((addr_of(&v), i64s(arg, v.strides())?))
            }
            None => Ok((0, vec![0; 4])),
        }
    };
    let out32 = |arg: &str, t: &Option<crate::tensor::TensorViewMut>| -> Result<(u64, Vec<i64>)> {
        match t {
            Some(t) => {
                let v = t.as_view();
                Ok((addr_of(&v), i64s(arg, v.strides())?))
            }
            None => Ok((0, vec![0; 4])),
        }
    };
    let seq = !args.prefix_only;
    let (dq, dq_s) = if seq {
        out16("dq", &grads.dq)?
    } else {
        (0, vec![0; 4])
    };
    let (dk, dk_s) = if seq {
        out16("dk", &grads.dk)?
    } else {
        (0, vec![0; 4])
    };
    let (dv, dv_s) = if seq {
        out16("dv", &grads.dv)?
    } else {
        (0, vec![0; 4])
    };
    let (dkp, dkp_s) = out32("dk_pre", &grads.dk_pre)?;
    let (dvp, dvp_s) = out32("dv_pre", &grads.dv_pre)?;
    dims_of("d_o", &args.d_o, &pr.q_dims())?;
    let do_s = i64s("d_o", args.d_o.strides())?;
    let dt = if f.dtype == 0 { "f16" } else { "bf16" };
    let dq_k = kernel(&format!("prefix_attn_bwd_dq_{suffix}"))?;
    let seq_k = kernel(&format!("prefix_attn_bwd_dkv_seq_{suffix}"))?;
    let pre_k = kernel(&format!("prefix_attn_bwd_dkv_pre_{suffix}"))?;
    let delta_k = kernel(&format!("prefix_attn_bwd_delta_{dt}"))?;
    let reduce_k = kernel("prefix_attn_bwd_reduce")?;
    let prefix_tiles = pr.prefix_len.div_ceil(pre_k.block_n).max(1);
    let split = prefix_split(
        prefix_tiles * pr.heads_kv * pr.num_prefixes.max(1),
        pr.batch,
        pr.heads_q / pr.heads_kv,
        pr.tq.div_ceil(pre_k.block_m),
    );
    let params = BwdParams {
        f,
        d_o: addr_of(&args.d_o),
        dq,
        dk,
        dv,
        dk_pre: dkp,
        dv_pre: dvp,
        delta: 0,
        partial: 0,
        do_batch_stride: do_s[0],
        do_row_stride: do_s[1],
        do_head_stride: do_s[2],
        dq_batch_stride: dq_s[0],
        dq_row_stride: dq_s[1],
        dq_head_stride: dq_s[2],
        dk_batch_stride: dk_s[0],
        dk_row_stride: dk_s[1],
        dk_head_stride: dk_s[2],
        dv_batch_stride: dv_s[0],
        dv_row_stride: dv_s[1],
        dv_head_stride: dv_s[2],
        dkp_prefix_stride: dkp_s[0],
        dkp_row_stride: dkp_s[1],
        dkp_head_stride: dkp_s[2],
        dvp_prefix_stride: dvp_s[0],
        dvp_row_stride: dvp_s[1],
        dvp_head_stride: dvp_s[2],
        prefix_only: args.prefix_only as i32,
        splits: split.splits() as i32,
        split_batch: split.batch as i32,
        split_heads: split.heads as i32,
        split_qtiles: split.qtiles as i32,
    };
    let splits = split.splits();
    let (b, hq, hkv, tq, tk) = (pr.batch, pr.heads_q, pr.heads_kv, pr.tq, pr.tk);
    let launch = |k: &'static super::registry::KernelInfo,
                  grid: (usize, usize, usize),
                  threads: u32|
     -> Result<KernelLaunch> {
        Ok(KernelLaunch {
            entry: k.name,
            grid: (
                grid_dim(k.name, grid.0, u32::MAX as usize)?,
                grid_dim(k.name, grid.1, MAX_GRID_YZ)?,
                grid_dim(k.name, grid.2, MAX_GRID_YZ)?,
            ),
            threads,
            smem_bytes: k.smem_bytes,
        })
    };
    let mut launches = vec![launch(
        delta_k,
        (tq.div_ceil(delta_k.block_m), hq, b),
        delta_k.threads,
    )?];
    if seq {
        launches.push(launch(
            dq_k,
            (tq.div_ceil(dq_k.block_m), hq, b),
            dq_k.threads,
        )?);
        launches.push(launch(
            seq_k,
            (tk.div_ceil(seq_k.block_n), hkv, b),
            seq_k.threads,
        )?);
    }
    let per = pr.num_prefixes * pr.prefix_len * hkv * d;
    let wants_prefix = per > 0 && (grads.dk_pre.is_some() || grads.dv_pre.is_some());
    if wants_prefix {
        launches.push(launch(
            pre_k,
            (
                pr.prefix_len.div_ceil(pre_k.block_n),
                hkv,
                pr.num_prefixes * splits,
            ),
            pre_k.threads,
        )?);
        // One thread per element of dK_pre and dV_pre.
        launches.push(launch(
            reduce_k,
            ((2 * per).div_ceil(REDUCE_THREADS as usize), 1, 1),
            REDUCE_THREADS,
        )?);
    }
    let (meta, meta_dev) = launch_meta(&args.fwd, &pr);
    Ok(BwdLaunch {
        params,
        launches: launches
            .into_iter()
            .filter(|l| l.grid.0 > 0 && l.grid.1 > 0 && l.grid.2 > 0)
            .collect(),
        delta_len: b * hq * tq,
        partial_len: if wants_prefix { splits * 2 * per } else { 0 },
        meta,
        meta_dev,
        problem: pr,
    })
}

/// Mirror of `PrefixAttnDecodeParams` (kernels/common/params.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeParams {
    /// Addresses of q, k_cache, v_cache, k_pre, v_pre, o, lse.
    pub q: u64,
    /// See `q`.
    pub k_cache: u64,
    /// See `q`.
    pub v_cache: u64,
    /// See `q`.
    pub k_pre: u64,
    /// See `q`.
    pub v_pre: u64,
    /// See `q`.
    pub o: u64,
    /// See `q`.
    pub lse: u64,
    /// int32 metadata: block table `[B, max_pages]`, seqlen_k, prefix_index `[B]`,
    /// prefix_len `[NP]`.
    pub block_table: u64,
    /// See `block_table`.
    pub seqlen_k: u64,
    /// See `block_table`.
    pub prefix_index: u64,
    /// See `block_table`.
    pub prefix_len: u64,
    /// f32 partial outputs `[splits, B, Hq, Tq, D]` (splits > 1).
    pub part_o: u64,
    /// f32 partial LSEs `[splits, B, Hq, Tq]`.
    pub part_lse: u64,
    /// Element strides.
    pub q_batch_stride: i64,
    /// See `q_batch_stride`.
    pub q_row_stride: i64,
    /// See `q_batch_stride`.
    pub q_head_stride: i64,
    /// See `q_batch_stride`.
    pub kc_page_stride: i64,
    /// See `q_batch_stride`.
    pub kc_row_stride: i64,
    /// See `q_batch_stride`.
    pub kc_head_stride: i64,
    /// See `q_batch_stride`.
    pub vc_page_stride: i64,
    /// See `q_batch_stride`.
    pub vc_row_stride: i64,
    /// See `q_batch_stride`.
    pub vc_head_stride: i64,
    /// See `q_batch_stride`.
    pub kp_prefix_stride: i64,
    /// See `q_batch_stride`.
    pub kp_row_stride: i64,
    /// See `q_batch_stride`.
    pub kp_head_stride: i64,
    /// See `q_batch_stride`.
    pub vp_prefix_stride: i64,
    /// See `q_batch_stride`.
    pub vp_row_stride: i64,
    /// See `q_batch_stride`.
    pub vp_head_stride: i64,
    /// See `q_batch_stride`.
    pub o_batch_stride: i64,
    /// See `q_batch_stride`.
    pub o_row_stride: i64,
    /// See `q_batch_stride`.
    pub o_head_stride: i64,
    /// See `q_batch_stride`.
    pub lse_batch_stride: i64,
    /// See `q_batch_stride`.
    pub lse_head_stride: i64,
    /// Sizes.
    pub batch: i32,
    /// See `batch`.
    pub tq: i32,
    /// See `batch`.
    pub heads_q: i32,
    /// See `batch`.
    pub heads_kv: i32,
    /// See `batch`.
    pub head_dim: i32,
    /// See `batch`.
    pub num_pages: i32,
    /// See `batch`.
    pub page_size: i32,
    /// See `batch`.
    pub max_pages: i32,
    /// See `batch`.
    pub prefix_rows: i32,
    /// See `batch`.
    pub num_prefixes: i32,
    /// Key chunks per (sequence, KV head); partials merged when > 1.
    pub splits: i32,
    /// 0 = f16, 1 = bf16.
    pub dtype: i32,
    /// Softmax scale.
    pub scale: f32,
    /// `scale · log2(e)`.
    pub scale_log2: f32,
}

/// Field offsets of [`DecodeParams`], in the order the C side reports them.
pub fn decode_params_rust_layout() -> Vec<usize> {
    use std::mem::{offset_of, size_of};
    vec![
        size_of::<DecodeParams>(),
        offset_of!(DecodeParams, block_table),
        offset_of!(DecodeParams, part_lse),
        offset_of!(DecodeParams, q_batch_stride),
        offset_of!(DecodeParams, lse_head_stride),
        offset_of!(DecodeParams, batch),
        offset_of!(DecodeParams, splits),
        offset_of!(DecodeParams, scale_log2),
    ]
}

/// SMs of the GPU the split heuristic is tuned for (an H200; an H100 has the same 132).
pub const DECODE_SMS: usize = 132;

/// Key chunks per (sequence, KV head) for paged decode (flash-decoding): `B · Hkv` blocks
/// alone leave an H200's 132 SMs idle at small batches, so the keys are split until about two
/// blocks per SM are in flight, `ceil(264 / (B · Hkv))`, but never into chunks of less than
/// one tile (`max_keys / block_n`) and at most 64 ways (the merge reads every partial).
/// `decode` shape (Hkv = 8, 2048 + 64 keys): B = 1 → 33 splits, B = 4 → 9, B = 64 → 1.
pub fn decode_splits(batch: usize, heads_kv: usize, max_keys: usize, block_n: usize) -> usize {
    let base = (batch * heads_kv).max(1);
    let want = (2 * DECODE_SMS).div_ceil(base);
    want.min(max_keys.div_ceil(block_n)).clamp(1, 64)
}

/// A checked paged-decode launch.
#[derive(Clone, Debug)]
pub struct DecodeLaunch {
    /// Parameters (metadata and scratch addresses filled by the device).
    pub params: DecodeParams,
    /// The decode kernel, then the merge when `params.splits > 1`.
    pub launches: Vec<KernelLaunch>,
    /// Host metadata `[block_table (B·max_pages); seqlen_k (B); prefix_index (B);
    /// prefix_len (NP)]`, with defaults; entries given as device tensors are placeholders.
    pub meta: Vec<i32>,
    /// Device addresses of the metadata passed as device tensors, in that order.
    pub meta_dev: [Option<u64>; 4],
    /// f32 elements of the partial-output scratch (0 with one split).
    pub part_o_len: usize,
    /// f32 elements of the partial-LSE scratch.
    pub part_lse_len: usize,
    /// The validated problem.
    pub problem: crate::attn::paged::PagedProblem,
}

/// Validates a paged-decode call for the CUDA kernels and plans its launches.
pub fn plan_decode(
    args: &crate::attn::paged::PagedAttnArgs,
    out: &AttnFwdOut,
) -> Result<DecodeLaunch> {
    let pr = args.check()?;
    pr.check_out(out)?;
    let dtype = match pr.dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        other => {
            return Err(Error::DType {
                arg: "q".into(),
                expected: "f16 or bf16 (the CUDA kernels' input types)".into(),
                got: other.name().into(),
            })
        }
    };
    let d = pr.head_dim;
    if d != 64 && d != 128 {
        return Err(Error::Unsupported(format!(
            "head dim {d}: the CUDA kernels are built for head dims 64 and 128"
        )));
    }
    let suffix = match (d, dtype) {
        (64, 0) => "d64_f16",
        (128, 0) => "d128_f16",
        (64, _) => "d64_bf16",
        _ => "d128_bf16",
    };
    let k = kernel(&format!("prefix_attn_decode_{suffix}"))?;
    let merge = kernel(if dtype == 0 {
        "prefix_attn_decode_merge_f16"
    } else {
        "prefix_attn_decode_merge_bf16"
    })?;
    if pr.group() * pr.tq > k.block_m {
        return Err(Error::Unsupported(format!(
            "paged decode packs the G·Tq = {} query rows of a KV head into one block of at most {}",
            pr.group() * pr.tq,
            k.block_m
        )));
    }
    if pr.num_pages == 0 {
        return Err(Error::shape(
            "k_cache",
            "at least one page",
            args.kv.k_cache.dims(),
        ));
    }
    check_vec16("q", &args.q)?;
    check_vec16("k_cache", &args.kv.k_cache)?;
    check_vec16("v_cache", &args.kv.v_cache)?;
    let (kp, vp) = match &args.prefix {
        Some(p) => {
            check_vec16("k_pre", &p.k)?;
            check_vec16("v_pre", &p.v)?;
            (
                Some((addr_of(&p.k), i64s("k_pre", p.k.strides())?)),
                Some((addr_of(&p.v), i64s("v_pre", p.v.strides())?)),
            )
        }
        None => (None, None),
    };
    let (kp_addr, kp_s) = kp.unwrap_or((0, vec![0; 4]));
    let (vp_addr, vp_s) = vp.unwrap_or((0, vec![0; 4]));
    let o = out.o.as_view();
    if addr_of(&o) % 4 != 0 || o.strides()[..3].iter().any(|s| s % 2 != 0) {
        return Err(Error::layout(
            "o",
            format!(
                "address and strides must be 4-byte aligned (pairs of elements), strides {:?}",
                o.strides()
            ),
        ));
    }
    let (lse_addr, lse_s) = match &out.lse {
        Some(l) => (addr_of(&l.as_view()), i64s("lse", l.strides())?),
        None => (0, vec![0; 3]),
    };
    let (q_s, kc_s, vc_s, o_s) = (
        i64s("q", args.q.strides())?,
        i64s("k_cache", args.kv.k_cache.strides())?,
        i64s("v_cache", args.kv.v_cache.strides())?,
        i64s("o", o.strides())?,
    );
    let splits = decode_splits(
        pr.batch,
        pr.heads_kv,
        pr.prefix_rows + pr.max_pages * pr.page_size,
        k.block_n,
    );
    let params = DecodeParams {
        q: addr_of(&args.q),
        k_cache: addr_of(&args.kv.k_cache),
        v_cache: addr_of(&args.kv.v_cache),
        k_pre: kp_addr,
        v_pre: vp_addr,
        o: addr_of(&o),
        lse: lse_addr,
        q_batch_stride: q_s[0],
        q_row_stride: q_s[1],
        q_head_stride: q_s[2],
        kc_page_stride: kc_s[0],
        kc_row_stride: kc_s[1],
        kc_head_stride: kc_s[2],
        vc_page_stride: vc_s[0],
        vc_row_stride: vc_s[1],
        vc_head_stride: vc_s[2],
        kp_prefix_stride: kp_s[0],
        kp_row_stride: kp_s[1],
        kp_head_stride: kp_s[2],
        vp_prefix_stride: vp_s[0],
        vp_row_stride: vp_s[1],
        vp_head_stride: vp_s[2],
        o_batch_stride: o_s[0],
        o_row_stride: o_s[1],
        o_head_stride: o_s[2],
        lse_batch_stride: lse_s[0],
        lse_head_stride: lse_s[1],
        batch: i32s("B", pr.batch)?,
        tq: i32s("Tq", pr.tq)?,
        heads_q: i32s("Hq", pr.heads_q)?,
        heads_kv: i32s("Hkv", pr.heads_kv)?,
        head_dim: d as i32,
        num_pages: i32s("num_pages", pr.num_pages)?,
        page_size: i32s("page_size", pr.page_size)?,
        max_pages: i32s("max_pages", pr.max_pages)?,
        prefix_rows: i32s("P", pr.prefix_rows)?,
        num_prefixes: i32s("NP", pr.num_prefixes)?,
        splits: splits as i32,
        dtype,
        scale: pr.scale,
        scale_log2: pr.scale * std::f32::consts::LOG2_E,
        ..Default::default()
    };
    let mut launches = vec![KernelLaunch {
        entry: k.name,
        grid: (
            splits as u32,
            grid_dim("Hkv", pr.heads_kv, MAX_GRID_YZ)?,
            grid_dim("B", pr.batch, MAX_GRID_YZ)?,
        ),
        threads: k.threads,
        smem_bytes: k.smem_bytes,
    }];
    let rows = pr.batch * pr.heads_q * pr.tq;
    if splits > 1 {
        launches.push(KernelLaunch {
            entry: merge.name,
            grid: (
                grid_dim("B·Hq·Tq", rows.div_ceil(merge.block_m), u32::MAX as usize)?,
                1,
                1,
            ),
            threads: merge.threads,
            smem_bytes: merge.smem_bytes,
        });
    }
    let mut meta = Vec::with_capacity(pr.pages.len() + 2 * pr.batch + pr.num_prefixes);
    meta.extend(&pr.pages);
    meta.extend(pr.lens_k.iter().map(|&n| n as i32));
    meta.extend(pr.prefix_of.iter().map(|p| p.map_or(-1, |n| n as i32)));
    meta.extend(pr.prefix_lens.iter().map(|&n| n as i32));
    let dev = |m: Option<&Meta>| m.and_then(|m| m.device()).map(addr_of);
    let meta_dev = [
        dev(Some(&args.kv.block_table)),
        dev(Some(&args.kv.seqlen_k)),
        dev(args.prefix_index.as_ref()),
        dev(args.prefix_len.as_ref()),
    ];
    Ok(DecodeLaunch {
        params,
        launches: launches
            .into_iter()
            .filter(|l| l.grid.0 > 0 && l.grid.1 > 0 && l.grid.2 > 0)
            .collect(),
        meta,
        meta_dev,
        part_o_len: if splits > 1 { splits * rows * d } else { 0 },
        part_lse_len: if splits > 1 { splits * rows } else { 0 },
        problem: pr,
    })
}

impl DecodeLaunch {
    /// Points the parameters at the metadata (device arrays where given, else the thirds of
    /// the host array uploaded at `uploaded`) and at the scratch.
    pub fn place(&mut self, uploaded: u64, part_o: u64, part_lse: u64) {
        let pr = &self.problem;
        let lens = [pr.pages.len(), pr.batch, pr.batch, pr.prefix_lens.len()];
        let mut at = uploaded;
        let mut addrs = [0u64; 4];
        for i in 0..4 {
            addrs[i] = self.meta_dev[i].unwrap_or(at);
            at += 4 * lens[i] as u64;
        }
        let p = &mut self.params;
        [p.block_table, p.seqlen_k, p.prefix_index, p.prefix_len] = addrs;
        p.part_o = part_o;
        p.part_lse = part_lse;
    }
}
