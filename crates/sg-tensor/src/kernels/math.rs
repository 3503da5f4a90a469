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

/// `e^x` for `x <= 0` (a softmax after subtracting the row maximum, GELU's density): a degree-5
/// polynomial (about 2 ulp) and no overflow handling, about 40% fewer instructions than [`exp`].
/// Inputs below the normal range give a tiny positive number rather than 0, which a softmax sum
/// cannot notice.
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

/// 1.5 * 2^23 + 127: a float in [-126, 0] plus this lands in [2^23, 2^24), where floats are the
/// integers, so the sum is rounded to the nearest integer (ties to even) plus the bias, and its
/// low mantissa bits hold that integer as a biased exponent.
const EXP2_SHIFT: f32 = 12_583_039.0;

/// [`EXP5_P`] for `2^r = e^(r ln 2)`: `2^r = 1 + r (c1 + r (c2 + ...))` with `c1 = ln 2` and
/// `c(k+2) = EXP5_P[k] ln^(k+2) 2` (so the same accuracy on |r| <= 1/2 as `exp_nonpos` on
/// |r ln 2| <= ln2/2).
const EXP2_P: [f32; 5] = {
    let l = std::f64::consts::LN_2;
    let p = EXP5_P;
    [
        l as f32,
        (p[0] as f64 * l * l) as f32,
        (p[1] as f64 * l * l * l) as f32,
        (p[2] as f64 * l * l * l * l) as f32,
        (p[3] as f64 * l * l * l * l * l) as f32,
    ]
};

/// `2^x` for `x <= 0`, as accurate as [`exp_nonpos`] with fewer instructions (11 against 16): the
/// attention softmax, whose scores carry the factor log2(e) from their product's scale. The
/// integer part comes from one addition (see `EXP2_SHIFT`), so there is no rounding instruction,
/// no Cody-Waite reduction (`x - round(x)` is exact) and no conversion to an integer. Inputs below
/// -126 give 2^-126 (the smallest normal), which a softmax sum cannot notice.
#[inline(always)]
pub fn exp2_nonpos<S: Simd>(x: S::V) -> S::V {
    let x = S::max(S::splat(-126.0), x);
    let t = S::add(x, S::splat(EXP2_SHIFT));
    let r = S::sub(x, S::sub(t, S::splat(EXP2_SHIFT)));
    let mut p = S::splat(EXP2_P[4]);
    p = S::fma(p, r, S::splat(EXP2_P[3]));
    p = S::fma(p, r, S::splat(EXP2_P[2]));
    p = S::fma(p, r, S::splat(EXP2_P[1]));
    p = S::fma(p, r, S::splat(EXP2_P[0]));
    S::mul(S::fma(p, r, S::splat(1.0)), S::shl23(t))
}

/// `ln x` for positive normal `x`, within 2 ulp; NaN and +infinity pass through, and zero,
/// negative and subnormal inputs give unspecified values. `x = m 2^e` with `m` folded into
/// [sqrt(1/2), sqrt(2)), and `ln m = 2 atanh(t)`, `t = (m - 1) / (m + 1)`, `|t| <= 0.172`, as an odd
/// series to `t^9` (the next term is below 1e-9 of the result).
#[inline(always)]
pub fn ln_pos<S: Simd>(x: S::V) -> S::V {
    let (e, m) = S::split_exp(x);
    let sqrt2 = S::splat(std::f32::consts::SQRT_2);
    let e = S::add(e, S::select_lt(sqrt2, m, S::splat(1.0), S::splat(0.0)));
    let m = S::select_lt(sqrt2, m, S::mul(m, S::splat(0.5)), m);
    // m - 1 is exact (Sterbenz), so near x = 1 the result keeps its relative accuracy.
    let t = S::div(S::sub(m, S::splat(1.0)), S::add(m, S::splat(1.0)));
    let t2 = S::mul(t, t);
    let mut p = S::splat(1.0 / 9.0);
    p = S::fma(p, t2, S::splat(1.0 / 7.0));
    p = S::fma(p, t2, S::splat(1.0 / 5.0));
    p = S::fma(p, t2, S::splat(1.0 / 3.0));
    let two_t = S::add(t, t);
    let ln_m = S::fma(S::mul(two_t, t2), p, two_t);
    // e ln 2 in two parts (Cody-Waite, as in `exp`): e * LN2_HI is exact.
    let y = S::fma(e, S::splat(LN2_HI), S::fma(e, S::splat(LN2_LO), ln_m));
    // NaN fails `x < inf` and so does +inf: both are returned as they came.
    S::select_lt(x, S::splat(f32::INFINITY), y, x)
}

/// erf's pieces: `|x|` in `[i / 2, (i + 1) / 2)` for `i` in 0..8 is piece `i`, a degree-7
/// polynomial in `|x| - ERF_CENTRE[i]`; piece 0 has no constant term, so it keeps relative
/// accuracy near 0. Fitted by tools/fit_math.py (iterated least squares towards minimax, against
/// mpmath, each piece a little beyond its ends): largest error 8.6e-8 evaluated in f32.
const ERF_CENTRE: [f32; 8] = [0.0, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75];
/// `ERF_PW[j][i]`: coefficient of degree `j` of piece `i` (one row per `vpermps` table).
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
const ERF_PW: [[f32; 8]; 8] = [
    [0.000000000e+00, 7.111556530e-01, 9.229001403e-01, 9.866716862e-01, 9.985373020e-01, 9.998993874e-01, 9.999957085e-01, 9.999998808e-01],
    [1.128379226e+00, 6.429311037e-01, 2.365211248e-01, 5.277499557e-02, 7.142319810e-03, 5.862773978e-04, 2.918898099e-05, 8.814211583e-07],
    [-2.109507022e-06, -4.821980894e-01, -2.956519425e-01, -9.235618263e-02, -1.607012190e-02, -1.612270135e-03, -9.487226635e-05, -3.306486633e-06],
    [-3.760638237e-01, 2.678778581e-02, 1.675360203e-01, 9.015751630e-02, 2.172445878e-02, 2.760369331e-03, 1.958164794e-04, 7.971280866e-06],
    [-6.903473986e-04, 1.506717205e-01, -6.122302730e-03, -4.810661077e-02, -1.909000613e-02, -3.257576376e-03, -2.860252280e-04, -1.376496948e-05],
    [1.163981035e-01, -5.319945887e-02, -4.719036445e-02, 6.614406127e-03, 1.066173147e-02, 2.756632632e-03, 3.135099250e-04, 1.830057590e-05],
    [-8.990659378e-03, -2.653614990e-02, 2.048264071e-02, 9.062454104e-03, -2.758879913e-03, -1.669445424e-03, -2.754630405e-04, -2.093400144e-05],
    [-1.728200726e-02, 1.772856899e-02, 3.778863465e-03, -5.896838848e-03, -7.363287150e-04, 6.327741430e-04, 1.746495254e-04, 1.740570951e-05],
];

/// The error function, absolute error below 1e-7 everywhere: eight polynomial pieces, each lane
/// picking its piece's coefficients by a table lookup (no division, no `exp`: a third of the
/// previous two-piece form's instructions, which made GELU a visible share of a training step).
#[inline(always)]
pub fn erf<S: Simd>(x: S::V) -> S::V {
    let a = S::abs(x);
    // Clamped so that infinity finds a piece; `min(c, a)` keeps a NaN `a`, which stays NaN below.
    let ac = S::min(S::splat(4.0), a);
    // Piece floor(2|x|) as round(2|x| - 1/2): a tie may pick the neighbour, which is fitted past
    // the shared end.
    let i = S::min(S::splat(7.0), S::round(S::fma(ac, S::splat(2.0), S::splat(-0.5))));
    let t = S::sub(ac, S::lookup8(&ERF_CENTRE, i));
    let mut p = S::lookup8(&ERF_PW[7], i);
    for c in ERF_PW[..7].iter().rev() {
        p = S::fma(p, t, S::lookup8(c, i));
    }
    // Beyond 4 exactly +-1 (erfc(4) = 1.5e-8 is below half an f32 ulp of 1).
    S::copysign(S::select_lt(S::splat(4.0), a, S::splat(1.0), p), x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The standard normal distribution function `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
fn normal_cdf<S: Simd>(x: S::V) -> S::V {
    S::mul(S::splat(0.5), S::add(S::splat(1.0), erf::<S>(S::mul(x, S::splat(FRAC_1_SQRT_2)))))
}

/// GELU in its exact form, `x * Phi(x)`.
#[inline(always)]
pub fn gelu<S: Simd>(x: S::V) -> S::V {
    S::mul(x, normal_cdf::<S>(x))
}

/// The exact derivative of [`gelu`]: `Phi(x) + x * phi(x)` with the normal density `phi`.
#[inline(always)]
pub fn gelu_grad<S: Simd>(x: S::V) -> S::V {
    // The density's exponent is never positive, so the cheaper exp serves; below the normal range
    // it is exactly 0 as with `exp` (x * 0: huge x keep a gradient of exactly 1, infinite x NaN).
    let h = S::mul(S::splat(-0.5), S::mul(x, x));
    let e = S::select_lt(h, S::splat(EXP_LO), S::splat(0.0), exp_nonpos::<S>(h));
    S::fma(x, S::mul(S::splat(INV_SQRT_2PI), e), normal_cdf::<S>(x))
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
