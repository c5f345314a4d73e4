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
use crate::tensor::{DType, Tensor};

/// One timed decode configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeTiming {
    /// Batch size.
    pub batch: usize,
    /// Median milliseconds of one call.
    pub ms: f64,
    /// Bytes one call must move at least.
    pub bytes: u64,
    /// Copies of the inputs the calls rotate through.
    pub copies: usize,
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

/// One copy of a decode problem's inputs and outputs on the device.
struct DeviceSet {
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix: Option<Tensor>,
    table: Tensor,
    seqlen_k: Tensor,
    prefix_index: Tensor,
    prefix_len: Tensor,
    o: Tensor,
    lse: Tensor,
}

impl DeviceSet {
    fn new(be: &dyn Backend, spec: &PagedSpec, seed: u64) -> Result<DeviceSet> {
        let b = spec.batch;
        let pb = RandomPaged::new(spec, &mut Rng::new(seed))?;
        let i32s = |v: &[i32], dims: &[usize]| be.upload(&Tensor::from_slice(dims, v)?);
        let mut t = ProblemSpec::new(b, 1, 1, spec.heads_q, spec.heads_kv, spec.head_dim, 0, true);
        t.dtype = spec.dtype;
        let host = FwdBuffers::poisoned(&t)?;
        Ok(DeviceSet {
            q: be.upload(&pb.q)?,
            k_cache: be.upload(&pb.k_cache)?,
            v_cache: be.upload(&pb.v_cache)?,
            prefix: pb.prefix.as_ref().map(|p| be.upload(p)).transpose()?,
            table: i32s(&pb.block_table, &[b, pb.block_table.len() / b])?,
            seqlen_k: i32s(&pb.seqlen_k, &[b])?,
            prefix_index: i32s(&pb.prefix_index, &[b])?,
            prefix_len: i32s(&pb.prefix_len, &[pb.prefix_len.len()])?,
            o: be.upload(&host.o)?,
            lse: be.upload(&host.lse)?,
        })
    }

    /// One `attn_decode` call on this copy (metadata on the device: nothing is copied from
    /// the host).
    fn call(&mut self, be: &dyn Backend) -> Result<()> {
        let mut args = PagedAttnArgs::new(
            self.q.view(),
            self.k_cache.view(),
            self.v_cache.view(),
            Meta::Device(self.table.view()),
            Meta::Device(self.seqlen_k.view()),
        );
        if let Some(p) = &self.prefix {
            let pv = p.view();
            args = args
                .prefix(pv.select(0, 0)?, pv.select(0, 1)?)
                .prefix_index(Meta::Device(self.prefix_index.view()))
                .prefix_len(Meta::Device(self.prefix_len.view()));
        }
        be.attn_decode(
            &args,
            AttnFwdOut {
                o: self.o.view_mut(),
                lse: Some(self.lse.view_mut()),
            },
        )
    }
}

/// Inputs of all the copies of one batch size together fill at least this many bytes, more
/// than twice the L2 cache of an H100/H200 (50 MiB), so that a call reads DRAM as in a real
/// decode step and not what the previous call left in L2.
const ROTATE_BYTES: u64 = 128 << 20;

/// Times `attn_decode` on `be` at the `decode` shape for each batch in `batches` (B = 1, 4, 64
/// in the plan). Each timing covers back-to-back calls, one on each of several copies of the
/// inputs (together at least [`ROTATE_BYTES`]), so that launch latency is amortised as in a
/// decode step and no call finds its K/V in L2; it is divided by the calls. `reps` timings
/// after one warm-up round, the median.
pub fn time_decode(be: &dyn Backend, batches: &[usize], reps: usize) -> Result<Vec<DecodeTiming>> {
    let mut out = vec![];
    for &b in batches {
        let spec = decode_shape(b);
        let row = (spec.heads_kv * spec.head_dim * 2) as u64;
        let keys = (spec.prefix_rows + 2048) as u64;
        let bytes = b as u64 * (2 * keys * row + 2 * (spec.heads_q * spec.head_dim * 2) as u64);
        let copies = ROTATE_BYTES.div_ceil(bytes).max(1) as usize;
        let mut sets = (0..copies)
            .map(|c| DeviceSet::new(be, &spec, (b * 1000 + c) as u64))
            .collect::<Result<Vec<_>>>()?;
        let mut round = || -> Result<()> {
            for set in sets.iter_mut() {
                set.call(be)?;
            }
            Ok(())
        };
        round()?;
        let mut times = (0..reps.max(1))
            .map(|_| Ok(be.time_ms(&mut round)? / copies as f64))
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        out.push(DecodeTiming {
            batch: b,
            ms,
            bytes,
            copies,
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
        // 128 MiB of inputs in copies of 8.7 MB.
        assert_eq!(t[0].copies, 16);
    }
}
