//! The candle op's CUDA path (feature `candle-cuda`) on a real GPU: forward and backward on
//! candle CUDA tensors against the candle op's CPU path and the f64 oracle (the tolerance rule
//! of docs/ARCHITECTURE.md §5), on candle's default device (the per-thread stream) and on a
//! device with a stream of its own, strided inputs read in place, and the errors of inputs the
//! CUDA kernels do not take. Like `tests/gpu.rs` this binary has its own harness, so that a run
//! without a GPU *shows* the skip; `PREFIX_ATTN_REQUIRE_GPU=1` turns a skip into a failure.
//!
//! Built only with `--features candle-cuda` (`required-features`), which links the CUDA
//! libraries: `scripts/gpu-check.sh build` builds it and `run` runs it on the GPU machine.

mod common;

use candle_core::{Device as CDevice, Tensor as CTensor, Var};
use common::candle as cc;
use common::{max_abs, max_err, within_rule};
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::{AttnFwdArgs, Meta};
use prefix_attn::candle::{prefix_attn, prefix_attn_with_lse, PrefixAttnOpts};
use prefix_attn::device::cuda::{device_count, loaded_libraries};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

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
    /// q, k, v as strided views of one `qkv [B, T, 3, H, D]` (needs `tq == tk`,
    /// `heads_q == heads_kv`), read in place by the CUDA kernels.
    fused_qkv: bool,
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
            prefix_len: 5,
            dtype: DType::F16,
            opts: PrefixAttnOpts::default(),
            fused_qkv: false,
        }
    }
    fn q_dims(&self) -> Vec<usize> {
        vec![self.batch, self.tq, self.heads_q, self.head_dim]
    }
    fn k_dims(&self) -> Vec<usize> {
        vec![self.batch, self.tk, self.heads_kv, self.head_dim]
    }
    fn pre_dims(&self) -> Vec<usize> {
        vec![
            self.num_prefixes,
            self.prefix_len,
            self.heads_kv,
            self.head_dim,
        ]
    }
}

/// One case's inputs: the crate's host tensors (for the oracle), the same values as candle
/// CPU and CUDA tensors, and an output gradient.
struct Inputs {
    ours: [Tensor; 5],
    cpu: [CTensor; 5],
    gpu: [CTensor; 5],
    d_o: Tensor,
}

fn inputs(c: &Case, gpu: &CDevice, seed: u64) -> Result<Inputs, String> {
    let e = |e: candle_core::Error| e.to_string();
    let mut rng = Rng::new(seed);
    let (mut cpu, mut gpu_t) = (Vec::new(), Vec::new());
    if c.fused_qkv {
        assert!(c.tq == c.tk && c.heads_q == c.heads_kv);
        let (b, t, h, d) = (c.batch, c.tq, c.heads_q, c.head_dim);
        let qkv = cc::to_candle(&cc::random(&mut rng, &[b, t, 3, h, d], c.dtype));
        let qkv_gpu = qkv.to_device(gpu).map_err(e)?;
        for i in 0..3 {
            let pick = |x: &CTensor| x.narrow(2, i, 1).and_then(|x| x.squeeze(2));
            cpu.push(pick(&qkv).map_err(e)?);
            gpu_t.push(pick(&qkv_gpu).map_err(e)?);
        }
    } else {
        for dims in [c.q_dims(), c.k_dims(), c.k_dims()] {
            let t = cc::to_candle(&cc::random(&mut rng, &dims, c.dtype));
            gpu_t.push(t.to_device(gpu).map_err(e)?);
            cpu.push(t);
        }
    }
    for _ in 0..2 {
        let t = cc::to_candle(&cc::random(&mut rng, &c.pre_dims(), c.dtype));
        gpu_t.push(t.to_device(gpu).map_err(e)?);
        cpu.push(t);
    }
    let d_o = cc::random(&mut rng, &c.q_dims(), c.dtype);
    // The host copies the oracle reads: contiguous, the same values.
    let ours: Vec<Tensor> = cpu
        .iter()
        .map(|t| {
            let vals = cc::f32s(t);
            Tensor::from_f32(t.dims(), &vals, c.dtype).unwrap()
        })
        .collect();
    let arr = |v: Vec<CTensor>| -> [CTensor; 5] { v.try_into().unwrap() };
    Ok(Inputs {
        ours: ours.try_into().unwrap(),
        cpu: arr(cpu),
        gpu: arr(gpu_t),
        d_o,
    })
}

/// The oracle of a case.
fn dense(c: &Case, t: &[Tensor; 5]) -> Dense {
    let o = &c.opts;
    let mut a = AttnFwdArgs::new(t[0].view(), t[1].view(), t[2].view())
        .prefix(t[3].view(), t[4].view())
        .causal(o.causal);
    a.scale = o.softmax_scale;
    a.prefix_index = o.prefix_index.as_deref().map(Meta::Host);
    a.seqlen_q = o.seqlen_q.as_deref().map(Meta::Host);
    a.seqlen_k = o.seqlen_k.as_deref().map(Meta::Host);
    Dense::from_args(&a).unwrap()
}

/// The CUDA values `got` within the tolerance rule of the oracle (`exact`, with the naive
/// implementation's error `naive`), and within twice that bound of the candle CPU path's
/// values `cpu`: each path is within the rule of the oracle, so they differ by at most twice
/// its bound.
fn compare(
    name: &str,
    got: &[f64],
    cpu: &[f64],
    exact: &[f64],
    naive: f64,
    dtype: DType,
) -> Result<(), String> {
    let scale = max_abs(exact);
    within_rule(name, max_err(got, exact), naive, scale, dtype)?;
    within_rule(
        &format!("{name} against the CPU path"),
        max_err(got, cpu),
        2.0 * naive,
        scale,
        dtype,
    )
}

/// The gradients of `sum(o * d_o)` with respect to the five inputs (q, k, v only when
/// `seq_vars`; the prefix table always), through candle's `backward()`.
fn grads(
    c: &Case,
    ins: &[CTensor; 5],
    d_o: &CTensor,
    seq_vars: bool,
) -> Result<(CTensor, Vec<Option<CTensor>>), String> {
    let e = |e: candle_core::Error| e.to_string();
    let vars: Vec<Option<Var>> = ins
        .iter()
        .enumerate()
        .map(|(i, t)| (i >= 3 || seq_vars).then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let ts: Vec<CTensor> = (0..5)
        .map(|i| match &vars[i] {
            Some(v) => v.as_tensor().clone(),
            None => ins[i].clone(),
        })
        .collect();
    let o = prefix_attn(&ts[0], &ts[1], &ts[2], &ts[3], &ts[4], &c.opts).map_err(e)?;
    let store = (&o * d_o)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(e)?;
    let got = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| store.get(v.as_tensor()).cloned()))
        .collect();
    Ok((o, got))
}

/// Forward and backward of one case on `gpu`, against the candle CPU path and the oracle.
fn run_case(c: &Case, gpu: &CDevice, seed: u64) -> Result<(), String> {
    let e = |e: candle_core::Error| e.to_string();
    let x = inputs(c, gpu, seed)?;
    let [q, k, v, kp, vp] = &x.gpu;
    let (o, lse) = prefix_attn_with_lse(q, k, v, kp, vp, &c.opts).map_err(e)?;
    let [qc, kc, vc, kpc, vpc] = &x.cpu;
    let (o_cpu, lse_cpu) = prefix_attn_with_lse(qc, kc, vc, kpc, vpc, &c.opts).map_err(e)?;
    if o.dims() != o_cpu.dims() || o.dtype() != o_cpu.dtype() || !o.device().is_cuda() {
        return Err(format!(
            "o: {:?} {:?} on {:?}, the CPU path gives {:?} {:?}",
            o.dims(),
            o.dtype(),
            o.device().location(),
            o_cpu.dims(),
            o_cpu.dtype()
        ));
    }
    if lse.dims() != lse_cpu.dims() || !lse.device().is_cuda() {
        return Err(format!(
            "lse: {:?} on {:?}",
            lse.dims(),
            lse.device().location()
        ));
    }
    let dense = dense(c, &x.ours);
    let exact = dense.forward(Precision::Exact);
    let lowp = dense.forward(Precision::Round(c.dtype));
    compare(
        "o",
        &cc::f64s(&o),
        &cc::f64s(&o_cpu),
        &exact.o,
        max_err(&lowp.o, &exact.o),
        c.dtype,
    )?;
    // The LSE is f32 in every dtype; the naive LSE is rounded to f32 too.
    compare(
        "lse",
        &cc::f64s(&lse),
        &cc::f64s(&lse_cpu),
        &exact.lse,
        max_err(&lowp.lse, &exact.lse).max(max_abs(&exact.lse) * 1.2e-7),
        DType::F32,
    )?;

    // Backward: d loss / d o = d_o.
    let d_o64 = common::f64s(&x.d_o);
    let d_o_cpu = cc::to_candle(&x.d_o);
    let d_o_gpu = d_o_cpu.to_device(gpu).map_err(e)?;
    let want = dense.backward(&d_o64, Precision::Exact);
    let naive = dense.backward(&d_o64, Precision::Round(c.dtype));
    let names = ["dq", "dk", "dv", "dk_pre", "dv_pre"];
    let exact_g = [&want.dq, &want.dk, &want.dv, &want.dk_pre, &want.dv_pre];
    let naive_g = [
        &naive.dq,
        &naive.dk,
        &naive.dv,
        &naive.dk_pre,
        &naive.dv_pre,
    ];
    for seq_vars in [true, false] {
        let (o_g, got) = grads(c, &x.gpu, &d_o_gpu, seq_vars)?;
        let (_, cpu) = grads(c, &x.cpu, &d_o_cpu, seq_vars)?;
        // The best any backward can do from the stored (rounded) o: exact math from its
        // actual inputs, rounded once to the gradients' dtype (the prefix gradients are f32
        // sums rounded once to the prefix's dtype).
        let from_o = dense.backward_with_o(&d_o64, &cc::f64s(&o_g), Precision::Exact);
        let best = [
            &from_o.dq,
            &from_o.dk,
            &from_o.dv,
            &from_o.dk_pre,
            &from_o.dv_pre,
        ];
        for i in 0..5 {
            let ctx = format!("seq_vars {seq_vars}: {}", names[i]);
            let (g, g_cpu) = match (&got[i], &cpu[i]) {
                (Some(g), Some(g_cpu)) => (g, g_cpu),
                (None, None) if i < 3 && !seq_vars => continue,
                (g, g_cpu) => {
                    return Err(format!(
                        "{ctx}: CUDA gradient present {}, CPU path's {}",
                        g.is_some(),
                        g_cpu.is_some()
                    ))
                }
            };
            if g.dims() != g_cpu.dims() || g.dtype() != g_cpu.dtype() || !g.device().is_cuda() {
                return Err(format!(
                    "{ctx}: {:?} {:?} on {:?}, the CPU path's {:?} {:?}",
                    g.dims(),
                    g.dtype(),
                    g.device().location(),
                    g_cpu.dims(),
                    g_cpu.dtype()
                ));
            }
            let rounded: Vec<f64> = best[i]
                .iter()
                .map(|&v| c.dtype.round_f32(v as f32) as f64)
                .collect();
            let naive_err = max_err(naive_g[i], exact_g[i]).max(max_err(&rounded, exact_g[i]));
            compare(
                &ctx,
                &cc::f64s(g),
                &cc::f64s(g_cpu),
                exact_g[i],
                naive_err,
                c.dtype,
            )?;
        }
    }
    Ok(())
}

fn padded(mut c: Case) -> Case {
    c.opts.seqlen_q = Some((0..c.batch).map(|b| (c.tq - 3 * b % c.tq) as i32).collect());
    c.opts.seqlen_k = Some(
        (0..c.batch)
            .map(|b| (c.tk - (5 * b) % c.tk) as i32)
            .collect(),
    );
    c
}

/// The cases, each in f16 and bf16.
fn cases() -> Vec<(String, Case)> {
    let mut v = Vec::new();
    // Plain, prefix 0 for every sequence, several query tiles.
    v.push(("plain".to_string(), Case::new(2, 70, 70, (4, 4), 64)));
    // GQA, causal decode-like (Tq < Tk), mixed prefixes and -1, a custom scale, D = 128.
    let mut c = Case::new(3, 5, 40, (8, 2), 128);
    c.num_prefixes = 3;
    c.prefix_len = 16;
    c.opts = PrefixAttnOpts {
        softmax_scale: Some(0.1),
        causal: true,
        prefix_index: Some(vec![2, -1, 0]),
        ..Default::default()
    };
    v.push(("gqa causal decode".to_string(), c));
    // Padding through seqlens, causal, MQA, mixed prefixes.
    let mut c = padded(Case::new(4, 33, 33, (4, 1), 64));
    c.num_prefixes = 2;
    c.prefix_len = 7;
    c.opts.causal = true;
    c.opts.prefix_index = Some(vec![1, 0, -1, 1]);
    v.push(("padded mqa causal".to_string(), c));
    // q, k, v strided out of a fused qkv, read in place.
    let mut c = Case::new(2, 48, 48, (4, 4), 128);
    c.fused_qkv = true;
    c.opts.causal = true;
    v.push(("fused qkv".to_string(), c));
    let mut out = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for (name, c) in &v {
            let mut c = c.clone();
            c.dtype = dtype;
            out.push((format!("{name} {}", dtype.name()), c));
        }
    }
    out
}

/// Inputs the CUDA path does not take give errors that name them.
fn bad_inputs(gpu: &CDevice) -> Result<(), String> {
    let e = |e: candle_core::Error| e.to_string();
    let t = |dims: &[usize], dt: candle_core::DType, dev: &CDevice| {
        CTensor::zeros(dims.to_vec(), dt, dev).map_err(e)
    };
    let f16 = candle_core::DType::F16;
    let opts = PrefixAttnOpts::default();
    let call = |q: &CTensor, k: &CTensor, kp: &CTensor| prefix_attn(q, k, k, kp, kp, &opts);
    let q = t(&[2, 3, 2, 64], f16, gpu)?;
    let kp = t(&[1, 4, 2, 64], f16, gpu)?;
    let cases: Vec<(&str, &str, candle_core::Result<CTensor>)> = vec![
        (
            "q",
            "f16 or bf16",
            call(
                &q.to_dtype(candle_core::DType::F32).map_err(e)?,
                &q.to_dtype(candle_core::DType::F32).map_err(e)?,
                &kp.to_dtype(candle_core::DType::F32).map_err(e)?,
            ),
        ),
        (
            "q",
            "head dim",
            call(
                &t(&[2, 3, 2, 32], f16, gpu)?,
                &t(&[2, 3, 2, 32], f16, gpu)?,
                &t(&[1, 4, 2, 32], f16, gpu)?,
            ),
        ),
        (
            "k",
            "one device",
            call(&q, &t(&[2, 3, 2, 64], f16, &CDevice::Cpu)?, &kp),
        ),
        ("k", "", call(&q, &t(&[2, 3, 2, 32], f16, gpu)?, &kp)),
    ];
    for (arg, what, r) in cases {
        match r {
            Ok(_) => return Err(format!("expected an error naming {arg} ({what})")),
            Err(err) => {
                let msg = err.to_string();
                if !msg.starts_with(&format!("{arg}:")) || !msg.contains(what) {
                    return Err(format!("error should name {arg} and say {what:?}: {msg}"));
                }
            }
        }
    }
    Ok(())
}

fn main() {
    let require = std::env::var("PREFIX_ATTN_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if device_count() == 0 {
        println!("candle CUDA tests: SKIPPED (no CUDA device or driver on this machine)");
        if require {
            println!("PREFIX_ATTN_REQUIRE_GPU=1: failing because no GPU is present");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
        println!("0 passed, 0 failed, 1 skipped");
        return;
    }
    let devices = match CDevice::new_cuda(0).and_then(|d| {
        let own = candle_core::CudaDevice::new_with_stream(0)?;
        Ok((d, CDevice::Cuda(own)))
    }) {
        Ok(d) => d,
        Err(e) => {
            println!("FAILED to open candle's cuda:0: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let (passed, failed) = run_all(&devices);
    println!("libraries loaded: {}", loaded_libraries().join(", "));
    println!("candle op on CUDA vs its CPU path and the f64 oracle on cuda:0");
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// A named test of this harness.
type Test = (String, Box<dyn Fn() -> Result<(), String>>);

fn run_all((default, own_stream): &(CDevice, CDevice)) -> (usize, usize) {
    let mut tests: Vec<Test> = Vec::new();
    for (i, (name, c)) in cases().into_iter().enumerate() {
        let seed = 0xcc_0100 + i as u64;
        let dev = default.clone();
        tests.push((name, Box::new(move || run_case(&c, &dev, seed))));
    }
    // The same op on a device with a stream of its own (not the per-thread default stream).
    let (_, plain) = cases().swap_remove(0);
    let dev = own_stream.clone();
    tests.push((
        "plain f16, device with its own stream".into(),
        Box::new(move || run_case(&plain, &dev, 0xcc_0200)),
    ));
    let dev = default.clone();
    tests.push((
        "bad inputs name the argument".into(),
        Box::new(move || bad_inputs(&dev)),
    ));
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        // A panic in one case must not hide the others.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test))
            .unwrap_or_else(|_| Err("panicked (message above)".into()));
        match res {
            Ok(()) => {
                passed += 1;
                println!("ok {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {name}: {e}");
            }
        }
    }
    (passed, failed)
}
