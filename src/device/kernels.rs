//! The CUDA kernels' parameter structs (mirrors of `kernels/common/params.h`), the embedded
//! fatbins, and the launch plans that the `emu` and `cuda` devices share: every check on
//! shapes, strides, alignment and dtypes happens here, before any launch.

use crate::attn::{AttnFwdArgs, AttnFwdOut, AttnProblem};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The forward kernel's fatbin (sm_80, sm_90, compute_80 PTX), if nvcc was found at build time.
pub const PREFIX_ATTN_FWD_FATBIN: Option<&[u8]> = fatbins::PREFIX_ATTN_FWD;

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

/// Tile rows of the forward kernel (4 warps × 16 rows).
pub const FWD_BLOCK_M: usize = 64;
/// Threads per block of the forward kernel.
pub const FWD_THREADS: u32 = 128;

/// A checked forward launch: parameters (metadata addresses still to be filled by the device),
/// geometry, and the metadata arrays `[prefix_index; seqlen_q; seqlen_k]`.
#[derive(Clone, Debug)]
pub struct FwdLaunch {
    /// Parameters.
    pub params: FwdParams,
    /// Grid `(ceil(Tq / 64), Hq, B)`.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub smem_bytes: usize,
    /// Kernel entry name.
    pub entry: &'static str,
    /// `3B` int32 values: prefix_index, seqlen_q, seqlen_k.
    pub meta: Vec<i32>,
    /// The validated problem.
    pub problem: AttnProblem,
}

impl FwdLaunch {
    /// Whether there is anything to launch.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
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

/// Validates a forward call for the CUDA kernels and plans its launch.
pub fn plan_fwd(args: &AttnFwdArgs, out: &AttnFwdOut) -> Result<FwdLaunch> {
    let pr = args.check()?;
    pr.check_fwd_out(out)?;
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
    let o = out.o.as_view();
    // The kernel writes o in pairs of elements (4 bytes).
    if addr_of(&o) % 4 != 0 || o.strides()[..3].iter().any(|s| s % 2 != 0) {
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
    let (lse_addr, lse_s) = match &out.lse {
        Some(l) => {
            let v: TensorView = l.as_view();
            (addr_of(&v), i64s("lse", v.strides())?)
        }
        None => (0, vec![0; 3]),
    };
    let scale = pr.scale;
    let params = FwdParams {
        q: addr_of(&args.q),
        k: addr_of(&args.k),
        v: addr_of(&args.v),
        k_pre: addr_of(&kp),
        v_pre: addr_of(&vp),
        o: addr_of(&o),
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
    let mut meta = Vec::with_capacity(3 * pr.batch);
    meta.extend(pr.prefix_of.iter().map(|p| p.map_or(-1, |n| n as i32)));
    meta.extend(pr.lens_q.iter().map(|&n| n as i32));
    meta.extend(pr.lens_k.iter().map(|&n| n as i32));
    let block_n = if d <= 64 { 64 } else { 32 };
    let smem_bytes = (FWD_BLOCK_M * d + 4 * block_n * d) * 2;
    let entry = match (d, dtype) {
        (64, 0) => "prefix_attn_fwd_d64_f16",
        (128, 0) => "prefix_attn_fwd_d128_f16",
        (64, _) => "prefix_attn_fwd_d64_bf16",
        _ => "prefix_attn_fwd_d128_bf16",
    };
    Ok(FwdLaunch {
        params,
        grid: (
            u32::try_from(pr.tq.div_ceil(FWD_BLOCK_M))
                .map_err(|_| Error::index("Tq", "too large"))?,
            pr.heads_q as u32,
            pr.batch as u32,
        ),
        threads: FWD_THREADS,
        smem_bytes,
        entry,
        meta,
        problem: pr,
    })
}
