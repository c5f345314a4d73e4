//! The CPU prefix attention against the f64 oracle, the naive-concat baseline and finite
//! differences, on random shapes and on every edge case of the contract.

mod common;

use common::*;
use prefix_attn::attn::oracle::{Dense, Outputs, Precision};
use prefix_attn::attn::paged::{self, PagedAttnArgs, PagedKv};
use prefix_attn::attn::testing::{
    random_paged_spec, random_spec, FwdBuffers, GradBuffers, KvLayout, PagedSpec, ProblemSpec,
    RandomPaged, RandomProblem,
};
use prefix_attn::attn::{cpu, AttnFwdArgs, AttnFwdOut, Meta};
use prefix_attn::bench::naive;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

/// Runs fused forward + backward (full and prefix-only) on `spec` and checks everything
/// against the oracle. Returns the buffers for further checks.
fn run_and_check(spec: ProblemSpec, seed: u64) -> (RandomProblem, FwdBuffers, GradBuffers) {
    let ctx = format!("seed {seed}, spec {spec:?}");
    let mut rng = Rng::new(seed);
    let pb = RandomProblem::new(spec, &mut rng).expect("problem");
    let dtype = pb.spec.dtype;
    let args = pb.args().expect("args");
    let has_prefix = args.prefix.is_some();
    let x = Dense::from_args(&args).expect("dense");
    let exact = x.forward(Precision::Exact);

    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    cpu::forward(&args, f.out()).unwrap_or_else(|e| panic!("{ctx}: forward: {e}"));
    check_fwd(&x, &f, &exact, dtype).unwrap_or_else(|e| panic!("{ctx}: {e}"));

    let d_o = f64s(&pb.d_o);
    let exact_g = x.backward(&d_o, Precision::Exact);
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let bargs = pb.bwd_args(&f.o, &f.lse, false).unwrap();
    cpu::backward(&bargs, g.grads(has_prefix, false))
        .unwrap_or_else(|e| panic!("{ctx}: backward: {e}"));
    check_bwd(
        &x,
        &d_o,
        &f64s(&f.o),
        &g,
        &exact_g,
        dtype,
        has_prefix,
        false,
    )
    .unwrap_or_else(|e| panic!("{ctx}: {e}"));

    // prefix_only gives the same prefix gradients (to f32 rounding: its products skip the
    // sequence columns, so gemm may block them differently) and writes nothing else.
    let mut gp = GradBuffers::poisoned(&pb.spec).unwrap();
    let bargs = pb.bwd_args(&f.o, &f.lse, true).unwrap();
    cpu::backward(&bargs, gp.grads(has_prefix, true)).unwrap();
    if has_prefix {
        for (name, a, b) in [
            ("dk_pre", &gp.dk_pre, &g.dk_pre),
            ("dv_pre", &gp.dv_pre, &g.dv_pre),
        ] {
            let (a, b) = (f64s(a), f64s(b));
            let e = max_err(&a, &b);
            assert!(
                e <= 1e-6 * (1.0 + max_abs(&b)),
                "{ctx}: prefix_only {name} differs by {e}"
            );
        }
    }
    assert!(
        gp.dq.to_f32_vec().iter().all(|x| x.is_nan()),
        "{ctx}: prefix_only wrote dq"
    );
    (pb, f, g)
}

#[test]
fn random_shapes_match_oracle_f32() {
    let mut rng = Rng::new(1);
    for seed in 0..120 {
        run_and_check(random_spec(&mut rng, DType::F32), seed);
    }
}

#[test]
fn random_shapes_match_oracle_f16() {
    let mut rng = Rng::new(2);
    for seed in 0..80 {
        run_and_check(random_spec(&mut rng, DType::F16), 1000 + seed);
    }
}

#[test]
fn random_shapes_match_oracle_bf16() {
    let mut rng = Rng::new(3);
    for seed in 0..80 {
        run_and_check(random_spec(&mut rng, DType::BF16), 2000 + seed);
    }
}

fn spec_with(f: impl FnOnce(&mut ProblemSpec)) -> ProblemSpec {
    let mut s = ProblemSpec::new(3, 7, 7, 4, 4, 16, 3, true);
    f(&mut s);
    s
}

#[test]
fn edge_cases_match_oracle() {
    let cases: Vec<(&str, ProblemSpec)> = vec![
        ("P=0 table", spec_with(|s| s.prefix_len = 0)),
        ("no table", spec_with(|s| s.num_prefixes = 0)),
        ("P=1", spec_with(|s| s.prefix_len = 1)),
        (
            "T=1",
            spec_with(|s| {
                s.tq = 1;
                s.tk = 1;
            }),
        ),
        (
            "Tq=1 decode",
            spec_with(|s| {
                s.tq = 1;
                s.tk = 9;
            }),
        ),
        (
            "Tq<Tk decode chunk",
            spec_with(|s| {
                s.tq = 3;
                s.tk = 9;
                s.seqlen_q = Some(vec![3, 1, 2]);
                s.seqlen_k = Some(vec![9, 4, 2]);
            }),
        ),
        (
            "padding",
            spec_with(|s| {
                s.seqlen_q = Some(vec![7, 3, 0]);
                s.seqlen_k = Some(vec![7, 3, 0]);
            }),
        ),
        (
            "mixed prefixes",
            spec_with(|s| {
                s.num_prefixes = 3;
                s.prefix_index = Some(vec![2, -1, 2]);
            }),
        ),
        (
            "all -1",
            spec_with(|s| {
                s.num_prefixes = 2;
                s.prefix_index = Some(vec![-1, -1, -1]);
            }),
        ),
        (
            "GQA 2",
            spec_with(|s| {
                s.heads_q = 4;
                s.heads_kv = 2;
            }),
        ),
        (
            "GQA 4",
            spec_with(|s| {
                s.heads_q = 8;
                s.heads_kv = 2;
            }),
        ),
        (
            "MQA",
            spec_with(|s| {
                s.heads_q = 4;
                s.heads_kv = 1;
            }),
        ),
        ("D=64", spec_with(|s| s.head_dim = 64)),
        ("D=128", spec_with(|s| s.head_dim = 128)),
        ("non-causal", spec_with(|s| s.causal = false)),
        ("fused qkv", spec_with(|s| s.layout = KvLayout::FusedQkv)),
        ("padded rows", spec_with(|s| s.layout = KvLayout::Padded)),
        (
            "PEFT prefix layer 2 of 3",
            spec_with(|s| s.peft_layer = Some((3, 2))),
        ),
        (
            "GPT-2 layout",
            spec_with(|s| {
                s.head_dim = 64;
                s.layout = KvLayout::FusedQkv;
                s.peft_layer = Some((4, 1));
                s.prefix_len = 10;
                s.seqlen_q = Some(vec![7, 5, 2]);
                s.seqlen_k = Some(vec![7, 5, 2]);
            }),
        ),
        (
            "fully masked rows",
            spec_with(|s| {
                s.num_prefixes = 1;
                s.prefix_index = Some(vec![-1, 0, -1]);
                s.seqlen_k = Some(vec![0, 0, 2]);
                s.seqlen_q = Some(vec![0, 0, 2]);
                s.causal = false;
            }),
        ),
    ];
    for (i, (name, spec)) in cases.into_iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut s = spec.clone();
            s.dtype = dtype;
            eprintln!("case {name} {dtype}");
            run_and_check(s, 100 + i as u64);
        }
    }
}

/// A valid row that sees no key at all: `o = 0`, `lse = -inf`, zero gradients, no NaN.
#[test]
fn row_seeing_nothing_gives_zero_and_neg_inf() {
    // Sequence 0 has no prefix and no keys but one valid query row (non-causal, Tq > Tk
    // lengths are allowed by the contract).
    let mut s = ProblemSpec::new(2, 2, 3, 2, 2, 8, 2, false);
    s.prefix_index = Some(vec![-1, 0]);
    s.seqlen_q = Some(vec![1, 2]);
    s.seqlen_k = Some(vec![0, 3]);
    let (_pb, f, g) = run_and_check(s, 7);
    let o = f.o.to_f32_vec();
    let lse = f.lse.to_f32_vec();
    // [B=2, Tq=2, H=2, D=8]: sequence 0 is all zero; lse[0, h, i] = -inf.
    assert!(o[..2 * 2 * 8].iter().all(|&x| x == 0.0));
    assert!(lse[..4].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(lse[4..].iter().all(|x| x.is_finite()));
    for t in [&g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre] {
        assert!(t.to_f32_vec().iter().all(|x| !x.is_nan()));
    }
    assert!(g.dq.to_f32_vec()[..2 * 2 * 8].iter().all(|&x| x == 0.0));
}

/// The naive concat baseline agrees with the fused path.
#[test]
fn naive_concat_agrees_with_fused() {
    let mut rng = Rng::new(11);
    for seed in 0..60 {
        let dtype = [DType::F32, DType::F16, DType::BF16][seed % 3];
        let spec = random_spec(&mut rng, dtype);
        let mut prng = Rng::new(seed as u64);
        let pb = RandomProblem::new(spec, &mut prng).unwrap();
        let args = pb.args().unwrap();
        let has_prefix = args.prefix.is_some();
        let x = Dense::from_args(&args).unwrap();
        let exact = x.forward(Precision::Exact);

        let mut fused = FwdBuffers::poisoned(&pb.spec).unwrap();
        cpu::forward(&args, fused.out()).unwrap();
        let mut nf = FwdBuffers::poisoned(&pb.spec).unwrap();
        naive::forward(&CpuBackend, &args, nf.out()).unwrap();
        check_fwd(&x, &nf, &exact, dtype).unwrap_or_else(|e| panic!("seed {seed}: naive {e}"));
        // Both compute in f32 over the same key set: they agree to f32 rounding in o's type.
        let (a, b) = (f64s(&fused.o), f64s(&nf.o));
        let tol = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            _ => 1.6e-2,
        } * (1.0 + max_abs(&a));
        assert!(
            max_err(&a, &b) <= tol,
            "seed {seed}: fused vs naive o {}",
            max_err(&a, &b)
        );

        let d_o = f64s(&pb.d_o);
        let exact_g = x.backward(&d_o, Precision::Exact);
        let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
        naive::backward(
            &CpuBackend,
            &pb.bwd_args(&fused.o, &fused.lse, false).unwrap(),
            g.grads(has_prefix, false),
        )
        .unwrap();
        check_bwd(
            &x,
            &d_o,
            &f64s(&fused.o),
            &g,
            &exact_g,
            dtype,
            has_prefix,
            false,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: naive backward {e}"));
    }
}

type Field = fn(&mut Dense) -> &mut Vec<f64>;

/// Central finite differences in f64 of `L = sum(o * R)` validate the oracle's backward,
/// which validates the fused backward above.
#[test]
fn oracle_gradients_match_finite_differences() {
    let mut rng = Rng::new(5);
    for seed in 0..6u64 {
        let mut s = ProblemSpec::new(2, 3, 4, 4, 2, 5, 2, seed % 2 == 0);
        s.num_prefixes = 2;
        s.prefix_index = Some(vec![1, if seed % 3 == 0 { -1 } else { 1 }]);
        s.seqlen_q = Some(vec![3, 2]);
        s.seqlen_k = Some(vec![4, 3]);
        let pb = RandomProblem::new(s, &mut rng).unwrap();
        let x = Dense::from_args(&pb.args().unwrap()).unwrap();
        let r = f64s(&pb.d_o);
        let g = x.backward(&r, Precision::Exact);
        let loss = |x: &Dense| -> f64 {
            x.forward(Precision::Exact)
                .o
                .iter()
                .zip(&r)
                .map(|(a, b)| a * b)
                .sum()
        };
        let h = 1e-6;
        let fields: [(&str, Field, &Vec<f64>); 5] = [
            ("q", |x| &mut x.q, &g.dq),
            ("k", |x| &mut x.k, &g.dk),
            ("v", |x| &mut x.v, &g.dv),
            ("k_pre", |x| &mut x.k_pre, &g.dk_pre),
            ("v_pre", |x| &mut x.v_pre, &g.dv_pre),
        ];
        for (name, field, grad) in fields {
            for idx in 0..field(&mut x.clone()).len() {
                let mut xp = x.clone();
                field(&mut xp)[idx] += h;
                let mut xm = x.clone();
                field(&mut xm)[idx] -= h;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
                let err = (fd - grad[idx]).abs();
                assert!(
                    err <= 1e-7 * (1.0 + fd.abs()),
                    "seed {seed} {name}[{idx}]: fd {fd} vs analytic {}",
                    grad[idx]
                );
            }
        }
    }
}

/// Same inputs, bit-identical outputs, whatever the thread count.
#[test]
fn deterministic_across_runs_and_thread_counts() {
    let mut s = ProblemSpec::new(4, 16, 16, 4, 2, 32, 5, true);
    s.num_prefixes = 2;
    s.prefix_index = Some(vec![0, 1, 0, 0]);
    let mut rng = Rng::new(9);
    let pb = RandomProblem::new(s, &mut rng).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let args = pb.args().unwrap();
            let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
            cpu::forward(&args, f.out()).unwrap();
            let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
            cpu::backward(
                &pb.bwd_args(&f.o, &f.lse, false).unwrap(),
                g.grads(true, false),
            )
            .unwrap();
            [&f.o, &f.lse, &g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre]
                .iter()
                .map(|t| {
                    t.to_f32_vec()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
    };
    let a = run(2);
    assert_eq!(a, run(2));
    assert_eq!(a, run(1));
    assert_eq!(a, run(3));
}

/// Sanity of the oracle itself on a case small enough to do by hand: one query, one prefix
/// key and one sequence key, D = 1.
#[test]
fn oracle_hand_computed_case() {
    let q = Tensor::from_slice(&[1, 1, 1, 1], &[2.0f32]).unwrap();
    let k = Tensor::from_slice(&[1, 1, 1, 1], &[0.5f32]).unwrap();
    let v = Tensor::from_slice(&[1, 1, 1, 1], &[3.0f32]).unwrap();
    let kp = Tensor::from_slice(&[1, 1, 1, 1], &[-1.0f32]).unwrap();
    let vp = Tensor::from_slice(&[1, 1, 1, 1], &[7.0f32]).unwrap();
    let args = AttnFwdArgs::new(q.view(), k.view(), v.view())
        .prefix(kp.view(), vp.view())
        .causal(true);
    // scale = 1: scores 2*(-1) = -2 (prefix) and 2*0.5 = 1 (sequence).
    let (s0, s1) = (-2f64, 1f64);
    let lse = (s0.exp() + s1.exp()).ln();
    let o = (7.0 * s0.exp() + 3.0 * s1.exp()) / (s0.exp() + s1.exp());
    let x = Dense::from_args(&args).unwrap();
    let out = x.forward(Precision::Exact);
    assert!((out.lse[0] - lse).abs() < 1e-12 && (out.o[0] - o).abs() < 1e-12);
    let mut ob = Tensor::zeros(&[1, 1, 1, 1], DType::F32).unwrap();
    let mut lb = Tensor::zeros(&[1, 1, 1], DType::F32).unwrap();
    cpu::forward(
        &args,
        AttnFwdOut {
            o: ob.view_mut(),
            lse: Some(lb.view_mut()),
        },
    )
    .unwrap();
    assert!((ob.to_f32_vec()[0] as f64 - o).abs() < 1e-6);
    assert!((lb.to_f32_vec()[0] as f64 - lse).abs() < 1e-6);
}

/// Random problems with padding and mixed prefix indices (including -1), for the
/// device-metadata tests.
fn meta_spec(rng: &mut Rng, dtype: DType) -> ProblemSpec {
    let s = random_spec(rng, dtype);
    common::meta::with_mixed_meta(s, rng)
}

/// Metadata passed as i32 tensors (host memory on the cpu device) gives bit for bit the
/// results of the same metadata as host slices, forward and backward.
#[test]
fn device_metadata_equals_host_metadata() {
    let mut rng = Rng::new(314);
    for seed in 0..18 {
        let dtype = [DType::F32, DType::F16, DType::BF16][seed % 3];
        let spec = meta_spec(&mut rng, dtype);
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomProblem::new(spec, &mut Rng::new(seed as u64)).unwrap();
        common::meta::assert_device_meta_matches_host(&CpuBackend, &pb, &ctx);
    }
}

/// Out-of-range device metadata is clamped as the kernels clamp it (docs/ARCHITECTURE.md
/// §1): the results equal host metadata holding the clamped values.
#[test]
fn out_of_range_device_metadata_is_clamped() {
    let mut rng = Rng::new(2718);
    for seed in 0..6 {
        let spec = meta_spec(&mut rng, DType::F32);
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomProblem::new(spec, &mut Rng::new(seed)).unwrap();
        common::meta::assert_bad_device_meta_is_clamped(&CpuBackend, &pb, &ctx);
    }
}

/// Device metadata of the wrong dtype, shape or layout is an error naming the argument.
#[test]
fn bad_device_metadata_is_an_error() {
    let mut s = ProblemSpec::new(3, 4, 4, 2, 2, 8, 2, true);
    s.num_prefixes = 2;
    let pb = RandomProblem::new(s, &mut Rng::new(5)).unwrap();
    let ok = Tensor::from_slice(&[3], &[0i32, 1, -1]).unwrap();
    let f32s = Tensor::from_f32(&[3], &[4.0, 4.0, 4.0], DType::F32).unwrap();
    let long = Tensor::from_slice(&[4], &[4i32, 4, 4, 4]).unwrap();
    let strided_buf = Tensor::from_slice(&[6], &[4i32, 0, 4, 0, 4, 0]).unwrap();
    let strided = strided_buf.view().as_strided(&[3], &[2], 0).unwrap();
    let cases: Vec<(&str, AttnFwdArgs, &str)> = vec![
        (
            "f32 seqlen_q",
            pb.args().unwrap().seqlens_device(f32s.view(), ok.view()),
            "seqlen_q",
        ),
        (
            "[4] seqlen_k",
            pb.args().unwrap().seqlens_device(ok.view(), long.view()),
            "seqlen_k",
        ),
        (
            "strided prefix_index",
            pb.args().unwrap().prefix_index_device(strided),
            "prefix_index",
        ),
    ];
    for (name, args, arg) in cases {
        let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
        let err = cpu::forward(&args, f.out()).expect_err(name).to_string();
        assert!(err.contains(arg), "{name}: {err}");
    }
}

/// Paged decode on the cpu device against the f64 oracle with the tolerance rule, on random
/// paged problems: shuffled pages, lengths across page boundaries (0 included), Tq up to 16,
/// GQA, adapters of different lengths and mixed prefix indices (-1 included).
#[test]
fn paged_decode_matches_oracle_on_random_shapes() {
    let mut rng = Rng::new(4242);
    for seed in 0..30 {
        let dtype = [DType::F32, DType::F16, DType::BF16][seed % 3];
        let spec = random_paged_spec(&mut rng, dtype, &[8, 16, 64]);
        check_paged(&spec, seed as u64);
    }
}

/// Runs paged decode on the cpu device and checks it against the oracle.
fn check_paged(spec: &PagedSpec, seed: u64) -> FwdBuffers {
    let ctx = format!("seed {seed}, spec {spec:?}");
    let pb = RandomPaged::new(spec, &mut Rng::new(seed)).unwrap();
    let args = pb.args().unwrap();
    let exact = paged::oracle(&args, Precision::Exact).unwrap();
    let lowp = paged::oracle(&args, Precision::Round(spec.dtype)).unwrap();
    let mut f = paged_buffers(spec);
    CpuBackend
        .attn_decode(&args, f.out())
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    check_against(&f, &exact, &lowp, spec.dtype).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    f
}

use common::meta::paged_buffers;

/// The tolerance rule against the exact oracle, with `lowp` as the naive implementation.
fn check_against(
    f: &FwdBuffers,
    exact: &Outputs,
    lowp: &Outputs,
    dtype: DType,
) -> Result<(), String> {
    common::meta::check_outputs(&f.o, &f.lse, exact, lowp, dtype)
}

/// The edges of the paged contract: a sequence ending exactly on a page boundary and one key
/// past it, an empty sequence with a prefix (its rows see only the prefix), an empty
/// sequence without one (o = 0, lse = -inf), Tq = 16, one page in all, prefix lengths 0 and P.
#[test]
fn paged_decode_edge_cases() {
    let base = PagedSpec {
        batch: 4,
        tq: 1,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 16,
        page_size: 16,
        seqlen_k: vec![16, 17, 0, 0],
        prefix_rows: 6,
        num_prefixes: 2,
        prefix_index: vec![0, 1, 1, -1],
        prefix_len: vec![6, 3],
        dtype: DType::F32,
    };
    let with = |f: &dyn Fn(&mut PagedSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let cases = vec![
        ("page boundary, empty with and without prefix", base.clone()),
        (
            "Tq = 16",
            with(&|s| {
                s.tq = 16;
                s.seqlen_k = vec![16, 33, 0, 20];
            }),
        ),
        ("one page", with(&|s| s.seqlen_k = vec![3, 0, 1, 16])),
        (
            "prefix lengths 0 and P",
            with(&|s| s.prefix_len = vec![0, 6]),
        ),
        ("page size 1", with(&|s| s.page_size = 1)),
        (
            "f16 GQA 4",
            with(&|s| {
                s.dtype = DType::F16;
                s.heads_q = 8;
            }),
        ),
    ];
    for (i, (name, spec)) in cases.into_iter().enumerate() {
        let f = check_paged(&spec, 900 + i as u64);
        // The empty sequence without a prefix (b = 3 in the base case) sees no key.
        if name.starts_with("page boundary") {
            let lse = f.lse.to_f32_vec();
            let per_b = spec.heads_q * spec.tq;
            assert!(
                lse[3 * per_b..].iter().all(|&x| x == f32::NEG_INFINITY),
                "{name}"
            );
            let o = f.o.to_f32_vec();
            let per_o = spec.tq * spec.heads_q * spec.head_dim;
            assert!(o[3 * per_o..].iter().all(|&x| x == 0.0), "{name}");
        }
    }
}

/// Paged decode equals the dense `attn_fwd` over the same keys gathered out of the pages
/// (every adapter at its full length P, seqlen_q = Tq, causal), within the tolerance rule.
#[test]
fn paged_decode_equals_dense_attention_on_gathered_keys() {
    let mut rng = Rng::new(77);
    let mut compared = 0;
    for seed in 0..10u64 {
        let dtype = [DType::F32, DType::F16, DType::BF16][seed as usize % 3];
        let mut spec = random_paged_spec(&mut rng, dtype, &[8, 64]);
        spec.prefix_len = vec![spec.prefix_rows as i32; spec.num_prefixes];
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomPaged::new(&spec, &mut Rng::new(seed)).unwrap();
        let args = pb.args().unwrap();
        let mut paged_out = paged_buffers(&spec);
        CpuBackend.attn_decode(&args, paged_out.out()).unwrap();
        // Gather the sequence keys: [B, Tk = max seqlen_k, Hkv, D].
        let (b, d, hkv) = (spec.batch, spec.head_dim, spec.heads_kv);
        let tk = spec.seqlen_k.iter().copied().max().unwrap_or(0).max(1) as usize;
        let max_pages = pb.block_table.len() / b;
        let gather = |cache: &Tensor| {
            let c = cache.to_f32_vec();
            let mut out = vec![0.5f32; b * tk * hkv * d];
            for s in 0..b {
                for j in 0..spec.seqlen_k[s] as usize {
                    let page = pb.block_table[s * max_pages + j / spec.page_size] as usize;
                    let from = ((page * spec.page_size + j % spec.page_size) * hkv) * d;
                    let to = ((s * tk + j) * hkv) * d;
                    out[to..to + hkv * d].copy_from_slice(&c[from..from + hkv * d]);
                }
            }
            Tensor::from_f32(&[b, tk, hkv, d], &out, dtype).unwrap()
        };
        let (k, v) = (gather(&pb.k_cache), gather(&pb.v_cache));
        let lq = vec![spec.tq as i32; b];
        let mut dense = AttnFwdArgs::new(pb.q.view(), k.view(), v.view())
            .causal(true)
            .seqlens(&lq, &pb.seqlen_k);
        if let Some(p) = &pb.prefix {
            dense = dense
                .prefix(
                    p.view().select(0, 0).unwrap(),
                    p.view().select(0, 1).unwrap(),
                )
                .prefix_index(&pb.prefix_index);
        }
        // Rows whose causal window starts before the cache (seqlen_k < Tq) are where the two
        // contracts differ (dense masks them as padding of seqlen_q); compare the others.
        if spec.seqlen_k.iter().any(|&n| (n as usize) < spec.tq) {
            continue;
        }
        let x = Dense::from_args(&dense).unwrap();
        let exact = x.forward(Precision::Exact);
        let lowp = x.forward(Precision::Round(dtype));
        check_against(&paged_out, &exact, &lowp, dtype).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} problems compared");
}

/// `kv_append` writes new rows at positions seqlen_k.. of each sequence, across page
/// boundaries, on the cpu and emu devices alike, and touches no other slot.
#[test]
fn kv_append_writes_rows_into_pages() {
    use prefix_attn::device::emu::EmuBackend;
    use prefix_attn::device::{kv_append, Backend};
    let (b, hkv, d, ps, pages) = (2, 2, 8, 4, 6);
    let mut rng = Rng::new(12);
    // Sequence 0 has 3 keys in page 4; sequence 1 has 4 keys (a full page, 1) and page 0 next.
    let table = vec![4, 2, -1, 1, 0, 5];
    let seqlen = vec![3, 4];
    let t_new = 5;
    let new_k = Tensor::from_f32(
        &[b, t_new, hkv, d],
        &rng.normal_vec(b * t_new * hkv * d, 1.0),
        DType::F16,
    )
    .unwrap();
    let new_v = Tensor::from_f32(
        &[b, t_new, hkv, d],
        &rng.normal_vec(b * t_new * hkv * d, 1.0),
        DType::F16,
    )
    .unwrap();
    let init = rng.normal_vec(pages * ps * hkv * d, 1.0);
    let mut results = vec![];
    for be in [&CpuBackend as &dyn Backend, &EmuBackend] {
        let mut kc = Tensor::from_f32(&[pages, ps, hkv, d], &init, DType::F16).unwrap();
        let mut vc = kc.clone();
        kv_append(
            be,
            &new_k.view(),
            &new_v.view(),
            &mut kc.view_mut(),
            &mut vc.view_mut(),
            &table,
            &seqlen,
        )
        .unwrap();
        results.push((kc.to_f32_vec(), vc.to_f32_vec()));
    }
    assert_eq!(results[0], results[1], "cpu and emu differ");
    let (kc, vc) = &results[0];
    let (nk, nv) = (new_k.to_f32_vec(), new_v.to_f32_vec());
    let init16 = Tensor::from_f32(&[pages * ps * hkv * d], &init, DType::F16)
        .unwrap()
        .to_f32_vec();
    let mut written = vec![false; pages * ps];
    for s in 0..b {
        for t in 0..t_new {
            let pos = seqlen[s] as usize + t;
            let page = table[s * 3 + pos / ps] as usize;
            let slot = page * ps + pos % ps;
            written[slot] = true;
            let (at, from) = (slot * hkv * d, (s * t_new + t) * hkv * d);
            assert_eq!(
                kc[at..at + hkv * d],
                nk[from..from + hkv * d],
                "k b={s} t={t}"
            );
            assert_eq!(
                vc[at..at + hkv * d],
                nv[from..from + hkv * d],
                "v b={s} t={t}"
            );
        }
    }
    for (slot, &w) in written.iter().enumerate() {
        if !w {
            let at = slot * hkv * d;
            assert_eq!(
                kc[at..at + hkv * d],
                init16[at..at + hkv * d],
                "slot {slot} was touched"
            );
        }
    }
    // Past the block table's capacity, and into a page number out of range: errors.
    let mut kc = Tensor::from_f32(&[pages, ps, hkv, d], &init, DType::F16).unwrap();
    let mut vc = kc.clone();
    let err = kv_append(
        &CpuBackend,
        &new_k.view(),
        &new_v.view(),
        &mut kc.view_mut(),
        &mut vc.view_mut(),
        &table,
        &[8, 0],
    )
    .expect_err("capacity")
    .to_string();
    assert!(err.contains("seqlen_k"), "{err}");
    let err = kv_append(
        &CpuBackend,
        &new_k.view(),
        &new_v.view(),
        &mut kc.view_mut(),
        &mut vc.view_mut(),
        &[4, 9, -1, 1, 0, 5],
        &seqlen,
    )
    .expect_err("page range")
    .to_string();
    assert!(err.contains("block_table"), "{err}");
}

/// Bad paged-decode input is an error naming the argument: a page size that is not a power
/// of two, Tq > 16, a block-table entry out of range, seqlen_k past the table's capacity, a
/// prefix length past P.
#[test]
fn bad_paged_input_is_an_error() {
    let spec = PagedSpec {
        batch: 2,
        tq: 1,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 8,
        page_size: 4,
        seqlen_k: vec![5, 2],
        prefix_rows: 3,
        num_prefixes: 1,
        prefix_index: vec![0, -1],
        prefix_len: vec![2],
        dtype: DType::F32,
    };
    let pb = RandomPaged::new(&spec, &mut Rng::new(3)).unwrap();
    let run = |args: &PagedAttnArgs, tq: usize| {
        let mut s = spec.clone();
        s.tq = tq;
        let mut f = paged_buffers(&s);
        CpuBackend
            .attn_decode(args, f.out())
            .expect_err("must fail")
            .to_string()
    };
    let bad_table: Vec<i32> = pb
        .block_table
        .iter()
        .map(|&p| if p >= 0 { p + 100 } else { p })
        .collect();
    let e = run(
        &PagedAttnArgs {
            kv: PagedKv {
                block_table: Meta::Host(&bad_table),
                ..pb.args().unwrap().kv
            },
            ..pb.args().unwrap()
        },
        1,
    );
    assert!(e.contains("block_table"), "{e}");
    let long = [500, 2];
    let e = run(
        &PagedAttnArgs {
            kv: PagedKv {
                seqlen_k: Meta::Host(&long),
                ..pb.args().unwrap().kv
            },
            ..pb.args().unwrap()
        },
        1,
    );
    assert!(e.contains("seqlen_k"), "{e}");
    let plen = [4];
    let e = run(&pb.args().unwrap().prefix_len(Meta::Host(&plen)), 1);
    assert!(e.contains("prefix_len"), "{e}");
    let kc3 = Tensor::zeros(&[4, 3, 1, 8], DType::F32).unwrap();
    let e = run(
        &PagedAttnArgs {
            kv: PagedKv {
                k_cache: kc3.view(),
                v_cache: kc3.view(),
                ..pb.args().unwrap().kv
            },
            ..pb.args().unwrap()
        },
        1,
    );
    assert!(e.contains("power of two"), "{e}");
    let q17 = Tensor::zeros(&[2, 17, 2, 8], DType::F32).unwrap();
    let e = run(
        &PagedAttnArgs {
            q: q17.view(),
            ..pb.args().unwrap()
        },
        17,
    );
    assert!(e.contains("Tq <= 16"), "{e}");
}
