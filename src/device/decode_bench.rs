//! Timing of the paged-decode kernel at the `decode` shape (docs/ARCHITECTURE.md §6: Hq / Hkv
//! = 32 / 8, one new token, 2048 cached keys in pages of 16, P = 64, D = 128, fp16), for a
//! benchmark plan: decode is bandwidth-bound, so each result carries the bytes it must move
//! (every K/V row it sees read once per KV head, q read, o written) and the rate.

use super::Backend;
use crate::attn::paged::PagedAttnArgs;
use crate::attn::testing::{FwdBuffers, PagedSpec, ProblemSpec, RandomPaged};
use crate::attn::{AttnFwdOut, Meta};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::DType;

/// One timed decode configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeTiming {
    /// Batch size.
    pub batch: usize,
    /// Median milliseconds of one call.
    pub ms: f64,
    /// Bytes one call must move at least.
    pub bytes: u64,
    /// `bytes / time`, GB/s.
    pub gb_per_s: f64,
}

/// The `decode` shape at batch `b` (every sequence on a prefix of 64 rows).
pub fn decode_shape(b: usize) -> PagedSpec {
    PagedSpec {
        batch: b,
        tq: 1,
        heads_q: 32,
        heads_kv: 8,
        head_dim: 128,
        page_size: 16,
        seqlen_k: vec![2048; b],
        prefix_rows: 64,
        num_prefixes: 1,
        prefix_index: vec![0; b],
        prefix_len: vec![64],
        dtype: DType::F16,
    }
}

/// Times `attn_decode` on `be` at the `decode` shape for each batch in `batches` (B = 1, 4, 64
/// in the plan): `reps` timed calls after one warm-up, the median, with device-resident
/// metadata so a call copies nothing from the host.
pub fn time_decode(be: &dyn Backend, batches: &[usize], reps: usize) -> Result<Vec<DecodeTiming>> {
    let mut out = vec![];
    for &b in batches {
        let spec = decode_shape(b);
        let pb = RandomPaged::new(&spec, &mut Rng::new(b as u64))?;
        let (q, kc, vc) = (
            be.upload(&pb.q)?,
            be.upload(&pb.k_cache)?,
            be.upload(&pb.v_cache)?,
        );
        let pre = pb.prefix.as_ref().map(|p| be.upload(p)).transpose()?;
        let i32s =
            |v: &[i32], dims: &[usize]| be.upload(&crate::tensor::Tensor::from_slice(dims, v)?);
        let table = i32s(&pb.block_table, &[b, pb.block_table.len() / b])?;
        let (lk, idx, plen) = (
            i32s(&pb.seqlen_k, &[b])?,
            i32s(&pb.prefix_index, &[b])?,
            i32s(&pb.prefix_len, &[1])?,
        );
        let mut args = PagedAttnArgs::new(
            q.view(),
            kc.view(),
            vc.view(),
            Meta::Device(table.view()),
            Meta::Device(lk.view()),
        );
        if let Some(p) = &pre {
            let pv = p.view();
            args = args
                .prefix(pv.select(0, 0)?, pv.select(0, 1)?)
                .prefix_index(Meta::Device(idx.view()))
                .prefix_len(Meta::Device(plen.view()));
        }
        let mut t = ProblemSpec::new(b, 1, 1, spec.heads_q, spec.heads_kv, spec.head_dim, 0, true);
        t.dtype = spec.dtype;
        let host = FwdBuffers::poisoned(&t)?;
        let (mut o, mut lse) = (be.upload(&host.o)?, be.upload(&host.lse)?);
        let mut call = || {
            be.attn_decode(
                &args,
                AttnFwdOut {
                    o: o.view_mut(),
                    lse: Some(lse.view_mut()),
                },
            )
        };
        call()?;
        let mut times = (0..reps.max(1))
            .map(|_| be.time_ms(&mut call))
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let row = (spec.heads_kv * spec.head_dim * 2) as u64;
        let keys = (spec.prefix_rows + 2048) as u64;
        let bytes = b as u64 * (2 * keys * row + 2 * (spec.heads_q * spec.head_dim * 2) as u64);
        out.push(DecodeTiming {
            batch: b,
            ms,
            bytes,
            gb_per_s: bytes as f64 / (ms * 1e-3) / 1e9,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::CpuBackend;

    /// The timing runs the real call on device-resident metadata and counts the bytes of the
    /// `decode` shape: 2 · (64 + 2048) K/V rows of 8 · 128 fp16 values plus q and o.
    #[test]
    fn times_the_decode_shape() {
        let t = time_decode(&CpuBackend, &[1], 1).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].bytes, 2 * 2112 * 2048 + 2 * 32 * 128 * 2);
        assert!(t[0].ms > 0.0 && t[0].gb_per_s > 0.0, "{t:?}");
    }
}
