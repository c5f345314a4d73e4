//! The candle op (`prefix_attn::candle`, feature `candle`) on candle CPU tensors: its forward
//! equals the crate's CPU API bit for bit and the f64 oracle within the tolerance rule, its
//! candle backward equals the CPU API's `attn_bwd` and finite differences of the candle
//! forward, and bad arguments give errors that name them.
#![cfg(feature = "candle")]

mod common;

use candle_core::{Tensor as CTensor, Var};
use common::candle::{bits, f32s, random, to_candle};
use common::*;
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, Meta};
use prefix_attn::candle::{prefix_attn, prefix_attn_with_lse, PrefixAttnOpts};
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

const CPU: candle_core::Device = candle_core::Device::Cpu;

/// Sizes and options of one case.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    tq: usize,
    tk: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    num_prefixes: usize,
    prefix_len: usize,
    dtype: DType,
    opts: PrefixAttnOpts,
}

impl Case {
    fn new(batch: usize, tq: usize, tk: usize, heads: (usize, usize), head_dim: usize) -> Case {
        Case {
            batch,
            tq,
            tk,
            heads_q: heads.0,
            heads_kv: heads.1,
            head_dim,
            num_prefixes: 2,
            prefix_len: 3,
            dtype: DType::F32,
            opts: PrefixAttnOpts::default(),
        }
    }
    fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.tq, self.heads_q, self.head_dim]
    }
    fn k_dims(&self) -> [usize; 4] {
        [self.batch, self.tk, self.heads_kv, self.head_dim]
    }
    fn pre_dims(&self) -> [usize; 4] {
        [
            self.num_prefixes,
            self.prefix_len,
            self.heads_kv,
            self.head_dim,
        ]
    }
}

/// One case's inputs, as the crate's host tensors and as candle tensors with the same bits,
/// and an output gradient `d_o`.
struct Inputs {
    ours: [Tensor; 5],
    candle: [CTensor; 5],
    d_o: Tensor,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let ours = [
        random(&mut rng, &c.q_dims(), c.dtype),
        random(&mut rng, &c.k_dims(), c.dtype),
        random(&mut rng, &c.k_dims(), c.dtype),
        random(&mut rng, &c.pre_dims(), c.dtype),
        random(&mut rng, &c.pre_dims(), c.dtype),
    ];
    let candle = [0, 1, 2, 3, 4].map(|i| to_candle(&ours[i]));
    let d_o = random(&mut rng, &c.q_dims(), c.dtype);
    Inputs { ours, candle, d_o }
}

/// The crate's CPU API arguments for a case.
fn our_args<'a>(c: &'a Case, t: &'a [Tensor; 5]) -> AttnFwdArgs<'a> {
    let o = &c.opts;
    let mut a = AttnFwdArgs::new(t[0].view(), t[1].view(), t[2].view())
        .prefix(t[3].view(), t[4].view())
        .causal(o.causal);
    a.scale = o.softmax_scale;
    a.prefix_index = o.prefix_index.as_deref().map(Meta::Host);
    a.seqlen_q = o.seqlen_q.as_deref().map(Meta::Host);
    a.seqlen_k = o.seqlen_k.as_deref().map(Meta::Host);
    a
}

/// The crate's CPU forward: `(o, lse)`.
fn our_fwd(c: &Case, t: &[Tensor; 5]) -> (Tensor, Tensor) {
    let mut o = Tensor::zeros(&c.q_dims(), c.dtype).unwrap();
    let mut lse = Tensor::zeros(&[c.batch, c.heads_q, c.tq], DType::F32).unwrap();
    CpuBackend
        .attn_fwd(
            &our_args(c, t),
            AttnFwdOut {
                o: o.view_mut(),
                lse: Some(lse.view_mut()),
            },
        )
        .unwrap();
    (o, lse)
}

/// The crate's CPU backward: `[dq, dk, dv]` (absent when `prefix_only`) and the f32
/// `[dk_pre, dv_pre]`.
fn our_bwd(
    c: &Case,
    t: &[Tensor; 5],
    d_o: &Tensor,
    prefix_only: bool,
) -> (Option<[Tensor; 3]>, [Tensor; 2]) {
    let (o, lse) = our_fwd(c, t);
    let z = |dims: &[usize], dt| Tensor::zeros(dims, dt).unwrap();
    let mut seq = [
        z(&c.q_dims(), c.dtype),
        z(&c.k_dims(), c.dtype),
        z(&c.k_dims(), c.dtype),
    ];
    let mut pre = [z(&c.pre_dims(), DType::F32), z(&c.pre_dims(), DType::F32)];
    let [dq, dk, dv] = &mut seq;
    let [dk_pre, dv_pre] = &mut pre;
    let grads = AttnGrads {
        dq: (!prefix_only).then(|| dq.view_mut()),
        dk: (!prefix_only).then(|| dk.view_mut()),
        dv: (!prefix_only).then(|| dv.view_mut()),
        dk_pre: Some(dk_pre.view_mut()),
        dv_pre: Some(dv_pre.view_mut()),
    };
    let args = AttnBwdArgs {
        fwd: our_args(c, t),
        o: o.view(),
        lse: lse.view(),
        d_o: d_o.view(),
        prefix_only,
    };
    CpuBackend.attn_bwd(&args, grads).unwrap();
    ((!prefix_only).then_some(seq), pre)
}

fn run(c: &Case, t: &[CTensor; 5]) -> candle_core::Result<CTensor> {
    prefix_attn(&t[0], &t[1], &t[2], &t[3], &t[4], &c.opts)
}

/// Forward: bit-identical to the CPU API (o and lse), and within the tolerance rule of the
/// f64 oracle.
fn check_forward(c: &Case, seed: u64) {
    let ctx = format!("seed {seed}, {c:?}");
    let x = inputs(c, seed);
    let [q, k, v, kp, vp] = &x.candle;
    let (o, lse) = prefix_attn_with_lse(q, k, v, kp, vp, &c.opts)
        .unwrap_or_else(|e| panic!("{ctx}: candle forward: {e}"));
    assert_eq!(o.dims(), c.q_dims(), "{ctx}: o dims");
    assert_eq!(o.dtype(), q.dtype(), "{ctx}: o dtype");
    assert_eq!(lse.dims(), [c.batch, c.heads_q, c.tq], "{ctx}: lse dims");
    let (our_o, our_lse) = our_fwd(c, &x.ours);
    assert_eq!(bits(&o), bits(&to_candle(&our_o)), "{ctx}: o differs");
    assert_eq!(bits(&lse), bits(&to_candle(&our_lse)), "{ctx}: lse differs");
    // The plain entry point gives the same output.
    assert_eq!(bits(&run(c, &x.candle).unwrap()), bits(&o), "{ctx}");

    let dense = Dense::from_args(&our_args(c, &x.ours)).unwrap();
    let exact = dense.forward(Precision::Exact);
    let lowp = dense.forward(Precision::Round(c.dtype));
    let got: Vec<f64> = f32s(&o).into_iter().map(f64::from).collect();
    within_rule(
        "o",
        max_err(&got, &exact.o),
        max_err(&lowp.o, &exact.o),
        max_abs(&exact.o),
        c.dtype,
    )
    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let got: Vec<f64> = f32s(&lse).into_iter().map(f64::from).collect();
    within_rule(
        "lse",
        max_err(&got, &exact.lse),
        max_err(&lowp.lse, &exact.lse).max(max_abs(&exact.lse) * 1.2e-7),
        max_abs(&exact.lse),
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
}

/// Backward through candle (`Var`s, `backward()`): equal to the CPU API's `attn_bwd` on the
/// same inputs and `d_o`. `seq_vars`: whether q, k, v are `Var`s (else only the prefix is,
/// and the op takes the prefix-only backward).
fn check_backward(c: &Case, seed: u64, seq_vars: bool) {
    let ctx = format!("seed {seed}, seq_vars {seq_vars}, {c:?}");
    let x = inputs(c, seed);
    let vars: Vec<Var> = x
        .candle
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: [CTensor; 5] = std::array::from_fn(|i| {
        if i >= 3 || seq_vars {
            vars[i].as_tensor().clone()
        } else {
            x.candle[i].clone()
        }
    });
    let o = run(c, &ts).unwrap_or_else(|e| panic!("{ctx}: forward: {e}"));
    // d loss / d o = d_o.
    let loss = (o * to_candle(&x.d_o)).unwrap().sum_all().unwrap();
    let grads = loss
        .backward()
        .unwrap_or_else(|e| panic!("{ctx}: backward: {e}"));
    let (seq, pre) = our_bwd(c, &x.ours, &x.d_o, !seq_vars);
    let names = ["dq", "dk", "dv", "dk_pre", "dv_pre"];
    for i in 0..5 {
        let got = grads.get(vars[i].as_tensor());
        let want = match (i, &seq) {
            (0..3, Some(s)) => &s[i],
            (0..3, None) => {
                assert!(got.is_none(), "{ctx}: {} without a Var", names[i]);
                continue;
            }
            _ => &pre[i - 3],
        };
        let got = got.unwrap_or_else(|| panic!("{ctx}: no {}", names[i]));
        assert_eq!(got.dims(), want.dims(), "{ctx}: {} dims", names[i]);
        assert_eq!(
            got.dtype(),
            x.candle[i].dtype(),
            "{ctx}: {} dtype",
            names[i]
        );
        // The prefix gradients are f32 sums rounded once to the prefix's dtype; candle adds
        // each gradient to a zero tensor, so compare values (+0 and -0 are equal).
        let want: Vec<f32> = want
            .to_f32_vec()
            .iter()
            .map(|&w| c.dtype.round_f32(w))
            .collect();
        assert_eq!(f32s(got), want, "{ctx}: {} differs", names[i]);
    }
}

fn padded(mut c: Case) -> Case {
    c.opts.seqlen_q = Some((0..c.batch).map(|b| (c.tq - b % c.tq) as i32).collect());
    c.opts.seqlen_k = Some(
        (0..c.batch)
            .map(|b| (c.tk - (2 * b) % c.tk) as i32)
            .collect(),
    );
    c
}

fn cases(dtype: DType) -> Vec<Case> {
    let mut v = Vec::new();
    // Plain, prefix 0 for every sequence.
    v.push(Case::new(2, 5, 5, (2, 2), 16));
    // GQA, causal decode-like (Tq < Tk), mixed prefixes and -1, a custom scale.
    let mut c = Case::new(3, 2, 7, (4, 2), 8);
    c.num_prefixes = 3;
    c.prefix_len = 4;
    c.opts = PrefixAttnOpts {
        softmax_scale: Some(0.3),
        causal: true,
        prefix_index: Some(vec![2, -1, 0]),
        ..Default::default()
    };
    v.push(c);
    // Padding through seqlens, causal, MQA, mixed prefixes.
    let mut c = padded(Case::new(4, 6, 6, (3, 1), 32));
    c.opts.causal = true;
    c.opts.prefix_index = Some(vec![1, 0, -1, 1]);
    v.push(c);
    v.iter_mut().for_each(|c| c.dtype = dtype);
    v
}

#[test]
fn forward_matches_cpu_api_and_oracle_f32() {
    for (i, c) in cases(DType::F32).iter().enumerate() {
        check_forward(c, 0xca_0100 + i as u64);
    }
}

#[test]
fn forward_matches_cpu_api_and_oracle_f16_bf16() {
    for dtype in [DType::F16, DType::BF16] {
        for (i, c) in cases(dtype).iter().enumerate() {
            check_forward(c, 0xca_0200 + i as u64);
        }
    }
}

#[test]
fn backward_matches_cpu_api() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (i, c) in cases(dtype).iter().enumerate() {
            check_backward(c, 0xca_0300 + i as u64, true);
            check_backward(c, 0xca_0400 + i as u64, false);
        }
    }
}

/// `o.sum_all().backward()` hands the op a broadcast output gradient (all strides 0): the
/// op makes it contiguous, and the gradients are the CPU API's for `d_o = 1`.
#[test]
fn backward_of_a_plain_sum() {
    let mut c = padded(Case::new(2, 4, 4, (2, 1), 8));
    c.opts.causal = true;
    c.opts.prefix_index = Some(vec![1, -1]);
    let x = inputs(&c, 0xca_0800);
    let vars: Vec<Var> = x
        .candle
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: [CTensor; 5] = std::array::from_fn(|i| vars[i].as_tensor().clone());
    let grads = run(&c, &ts).unwrap().sum_all().unwrap().backward().unwrap();
    let ones = Tensor::from_f32(
        &c.q_dims(),
        &vec![1.0; c.q_dims().iter().product()],
        c.dtype,
    )
    .unwrap();
    let (seq, pre) = our_bwd(&c, &x.ours, &ones, false);
    let seq = seq.unwrap();
    let want = [&seq[0], &seq[1], &seq[2], &pre[0], &pre[1]];
    for i in 0..5 {
        assert_eq!(
            f32s(grads.get(vars[i].as_tensor()).unwrap()),
            want[i].to_f32_vec(),
            "input {i}"
        );
    }
}

/// Two calls that share the prefix table (two layers' worth of sequences, say): candle adds
/// their prefix gradients, and each call's q gets its own gradient.
#[test]
fn two_calls_sharing_a_prefix() {
    let mut c = Case::new(3, 4, 4, (2, 2), 8);
    c.opts.prefix_index = Some(vec![0, 1, 0]);
    let (x1, mut x2) = (inputs(&c, 0xca_0900), inputs(&c, 0xca_0901));
    // The second call uses the first call's prefix table.
    x2.ours[3] = x1.ours[3].clone();
    x2.ours[4] = x1.ours[4].clone();
    let kp = Var::from_tensor(&x1.candle[3]).unwrap();
    let vp = Var::from_tensor(&x1.candle[4]).unwrap();
    let (q1, q2) = (
        Var::from_tensor(&x1.candle[0]).unwrap(),
        Var::from_tensor(&x2.candle[0]).unwrap(),
    );
    let call = |q: &CTensor, x: &Inputs| {
        prefix_attn(q, &x.candle[1], &x.candle[2], &kp, &vp, &c.opts).unwrap()
    };
    let loss = |o: CTensor, x: &Inputs| (o * to_candle(&x.d_o)).unwrap().sum_all().unwrap();
    let total = (loss(call(&q1, &x1), &x1) + loss(call(&q2, &x2), &x2)).unwrap();
    let grads = total.backward().unwrap();
    let (s1, p1) = our_bwd(&c, &x1.ours, &x1.d_o, false);
    let (s2, p2) = our_bwd(&c, &x2.ours, &x2.d_o, false);
    assert_eq!(f32s(grads.get(&q1).unwrap()), s1.unwrap()[0].to_f32_vec());
    assert_eq!(f32s(grads.get(&q2).unwrap()), s2.unwrap()[0].to_f32_vec());
    for (i, var) in [(0, &kp), (1, &vp)] {
        let want: Vec<f32> = p1[i]
            .to_f32_vec()
            .iter()
            .zip(p2[i].to_f32_vec())
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(f32s(grads.get(var).unwrap()), want, "prefix gradient {i}");
    }
}

/// Strided inputs are read in place: q, k, v out of one fused `qkv [B, T, 3, H, D]` and the
/// prefix out of a PEFT-layout `[P, 2, H, D]` table give what the contiguous copies give;
/// an input whose last dimension is strided (a transpose) is copied first, same result.
#[test]
fn strided_inputs_match_contiguous() {
    let (b, t, h, d, p) = (2, 5, 3, 8, 4);
    let mut rng = Rng::new(0xca_0500);
    let qkv = to_candle(&random(&mut rng, &[b, t, 3, h, d], DType::F32));
    let pre = to_candle(&random(&mut rng, &[p, 2, h, d], DType::F32));
    let pick =
        |x: &CTensor, dim: usize, i: usize| x.narrow(dim, i, 1).unwrap().squeeze(dim).unwrap();
    let (q, k, v) = (pick(&qkv, 2, 0), pick(&qkv, 2, 1), pick(&qkv, 2, 2));
    let (kp, vp) = (
        pick(&pre, 1, 0).unsqueeze(0).unwrap(),
        pick(&pre, 1, 1).unsqueeze(0).unwrap(),
    );
    assert!(!q.is_contiguous() && !kp.is_contiguous());
    let opts = PrefixAttnOpts {
        causal: true,
        ..Default::default()
    };
    let strided = prefix_attn(&q, &k, &v, &kp, &vp, &opts).unwrap();
    let cont = |x: &CTensor| x.contiguous().unwrap();
    let want = prefix_attn(
        &cont(&q),
        &cont(&k),
        &cont(&v),
        &cont(&kp),
        &cont(&vp),
        &opts,
    )
    .unwrap();
    assert_eq!(bits(&strided), bits(&want));
    // q stored [B, T, D, H] and transposed: its last dimension has stride H.
    let q_t = cont(&q.transpose(2, 3).unwrap()).transpose(2, 3).unwrap();
    assert_eq!(q_t.stride()[3], h);
    let got = prefix_attn(&q_t, &k, &v, &kp, &vp, &opts).unwrap();
    assert_eq!(bits(&got), bits(&want));
}

/// Central differences of the candle forward (f32, a tiny shape) against the candle
/// backward, for every element of all five inputs.
#[test]
fn backward_matches_finite_differences() {
    let mut c = Case::new(2, 3, 3, (2, 1), 4);
    c.prefix_len = 2;
    c.opts = PrefixAttnOpts {
        causal: true,
        prefix_index: Some(vec![1, 0]),
        seqlen_q: Some(vec![3, 2]),
        seqlen_k: Some(vec![3, 3]),
        ..Default::default()
    };
    let x = inputs(&c, 0xca_0600);
    let w = f32s(&to_candle(&x.d_o));
    let loss = |t: &[CTensor; 5]| -> f64 {
        let o = f32s(&run(&c, t).unwrap());
        o.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let vars: Vec<Var> = x
        .candle
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: [CTensor; 5] = std::array::from_fn(|i| vars[i].as_tensor().clone());
    let o = run(&c, &ts).unwrap();
    let grads = (o * to_candle(&x.d_o))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // h = 1e-2: the truncation error (~h² · |f'''|) and f32 rounding of the loss
    // (~1e-7 / h) both stay near 1e-4, well under the tolerance.
    let h = 1e-2f32;
    for i in 0..5 {
        let analytic = f32s(grads.get(vars[i].as_tensor()).unwrap());
        let base = f32s(&x.candle[i]);
        let dims = x.candle[i].dims().to_vec();
        for (e, &g) in analytic.iter().enumerate() {
            let at = |delta: f32| {
                let mut vals = base.clone();
                vals[e] += delta;
                let mut t = x.candle.clone();
                t[i] = CTensor::from_vec(vals, dims.clone(), &CPU).unwrap();
                loss(&t)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            assert!(
                (fd - g as f64).abs() <= 2e-3 * (1.0 + fd.abs()),
                "input {i} element {e}: finite difference {fd}, backward {g}"
            );
        }
    }
}

fn err_of(r: candle_core::Result<CTensor>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_arguments_give_errors_naming_them() {
    let c = Case::new(2, 3, 3, (2, 2), 8);
    let x = inputs(&c, 0xca_0700);
    let [q, k, v, kp, vp] = &x.candle;
    let call = |q: &CTensor, k: &CTensor, v: &CTensor, kp: &CTensor, vp: &CTensor| {
        prefix_attn(q, k, v, kp, vp, &c.opts)
    };
    let zeros =
        |dims: &[usize]| CTensor::zeros(dims.to_vec(), candle_core::DType::F32, &CPU).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("q", err_of(call(&q.flatten_from(2).unwrap(), k, v, kp, vp))),
        ("k", err_of(call(q, &zeros(&[2, 3, 2, 4]), v, kp, vp))),
        ("v", err_of(call(q, k, &zeros(&[2, 4, 2, 8]), kp, vp))),
        ("k_pre", err_of(call(q, k, v, &zeros(&[2, 3, 1, 8]), vp))),
        ("v_pre", err_of(call(q, k, v, kp, &zeros(&[2, 4, 2, 8])))),
        (
            "k",
            err_of(call(
                q,
                &k.to_dtype(candle_core::DType::F16).unwrap(),
                v,
                kp,
                vp,
            )),
        ),
        (
            "q",
            err_of(call(
                &q.to_dtype(candle_core::DType::F64).unwrap(),
                k,
                v,
                kp,
                vp,
            )),
        ),
        (
            "prefix_index",
            err_of(prefix_attn(
                q,
                k,
                v,
                kp,
                vp,
                &PrefixAttnOpts {
                    prefix_index: Some(vec![0, 2]),
                    ..Default::default()
                },
            )),
        ),
        (
            "seqlen_q",
            err_of(prefix_attn(
                q,
                k,
                v,
                kp,
                vp,
                &PrefixAttnOpts {
                    seqlen_q: Some(vec![1]),
                    seqlen_k: Some(vec![1, 1]),
                    ..Default::default()
                },
            )),
        ),
    ];
    for (arg, msg) in cases {
        assert!(
            msg.starts_with(&format!("{arg}:")),
            "error should name {arg}: {msg}"
        );
    }
}
