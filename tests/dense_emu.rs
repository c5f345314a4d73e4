//! The dense GPT-2 kernels (kernels/dense.cu) on the CPU emulator against the cpu backend on
//! random shapes and values, in f16, bf16 and f32 storage; the half-precision training path
//! (model, encoder, optimiser, generation) on the emu device against the Hugging Face + PEFT
//! fixture `tiny-c`, and against the cpu backend.

mod common;

use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::emu::{dense_params_layout, EmuBackend};
use prefix_attn::device::{dense, AdamWStep, Backend, MatmulOpts};
use prefix_attn::gpt2::Gpt2;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

const CPU: CpuBackend = CpuBackend;
const EMU: EmuBackend = EmuBackend;

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * scale).collect()
}

/// A tensor of `dtype` holding `data` rounded, and the f32 tensor of the rounded values (what
/// the cpu reference sees).
fn pair(shape: &[usize], data: &[f32], dtype: DType) -> (Tensor, Tensor) {
    let t = Tensor::from_f32(shape, data, dtype).unwrap();
    let f = Tensor::from_f32(shape, &t.to_f32_vec(), DType::F32).unwrap();
    (t, f)
}

/// Storage rounding of `dtype` relative to the value (0 for f32).
fn ulp(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
        _ => 0.0,
    }
}

/// |emu - cpu| ≤ rel · |cpu| + abs for every element; NaN fails.
fn close(what: &str, got: &Tensor, want: &Tensor, rel: f32, abs: f32) {
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    assert_eq!(g.len(), w.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs();
        assert!(
            d <= rel * b.abs() + abs,
            "{what}: element {i}: emu {a} vs cpu {b} (|d| = {d:e}, allowed {})",
            rel * b.abs() + abs
        );
        worst = worst.max(d);
    }
    assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    eprintln!("{what}: max |emu - cpu| = {worst:.3e}");
}

const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

#[test]
fn dense_params_struct_matches_the_kernels() {
    assert_eq!(dense_params_layout(), dense::params_rust_layout());
}

#[test]
fn layernorm_forward_and_backward_match_cpu() {
    let mut rng = Rng::new(11);
    for (case, &(m, c)) in [(1usize, 64usize), (7, 128), (37, 96), (5, 33)]
        .iter()
        .enumerate()
    {
        for dt in DTYPES {
            let x = random(&mut rng, m * c, 2.0)
                .iter()
                .map(|v| v + 0.5)
                .collect::<Vec<_>>();
            let (xh, xf) = pair(&[m, c], &x, dt);
            let (wh, wf) = pair(&[c], &random(&mut rng, c, 1.0), dt);
            let (bh, bf) = pair(&[c], &random(&mut rng, c, 1.0), dt);
            let mut out = Tensor::from_f32(&[m, c], &vec![f32::NAN; m * c], dt).unwrap();
            let mut mean = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
            let mut rstd = mean.clone();
            EMU.layernorm(
                &xh.view(),
                &wh.view(),
                &bh.view(),
                1e-5,
                &mut out.view_mut(),
                &mut mean.view_mut(),
                &mut rstd.view_mut(),
            )
            .unwrap();
            let mut out_c = Tensor::zeros(&[m, c], DType::F32).unwrap();
            let mut mean_c = Tensor::zeros(&[m], DType::F32).unwrap();
            let mut rstd_c = mean_c.clone();
            CPU.layernorm(
                &xf.view(),
                &wf.view(),
                &bf.view(),
                1e-5,
                &mut out_c.view_mut(),
                &mut mean_c.view_mut(),
                &mut rstd_c.view_mut(),
            )
            .unwrap();
            let u = ulp(dt);
            close(&format!("layernorm {case} {dt} out"), &out, &out_c, u, 1e-4);
            close(
                &format!("layernorm {case} {dt} mean"),
                &mean,
                &mean_c,
                1e-5,
                1e-5,
            );
            close(
                &format!("layernorm {case} {dt} rstd"),
                &rstd,
                &rstd_c,
                1e-5,
                1e-5,
            );

            // Backward, overwriting and accumulating.
            let (dyh, dyf) = pair(&[m, c], &random(&mut rng, m * c, 1.0), dt);
            for acc in [false, true] {
                let init = random(&mut rng, m * c, 1.0);
                let (mut dx, dx0) = pair(&[m, c], &init, dt);
                let mut dx_c = dx0.clone();
                EMU.layernorm_bwd(
                    &dyh.view(),
                    &xh.view(),
                    &wh.view(),
                    &mean.view(),
                    &rstd.view(),
                    &mut dx.view_mut(),
                    acc,
                )
                .unwrap();
                CPU.layernorm_bwd(
                    &dyf.view(),
                    &xf.view(),
                    &wf.view(),
                    &mean_c.view(),
                    &rstd_c.view(),
                    &mut dx_c.view_mut(),
                    acc,
                )
                .unwrap();
                close(
                    &format!("layernorm_bwd {case} {dt} acc={acc}"),
                    &dx,
                    &dx_c,
                    u.max(1e-5),
                    1e-3,
                );
            }
        }
    }
}

#[test]
fn elementwise_kernels_match_cpu() {
    let mut rng = Rng::new(12);
    for &n in &[1usize, 255, 4096 + 17, 70_000] {
        for dt in DTYPES {
            let u = ulp(dt);
            let (xh, xf) = pair(&[n, 1], &random(&mut rng, n, 2.5), dt);
            let (dyh, dyf) = pair(&[n, 1], &random(&mut rng, n, 1.0), dt);
            let mut o = Tensor::from_f32(&[n, 1], &vec![f32::NAN; n], dt).unwrap();
            let mut oc = Tensor::zeros(&[n, 1], DType::F32).unwrap();
            EMU.gelu(&xh.view(), &mut o.view_mut()).unwrap();
            CPU.gelu(&xf.view(), &mut oc.view_mut()).unwrap();
            close(&format!("gelu n={n} {dt}"), &o, &oc, u.max(2e-6), 2e-6);
            EMU.gelu_bwd(&xh.view(), &dyh.view(), &mut o.view_mut())
                .unwrap();
            CPU.gelu_bwd(&xf.view(), &dyf.view(), &mut oc.view_mut())
                .unwrap();
            // gelu' cancels (1 + tanh) for negative x: f32 noise of ~1e-6 against |dy| ~ 1.
            close(&format!("gelu_bwd n={n} {dt}"), &o, &oc, u.max(2e-6), 1e-5);
            EMU.tanh(&xh.view(), &mut o.view_mut()).unwrap();
            CPU.tanh(&xf.view(), &mut oc.view_mut()).unwrap();
            close(&format!("tanh n={n} {dt}"), &o, &oc, u.max(2e-6), 2e-6);
            // tanh_bwd takes y = tanh(x).
            let (yh, yf) = pair(&[n, 1], &oc.to_f32_vec(), dt);
            EMU.tanh_bwd(&yh.view(), &dyh.view(), &mut o.view_mut())
                .unwrap();
            CPU.tanh_bwd(&yf.view(), &dyf.view(), &mut oc.view_mut())
                .unwrap();
            close(&format!("tanh_bwd n={n} {dt}"), &o, &oc, u.max(2e-6), 2e-6);

            // Residual add, axpy, scale.
            let base = random(&mut rng, n, 1.0);
            let (mut a, af) = pair(&[n, 1], &base, dt);
            let mut ac = af.clone();
            EMU.add_assign(&mut a.view_mut(), &xh.view()).unwrap();
            CPU.add_assign(&mut ac.view_mut(), &xf.view()).unwrap();
            close(&format!("add_assign n={n} {dt}"), &a, &ac, u, 1e-6);
            let (mut a, af) = pair(&[n, 1], &base, dt);
            let mut ac = af.clone();
            EMU.axpy(&mut a.view_mut(), -0.37, &xh.view()).unwrap();
            CPU.axpy(&mut ac.view_mut(), -0.37, &xf.view()).unwrap();
            close(&format!("axpy n={n} {dt}"), &a, &ac, u, 1e-6);
            EMU.scale(&mut a.view_mut(), 1.7).unwrap();
            CPU.scale(&mut ac.view_mut(), 1.7).unwrap();
            close(&format!("scale n={n} {dt}"), &a, &ac, 2.0 * u, 1e-6);
        }
    }
}

#[test]
fn rows_copy_embed_and_sum_match_cpu() {
    let mut rng = Rng::new(13);
    for dt in DTYPES {
        let (m, c) = (23, 40);
        let (src, srcf) = pair(&[m, c], &random(&mut rng, m * c, 1.0), dt);
        let rows: Vec<i32> = (0..9).map(|_| rng.below(m as u64) as i32).collect();
        let mut g = Tensor::from_f32(&[9, c], &vec![f32::NAN; 9 * c], dt).unwrap();
        let mut gc = Tensor::zeros(&[9, c], DType::F32).unwrap();
        EMU.gather_rows(&src.view(), &rows, &mut g.view_mut())
            .unwrap();
        CPU.gather_rows(&srcf.view(), &rows, &mut gc.view_mut())
            .unwrap();
        close(&format!("gather_rows {dt}"), &g, &gc, 0.0, 0.0);
        let distinct: Vec<i32> = vec![3, 0, 17, 22, 9];
        let (s5, s5f) = pair(&[5, c], &random(&mut rng, 5 * c, 1.0), dt);
        let mut d = Tensor::from_f32(&[m, c], &vec![f32::NAN; m * c], dt).unwrap();
        let mut dc = Tensor::zeros(&[m, c], DType::F32).unwrap();
        EMU.scatter_rows(&s5.view(), &distinct, &mut d.view_mut())
            .unwrap();
        CPU.scatter_rows(&s5f.view(), &distinct, &mut dc.view_mut())
            .unwrap();
        close(&format!("scatter_rows {dt}"), &d, &dc, 0.0, 0.0);
        assert!(EMU
            .gather_rows(
                &src.view(),
                &[m as i32],
                &mut g.view_mut().narrow(0, 0, 1).unwrap()
            )
            .is_err());

        // Embedding with a position offset.
        let (v, npos, t) = (31, 20, 6);
        let (wte, wtef) = pair(&[v, c], &random(&mut rng, v * c, 1.0), dt);
        let (wpe, wpef) = pair(&[npos, c], &random(&mut rng, npos * c, 1.0), dt);
        let ids: Vec<i32> = (0..3 * t).map(|_| rng.below(v as u64) as i32).collect();
        let mut e = Tensor::from_f32(&[3 * t, c], &vec![f32::NAN; 3 * t * c], dt).unwrap();
        let mut ec = Tensor::zeros(&[3 * t, c], DType::F32).unwrap();
        EMU.embed(&ids, t, &wte.view(), &wpe.view(), 5, &mut e.view_mut())
            .unwrap();
        CPU.embed(&ids, t, &wtef.view(), &wpef.view(), 5, &mut ec.view_mut())
            .unwrap();
        close(&format!("embed {dt}"), &e, &ec, ulp(dt), 0.0);
        let bad = [v as i32; 6];
        assert!(EMU
            .embed(
                &bad,
                t,
                &wte.view(),
                &wpe.view(),
                0,
                &mut e.view_mut().narrow(0, 0, 6).unwrap()
            )
            .is_err());

        // Bias gradients (f32 accumulation).
        let mut sr = Tensor::from_f32(&[c], &vec![1.5; c], DType::F32).unwrap();
        let mut src_c = sr.clone();
        EMU.sum_rows(&src.view(), &mut sr.view_mut(), true).unwrap();
        CPU.sum_rows(&srcf.view(), &mut src_c.view_mut(), true)
            .unwrap();
        close(&format!("sum_rows {dt}"), &sr, &src_c, 1e-6, 1e-5);
    }
    // Strided copy with conversion: the q part of a [B, T, 3, H, D] qkv into a KV-cache slice.
    let (b, t, h, d) = (2, 5, 3, 8);
    let qkv = random(&mut rng, b * t * 3 * h * d, 1.0);
    let q32 = Tensor::from_f32(&[b, t, 3, h, d], &qkv, DType::F32).unwrap();
    let mut cache =
        Tensor::from_f32(&[b, 9, h, d], &vec![f32::NAN; b * 9 * h * d], DType::F16).unwrap();
    let src = q32.view().select(2, 1).unwrap();
    EMU.copy(&src, &mut cache.view_mut().narrow(1, 2, t).unwrap())
        .unwrap();
    let mut want = Tensor::zeros(&[b, t, h, d], DType::F32).unwrap();
    CPU.copy(&src, &mut want.view_mut()).unwrap();
    let mut got = Tensor::zeros(&[b, t, h, d], DType::F32).unwrap();
    CPU.copy(&cache.view().narrow(1, 2, t).unwrap(), &mut got.view_mut())
        .unwrap();
    close("strided copy f32 -> f16", &got, &want, ulp(DType::F16), 0.0);
    // The rest of the cache was not touched.
    let rest = cache.view().narrow(1, 0, 2).unwrap();
    let mut r = vec![0f32; rest.numel()];
    rest.gather_f32(&mut r).unwrap();
    assert!(r.iter().all(|x| x.is_nan()), "copy wrote outside its view");
}

#[test]
fn cross_entropy_matches_cpu_separate_and_in_place() {
    let mut rng = Rng::new(14);
    for &(m, v) in &[(1usize, 7usize), (9, 331), (4, 1000)] {
        for dt in DTYPES {
            let (lh, lf) = pair(&[m, v], &random(&mut rng, m * v, 3.0), dt);
            let targets: Vec<i32> = (0..m)
                .map(|i| {
                    if i % 3 == 1 {
                        -100
                    } else {
                        rng.below(v as u64) as i32
                    }
                })
                .collect();
            let mut loss = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
            let mut loss_c = Tensor::zeros(&[m], DType::F32).unwrap();
            let mut dl = Tensor::from_f32(&[m, v], &vec![f32::NAN; m * v], dt).unwrap();
            let mut dl_c = Tensor::zeros(&[m, v], DType::F32).unwrap();
            EMU.cross_entropy(
                &lh.view(),
                &targets,
                &mut loss.view_mut(),
                Some(&mut dl.view_mut()),
            )
            .unwrap();
            CPU.cross_entropy(
                &lf.view(),
                &targets,
                &mut loss_c.view_mut(),
                Some(&mut dl_c.view_mut()),
            )
            .unwrap();
            close(
                &format!("ce loss m={m} v={v} {dt}"),
                &loss,
                &loss_c,
                1e-5,
                1e-5,
            );
            close(
                &format!("ce dlogits m={m} v={v} {dt}"),
                &dl,
                &dl_c,
                ulp(dt).max(1e-5),
                1e-6,
            );
            // In place: the logits become the gradient.
            let mut inplace = lh.clone();
            let mut loss2 = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
            EMU.cross_entropy_inplace(&mut inplace.view_mut(), &targets, &mut loss2.view_mut())
                .unwrap();
            close(
                &format!("ce in place loss {dt}"),
                &loss2,
                &loss_c,
                1e-5,
                1e-5,
            );
            close(
                &format!("ce in place grad {dt}"),
                &inplace,
                &dl_c,
                ulp(dt).max(1e-5),
                1e-6,
            );
            let mut bad = targets.clone();
            bad[0] = v as i32;
            assert!(EMU
                .cross_entropy(&lh.view(), &bad, &mut loss.view_mut(), None)
                .is_err());
        }
    }
}

#[test]
fn adamw_matches_cpu() {
    let mut rng = Rng::new(15);
    let n = 3000;
    let p0 = random(&mut rng, n, 1.0);
    let (mut p, mut pc) = (
        Tensor::from_f32(&[n], &p0, DType::F32).unwrap(),
        Tensor::from_f32(&[n], &p0, DType::F32).unwrap(),
    );
    let (mut m, mut v) = (
        Tensor::zeros(&[n], DType::F32).unwrap(),
        Tensor::zeros(&[n], DType::F32).unwrap(),
    );
    let (mut mc, mut vc) = (m.clone(), v.clone());
    for step in 1..=4 {
        let g = Tensor::from_f32(&[n], &random(&mut rng, n, 0.1), DType::F32).unwrap();
        let hp = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        EMU.adamw(
            &mut p.view_mut(),
            &g.view(),
            &mut m.view_mut(),
            &mut v.view_mut(),
            hp,
        )
        .unwrap();
        CPU.adamw(
            &mut pc.view_mut(),
            &g.view(),
            &mut mc.view_mut(),
            &mut vc.view_mut(),
            hp,
        )
        .unwrap();
    }
    close("adamw param", &p, &pc, 1e-6, 1e-7);
    close("adamw m", &m, &mc, 1e-6, 1e-9);
    close("adamw v", &v, &vc, 1e-6, 1e-12);
}

#[test]
fn emu_matmul_rounds_once_like_cublas() {
    let mut rng = Rng::new(16);
    let (m, k, n) = (13, 40, 24);
    let (a, af) = pair(&[m, k], &random(&mut rng, m * k, 1.0), DType::F16);
    let (b, bf) = pair(&[n, k], &random(&mut rng, n * k, 1.0), DType::F16);
    let (bias, biasf) = pair(&[n], &random(&mut rng, n, 1.0), DType::F16);
    let mut o = Tensor::zeros(&[m, n], DType::F16).unwrap();
    let mut oc = Tensor::zeros(&[m, n], DType::F32).unwrap();
    EMU.matmul(
        &a.view(),
        &b.view(),
        Some(&bias.view()),
        &mut o.view_mut(),
        MatmulOpts::nt(),
    )
    .unwrap();
    CPU.matmul(
        &af.view(),
        &bf.view(),
        Some(&biasf.view()),
        &mut oc.view_mut(),
        MatmulOpts::nt(),
    )
    .unwrap();
    // One rounding of the f32 result to f16: exactly the rounded cpu value.
    let want = Tensor::from_f32(&[m, n], &oc.to_f32_vec(), DType::F16).unwrap();
    close("matmul f16", &o, &want, 0.0, 0.0);
}

#[test]
fn kernel_devices_compute_in_f16() {
    assert_eq!(Gpt2::dtype_for(&EMU), DType::F16);
    assert_eq!(Gpt2::dtype_for(&CPU), DType::F32);
}

#[test]
fn tiny_c_fp16_training_path_on_emu_matches_hugging_face() {
    let report = common::fp16::tiny_c_fp16_parity(&EMU).unwrap_or_else(|e| panic!("{e}"));
    for line in report {
        eprintln!("emu {line}");
    }
}

/// The device attention benchmark's naive-concat baseline (built from the copy, attention and
/// row-sum kernels) computes the same attention and prefix gradient as the fused kernels: run
/// on the emulator at a small shape (GQA, causal, Tq = Tk) so the GPU benchmark compares like
/// with like.
#[test]
fn device_attention_benchmark_baseline_agrees_with_the_fused_kernels() {
    use prefix_attn::attn::shapes::NamedShape;
    let s = NamedShape {
        name: "small",
        batch: 3,
        heads_q: 4,
        heads_kv: 2,
        tq: 24,
        tk: 24,
        prefix_len: 5,
        head_dim: 64,
        causal: true,
    };
    let r = prefix_attn::bench::bench_attn_device(&EMU, s, 1, 1).unwrap();
    eprintln!(
        "emu: o diff {:.2e}, dK_pre rel diff {:.2e}, {} set(s), times fwd {:.1} / naive {:.1} ms",
        r.o_diff, r.dk_pre_rel_diff, r.sets, r.row.fwd_ms, r.row.naive_fwd_ms
    );
    // f16 outputs of |o| < ~3: a couple of f16 ulps; the naive prefix gradient is reduced
    // from f16-rounded per-sequence gradients.
    assert!(r.o_diff < 4e-3, "o differs by {}", r.o_diff);
    assert!(
        r.dk_pre_rel_diff < 5e-3,
        "dK_pre differs by {} (relative)",
        r.dk_pre_rel_diff
    );
    assert!(r.row.fwd_ms > 0.0 && r.row.naive_bwd_ms > 0.0);
    assert!(r.row.naive_extra_bytes > 0.0);
}

#[test]
fn fused_bias_gelu_and_bias_residual_match_cpu() {
    let mut rng = Rng::new(17);
    for &(m, n) in &[(1usize, 8usize), (37, 96), (300, 256)] {
        for dt in DTYPES {
            let u = ulp(dt);
            let (bias, biasf) = pair(&[n], &random(&mut rng, n, 1.0), dt);
            // h += bias; g = gelu(h)
            let (mut h, hf) = pair(&[m, n], &random(&mut rng, m * n, 2.0), dt);
            let mut hc = hf.clone();
            let mut g = Tensor::from_f32(&[m, n], &vec![f32::NAN; m * n], dt).unwrap();
            let mut gc = Tensor::zeros(&[m, n], DType::F32).unwrap();
            EMU.bias_gelu(&mut h.view_mut(), &bias.view(), &mut g.view_mut())
                .unwrap();
            CPU.bias_gelu(&mut hc.view_mut(), &biasf.view(), &mut gc.view_mut())
                .unwrap();
            close(&format!("bias_gelu h {m}x{n} {dt}"), &h, &hc, u, 1e-6);
            // The emu GELU reads the rounded h: compare against gelu of the rounded h.
            let hr = Tensor::from_f32(&[m, n], &h.to_f32_vec(), DType::F32).unwrap();
            CPU.gelu(&hr.view(), &mut gc.view_mut()).unwrap();
            close(
                &format!("bias_gelu out {m}x{n} {dt}"),
                &g,
                &gc,
                u.max(2e-6),
                2e-6,
            );
            // out += bias + residual
            let (res, resf) = pair(&[m, n], &random(&mut rng, m * n, 1.0), dt);
            let (mut o, of) = pair(&[m, n], &random(&mut rng, m * n, 1.0), dt);
            let mut oc = of.clone();
            EMU.bias_residual(&mut o.view_mut(), &bias.view(), &res.view())
                .unwrap();
            CPU.bias_residual(&mut oc.view_mut(), &biasf.view(), &resf.view())
                .unwrap();
            close(&format!("bias_residual {m}x{n} {dt}"), &o, &oc, u, 1e-6);
        }
    }
}

/// The naive baseline's per-sequence path on a kernel device (a prefix table with an unused
/// prefix, a sequence without a prefix, padded lengths: nothing the benchmarks' one shared
/// prefix takes), forward and backward, against the f64 oracle under the tolerance rule.
#[test]
fn naive_concat_with_a_prefix_table_on_emu_matches_the_oracle() {
    use common::{check_bwd, check_fwd, f64s};
    use prefix_attn::attn::oracle::{Dense, Precision};
    use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, ProblemSpec, RandomProblem};
    use prefix_attn::bench::naive;
    let mut s = ProblemSpec::new(3, 5, 9, 4, 2, 64, 3, true);
    s.dtype = DType::F16;
    s.num_prefixes = 3;
    s.prefix_index = Some(vec![2, -1, 0]);
    s.seqlen_q = Some(vec![5, 3, 2]);
    s.seqlen_k = Some(vec![9, 4, 7]);
    let pb = RandomProblem::new(s, &mut Rng::new(21)).unwrap();
    let args = pb.args().unwrap();
    let x = Dense::from_args(&args).unwrap();
    let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
    naive::forward(&EmuBackend, &args, f.out()).unwrap();
    check_fwd(&x, &f, &x.forward(Precision::Exact), DType::F16)
        .unwrap_or_else(|e| panic!("naive forward on emu: {e}"));
    let d_o = f64s(&pb.d_o);
    let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
    let bargs = pb.bwd_args(&f.o, &f.lse, false).unwrap();
    naive::backward(&EmuBackend, &bargs, g.grads(true, false)).unwrap();
    let exact = x.backward(&d_o, Precision::Exact);
    check_bwd(&x, &d_o, &f64s(&f.o), &g, &exact, DType::F16, true, false)
        .unwrap_or_else(|e| panic!("naive backward on emu: {e}"));
}

/// The Llama family's kernels (RMS norm, rotary embedding with shared and per-sequence
/// tables, SwiGLU; forward and backward) against the cpu backend, in f16, bf16 and f32.
#[test]
fn llama_kernels_match_cpu() {
    let mut rng = Rng::new(21);
    for &(m, c) in &[(1usize, 64usize), (7, 128), (37, 96), (5, 33)] {
        for dt in DTYPES {
            let u = ulp(dt);
            let x: Vec<f32> = random(&mut rng, m * c, 2.0);
            let (xh, xf) = pair(&[m, c], &x, dt);
            let (wh, wf) = pair(&[c], &random(&mut rng, c, 1.0), dt);
            let (dyh, dyf) = pair(&[m, c], &random(&mut rng, m * c, 1.0), dt);
            let mut out = Tensor::from_f32(&[m, c], &vec![f32::NAN; m * c], dt).unwrap();
            let mut rstd = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
            let mut outc = Tensor::zeros(&[m, c], DType::F32).unwrap();
            let mut rstdc = Tensor::zeros(&[m], DType::F32).unwrap();
            EMU.rmsnorm(
                &xh.view(),
                &wh.view(),
                1e-5,
                &mut out.view_mut(),
                &mut rstd.view_mut(),
            )
            .unwrap();
            CPU.rmsnorm(
                &xf.view(),
                &wf.view(),
                1e-5,
                &mut outc.view_mut(),
                &mut rstdc.view_mut(),
            )
            .unwrap();
            close(
                &format!("rmsnorm [{m},{c}] {dt}"),
                &out,
                &outc,
                u.max(1e-6),
                1e-5,
            );
            close(
                &format!("rmsnorm rstd [{m},{c}] {dt}"),
                &rstd,
                &rstdc,
                1e-5,
                0.0,
            );
            for acc in [false, true] {
                let base = random(&mut rng, m * c, 1.0);
                let (mut dx, dxf) = pair(&[m, c], &base, dt);
                let mut dxc = dxf.clone();
                EMU.rmsnorm_bwd(
                    &dyh.view(),
                    &xh.view(),
                    &wh.view(),
                    &rstdc.view(),
                    &mut dx.view_mut(),
                    acc,
                )
                .unwrap();
                CPU.rmsnorm_bwd(
                    &dyf.view(),
                    &xf.view(),
                    &wf.view(),
                    &rstdc.view(),
                    &mut dxc.view_mut(),
                    acc,
                )
                .unwrap();
                close(
                    &format!("rmsnorm_bwd [{m},{c}] acc={acc} {dt}"),
                    &dx,
                    &dxc,
                    2.0 * u.max(1e-6),
                    1e-4,
                );
            }
            // SwiGLU on [m, c] as gate and up.
            EMU.swiglu(&xh.view(), &dyh.view(), &mut out.view_mut())
                .unwrap();
            CPU.swiglu(&xf.view(), &dyf.view(), &mut outc.view_mut())
                .unwrap();
            close(
                &format!("swiglu [{m},{c}] {dt}"),
                &out,
                &outc,
                u.max(2e-6),
                2e-6,
            );
            let (gh, gf) = pair(&[m, c], &random(&mut rng, m * c, 1.0), dt);
            let mut out2 = Tensor::from_f32(&[m, c], &vec![f32::NAN; m * c], dt).unwrap();
            let mut out2c = Tensor::zeros(&[m, c], DType::F32).unwrap();
            EMU.swiglu_bwd(
                &xh.view(),
                &dyh.view(),
                &gh.view(),
                &mut out.view_mut(),
                &mut out2.view_mut(),
            )
            .unwrap();
            CPU.swiglu_bwd(
                &xf.view(),
                &dyf.view(),
                &gf.view(),
                &mut outc.view_mut(),
                &mut out2c.view_mut(),
            )
            .unwrap();
            close(
                &format!("swiglu_bwd d_gate [{m},{c}] {dt}"),
                &out,
                &outc,
                u.max(2e-6),
                1e-5,
            );
            close(
                &format!("swiglu_bwd d_up [{m},{c}] {dt}"),
                &out2,
                &out2c,
                u.max(2e-6),
                1e-5,
            );
        }
    }
    // RoPE: [B, T, H, D] with a table for the batch and one per sequence, forward and back.
    for &(b, t, h, d) in &[
        (2usize, 5usize, 3usize, 8usize),
        (1, 7, 2, 64),
        (3, 4, 1, 128),
    ] {
        for dt in DTYPES {
            let u = ulp(dt);
            let n = b * t * h * d;
            let (xh, xf) = pair(&[b, t, h, d], &random(&mut rng, n, 1.0), dt);
            for per_seq in [false, true] {
                let rows = if per_seq { b * t } else { t };
                let angles: Vec<f32> = random(&mut rng, rows * d / 2, 3.0);
                let cs: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
                let sn: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
                let shape = if per_seq {
                    vec![b, t, d / 2]
                } else {
                    vec![t, d / 2]
                };
                let cos = Tensor::from_f32(&shape, &cs, DType::F32).unwrap();
                let sin = Tensor::from_f32(&shape, &sn, DType::F32).unwrap();
                let (mut e, mut cpu) = (xh.clone(), xf.clone());
                EMU.rope(&mut e.view_mut(), &cos.view(), &sin.view())
                    .unwrap();
                CPU.rope(&mut cpu.view_mut(), &cos.view(), &sin.view())
                    .unwrap();
                let what = format!("rope [{b},{t},{h},{d}] per_seq={per_seq} {dt}");
                // Values are O(1): the half-precision output's rounding is absolute too.
                close(&what, &e, &cpu, 2.0 * u.max(1e-6), u + 1e-6);
                let moved = cpu
                    .to_f32_vec()
                    .iter()
                    .zip(xf.to_f32_vec())
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(moved > 0.1, "{what}: the rotation moved nothing");
                // The backward undoes the rotation.
                EMU.rope_bwd(&mut e.view_mut(), &cos.view(), &sin.view())
                    .unwrap();
                CPU.rope_bwd(&mut cpu.view_mut(), &cos.view(), &sin.view())
                    .unwrap();
                // The emu input was rounded once more (the stored rotation).
                close(
                    &format!("rope_bwd {what}"),
                    &e,
                    &cpu,
                    4.0 * u.max(1e-6),
                    4.0 * u + 1e-6,
                );
                close(&format!("rope_bwd ∘ rope {what}"), &cpu, &xf, 1e-5, 1e-5);
            }
        }
    }
}
