//! Shared test helpers: error measures and the tolerance rule of docs/ARCHITECTURE.md §5;
//! `files` holds the fixtures, temporary folders and the CLI runner, `fp16` the half-precision
//! training check, `candle` (feature `candle`) candle tensors beside the crate's. Each helper is
//! defined here once; every test crate that needs one says `mod common;`.
#![allow(dead_code)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod files;
pub mod fp16;
pub mod llama_fp16;
pub mod meta;
pub mod paged;

use prefix_attn::attn::oracle::{Dense, Grads, Outputs, Precision};
use prefix_attn::attn::testing::{FwdBuffers, GradBuffers};
use prefix_attn::tensor::{DType, Tensor};

/// Max |got - want| over all elements; NaN anywhere (or a mismatch of -inf) is infinite.
pub fn max_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut m = 0f64;
    for (g, w) in got.iter().zip(want) {
        let e = if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else if g.is_infinite() || w.is_infinite() {
            if g == w {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g - w).abs()
        };
        m = m.max(e);
    }
    m
}

/// Max |x| over the finite elements.
pub fn max_abs(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .fold(0.0, |m, v| m.max(v.abs()))
}

/// Max |got - want| relative to max |want| (floored at 1e-30).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

/// A tensor's elements as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_f32_vec().into_iter().map(f64::from).collect()
}

/// Unit roundoff of a dtype (half an ulp at 1.0).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-24),
    }
}

/// The tolerance rule: the tested error must be at most twice the error of a naive
/// implementation in the same precision, plus a small slack relative to the values'
/// magnitude (fp32 sums in a different order differ by a few ulps of the largest term).
/// On tiny tensors the naive implementation's max error can be luckily small, so its error
/// counts as at least the rounding of the largest value to the output type.
pub fn within_rule(
    name: &str,
    tested: f64,
    naive: f64,
    scale: f64,
    dtype: DType,
) -> Result<(), String> {
    let slack = match dtype {
        DType::F32 => 2e-6 * (1.0 + scale),
        _ => 1e-6 * (1.0 + scale),
    };
    let naive = naive.max(unit_roundoff(dtype) * scale);
    let bound = 2.0 * naive + slack;
    if tested <= bound {
        Ok(())
    } else {
        Err(format!(
            "{name}: error {tested:.3e} exceeds 2 x naive {naive:.3e} + slack {slack:.1e} (max |ref| {scale:.3e})"
        ))
    }
}

/// Compares forward buffers against the exact oracle with the tolerance rule.
pub fn check_fwd(x: &Dense, out: &FwdBuffers, exact: &Outputs, dtype: DType) -> Result<(), String> {
    let lowp = x.forward(Precision::Round(dtype));
    let o = f64s(&out.o);
    let lse = f64s(&out.lse);
    within_rule(
        "o",
        max_err(&o, &exact.o),
        max_err(&lowp.o, &exact.o),
        max_abs(&exact.o),
        dtype,
    )?;
    // lse is f32 in every dtype; the naive lse is rounded to f32 too.
    within_rule(
        "lse",
        max_err(&lse, &exact.lse),
        max_err(&lowp.lse, &exact.lse).max(max_abs(&exact.lse) * 1.2e-7),
        max_abs(&exact.lse),
        DType::F32,
    )
}

/// Compares gradient buffers against the exact oracle with the tolerance rule.
pub fn check_bwd(
    x: &Dense,
    d_o: &[f64],
    o: &[f64],
    g: &GradBuffers,
    exact: &Grads,
    dtype: DType,
    has_prefix: bool,
    prefix_only: bool,
) -> Result<(), String> {
    let lowp = x.backward(d_o, Precision::Round(dtype));
    // The best any implementation can do from the stored (rounded) `o`: exact math from the
    // backward's actual inputs, rounded once to the output type.
    let from_o = x.backward_with_o(d_o, o, Precision::Exact);
    let round = |v: &Vec<f64>, dt: DType| -> Vec<f64> {
        v.iter().map(|&x| dt.round_f32(x as f32) as f64).collect()
    };
    let names = ["dq", "dk", "dv", "dk_pre", "dv_pre"];
    let got = [&g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre];
    let want = [
        &exact.dq,
        &exact.dk,
        &exact.dv,
        &exact.dk_pre,
        &exact.dv_pre,
    ];
    let naive = [&lowp.dq, &lowp.dk, &lowp.dv, &lowp.dk_pre, &lowp.dv_pre];
    let best = [
        &from_o.dq,
        &from_o.dk,
        &from_o.dv,
        &from_o.dk_pre,
        &from_o.dv_pre,
    ];
    for i in 0..names.len() {
        let is_prefix = i >= 3;
        if (is_prefix && !has_prefix) || (!is_prefix && prefix_only) {
            continue;
        }
        // Prefix gradients are f32 outputs; the others are stored in the input dtype.
        let out_dt = if is_prefix { DType::F32 } else { dtype };
        let naive_err = max_err(naive[i], want[i]).max(max_err(&round(best[i], out_dt), want[i]));
        within_rule(
            names[i],
            max_err(&f64s(got[i]), want[i]),
            naive_err,
            max_abs(want[i]),
            dtype,
        )?;
    }
    Ok(())
}
