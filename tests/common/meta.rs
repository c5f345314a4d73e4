//! Device metadata against host metadata: the same problem run with `[prefix_index,
//! seqlen_q, seqlen_k]` as host slices and as i32 tensors must give bit-identical results.

use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, MetaTensors, RandomProblem};
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs};
use prefix_attn::device::Backend;
use prefix_attn::tensor::Tensor;

/// The bits of every output of a forward and a full backward of `args` on `be` (buffers
/// NaN-poisoned first), in the order o, lse, dq, dk, dv, dk_pre, dv_pre.
pub fn fwd_bwd_bits(be: &dyn Backend, pb: &RandomProblem, args: &AttnFwdArgs) -> Vec<Vec<u32>> {
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    be.attn_fwd(args, f.out())
        .unwrap_or_else(|e| panic!("forward: {e}"));
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let bargs = AttnBwdArgs {
        fwd: *args,
        o: f.o.view(),
        lse: f.lse.view(),
        d_o: pb.d_o.view(),
        prefix_only: false,
    };
    be.attn_bwd(&bargs, g.grads(args.prefix.is_some(), false))
        .unwrap_or_else(|e| panic!("backward: {e}"));
    let bits = |t: &Tensor| t.to_f32_vec().iter().map(|x| x.to_bits()).collect();
    [&f.o, &f.lse, &g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre]
        .into_iter()
        .map(bits)
        .collect()
}

/// Asserts that `pb` with its metadata as device tensors gives the same bits on `be` as
/// with host slices.
pub fn assert_device_meta_matches_host(be: &dyn Backend, pb: &RandomProblem, ctx: &str) {
    let meta = MetaTensors::of(&pb.spec).unwrap();
    let host = fwd_bwd_bits(be, pb, &pb.args().unwrap());
    let dev = fwd_bwd_bits(be, pb, &pb.args_device_meta(&meta).unwrap());
    assert_bits_eq(&host, &dev, ctx);
}

/// Output-by-output bit equality with the output's name in the message.
pub fn assert_bits_eq(want: &[Vec<u32>], got: &[Vec<u32>], ctx: &str) {
    let names = ["o", "lse", "dq", "dk", "dv", "dk_pre", "dv_pre"];
    for ((name, w), g) in names.iter().zip(want).zip(got) {
        if let Some(i) = (0..w.len()).find(|&i| w[i] != g[i]) {
            panic!(
                "{ctx}: {name}[{i}] differs: {} (host metadata) vs {} (device metadata)",
                f32::from_bits(w[i]),
                f32::from_bits(g[i])
            );
        }
    }
}

/// Out-of-range device metadata for a batch of `b` over `tq` rows, `tk` keys and `np`
/// prefixes, and the in-range host values the kernels' clamps turn it into: lengths below 0
/// and above the maximum, prefix indices below -1 and at or past NP.
pub fn bad_meta(b: usize, tq: usize, tk: usize, np: usize) -> [[Vec<i32>; 3]; 2] {
    let pick = |i: usize, xs: &[i32]| xs[i % xs.len()];
    let idx: Vec<i32> = (0..b)
        .map(|i| pick(i, &[np as i32 + 3, -7, 0, np as i32, -1]))
        .collect();
    let lq: Vec<i32> = (0..b)
        .map(|i| pick(i, &[-5, tq as i32 + 100, i32::MIN, 1]))
        .collect();
    let lk: Vec<i32> = (0..b)
        .map(|i| pick(i, &[i32::MAX, -1, tk as i32 + 1, 2]))
        .collect();
    let clamp =
        |v: &[i32], max: usize| -> Vec<i32> { v.iter().map(|&n| n.clamp(0, max as i32)).collect() };
    let idx_c = idx
        .iter()
        .map(|&n| if n >= 0 && (n as usize) < np { n } else { -1 })
        .collect();
    [
        [idx, lq.clone(), lk.clone()],
        [idx_c, clamp(&lq, tq), clamp(&lk, tk)],
    ]
}

/// Device metadata with out-of-range values gives, on `be`, the bits of host metadata
/// holding the clamped values (and reads nothing out of bounds: run under the sanitizer).
pub fn assert_bad_device_meta_is_clamped(be: &dyn Backend, pb: &RandomProblem, ctx: &str) {
    let s = &pb.spec;
    let [bad, clamped] = bad_meta(s.batch, s.tq, s.tk, s.num_prefixes);
    let with_prefix = s.num_prefixes > 0;
    let dev = MetaTensors::from_values(with_prefix, &bad[0], &bad[1], &bad[2]).unwrap();
    let got = fwd_bwd_bits(be, pb, &pb.args_device_meta(&dev).unwrap());
    let mut args = pb.args().unwrap();
    if with_prefix {
        args = args.prefix_index(&clamped[0]);
    }
    args = args.seqlens(&clamped[1], &clamped[2]);
    let want = fwd_bwd_bits(be, pb, &args);
    assert_bits_eq(&want, &got, ctx);
}
