//! The CUDA kernels on the CPU emulator: the emulator's self-tests, the parameter-struct
//! layout against its C mirror, and the forward kernel against the f64 oracle on random shapes
//! and every edge case, with the tolerance rule of docs/ARCHITECTURE.md §5. The same file runs in the
//! sanitizer mode (`--features emu-sanitize`, see .ci/run).

mod common;

use common::*;
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::paged::{self, PagedAttnArgs, PagedKv};
use prefix_attn::attn::testing::{
    random_paged_spec, random_spec, FwdBuffers, GradBuffers, KvLayout, PagedSpec, ProblemSpec,
    RandomPaged, RandomProblem,
};
use prefix_attn::attn::{AttnFwdOut, Meta};
use prefix_attn::device::{emu, kernels, Backend};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

#[test]
fn emulator_self_tests_pass() {
    let names = emu::selftest_names();
    assert!(
        names.len() >= 10,
        "expected a self-test per primitive, got {names:?}"
    );
    for n in &names {
        emu::selftest(n).unwrap_or_else(|e| panic!("self-test {n}: {e}"));
    }
}

#[test]
fn params_struct_matches_its_c_mirror() {
    assert_eq!(emu::fwd_params_layout(), kernels::fwd_params_rust_layout());
    assert_eq!(
        emu::meta_clamp_params_layout(),
        kernels::meta_clamp_params_rust_layout()
    );
}

/// Runs the emulated forward on `spec` and checks it against the oracle; returns the outputs.
fn run_and_check(spec: ProblemSpec, seed: u64) -> FwdBuffers {
    let ctx = format!("seed {seed}, spec {spec:?}");
    let pb = RandomProblem::new(spec, &mut Rng::new(seed)).unwrap();
    let args = pb.args().unwrap();
    let x = Dense::from_args(&args).unwrap();
    let exact = x.forward(Precision::Exact);
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    emu::attn_fwd(&args, f.out()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    check_fwd(&x, &f, &exact, pb.spec.dtype).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    f
}

fn kernel_spec(rng: &mut Rng, dtype: DType) -> ProblemSpec {
    let mut s = random_spec(rng, dtype);
    s.head_dim = if rng.below(2) == 0 { 64 } else { 128 };
    s
}

#[test]
fn forward_matches_oracle_on_random_shapes() {
    let mut rng = Rng::new(21);
    for seed in 0..24 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let spec = kernel_spec(&mut rng, dtype);
        run_and_check(spec, seed);
    }
}

#[test]
fn forward_edge_cases() {
    let base = || {
        let mut s = ProblemSpec::new(2, 9, 9, 2, 2, 64, 3, true);
        s.dtype = DType::F16;
        s
    };
    let with = |f: &dyn Fn(&mut ProblemSpec)| {
        let mut s = base();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, ProblemSpec)> = vec![
        ("P=0 table", with(&|s| s.prefix_len = 0)),
        ("no table", with(&|s| s.num_prefixes = 0)),
        ("P=1", with(&|s| s.prefix_len = 1)),
        (
            "P=70 (two prefix tiles, not a multiple)",
            with(&|s| s.prefix_len = 70),
        ),
        (
            "T=1",
            with(&|s| {
                s.tq = 1;
                s.tk = 1;
            }),
        ),
        (
            "decode Tq=1",
            with(&|s| {
                s.tq = 1;
                s.tk = 77;
            }),
        ),
        (
            "Tq=70 > one tile",
            with(&|s| {
                s.tq = 70;
                s.tk = 70;
            }),
        ),
        (
            "padding",
            with(&|s| {
                s.seqlen_q = Some(vec![5, 0]);
                s.seqlen_k = Some(vec![5, 0]);
            }),
        ),
        (
            "mixed prefixes",
            with(&|s| {
                s.num_prefixes = 3;
                s.prefix_index = Some(vec![2, -1]);
            }),
        ),
        (
            "GQA 4",
            with(&|s| {
                s.heads_q = 8;
                s.heads_kv = 2;
            }),
        ),
        (
            "MQA",
            with(&|s| {
                s.heads_q = 4;
                s.heads_kv = 1;
            }),
        ),
        ("D=128", with(&|s| s.head_dim = 128)),
        (
            "D=128 bf16 long",
            with(&|s| {
                s.head_dim = 128;
                s.dtype = DType::BF16;
                s.tq = 40;
                s.tk = 100;
                s.prefix_len = 33;
            }),
        ),
        ("non-causal", with(&|s| s.causal = false)),
        (
            "GPT-2 qkv and PEFT prefix",
            with(&|s| {
                s.layout = KvLayout::FusedQkv;
                s.peft_layer = Some((3, 1));
                s.prefix_len = 10;
            }),
        ),
        ("padded rows", with(&|s| s.layout = KvLayout::Padded)),
        (
            "rows seeing nothing",
            with(&|s| {
                s.prefix_index = Some(vec![-1, 0]);
                s.seqlen_k = Some(vec![0, 9]);
                s.seqlen_q = Some(vec![3, 9]);
                s.causal = false;
            }),
        ),
    ];
    for (i, (name, spec)) in cases.into_iter().enumerate() {
        eprintln!("case {name}");
        run_and_check(spec, 500 + i as u64);
    }
}

#[test]
fn forward_is_deterministic() {
    let mut s = ProblemSpec::new(2, 33, 33, 2, 1, 64, 5, true);
    s.dtype = DType::BF16;
    let a = run_and_check(s.clone(), 3);
    let b = run_and_check(s, 3);
    let bits = |t: &Tensor| {
        t.to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a.o), bits(&b.o));
    assert_eq!(bits(&a.lse), bits(&b.lse));
}

#[test]
fn forward_is_schedule_independent() {
    let mut s = ProblemSpec::new(2, 70, 70, 2, 2, 128, 9, true);
    s.dtype = DType::F16;
    let bits = |t: &Tensor| {
        t.to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    let a = run_and_check(s.clone(), 4);
    emu::set_schedule_reverse(true);
    let b = run_and_check(s, 4);
    emu::set_schedule_reverse(false);
    assert_eq!(bits(&a.o), bits(&b.o));
    assert_eq!(bits(&a.lse), bits(&b.lse));
}

#[test]
fn forward_agrees_with_the_cpu_path() {
    // Same inputs, two implementations: the kernel and the CPU reference, both checked
    // against the oracle above; here their outputs are also close to each other.
    let mut s = ProblemSpec::new(3, 20, 20, 4, 2, 64, 7, true);
    s.dtype = DType::F16;
    s.num_prefixes = 2;
    s.prefix_index = Some(vec![1, 0, -1]);
    let pb = RandomProblem::new(s, &mut Rng::new(8)).unwrap();
    let args = pb.args().unwrap();
    let mut k = FwdBuffers::poisoned(&pb.spec).unwrap();
    emu::attn_fwd(&args, k.out()).unwrap();
    let mut c = FwdBuffers::poisoned(&pb.spec).unwrap();
    prefix_attn::attn::cpu::forward(&args, c.out()).unwrap();
    let (a, b) = (f64s(&k.o), f64s(&c.o));
    assert!(max_err(&a, &b) < 4e-3, "kernel vs cpu: {}", max_err(&a, &b));
}

#[test]
fn kernel_wrapper_rejects_what_the_kernel_cannot_read() {
    let mut s = ProblemSpec::new(1, 4, 4, 1, 1, 64, 2, true);
    s.dtype = DType::F16;
    let pb = RandomProblem::new(s.clone(), &mut Rng::new(1)).unwrap();
    let args = pb.args().unwrap();
    // A head dim the kernels are not built for.
    let mut s32 = s.clone();
    s32.head_dim = 32;
    let p32 = RandomProblem::new(s32.clone(), &mut Rng::new(1)).unwrap();
    let mut f = FwdBuffers::poisoned(&s32).unwrap();
    let e = emu::attn_fwd(&p32.args().unwrap(), f.out())
        .unwrap_err()
        .to_string();
    assert!(e.contains("head dim 32"), "{e}");
    // f32 inputs.
    let mut sf = s.clone();
    sf.dtype = DType::F32;
    let pf = RandomProblem::new(sf.clone(), &mut Rng::new(1)).unwrap();
    let mut f = FwdBuffers::poisoned(&sf).unwrap();
    let e = emu::attn_fwd(&pf.args().unwrap(), f.out())
        .unwrap_err()
        .to_string();
    assert!(e.contains("f16 or bf16"), "{e}");
    // A view that starts 2 bytes into a row: not 16-byte aligned.
    let big = Tensor::zeros(&[1, 4, 1, 72], DType::F16).unwrap();
    let q = big.view().narrow(3, 1, 64).unwrap();
    let mut a = args;
    a.q = q;
    let mut f = FwdBuffers::poisoned(&s).unwrap();
    let e = emu::attn_fwd(&a, f.out()).unwrap_err().to_string();
    assert!(e.contains("16-byte"), "{e}");
    // An output of the wrong shape.
    let mut o = Tensor::zeros(&[1, 4, 1, 32], DType::F16).unwrap();
    let e = emu::attn_fwd(
        &args,
        AttnFwdOut {
            o: o.view_mut(),
            lse: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("o:"), "{e}");
}

/// In the sanitizer mode, a planted out-of-bounds write in a tiny emulated kernel is caught:
/// this test runs itself in a child process that performs the write and must die with a
/// sanitizer report.
#[cfg(feature = "emu-sanitize")]
#[test]
fn sanitizer_catches_a_planted_out_of_bounds_write() {
    if std::env::var_os("PREFIX_ATTN_PLANT_OOB").is_some() {
        let _ = emu::planted_oob(true);
        return;
    }
    emu::planted_oob(false).expect("in-bounds run is clean");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sanitizer_catches_a_planted_out_of_bounds_write",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PREFIX_ATTN_PLANT_OOB", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the planted write went unnoticed");
    assert!(
        // ASan (redzones) or UBSan (array bounds), whichever sees the write first.
        stderr.contains("AddressSanitizer") || stderr.contains("out of bounds"),
        "no sanitizer report: {stderr}"
    );
}

#[test]
fn bwd_params_struct_matches_its_c_mirror() {
    assert_eq!(emu::bwd_params_layout(), kernels::bwd_params_rust_layout());
}

/// Emulated forward then backward on `spec`; the gradients are checked against the oracle.
fn run_bwd_and_check(spec: ProblemSpec, seed: u64, prefix_only: bool) -> GradBuffers {
    let ctx = format!("seed {seed}, prefix_only {prefix_only}, spec {spec:?}");
    let pb = RandomProblem::new(spec, &mut Rng::new(seed)).unwrap();
    let args = pb.args().unwrap();
    let has_prefix = args.prefix.is_some();
    let x = Dense::from_args(&args).unwrap();
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    emu::attn_fwd(&args, f.out()).unwrap_or_else(|e| panic!("{ctx}: forward: {e}"));
    let d_o = f64s(&pb.d_o);
    let exact = x.backward(&d_o, Precision::Exact);
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    emu::attn_bwd(
        &pb.bwd_args(&f.o, &f.lse, prefix_only).unwrap(),
        g.grads(has_prefix, prefix_only),
    )
    .unwrap_or_else(|e| panic!("{ctx}: backward: {e}"));
    check_bwd(
        &x,
        &d_o,
        &f64s(&f.o),
        &g,
        &exact,
        pb.spec.dtype,
        has_prefix,
        prefix_only,
    )
    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    if prefix_only {
        assert!(
            g.dq.to_f32_vec().iter().all(|v| v.is_nan()),
            "{ctx}: prefix_only wrote dq"
        );
    }
    g
}

#[test]
fn backward_matches_oracle_on_random_shapes() {
    let mut rng = Rng::new(31);
    for seed in 0..16 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let spec = kernel_spec(&mut rng, dtype);
        run_bwd_and_check(spec, seed, seed % 4 == 3);
    }
}

#[test]
fn backward_edge_cases() {
    let base = || {
        let mut s = ProblemSpec::new(3, 9, 9, 2, 2, 64, 3, true);
        s.dtype = DType::F16;
        s
    };
    let with = |f: &dyn Fn(&mut ProblemSpec)| {
        let mut s = base();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, ProblemSpec)> = vec![
        ("P=0 table", with(&|s| s.prefix_len = 0)),
        ("no table", with(&|s| s.num_prefixes = 0)),
        ("P=70", with(&|s| s.prefix_len = 70)),
        (
            "decode",
            with(&|s| {
                s.tq = 1;
                s.tk = 70;
            }),
        ),
        (
            "Tq=Tk=70",
            with(&|s| {
                s.tq = 70;
                s.tk = 70;
            }),
        ),
        (
            "padding",
            with(&|s| {
                s.seqlen_q = Some(vec![5, 0, 9]);
                s.seqlen_k = Some(vec![5, 0, 9]);
            }),
        ),
        (
            "mixed prefixes",
            with(&|s| {
                s.num_prefixes = 3;
                s.prefix_index = Some(vec![2, -1, 2]);
            }),
        ),
        (
            "GQA 4",
            with(&|s| {
                s.heads_q = 8;
                s.heads_kv = 2;
            }),
        ),
        (
            "D=128",
            with(&|s| {
                s.head_dim = 128;
                s.tq = 40;
                s.tk = 40;
                s.prefix_len = 33;
            }),
        ),
        (
            "D=128 bf16 GQA",
            with(&|s| {
                s.head_dim = 128;
                s.dtype = DType::BF16;
                s.heads_q = 4;
                s.heads_kv = 1;
            }),
        ),
        ("non-causal", with(&|s| s.causal = false)),
        (
            // The prefix kernel splits over the batch, the 4 query heads of each KV head and
            // 3 query chunks of 64 rows (36 partials), with padding and a sequence without
            // a prefix.
            "prefix split over batch, heads and query chunks",
            with(&|s| {
                s.tq = 140;
                s.tk = 140;
                s.heads_q = 8;
                s.heads_kv = 2;
                s.num_prefixes = 2;
                s.prefix_index = Some(vec![1, -1, 1]);
                s.seqlen_q = Some(vec![140, 77, 65]);
                s.seqlen_k = Some(vec![140, 77, 65]);
            }),
        ),
        (
            "prefix split, D=128 (32-row query tiles)",
            with(&|s| {
                s.head_dim = 128;
                s.tq = 70;
                s.tk = 70;
                s.heads_q = 4;
                s.heads_kv = 2;
                s.prefix_len = 40;
            }),
        ),
        (
            "GPT-2 layout",
            with(&|s| {
                s.layout = KvLayout::FusedQkv;
                s.peft_layer = Some((3, 2));
                s.prefix_len = 10;
            }),
        ),
    ];
    for (i, (name, spec)) in cases.into_iter().enumerate() {
        eprintln!("case {name}");
        run_bwd_and_check(spec.clone(), 700 + i as u64, false);
        run_bwd_and_check(spec, 700 + i as u64, true);
    }
}

#[test]
fn backward_is_deterministic() {
    let mut s = ProblemSpec::new(5, 20, 20, 2, 2, 64, 7, true);
    s.dtype = DType::F16;
    s.num_prefixes = 2;
    s.prefix_index = Some(vec![0, 1, 0, 0, -1]);
    // And one whose prefix gradient is split over query heads and query chunks too.
    let mut split = ProblemSpec::new(2, 130, 130, 4, 2, 64, 7, true);
    split.dtype = DType::F16;
    let bits = |t: &Tensor| {
        t.to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    for (seed, s) in [(9, s), (10, split)] {
        let a = run_bwd_and_check(s.clone(), seed, false);
        let b = run_bwd_and_check(s, seed, false);
        for (x, y) in [
            (&a.dq, &b.dq),
            (&a.dk, &b.dk),
            (&a.dv, &b.dv),
            (&a.dk_pre, &b.dk_pre),
            (&a.dv_pre, &b.dv_pre),
        ] {
            assert_eq!(bits(x), bits(y));
        }
    }
}

/// The backward writes dQ/dK/dV straight into a `dqkv [B, T, 3, H, D]` buffer laid out like
/// GPT-2's `qkv`, exactly as into separate tensors.
#[test]
fn backward_writes_a_gpt2_dqkv_buffer() {
    let mut s = ProblemSpec::new(2, 11, 11, 2, 2, 64, 5, true);
    s.dtype = DType::F16;
    s.layout = KvLayout::FusedQkv;
    s.peft_layer = Some((2, 1));
    s.seqlen_q = Some(vec![11, 6]);
    s.seqlen_k = Some(vec![11, 6]);
    let separate = run_bwd_and_check(s.clone(), 41, false);
    let pb = RandomProblem::new(s.clone(), &mut Rng::new(41)).unwrap();
    let args = pb.args().unwrap();
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    emu::attn_fwd(&args, f.out()).unwrap();
    let n = 2 * 11 * 3 * 2 * 64;
    let mut dqkv = Tensor::from_f32(&[2, 11, 3, 2, 64], &vec![f32::NAN; n], DType::F16).unwrap();
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    {
        let mut parts = dqkv.view_mut().unbind(2).unwrap().into_iter();
        let (dq, dk, dv) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let grads = prefix_attn::attn::AttnGrads {
            dq: Some(dq),
            dk: Some(dk),
            dv: Some(dv),
            dk_pre: Some(g.dk_pre.view_mut()),
            dv_pre: Some(g.dv_pre.view_mut()),
        };
        emu::attn_bwd(&pb.bwd_args(&f.o, &f.lse, false).unwrap(), grads).unwrap();
    }
    let fused = dqkv.to_f32_vec();
    let (sq, sk, sv) = (
        separate.dq.to_f32_vec(),
        separate.dk.to_f32_vec(),
        separate.dv.to_f32_vec(),
    );
    for b in 0..2 {
        for t in 0..11 {
            for h in 0..2 {
                for d in 0..64 {
                    let at = |which: usize| (((b * 11 + t) * 3 + which) * 2 + h) * 64 + d;
                    let one = ((b * 11 + t) * 2 + h) * 64 + d;
                    assert_eq!(fused[at(0)].to_bits(), sq[one].to_bits());
                    assert_eq!(fused[at(1)].to_bits(), sk[one].to_bits());
                    assert_eq!(fused[at(2)].to_bits(), sv[one].to_bits());
                }
            }
        }
    }
    let bits = |t: &Tensor| {
        t.to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&g.dk_pre), bits(&separate.dk_pre));
}

/// Kernel-sized random problems with padding and mixed prefix indices (including -1).
fn meta_kernel_spec(rng: &mut Rng, dtype: DType) -> ProblemSpec {
    let s = kernel_spec(rng, dtype);
    common::meta::with_mixed_meta(s, rng)
}

/// The kernels read metadata passed as device tensors (host memory on the emulator) and give
/// bit for bit the results of the same metadata as host slices, forward and backward.
#[test]
fn device_metadata_equals_host_metadata() {
    let mut rng = Rng::new(1414);
    for seed in 0..10 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let spec = meta_kernel_spec(&mut rng, dtype);
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomProblem::new(spec, &mut Rng::new(seed)).unwrap();
        common::meta::assert_device_meta_matches_host(&emu::EmuBackend, &pb, &ctx);
    }
}

/// Out-of-range device metadata (lengths below 0 and past Tq/Tk, prefix indices below -1 and
/// past NP) is clamped in the kernels: the results equal host metadata with the clamped
/// values, and nothing is read or written out of bounds (this test runs under the
/// sanitizer with the rest of the file).
#[test]
fn out_of_range_device_metadata_is_clamped_in_the_kernels() {
    let mut rng = Rng::new(1732);
    for seed in 0..4 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let mut spec = meta_kernel_spec(&mut rng, dtype);
        spec.batch = 5;
        spec.prefix_index = None;
        spec.seqlen_q = None;
        spec.seqlen_k = None;
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomProblem::new(spec, &mut Rng::new(seed)).unwrap();
        common::meta::assert_bad_device_meta_is_clamped(&emu::EmuBackend, &pb, &ctx);
    }
}

#[test]
fn decode_params_struct_matches_its_c_mirror() {
    assert_eq!(
        emu::decode_params_layout(),
        kernels::decode_params_rust_layout()
    );
}

use common::meta::paged_buffers as decode_buffers;

/// Runs the decode kernel on the emulator and checks it against the oracle with the tolerance
/// rule; returns the outputs and the number of key chunks the planner chose.
fn run_decode_and_check(spec: &PagedSpec, seed: u64) -> (FwdBuffers, i32) {
    let ctx = format!("seed {seed}, spec {spec:?}");
    let pb = RandomPaged::new(spec, &mut Rng::new(seed)).unwrap();
    let args = pb.args().unwrap();
    let exact = paged::oracle(&args, Precision::Exact).unwrap();
    let lowp = paged::oracle(&args, Precision::Round(spec.dtype)).unwrap();
    let mut f = decode_buffers(spec);
    let splits = kernels::plan_decode(&args, &f.out()).unwrap().params.splits;
    emu::EmuBackend
        .attn_decode(&args, f.out())
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    common::meta::check_outputs(&f.o, &f.lse, &exact, &lowp, spec.dtype)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    (f, splits)
}

/// The decode kernel against the oracle on random paged problems: fp16 and bf16, head dims 64
/// and 128, GQA, Tq up to 16, shuffled pages, mixed prefix lengths and indices.
#[test]
fn decode_matches_oracle_on_random_shapes() {
    let mut rng = Rng::new(5150);
    for seed in 0..12u64 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let spec = random_paged_spec(&mut rng, dtype, &[64, 128]);
        run_decode_and_check(&spec, seed);
    }
}

/// The edges: a sequence ending on a page boundary and one key past it, an empty sequence
/// with a prefix and one without, one chunk, many chunks, mixed prefix lengths (0 and P), a
/// rerun bit for bit, and the metadata as device tensors bit for bit.
#[test]
fn decode_edge_cases() {
    let base = PagedSpec {
        batch: 4,
        tq: 1,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        page_size: 16,
        seqlen_k: vec![16, 17, 0, 0],
        prefix_rows: 6,
        num_prefixes: 2,
        prefix_index: vec![0, 1, 1, -1],
        prefix_len: vec![6, 0],
        dtype: DType::F16,
    };
    let with = |f: &dyn Fn(&mut PagedSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let (f, splits) = run_decode_and_check(&base, 1);
    assert!(splits > 1, "the base case splits its keys");
    let lse = f.lse.to_f32_vec();
    assert!(
        lse[3 * 4..].iter().all(|&x| x == f32::NEG_INFINITY),
        "no key: lse = -inf"
    );
    // One chunk: the longest possible sequence (6 pages of 4) and prefix fit one 32-key tile.
    let one = with(&|s| {
        s.page_size = 4;
        s.seqlen_k = vec![3, 20, 0, 9];
        s.prefix_len = vec![6, 5];
    });
    assert_eq!(run_decode_and_check(&one, 2).1, 1, "one chunk");
    // Many chunks: long sequences, a small batch.
    let many = with(&|s| {
        s.batch = 2;
        s.seqlen_k = vec![300, 161];
        s.prefix_index = vec![1, 0];
        s.prefix_len = vec![6, 3];
        s.tq = 3;
        s.head_dim = 128;
        s.dtype = DType::BF16;
    });
    let (a, splits) = run_decode_and_check(&many, 3);
    assert!(splits >= 8, "many chunks, got {splits}");
    // Tq = 16 with G = 4: 64 rows of one KV head in one block.
    let full = with(&|s| {
        s.tq = 16;
        s.heads_q = 8;
        s.seqlen_k = vec![16, 40, 0, 33];
    });
    run_decode_and_check(&full, 4);
    // Deterministic: a rerun gives the same bits.
    let (b, _) = run_decode_and_check(&many, 3);
    let bits = |t: &Tensor| {
        t.to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a.o), bits(&b.o));
    assert_eq!(bits(&a.lse), bits(&b.lse));
    // Device metadata (host memory on the emulator) gives the same bits as host metadata,
    // and out-of-range device values are clamped (no out-of-bounds access under the
    // sanitizer).
    for spec in [&base, &many] {
        let pb = RandomPaged::new(spec, &mut Rng::new(9)).unwrap();
        let t = |v: &[i32], dims: &[usize]| Tensor::from_slice(dims, v).unwrap();
        let b = spec.batch;
        let table = t(&pb.block_table, &[b, pb.block_table.len() / b]);
        let (lk, idx, plen) = (
            t(&pb.seqlen_k, &[b]),
            t(&pb.prefix_index, &[b]),
            t(&pb.prefix_len, &[spec.num_prefixes]),
        );
        let host = pb.args().unwrap();
        let dev = PagedAttnArgs {
            kv: PagedKv {
                block_table: Meta::Device(table.view()),
                seqlen_k: Meta::Device(lk.view()),
                ..host.kv
            },
            prefix_index: Some(Meta::Device(idx.view())),
            prefix_len: Some(Meta::Device(plen.view())),
            ..host
        };
        let (mut fh, mut fd) = (decode_buffers(spec), decode_buffers(spec));
        emu::EmuBackend.attn_decode(&host, fh.out()).unwrap();
        emu::EmuBackend.attn_decode(&dev, fd.out()).unwrap();
        assert_eq!(bits(&fh.o), bits(&fd.o));
        assert_eq!(bits(&fh.lse), bits(&fd.lse));
        let wild_table: Vec<i32> = pb.block_table.iter().map(|&p| p * 1000 - 7).collect();
        let wild = (
            t(&wild_table, &[b, pb.block_table.len() / b]),
            t(&vec![i32::MAX; b], &[b]),
            t(&vec![99; b], &[b]),
            t(&vec![-5; spec.num_prefixes], &[spec.num_prefixes]),
        );
        let bad = PagedAttnArgs {
            kv: PagedKv {
                block_table: Meta::Device(wild.0.view()),
                seqlen_k: Meta::Device(wild.1.view()),
                ..host.kv
            },
            prefix_index: Some(Meta::Device(wild.2.view())),
            prefix_len: Some(Meta::Device(wild.3.view())),
            ..host
        };
        let mut fb = decode_buffers(spec);
        emu::EmuBackend.attn_decode(&bad, fb.out()).unwrap();
        let cpu_bad = {
            let mut f = decode_buffers(spec);
            prefix_attn::device::cpu::CpuBackend
                .attn_decode(&bad, f.out())
                .unwrap();
            f
        };
        let diff = max_err(&f64s(&fb.o), &f64s(&cpu_bad.o));
        assert!(
            diff < 0.05,
            "clamped device metadata: emu and cpu differ by {diff}"
        );
    }
}
