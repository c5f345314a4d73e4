//! Device metadata against host metadata: the same problem run with `[prefix_index,
//! seqlen_q, seqlen_k]` as host slices and as i32 tensors must give bit-identical results.

use super::{f64s, max_abs, max_err, within_rule};
use prefix_attn::attn::oracle::Outputs;
use prefix_attn::attn::testing::{
    FwdBuffers, GradBuffers, MetaTensors, PagedSpec, ProblemSpec, RandomProblem,
};
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs};
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

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

/// `s` with a prefix table of at least two prefixes, mixed prefix indices (every odd sequence
/// -1) and, unless it has padding already, right padding with `seqlen_q <= seqlen_k`.
pub fn with_mixed_meta(mut s: ProblemSpec, rng: &mut Rng) -> ProblemSpec {
    if s.num_prefixes == 0 {
        s.num_prefixes = 2;
    }
    s.prefix_index = Some(
        (0..s.batch)
            .map(|b| {
                if b % 2 == 1 {
                    -1
                } else {
                    rng.below(s.num_prefixes as u64) as i32
                }
            })
            .collect(),
    );
    if s.seqlen_k.is_none() {
        let lk: Vec<i32> = (0..s.batch)
            .map(|_| rng.below(s.tk as u64 + 1) as i32)
            .collect();
        s.seqlen_q = Some(lk.iter().map(|&k| k.min(s.tq as i32)).collect());
        s.seqlen_k = Some(lk);
    }
    s
}

/// NaN-poisoned outputs `o [B, Tq, Hq, D]`, `lse [B, Hq, Tq]` of a paged-decode problem.
pub fn paged_buffers(s: &PagedSpec) -> FwdBuffers {
    let mut t = ProblemSpec::new(
        s.batch, s.tq, s.tq, s.heads_q, s.heads_kv, s.head_dim, 0, true,
    );
    t.dtype = s.dtype;
    FwdBuffers::poisoned(&t).unwrap()
}

/// The tolerance rule for outputs `o`, `lse` against the exact oracle, with `lowp` (the oracle
/// in the low precision) as the naive implementation.
pub fn check_outputs(
    o: &Tensor,
    lse: &Tensor,
    exact: &Outputs,
    lowp: &Outputs,
    dtype: DType,
) -> Result<(), String> {
    within_rule(
        "o",
        max_err(&f64s(o), &exact.o),
        max_err(&lowp.o, &exact.o),
        max_abs(&exact.o),
        dtype,
    )?;
    within_rule(
        "lse",
        max_err(&f64s(lse), &exact.lse),
        max_err(&lowp.lse, &exact.lse).max(max_abs(&exact.lse) * 1.2e-7),
        max_abs(&exact.lse),
        DType::F32,
    )
}

/// The bits of a tensor's values (as f32).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

/// A plan's workspace of at least `bytes` bytes (one i32 at least) with every bit set (NaN
/// as f32): a run must not depend on what the workspace holds.
pub fn poisoned_workspace(bytes: usize) -> Tensor {
    let n = bytes.div_ceil(4).max(1);
    Tensor::from_slice(&[n], &vec![-1i32; n]).unwrap()
}

/// The argument an error names (for `Unsupported`, its message up to the first colon).
pub fn arg_of(e: &prefix_attn::Error) -> String {
    use prefix_attn::Error;
    match e {
        Error::Shape { arg, .. }
        | Error::DType { arg, .. }
        | Error::Layout { arg, .. }
        | Error::Index { arg, .. }
        | Error::Device { arg, .. } => arg.clone(),
        Error::Unsupported(msg) => msg.split(':').next().unwrap_or("").to_string(),
        other => other.to_string(),
    }
}

/// `run` fails with an error naming `arg` and containing `needle`, and writes nothing to
/// `out`'s `o` (NaN-poisoned before).
pub fn expect_err(
    what: &str,
    out: &mut FwdBuffers,
    run: impl FnOnce(&mut FwdBuffers) -> Result<(), prefix_attn::Error>,
    arg: &str,
    needle: &str,
) {
    let e = run(out).expect_err(what);
    assert_eq!(arg_of(&e), arg, "{what}: {e}");
    assert!(e.to_string().contains(needle), "{what}: {e}");
    assert!(
        out.o.to_f32_vec().iter().all(|x| x.is_nan()),
        "{what}: a failed run wrote o"
    );
}
