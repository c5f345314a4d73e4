//! Bad input gets an error that names the argument and what was expected: never a panic,
//! never an out-of-bounds access.

use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, ProblemSpec, RandomProblem};
use prefix_attn::attn::{cpu, AttnFwdArgs, AttnFwdOut, AttnGrads};
use prefix_attn::bench::naive;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

fn t(shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(shape, &Rng::new(1).normal_vec(n, 1.0), dtype).unwrap()
}

/// Runs the forward and returns the error message, failing the test if it succeeded.
fn fwd_err(args: &AttnFwdArgs, o_dims: &[usize], lse_dims: &[usize], o_dtype: DType) -> String {
    let mut o = Tensor::zeros(o_dims, o_dtype).unwrap();
    let mut lse = Tensor::zeros(lse_dims, DType::F32).unwrap();
    let out = AttnFwdOut {
        o: o.view_mut(),
        lse: Some(lse.view_mut()),
    };
    match cpu::forward(args, out) {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn expect(msg: String, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "message {msg:?} should mention {w:?}");
    }
}

#[test]
fn forward_argument_errors_name_the_argument() {
    let dt = DType::F16;
    let q = t(&[2, 3, 4, 8], dt);
    let k = t(&[2, 5, 2, 8], dt);
    let v = t(&[2, 5, 2, 8], dt);
    let kp = t(&[2, 4, 2, 8], dt);
    let od = [2, 3, 4, 8];
    let ld = [2, 4, 3];
    let base = || AttnFwdArgs::new(q.view(), k.view(), v.view()).prefix(kp.view(), kp.view());

    // Shapes.
    let k_bad_d = t(&[2, 5, 2, 7], dt);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k_bad_d.view(), v.view()),
            &od,
            &ld,
            dt,
        ),
        &["k:", "D=8"],
    );
    let v_bad = t(&[2, 6, 2, 8], dt);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k.view(), v_bad.view()),
            &od,
            &ld,
            dt,
        ),
        &["v:", "like k"],
    );
    let k_3heads = t(&[2, 5, 3, 8], dt);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k_3heads.view(), k_3heads.view()),
            &od,
            &ld,
            dt,
        ),
        &["q:", "multiple"],
    );
    let q3 = t(&[2, 3, 32], dt);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q3.view(), k.view(), v.view()),
            &od,
            &ld,
            dt,
        ),
        &["q:", "rank 4"],
    );
    let kp_bad = t(&[2, 4, 1, 8], dt);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k.view(), v.view()).prefix(kp_bad.view(), kp_bad.view()),
            &od,
            &ld,
            dt,
        ),
        &["k_pre", "Hkv=2"],
    );
    // Output shapes and dtypes.
    expect(fwd_err(&base(), &[2, 3, 4, 9], &ld, dt), &["o:"]);
    expect(fwd_err(&base(), &od, &[2, 3, 4], dt), &["lse:"]);
    expect(fwd_err(&base(), &od, &ld, DType::F32), &["o:", "dtype"]);
    // Dtypes.
    let k32 = t(&[2, 5, 2, 8], DType::F32);
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k32.view(), v.view()),
            &od,
            &ld,
            dt,
        ),
        &["k:", "dtype f32"],
    );
    // Metadata.
    expect(
        fwd_err(&base().prefix_index(&[0, 2]), &od, &ld, dt),
        &["prefix_index", "prefix_index[1] = 2", "-1"],
    );
    expect(
        fwd_err(&base().prefix_index(&[0]), &od, &ld, dt),
        &["prefix_index", "B=2"],
    );
    expect(
        fwd_err(
            &AttnFwdArgs::new(q.view(), k.view(), v.view()).prefix_index(&[0, 0]),
            &od,
            &ld,
            dt,
        ),
        &["prefix_index", "without a prefix table"],
    );
    expect(
        fwd_err(&base().seqlens(&[3, 4], &[5, 5]), &od, &ld, dt),
        &["seqlen_q[1] = 4", "0..=3"],
    );
    expect(
        fwd_err(&base().seqlens(&[3, 3], &[-1, 5]), &od, &ld, dt),
        &["seqlen_k[0] = -1"],
    );
    expect(fwd_err(&base().scale(f32::NAN), &od, &ld, dt), &["scale"]);
    // A last dimension that is not contiguous.
    let wide = t(&[2, 3, 4, 16], dt);
    let strided = wide
        .view()
        .as_strided(&[2, 3, 4, 8], &[192, 64, 16, 2], 0)
        .unwrap();
    expect(
        fwd_err(&AttnFwdArgs::new(strided, k.view(), v.view()), &od, &ld, dt),
        &["q:", "contiguous"],
    );
}

#[test]
fn views_that_leave_their_buffer_are_refused() {
    let x = t(&[2, 3, 4, 8], DType::F32);
    let e = x
        .view()
        .as_strided(&[2, 3, 4, 8], &[96, 32, 8, 1], 1)
        .unwrap_err()
        .to_string();
    expect(e, &["as_strided", "reaches element 192", "192 elements"]);
    assert!(x.view().narrow(1, 2, 2).is_err());
    assert!(x.view().select(0, 2).is_err());
    assert!(x.view().select(4, 0).is_err());
    assert!(x.view().reshape(&[5, 5]).is_err());
    let mut y = t(&[2, 3], DType::F32);
    assert!(
        y.view_mut().unbind(1).is_err(),
        "the contiguous last dim cannot be split"
    );
}

#[test]
fn backward_argument_errors() {
    let mut s = ProblemSpec::new(2, 3, 3, 2, 2, 8, 2, true);
    s.dtype = DType::F16;
    let pb = RandomProblem::new(s, &mut Rng::new(3)).unwrap();
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    cpu::forward(&pb.args().unwrap(), f.out()).unwrap();

    // dq/dk/dv are required unless prefix_only.
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let mut grads = g.grads(true, false);
    grads.dk = None;
    let e = cpu::backward(&pb.bwd_args(&f.o, &f.lse, false).unwrap(), grads).unwrap_err();
    expect(e.to_string(), &["dk", "prefix_only"]);

    // lse of the wrong dtype.
    let lse16 = f.lse.to_dtype(DType::F16).unwrap();
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let e = cpu::backward(
        &pb.bwd_args(&f.o, &lse16, false).unwrap(),
        g.grads(true, false),
    )
    .unwrap_err();
    expect(e.to_string(), &["lse", "f32"]);

    // Prefix gradients must be f32.
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let mut dk16 = g.dk_pre.to_dtype(DType::F16).unwrap();
    let grads = AttnGrads {
        dk_pre: Some(dk16.view_mut()),
        ..g.grads(false, true)
    };
    let e = cpu::backward(&pb.bwd_args(&f.o, &f.lse, true).unwrap(), grads).unwrap_err();
    expect(e.to_string(), &["dk_pre", "f32"]);

    // d_o of the wrong shape.
    let small = Tensor::zeros(&[2, 3, 2, 4], DType::F16).unwrap();
    let mut args = pb.bwd_args(&f.o, &f.lse, false).unwrap();
    args.d_o = small.view();
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    expect(
        cpu::backward(&args, g.grads(true, false))
            .unwrap_err()
            .to_string(),
        &["d_o"],
    );
}

#[test]
fn naive_refuses_what_concatenation_cannot_express() {
    // Causal with more valid queries than keys: the concatenation would hide prefix keys.
    let mut s = ProblemSpec::new(1, 4, 4, 1, 1, 8, 2, true);
    s.seqlen_q = Some(vec![4]);
    s.seqlen_k = Some(vec![2]);
    let pb = RandomProblem::new(s, &mut Rng::new(4)).unwrap();
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    let e = naive::forward(&CpuBackend, &pb.args().unwrap(), f.out()).unwrap_err();
    expect(e.to_string(), &["seqlen_q", "naive"]);
}
