//! Run-time SIMD selection and the lane abstraction every kernel is written against.
//!
//! A kernel body is written once as a generic function over [`Simd`]; the dispatcher instantiates it
//! for AVX2+FMA inside a `#[target_feature]` entry point (so the intrinsics inline), for the portable
//! `wide` vectors (SSE2 / NEON / whatever the build target guarantees), and for one-lane scalar code
//! that handles tails. The choice is made once per process from the CPU actually running the binary,
//! never from compile-time flags: a release build made on one machine runs fast on every x86-64.

use std::sync::atomic::{AtomicU8, Ordering};

use wide::{CmpGt, CmpLt};

/// The instruction sets a kernel can run on, fastest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain one-lane code: the slowest, used for tails and as a last resort.
    Scalar,
    /// `wide`'s 8-lane vectors with whatever the build target guarantees (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// AVX2 with FMA, detected at run time.
    Avx2Fma,
}

impl Isa {
    /// Every instruction set this CPU can run, slowest first (tests run kernels on each).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar, Isa::Portable];
        if avx2_fma_detected() {
            v.push(Isa::Avx2Fma);
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
        }
    }
}

fn avx2_fma_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

const UNSET: u8 = u8::MAX;
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(isa: Isa) -> u8 {
    isa as u8
}

fn decode(v: u8) -> Isa {
    match v {
        0 => Isa::Scalar,
        1 => Isa::Portable,
        _ => Isa::Avx2Fma,
    }
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with kernels called from this thread on `want` (or the best available below it). Used
/// by tests to check every instruction set side by side without touching the process-wide choice.
pub fn with_isa<R>(want: Isa, f: impl FnOnce() -> R) -> R {
    let got = if Isa::available().contains(&want) { want } else { *Isa::available().last().unwrap() };
    let old = OVERRIDE.with(|o| o.replace(Some(got)));
    let r = f();
    OVERRIDE.with(|o| o.set(old));
    r
}

/// The instruction set kernels use now: the best the CPU has, unless lowered by [`set_isa`], by
/// [`with_isa`] on this thread, or by the environment variable `SG_ISA=scalar|portable` (read once).
pub fn isa() -> Isa {
    if let Some(i) = OVERRIDE.with(|o| o.get()) {
        return i;
    }
    let v = ACTIVE.load(Ordering::Relaxed);
    if v != UNSET {
        return decode(v);
    }
    let best = *Isa::available().last().expect("scalar is always available");
    let chosen = match std::env::var("SG_ISA").ok().as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("portable") => Isa::Portable,
        _ => best,
    };
    ACTIVE.store(encode(chosen), Ordering::Relaxed);
    chosen
}

/// Twelve independent chains of `n` vector FMAs each, on registers alone, on the active instruction
/// set: this core's FMA rate at this moment. Benchmarks read kernel rates against it, because on a
/// shared host the peak is not a constant. Returns the floating-point operations done and a value
/// that depends on every one of them (so that none can be optimised away).
pub fn fma_probe(n: usize) -> (f64, f32) {
    crate::dispatch!(isa(), fma_chains[](n))
}

#[inline(always)]
fn fma_chains<S: Simd>(n: usize) -> (f64, f32) {
    let mut acc = [S::splat(0.0); 12];
    let (b, c) = (S::splat(0.999_999), S::splat(1e-7));
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = S::fma(*x, b, c);
        }
    }
    let sum = acc.iter().fold(S::splat(0.0), |s, &x| S::add(s, x));
    ((n * acc.len() * S::LANES * 2) as f64, S::reduce_sum(sum))
}

/// Forces an instruction set (for tests and benchmarks). Asking for one the CPU lacks selects the
/// best one it has instead, so this can never make a kernel execute an illegal instruction.
pub fn set_isa(want: Isa) -> Isa {
    let avail = Isa::available();
    let got = if avail.contains(&want) { want } else { *avail.last().unwrap() };
    ACTIVE.store(encode(got), Ordering::Relaxed);
    got
}

/// Lanes of `f32` processed together. Methods are `#[inline(always)]` so that, once inlined into a
/// `#[target_feature]` entry point, they compile to single instructions.
///
/// # Safety
/// `load`/`store` read and write `LANES` floats at the pointer.
pub trait Simd: Copy + 'static {
    type V: Copy;
    const LANES: usize;
    fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading `LANES` floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing `LANES` floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn sub(a: Self::V, b: Self::V) -> Self::V;
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the hardware has it.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise maximum; returns `b` where either is NaN (the x86 convention), so `max(c, x)`
    /// propagates a NaN `x`.
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise minimum; returns `b` where either is NaN.
    fn min(a: Self::V, b: Self::V) -> Self::V;
    fn sqrt(a: Self::V) -> Self::V;
    fn abs(a: Self::V) -> Self::V;
    /// `|mag|` with the sign of `sign`.
    fn copysign(mag: Self::V, sign: Self::V) -> Self::V;
    /// Round to nearest integer (ties to even), as a float.
    fn round(a: Self::V) -> Self::V;
    /// `2^n` for an integer-valued `n` in [-126, 127].
    fn pow2i(n: Self::V) -> Self::V;
    /// The float whose bits are `t`'s shifted left by 23 places: where the low 8 bits of `t`'s
    /// mantissa hold a biased exponent (and the ninth is 0), that power of two. [`Simd::pow2i`]
    /// without the conversion to an integer, for `math::exp2_nonpos`.
    fn shl23(t: Self::V) -> Self::V;
    /// `(e, m)` with `x = m * 2^e`, `m` in [1, 2) and `e` integer-valued, read from the bits of a
    /// positive normal `x` (the inverse of [`Simd::pow2i`]); other lanes get unspecified values.
    fn split_exp(x: Self::V) -> (Self::V, Self::V);
    /// Lane-wise `if a < b { x } else { y }`.
    fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// Lane-wise `table[i]` for an integer-valued `i` in 0..8 (AVX2: one `vpermps`). Any other `i`
    /// (NaN included) picks the same entry on every instruction set: the one at the low three bits
    /// of x86's float-to-integer conversion (0 for NaN and out-of-range values).
    fn lookup8(table: &[f32; 8], i: Self::V) -> Self::V;
    fn reduce_sum(a: Self::V) -> f32;
    fn reduce_max(a: Self::V) -> f32;
    /// A hint to bring the cache line holding `p` closer (no effect where the lanes have none).
    /// Never faults, whatever the address.
    #[inline(always)]
    fn prefetch(p: *const f32) {
        let _ = p;
    }
    /// `dst[j * ldd + i] = src[i * lds + j]` for `i, j < LANES`: one square block transposed.
    ///
    /// # Safety
    /// Both blocks must be valid (`LANES` rows of `LANES` floats at the given row strides) and
    /// must not overlap.
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        for i in 0..Self::LANES {
            for j in 0..Self::LANES {
                *dst.add(j * ldd + i) = *src.add(i * lds + j);
            }
        }
    }
}

/// One lane: the tail handler and the `Isa::Scalar` kernels.
#[derive(Clone, Copy)]
pub struct Scalar;

impl Simd for Scalar {
    type V = f32;
    const LANES: usize = 1;
    #[inline(always)]
    fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        // Not `mul_add`: without hardware FMA that is a slow libm call.
        a * b + c
    }
    #[inline(always)]
    fn max(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn min(a: f32, b: f32) -> f32 {
        if a < b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn sqrt(a: f32) -> f32 {
        a.sqrt()
    }
    #[inline(always)]
    fn abs(a: f32) -> f32 {
        a.abs()
    }
    #[inline(always)]
    fn copysign(mag: f32, sign: f32) -> f32 {
        mag.copysign(sign)
    }
    #[inline(always)]
    fn round(a: f32) -> f32 {
        a.round_ties_even()
    }
    #[inline(always)]
    fn pow2i(n: f32) -> f32 {
        f32::from_bits((((n as i32) + 127) as u32) << 23)
    }
    #[inline(always)]
    fn shl23(t: f32) -> f32 {
        f32::from_bits(t.to_bits() << 23)
    }
    #[inline(always)]
    fn split_exp(x: f32) -> (f32, f32) {
        let b = x.to_bits();
        (((b >> 23) & 0xff) as f32 - 127.0, f32::from_bits((b & MANTISSA) | ONE_BITS))
    }
    #[inline(always)]
    fn select_lt(a: f32, b: f32, x: f32, y: f32) -> f32 {
        if a < b {
            x
        } else {
            y
        }
    }
    #[inline(always)]
    fn lookup8(table: &[f32; 8], i: f32) -> f32 {
        table[cvtt_low3(i)]
    }
    #[inline(always)]
    fn reduce_sum(a: f32) -> f32 {
        a
    }
    #[inline(always)]
    fn reduce_max(a: f32) -> f32 {
        a
    }
}

/// Eight lanes through `wide`, compiled for the build target's baseline.
#[derive(Clone, Copy)]
pub struct Portable;

impl Simd for Portable {
    type V = wide::f32x8;
    const LANES: usize = 8;
    #[inline(always)]
    fn splat(x: f32) -> Self::V {
        wide::f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        wide::f32x8::from(std::ptr::read_unaligned(p as *const [f32; 8]))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v.to_array())
    }
    #[inline(always)]
    fn add(a: Self::V, b: Self::V) -> Self::V {
        a + b
    }
    #[inline(always)]
    fn sub(a: Self::V, b: Self::V) -> Self::V {
        a - b
    }
    #[inline(always)]
    fn mul(a: Self::V, b: Self::V) -> Self::V {
        a * b
    }
    #[inline(always)]
    fn div(a: Self::V, b: Self::V) -> Self::V {
        a / b
    }
    #[inline(always)]
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        a * b + c
    }
    #[inline(always)]
    fn max(a: Self::V, b: Self::V) -> Self::V {
        a.cmp_gt(b).blend(a, b)
    }
    #[inline(always)]
    fn min(a: Self::V, b: Self::V) -> Self::V {
        a.cmp_lt(b).blend(a, b)
    }
    #[inline(always)]
    fn sqrt(a: Self::V) -> Self::V {
        a.sqrt()
    }
    #[inline(always)]
    fn abs(a: Self::V) -> Self::V {
        a.abs()
    }
    #[inline(always)]
    fn copysign(mag: Self::V, sign: Self::V) -> Self::V {
        let m = wide::f32x8::splat(-0.0);
        (mag.abs()) | (sign & m)
    }
    #[inline(always)]
    fn round(a: Self::V) -> Self::V {
        a.round()
    }
    #[inline(always)]
    fn pow2i(n: Self::V) -> Self::V {
        let i = n.round_int() + wide::i32x8::splat(127);
        let bits: wide::i32x8 = i << 23;
        bytemuck_cast(bits)
    }
    #[inline(always)]
    fn shl23(t: Self::V) -> Self::V {
        wide::f32x8::from(t.to_array().map(|x| f32::from_bits(x.to_bits() << 23)))
    }
    #[inline(always)]
    fn split_exp(x: Self::V) -> (Self::V, Self::V) {
        // Lane by lane, as one-lane code does it.
        let (mut e, mut m) = ([0f32; 8], [0f32; 8]);
        for (i, v) in x.to_array().into_iter().enumerate() {
            (e[i], m[i]) = Scalar::split_exp(v);
        }
        (wide::f32x8::from(e), wide::f32x8::from(m))
    }
    #[inline(always)]
    fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        a.cmp_lt(b).blend(x, y)
    }
    #[inline(always)]
    fn lookup8(table: &[f32; 8], i: Self::V) -> Self::V {
        wide::f32x8::from(i.to_array().map(|v| table[cvtt_low3(v)]))
    }
    #[inline(always)]
    fn reduce_sum(a: Self::V) -> f32 {
        let v = a.to_array();
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn reduce_max(a: Self::V) -> f32 {
        a.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The low three bits of x86's truncating float-to-i32 conversion, which gives `i32::MIN` (low bits
/// 0) for NaN and out-of-range values: the index `vpermps` takes, computed in plain code.
#[inline(always)]
fn cvtt_low3(v: f32) -> usize {
    // (NaN is in no range.)
    let i = if (-2_147_483_648.0..2_147_483_648.0).contains(&v) { v as i32 } else { i32::MIN };
    (i & 7) as usize
}

/// The mantissa bits of an `f32`, and the bits of 1.0 (exponent field 127, mantissa 0).
const MANTISSA: u32 = 0x007f_ffff;
const ONE_BITS: u32 = 0x3f80_0000;

#[inline(always)]
fn bytemuck_cast(bits: wide::i32x8) -> wide::f32x8 {
    let a = bits.to_array();
    wide::f32x8::from(a.map(|b| f32::from_bits(b as u32)))
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::transpose8;
#[cfg(target_arch = "x86_64")]
pub use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA lanes. Only ever instantiated inside `#[target_feature(enable = "avx2,fma")]`
    /// entry points that the dispatcher calls after detecting both features.
    #[derive(Clone, Copy)]
    pub struct Avx2;

    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn sqrt(a: __m256) -> __m256 {
            unsafe { _mm256_sqrt_ps(a) }
        }
        #[inline(always)]
        fn abs(a: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn copysign(mag: __m256, sign: __m256) -> __m256 {
            unsafe {
                let m = _mm256_set1_ps(-0.0);
                _mm256_or_ps(_mm256_andnot_ps(m, mag), _mm256_and_ps(m, sign))
            }
        }
        #[inline(always)]
        fn round(a: __m256) -> __m256 {
            unsafe { _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) }
        }
        #[inline(always)]
        fn pow2i(n: __m256) -> __m256 {
            unsafe {
                let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32(i, 23))
            }
        }
        #[inline(always)]
        fn shl23(t: __m256) -> __m256 {
            unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)) }
        }
        #[inline(always)]
        fn split_exp(x: __m256) -> (__m256, __m256) {
            unsafe {
                let b = _mm256_castps_si256(x);
                let e = _mm256_srli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f80_0000)), 23);
                let e = _mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(127)));
                let m = _mm256_or_si256(
                    _mm256_and_si256(b, _mm256_set1_epi32(super::MANTISSA as i32)),
                    _mm256_set1_epi32(super::ONE_BITS as i32),
                );
                (e, _mm256_castsi256_ps(m))
            }
        }
        #[inline(always)]
        fn select_lt(a: __m256, b: __m256, x: __m256, y: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)) }
        }
        #[inline(always)]
        fn lookup8(table: &[f32; 8], i: __m256) -> __m256 {
            // SAFETY: the table holds eight floats; vpermps reads only the index's low three bits.
            unsafe { _mm256_permutevar8x32_ps(_mm256_loadu_ps(table.as_ptr()), _mm256_cvttps_epi32(i)) }
        }
        #[inline(always)]
        fn reduce_sum(a: __m256) -> f32 {
            unsafe {
                let lo = _mm256_castps256_ps128(a);
                let hi = _mm256_extractf128_ps(a, 1);
                let s = _mm_add_ps(lo, hi);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn reduce_max(a: __m256) -> f32 {
            unsafe {
                let lo = _mm256_castps256_ps128(a);
                let hi = _mm256_extractf128_ps(a, 1);
                let s = _mm_max_ps(lo, hi);
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, x) in r.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(src.add(i * lds));
            }
            for (j, x) in transpose8(r).iter().enumerate() {
                _mm256_storeu_ps(dst.add(j * ldd), *x);
            }
        }
    }

    /// Transpose of an 8 x 8 block held as eight rows (unpack pairs, shuffle quads, swap halves).
    #[inline(always)]
    pub(crate) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }
}

/// Calls a kernel body generic over [`Simd`] on the active instruction set:
/// `dispatch!(isa, path::to::kernel[ExtraGenerics, ...](args...))` calls
/// `kernel::<S, ExtraGenerics...>(args...)`. The AVX2 instantiation runs inside a
/// `#[target_feature]` function, and kernel bodies are `#[inline(always)]`, so the whole kernel, not
/// just its leaves, is compiled for AVX2+FMA.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch {
    ($isa:expr, $($f:ident)::+ [$($g:ty),*] ($($arg:expr),* $(,)?)) => {{
        match $isa {
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Isa::Avx2Fma => {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn entry<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: `Isa::Avx2Fma` is only ever active after run-time detection of AVX2 and FMA.
                #[allow(unused_unsafe)]
                unsafe {
                    entry(
                        #[inline(always)]
                        || $($f)::+::<$crate::simd::Avx2 $(, $g)*>($($arg),*),
                    )
                }
            }
            $crate::simd::Isa::Scalar => $($f)::+::<$crate::simd::Scalar $(, $g)*>($($arg),*),
            _ => $($f)::+::<$crate::simd::Portable $(, $g)*>($($arg),*),
        }
    }};
}
