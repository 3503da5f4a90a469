//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use proptest::prelude::*;
use sg_tensor::simd::{with_isa, Isa};

/// Runs `f` once per instruction set this CPU has, naming the set in any failure.
pub fn on_every_isa(mut f: impl FnMut(Isa)) {
    for isa in Isa::available() {
        with_isa(isa, || f(isa));
    }
}

/// `f` on a pool of `n` threads (the kernels split over whichever pool they run in).
pub fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

/// `|got - want|`, infinite where exactly one of them is NaN (both NaN: equal). `f64::max` skips a
/// NaN, so without this a NaN result would pass every comparison.
pub fn abs_diff(got: f64, want: f64) -> f64 {
    match (got.is_nan(), want.is_nan()) {
        // Equal infinities are equal (their difference would be NaN).
        (false, false) if got == want => 0.0,
        (false, false) => (got - want).abs(),
        (true, true) => 0.0,
        _ => f64::INFINITY,
    }
}

/// Same length and the same bits everywhere (NaN payloads and signed zeros included).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Largest of `|got - want| / max(1, |want|)`: absolute near zero, relative for large values.
pub fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    got.iter().zip(want).map(|(&g, &w)| abs_diff(g as f64, w) / w.abs().max(1.0)).fold(0.0, f64::max)
}

/// Error relative to the largest magnitude of the reference (for sums of many terms).
pub fn rel_to_max(got: &[f32], want: &[f64]) -> f64 {
    rel_to_max_floor(got, want, 1e-30)
}

/// Like [`rel_to_max`], with the scale at least `floor`: for results that can cancel to exactly zero
/// (a one-token softmax has a zero gradient), where only absolute error at the inputs' scale means
/// anything.
pub fn rel_to_max_floor(got: &[f32], want: &[f64], floor: f64) -> f64 {
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(&g, &w)| abs_diff(g as f64, w)).fold(0.0, f64::max) / scale
}

/// A vector of `n` values uniform in [-scale, scale], from a proptest-drawn seed.
pub fn data(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn seed() -> impl Strategy<Value = u64> {
    any::<u64>()
}
