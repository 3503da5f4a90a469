//! Vectorised `exp` and `erf`, written once over [`Simd`] so that every instruction set computes the
//! same approximation (scalar tails agree with vector lanes to the last bit, up to FMA contraction).

use crate::simd::Simd;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two (Cody-Waite): the high part has few mantissa bits, so n * LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this exp underflows f32 normals; above the next it overflows.
const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.376_26;

/// `e^x` with about 2 ulp error on the normal range, 0 below it (no denormals), infinity above;
/// NaN propagates.
#[inline(always)]
pub fn exp<S: Simd>(x0: S::V) -> S::V {
    // `max(c, x)`/`min(c, x)` return `x` when it is NaN, so a NaN input stays NaN.
    let x = S::min(S::splat(EXP_HI), S::max(S::splat(EXP_LO), x0));
    let n = S::round(S::mul(x, S::splat(LOG2E)));
    let r = S::fma(n, S::splat(-LN2_HI), x);
    let r = S::fma(n, S::splat(-LN2_LO), r);
    // Taylor series of e^r to degree 7 on |r| <= ln2/2: truncation error < 5e-9.
    let mut p = S::splat(1.0 / 5040.0);
    p = S::fma(p, r, S::splat(1.0 / 720.0));
    p = S::fma(p, r, S::splat(1.0 / 120.0));
    p = S::fma(p, r, S::splat(1.0 / 24.0));
    p = S::fma(p, r, S::splat(1.0 / 6.0));
    p = S::fma(p, r, S::splat(0.5));
    p = S::fma(p, r, S::splat(1.0));
    p = S::fma(p, r, S::splat(1.0));
    let y = S::mul(p, S::pow2i(n));
    // Past the ends: 0 below (softmax of a hopeless logit is exactly 0), infinity above.
    let y = S::select_lt(x0, S::splat(EXP_LO), S::splat(0.0), y);
    S::select_lt(S::splat(EXP_HI), x0, S::splat(f32::INFINITY), y)
}

// Fitted by tools/fit_math.py: e^r = 1 + r + r^2 P(r) on |r| <= ln2/2, max relative error 1.0e-07.
#[allow(clippy::excessive_precision)]
const EXP5_P: [f32; 4] = [4.999_923_2e-1, 1.666_711_4e-1, 4.189_011_6e-2, 8.312_524e-3];

/// `e^x` for `x <= 0`, the softmax's case after subtracting the row maximum: a degree-5 polynomial
/// (about 2 ulp) and no overflow handling, about 40% fewer instructions than [`exp`]. Inputs below
/// the normal range give a tiny positive number rather than 0, which a softmax sum cannot notice.
#[inline(always)]
pub fn exp_nonpos<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::splat(EXP_LO), x);
    let n = S::round(S::mul(x, S::splat(LOG2E)));
    let r = S::fma(n, S::splat(-LN2_HI), x);
    let r = S::fma(n, S::splat(-LN2_LO), r);
    let mut p = S::splat(EXP5_P[3]);
    p = S::fma(p, r, S::splat(EXP5_P[2]));
    p = S::fma(p, r, S::splat(EXP5_P[1]));
    p = S::fma(p, r, S::splat(EXP5_P[0]));
    let y = S::fma(p, S::mul(r, r), S::add(r, S::splat(1.0)));
    S::mul(y, S::pow2i(n))
}

// Fitted by tools/fit_math.py (relative least squares against mpmath); see that script for the pieces.
// erf(x)/x on |x| <= 1 as a polynomial in x^2; max relative error of the fit 1.4e-09
#[allow(clippy::excessive_precision)]
const ERF_A: [f32; 7] =
    [1.128_379_2e0, -3.761_262_9e-1, 1.128_361_2e-1, -2.685_480_9e-2, 5.190_053_6e-3, -8.024_354e-4, 7.898_21e-5];
// erfc(x) exp(x^2) on 1 < x < 4 as a polynomial in 1/x; max relative error of the fit 2.7e-09
#[allow(clippy::excessive_precision)]
const ERFC_B: [f32; 11] = [
    2.596_134_8e-5,
    5.637_192_3e-1,
    3.015_458_2e-3,
    -2.851_863e-1,
    -6.926_851e-2,
    8.994_86e-1,
    -1.524_054e0,
    1.424_004_9e0,
    -8.106_042e-1,
    2.646_626_3e-1,
    -3.821_760_5e-2,
];

#[inline(always)]
fn horner<S: Simd>(c: &[f32], x: S::V) -> S::V {
    let mut p = S::splat(c[c.len() - 1]);
    for &ci in c[..c.len() - 1].iter().rev() {
        p = S::fma(p, x, S::splat(ci));
    }
    p
}

/// The error function, absolute error below 3e-7 everywhere. Both pieces are evaluated and blended,
/// which is cheaper than branching on vectors.
#[inline(always)]
pub fn erf<S: Simd>(x: S::V) -> S::V {
    let a = S::abs(x);
    let one = S::splat(1.0);
    // Small piece: x * A(x^2).
    let small = S::mul(x, horner::<S>(&ERF_A, S::mul(x, x)));
    // Large piece: 1 - exp(-a^2) B(1/a); a >= 4 (infinity included) gives exactly 1.
    let ac = S::min(S::splat(4.0), a);
    let tail = S::mul(exp::<S>(S::mul(S::splat(-1.0), S::mul(ac, ac))), horner::<S>(&ERFC_B, S::div(one, ac)));
    let large = S::copysign(S::select_lt(ac, S::splat(4.0), S::sub(one, tail), one), x);
    // `1 < a` is false for NaN, so NaN takes the small piece and stays NaN.
    S::select_lt(one, a, large, small)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU in its exact form, `x * Phi(x)` with `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
pub fn gelu<S: Simd>(x: S::V) -> S::V {
    let phi = S::mul(S::splat(0.5), S::add(S::splat(1.0), erf::<S>(S::mul(x, S::splat(FRAC_1_SQRT_2)))));
    S::mul(x, phi)
}

/// The exact derivative of [`gelu`]: `Phi(x) + x * phi(x)` with the normal density `phi`.
#[inline(always)]
pub fn gelu_grad<S: Simd>(x: S::V) -> S::V {
    let phi_cdf = S::mul(S::splat(0.5), S::add(S::splat(1.0), erf::<S>(S::mul(x, S::splat(FRAC_1_SQRT_2)))));
    let pdf = S::mul(S::splat(INV_SQRT_2PI), exp::<S>(S::mul(S::splat(-0.5), S::mul(x, x))));
    S::fma(x, pdf, phi_cdf)
}

/// Double-precision references for the tests (not fast, only exact to about 1e-15).
pub mod reference {
    /// erf by the series `2/sqrt(pi) e^{-x^2} sum 2^n x^{2n+1} / (1*3*...*(2n+1))`: all terms positive,
    /// so no cancellation; converges for every x (beyond 6, erf is 1 to double precision).
    pub fn erf(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        let a = x.abs();
        if a >= 6.0 {
            return x.signum();
        }
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        while term > 1e-17 * sum {
            n += 1.0;
            term *= 2.0 * a * a / (2.0 * n + 1.0);
            sum += term;
        }
        let r = 2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum;
        r.min(1.0).copysign(x)
    }

    /// The standard normal density.
    pub fn normal_pdf(x: f64) -> f64 {
        (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }
}
