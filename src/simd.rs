//! Vectorisable elementwise math for the CPU code paths: `exp` and `tanh` as plain-arithmetic
//! polynomials (no libm calls, so loops over slices vectorise), compiled twice — for AVX2+FMA,
//! chosen at run time when the CPU has it, and for the baseline target. A leaf module beside
//! `tensor`: both of its users, the fused CPU attention (`attn::cpu`) and the `cpu` device's
//! dense operations, sit above it, so neither layer reaches into the other for it.
//!
//! `exp` follows the classic Cephes `expf` scheme: `exp(x) = 2^n · p(r)` with
//! `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 split in two for exactness) and a degree-6
//! polynomial `p`; relative error below 2e-7 over the whole range (tested against f64).

/// ln 2, high part (exact in f32 with the low bits zero, so `n · LN2_HI` is exact).
const LN2_HI: f32 = 0.693_359_4;
/// ln 2, low part.
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Inputs are clamped here: `exp` of larger inputs overflows f32, of smaller ones underflows
/// to (sub)normal values we flush to 0 through the exponent bits.
const EXP_HI: f32 = 88.37;
const EXP_LO: f32 = -87.3;

/// `exp(x)` in f32 arithmetic that vectorises; `exp(-inf) = 0`, NaN propagates as NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r2)
        + r
        + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let y = p * scale;
    // Propagate NaN, and give exactly 0 for inputs below the clamp (e.g. -inf).
    if x.is_nan() {
        x
    } else if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh(x) = 1 - 2 / (exp(2x) + 1)`: absolute error below 2e-7 (relative error grows only
/// where tanh is tiny, |x| < 1e-3, where GELU does not depend on it).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Compiles `$body` (a block using the macro's arguments) twice: once with AVX2 and FMA
/// enabled, picked at run time when the CPU supports them, and once for the baseline target.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident$(<$lt:lifetime>)?($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name$(<$lt>)?($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast$(<$lt>)?($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            fn portable$(<$lt>)?($($arg: $ty),*) $(-> $ret)? $body
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `xs[i] = exp(xs[i] - shift)`.
    pub fn exp_shift(xs: &mut [f32], shift: f32) {
        for x in xs.iter_mut() {
            *x = exp(*x - shift);
        }
    }
}

/// Sum of a slice with eight interleaved partial sums (vectorises; a fixed order).
#[inline]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    let tail: f32 = rest.iter().sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Maximum of a slice (`-inf` when empty).
#[inline]
pub fn max(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
/// The cubic coefficient of `gelu_new`.
pub const GELU_C: f32 = 0.044_715;

multiversion! {
    /// `out = gelu(x)`.
    pub fn gelu(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = 0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)));
        }
    }
}

multiversion! {
    /// `dx = gelu'(x) · dy`.
    pub fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
            let t = tanh(GELU_K * (x + GELU_C * x * x * x));
            let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
            *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
        }
    }
}

multiversion! {
    /// `out = tanh(x)`.
    pub fn tanh_slice(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = tanh(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "max relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn tanh_and_gelu_are_accurate() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            x += 0.00731;
        }
        assert!(worst < 3e-7, "tanh max absolute error {worst}");
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let mut out = vec![0f32; xs.len()];
        gelu(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let x = x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (y as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "gelu({x}) = {y} vs {want}"
            );
        }
        let mut shifted = vec![1.0f32, 2.0, 3.0];
        exp_shift(&mut shifted, 3.0);
        assert!((shifted[0] - (-2f32).exp()).abs() < 1e-7);
    }
}
