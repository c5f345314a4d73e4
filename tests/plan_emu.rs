//! Plan/run (`AttnPlan`) on the emulator: a run gives the one-shot call's bits on random
//! shapes (fresh random inputs, mixed per-sequence prefixes, padding, causal or not, GQA,
//! strided layouts), allocates no device memory, and refuses tensors that do not match the
//! plan, host metadata, a small or misaligned workspace and a caller's stream with errors that
//! name the argument. And the one-shot calls on a stream (`AttnOnStream`).

mod common;

use common::meta::{
    arg_of, assert_bits_eq, bits, expect_err, paged_buffers, poisoned_workspace, with_mixed_meta,
};
use prefix_attn::attn::testing::{
    random_paged_spec, random_spec, FwdBuffers, GradBuffers, MetaTensors, ProblemSpec, RandomPaged,
    RandomProblem,
};
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs, Meta};
use prefix_attn::device::emu::{self, EmuBackend};
use prefix_attn::device::kernel_device::{
    AttnOnStream, AttnPlan, Stream, Workspace, WORKSPACE_ALIGN,
};
use prefix_attn::device::kernels::plan_fwd;
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use prefix_attn::Error;

/// The spec's metadata as "device" tensors (host memory on the emulator), only those the spec
/// gives: a missing one stays missing, and the run takes its default.
fn device_meta(spec: &ProblemSpec) -> [Option<Tensor>; 3] {
    let t = |v: &Option<Vec<i32>>| {
        v.as_ref()
            .map(|v| Tensor::from_slice(&[v.len()], v).unwrap())
    };
    [t(&spec.prefix_index), t(&spec.seqlen_q), t(&spec.seqlen_k)]
}

fn with_device_meta<'a>(args: AttnFwdArgs<'a>, meta: &'a [Option<Tensor>; 3]) -> AttnFwdArgs<'a> {
    let dev = |t: &'a Option<Tensor>| t.as_ref().map(|t| Meta::Device(t.view()));
    AttnFwdArgs {
        prefix_index: dev(&meta[0]),
        seqlen_q: dev(&meta[1]),
        seqlen_k: dev(&meta[2]),
        ..args
    }
}

fn kernel_spec(rng: &mut Rng, seed: u64) -> ProblemSpec {
    let dtype = if seed % 2 == 0 {
        DType::F16
    } else {
        DType::BF16
    };
    let mut s = random_spec(rng, dtype);
    s.head_dim = if rng.below(2) == 0 { 64 } else { 128 };
    // Half of the problems get two or more prefixes with mixed per-sequence indices (-1
    // among them) and padding; the others keep random_spec's (often absent) metadata, so
    // runs also take the defaults.
    if seed % 2 == 0 {
        s = with_mixed_meta(s, rng);
    }
    s
}

/// Forward and backward through plans on the emulator against the one-shot calls, bit for
/// bit, with no device allocation in any run.
#[test]
fn run_equals_one_shot_on_random_shapes() {
    let be = EmuBackend;
    let mut rng = Rng::new(2027);
    for seed in 0..16u64 {
        let spec = kernel_spec(&mut rng, seed);
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pb = RandomProblem::new(spec, &mut Rng::new(500 + seed)).unwrap();
        let host_args = pb.args().unwrap();
        let prefix_only = seed % 3 == 2;
        let has_prefix = host_args.prefix.is_some();

        // The one-shot calls (host metadata); each allocates its scratch.
        let before = emu::device_allocations();
        let mut f1 = FwdBuffers::poisoned(&pb.spec).unwrap();
        be.attn_fwd(&host_args, f1.out()).unwrap();
        let mut g1 = GradBuffers::poisoned(&pb.spec).unwrap();
        let b1 = AttnBwdArgs {
            fwd: host_args,
            o: f1.o.view(),
            lse: f1.lse.view(),
            d_o: pb.d_o.view(),
            prefix_only,
        };
        be.attn_bwd(&b1, g1.grads(has_prefix, prefix_only)).unwrap();
        assert!(
            emu::device_allocations().0 >= before.0 + 2,
            "{ctx}: the one-shot calls allocate scratch, the counter must see it"
        );

        // The plans, from the arguments' shapes.
        let fwd = AttnPlan::fwd(&be, &host_args).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let bwd = AttnPlan::bwd(&be, &host_args).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let one_shot = plan_fwd(&host_args, &f1.out()).unwrap();
        assert_eq!(
            fwd.launches()
                .iter()
                .map(|l| (l.entry, l.grid))
                .collect::<Vec<_>>(),
            vec![(one_shot.entry, one_shot.grid)],
            "{ctx}: the plan's launch is the one-shot call's"
        );
        assert!(bwd.workspace_bytes() >= fwd.workspace_bytes() && fwd.workspace_bytes() > 0);
        let mut wf = poisoned_workspace(fwd.workspace_bytes());
        let mut wb = poisoned_workspace(bwd.workspace_bytes());

        // The runs, with the metadata as device tensors (or left out).
        let meta = device_meta(&pb.spec);
        let run_args = with_device_meta(host_args, &meta);
        let mut f2 = FwdBuffers::poisoned(&pb.spec).unwrap();
        let before = emu::device_allocations();
        fwd.run_fwd(
            &be,
            &run_args,
            f2.out(),
            Workspace::from_view(wf.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_or_else(|e| panic!("{ctx}: forward run: {e}"));
        assert_eq!(
            emu::device_allocations(),
            before,
            "{ctx}: the forward run allocated"
        );
        assert_bits_eq(
            &[bits(&f1.o), bits(&f1.lse)],
            &[bits(&f2.o), bits(&f2.lse)],
            &format!("{ctx} (forward run)"),
        );
        let mut g2 = GradBuffers::poisoned(&pb.spec).unwrap();
        let b2 = AttnBwdArgs {
            fwd: run_args,
            o: f2.o.view(),
            lse: f2.lse.view(),
            d_o: pb.d_o.view(),
            prefix_only,
        };
        let before = emu::device_allocations();
        bwd.run_bwd(
            &be,
            &b2,
            g2.grads(has_prefix, prefix_only),
            Workspace::from_view(wb.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_or_else(|e| panic!("{ctx}: backward run: {e}"));
        assert_eq!(
            emu::device_allocations(),
            before,
            "{ctx}: the backward run allocated"
        );
        let grads = |g: &GradBuffers| {
            let mut v = vec![vec![], vec![]];
            v.extend([&g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre].map(bits));
            v
        };
        assert_bits_eq(&grads(&g1), &grads(&g2), &format!("{ctx} (backward run)"));
    }
}

/// Out-of-range device metadata in a run is clamped as in the one-shot call with device
/// metadata: the same bits.
#[test]
fn run_clamps_device_metadata_like_the_one_shot_call() {
    let be = EmuBackend;
    let mut spec = ProblemSpec::new(5, 7, 9, 4, 2, 64, 3, true);
    spec.dtype = DType::BF16;
    spec.num_prefixes = 2;
    let pb = RandomProblem::new(spec, &mut Rng::new(88)).unwrap();
    let [bad, _] = common::meta::bad_meta(5, 7, 9, 2);
    let meta = MetaTensors::from_values(true, &bad[0], &bad[1], &bad[2]).unwrap();
    let args = pb.args_device_meta(&meta).unwrap();
    let mut f1 = FwdBuffers::poisoned(&pb.spec).unwrap();
    be.attn_fwd(&args, f1.out()).unwrap();
    let plan = AttnPlan::fwd(&be, &args).unwrap();
    let mut ws = poisoned_workspace(plan.workspace_bytes());
    let mut f2 = FwdBuffers::poisoned(&pb.spec).unwrap();
    plan.run_fwd(
        &be,
        &args,
        f2.out(),
        Workspace::from_view(ws.view_mut()).unwrap(),
        Stream::OWN,
    )
    .unwrap();
    assert_bits_eq(
        &[bits(&f1.o), bits(&f1.lse)],
        &[bits(&f2.o), bits(&f2.lse)],
        "clamped device metadata",
    );
}

/// Runs with arguments that do not fit the plan fail before launching, with an error naming
/// the argument, and leave the outputs untouched.
#[test]
fn bad_runs_are_errors_that_name_the_argument() {
    let be = EmuBackend;
    let spec = |tq: usize, dtype: DType| {
        let mut s = ProblemSpec::new(2, tq, 6, 2, 2, 64, 3, true);
        s.dtype = dtype;
        s
    };
    let pb = RandomProblem::new(spec(5, DType::F16), &mut Rng::new(7)).unwrap();
    let args = pb.args().unwrap();
    let plan = AttnPlan::fwd(&be, &args).unwrap();
    let bytes = plan.workspace_bytes();
    let mut ws = poisoned_workspace(bytes + 64);
    let meta = device_meta(&pb.spec);
    let run_args = with_device_meta(args, &meta);

    let mut out = FwdBuffers::poisoned(&pb.spec).unwrap();

    // Another Tq than the plan's (a consistent problem otherwise).
    let other = RandomProblem::new(spec(4, DType::F16), &mut Rng::new(8)).unwrap();
    let other_args = other.args().unwrap();
    let mut other_out = FwdBuffers::poisoned(&other.spec).unwrap();
    let e = plan
        .run_fwd(
            &be,
            &other_args,
            other_out.out(),
            Workspace::from_view(ws.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");
    assert!(e.to_string().contains("the plan's [B, Tq, Hq, D]"), "{e}");
    // Another dtype.
    let bf = RandomProblem::new(spec(5, DType::BF16), &mut Rng::new(9)).unwrap();
    let mut bf_out = FwdBuffers::poisoned(&bf.spec).unwrap();
    let e = plan
        .run_fwd(
            &be,
            &bf.args().unwrap(),
            bf_out.out(),
            Workspace::from_view(ws.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");
    assert!(e.to_string().contains("expected f16 (the plan's)"), "{e}");

    // A workspace one element short, then misaligned.
    let short = ws.view_mut().narrow(0, 0, bytes / 4 - 1).unwrap();
    expect_err(
        "short workspace",
        &mut out,
        |o| {
            let w = Workspace::from_view(short)?;
            plan.run_fwd(&be, &run_args, o.out(), w, Stream::OWN)
        },
        "workspace",
        &format!("this run needs {bytes}"),
    );
    let shifted = ws.view_mut().narrow(0, 1, bytes / 4 + 1).unwrap();
    expect_err(
        "misaligned workspace",
        &mut out,
        |o| {
            let w = Workspace::from_view(shifted)?;
            plan.run_fwd(&be, &run_args, o.out(), w, Stream::OWN)
        },
        "workspace",
        &format!("is not {WORKSPACE_ALIGN}-byte aligned"),
    );
    // Host metadata: a run copies nothing from the host.
    let sq = vec![5, 2];
    let host_meta = AttnFwdArgs {
        seqlen_q: Some(Meta::Host(&sq)),
        ..run_args
    };
    expect_err(
        "host metadata",
        &mut out,
        |o| {
            let w = Workspace::from_view(ws.view_mut())?;
            plan.run_fwd(&be, &host_meta, o.out(), w, Stream::OWN)
        },
        "seqlen_q",
        "host metadata given to a plan's run",
    );
    // The emulator has no streams. The handle is never used: the emu device refuses it first.
    // SAFETY: the emu device reads nothing through the handle.
    let not_a_stream = unsafe { Stream::from_raw(std::ptr::NonNull::dangling().as_ptr()) };
    expect_err(
        "caller's stream",
        &mut out,
        |o| {
            let w = Workspace::from_view(ws.view_mut())?;
            plan.run_fwd(&be, &run_args, o.out(), w, not_a_stream)
        },
        "stream",
        "the emu device has no CUDA streams",
    );
    // A forward plan run as the backward.
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let b = AttnBwdArgs {
        fwd: run_args,
        o: out.o.view(),
        lse: out.lse.view(),
        d_o: pb.d_o.view(),
        prefix_only: false,
    };
    let e = plan
        .run_bwd(
            &be,
            &b,
            g.grads(true, false),
            Workspace::from_view(ws.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("plan: planned for the forward, run as the backward"),
        "{e}"
    );
    // After all that, a good run works.
    plan.run_fwd(
        &be,
        &run_args,
        out.out(),
        Workspace::from_view(ws.view_mut()).unwrap(),
        Stream::OWN,
    )
    .unwrap();
    assert!(out.o.to_f32_vec().iter().all(|x| x.is_finite()));
}

/// Planning validates the shapes: what the kernels cannot run is an error at plan time.
#[test]
fn plans_reject_what_the_kernels_cannot_run() {
    let be = EmuBackend;
    let mut s = ProblemSpec::new(2, 5, 6, 2, 2, 64, 3, true);
    s.dtype = DType::F32;
    let pb = RandomProblem::new(s.clone(), &mut Rng::new(1)).unwrap();
    let e = AttnPlan::fwd(&be, &pb.args().unwrap()).unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");
    s.dtype = DType::F16;
    s.head_dim = 8;
    let pb = RandomProblem::new(s, &mut Rng::new(2)).unwrap();
    let e = AttnPlan::bwd(&be, &pb.args().unwrap()).unwrap_err();
    assert!(e.to_string().contains("head dim 8"), "{e}");
}

/// The one-shot calls on a stream (`AttnOnStream`): with the device's own stream they are the
/// `Backend` calls, bit for bit; the emulator refuses a caller's stream before doing anything,
/// with an error naming `stream`, for the forward, the backward and the paged decode alike.
#[test]
fn one_shot_calls_take_a_stream() {
    let be = EmuBackend;
    // SAFETY: the emu device reads nothing through the handle: it refuses it first.
    let not_a_stream = unsafe { Stream::from_raw(std::ptr::NonNull::dangling().as_ptr()) };
    let refused = |e: Error| {
        assert!(
            e.to_string()
                .contains("stream: the emu device has no CUDA streams"),
            "{e}"
        );
    };
    let mut spec = with_mixed_meta(
        ProblemSpec::new(3, 6, 8, 4, 2, 64, 3, true),
        &mut Rng::new(3),
    );
    spec.dtype = DType::BF16;
    let pb = RandomProblem::new(spec, &mut Rng::new(31)).unwrap();
    let args = pb.args().unwrap();
    let (mut f1, mut f2, mut f3) = (
        FwdBuffers::poisoned(&pb.spec).unwrap(),
        FwdBuffers::poisoned(&pb.spec).unwrap(),
        FwdBuffers::poisoned(&pb.spec).unwrap(),
    );
    be.attn_fwd(&args, f1.out()).unwrap();
    be.attn_fwd_on(&args, f2.out(), Stream::OWN).unwrap();
    assert_bits_eq(
        &[bits(&f1.o), bits(&f1.lse)],
        &[bits(&f2.o), bits(&f2.lse)],
        "attn_fwd_on(OWN)",
    );
    refused(be.attn_fwd_on(&args, f3.out(), not_a_stream).unwrap_err());
    assert!(f3.o.to_f32_vec().iter().all(|x| x.is_nan()));
    let bargs = AttnBwdArgs {
        fwd: args,
        o: f1.o.view(),
        lse: f1.lse.view(),
        d_o: pb.d_o.view(),
        prefix_only: false,
    };
    let (mut g1, mut g2) = (
        GradBuffers::poisoned(&pb.spec).unwrap(),
        GradBuffers::poisoned(&pb.spec).unwrap(),
    );
    be.attn_bwd(&bargs, g1.grads(true, false)).unwrap();
    be.attn_bwd_on(&bargs, g2.grads(true, false), Stream::OWN)
        .unwrap();
    let grads = |g: &GradBuffers| {
        let mut v = vec![vec![], vec![]];
        v.extend([&g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre].map(bits));
        v
    };
    assert_bits_eq(&grads(&g1), &grads(&g2), "attn_bwd_on(OWN)");
    refused(
        be.attn_bwd_on(&bargs, g2.grads(true, false), not_a_stream)
            .unwrap_err(),
    );

    let paged = random_paged_spec(&mut Rng::new(5), DType::F16, &[64]);
    let pp = RandomPaged::new(&paged, &mut Rng::new(51)).unwrap();
    let pargs = pp.args().unwrap();
    let (mut d1, mut d2, mut d3) = (
        paged_buffers(&paged),
        paged_buffers(&paged),
        paged_buffers(&paged),
    );
    be.attn_decode(&pargs, d1.out()).unwrap();
    be.attn_decode_on(&pargs, d2.out(), Stream::OWN).unwrap();
    assert_bits_eq(
        &[bits(&d1.o), bits(&d1.lse)],
        &[bits(&d2.o), bits(&d2.lse)],
        "attn_decode_on(OWN)",
    );
    refused(
        be.attn_decode_on(&pargs, d3.out(), not_a_stream)
            .unwrap_err(),
    );
    assert!(d3.o.to_f32_vec().iter().all(|x| x.is_nan()));
}
