//! Tensor views, conversions, and bit-identical results whatever the thread count.
mod common;
use common::*;
use proptest::prelude::*;
use sg_tensor::kernels::attention::{self, AttnShape, QkvGrad, Rows, RowsMut};
use sg_tensor::kernels::{gemm, layernorm, math, reduce};
use sg_tensor::simd::{Isa, Scalar, Simd};
use sg_tensor::{Dst, Tensor};

#[test]
fn views_share_storage_and_index_correctly() {
    let t = Tensor::from_vec((0..24).map(|v| v as f32).collect(), &[2, 3, 4]).unwrap();
    assert!(t.is_contiguous());
    let p = t.permute(&[2, 0, 1]).unwrap();
    assert_eq!(p.shape(), &[4, 2, 3]);
    assert!(!p.is_contiguous());
    assert_eq!(p.get(&[3, 1, 2]).unwrap(), t.get(&[1, 2, 3]).unwrap());
    let n = t.narrow(2, 1, 2).unwrap();
    assert_eq!(n.to_vec(), vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]);
    let tt = t.transpose(1, 2).unwrap().reshape(&[2, 12]).unwrap();
    assert_eq!(tt.get(&[0, 1]).unwrap(), 4.0);
    assert!(t.view(&[6, 4]).is_ok());
    assert!(p.view(&[24]).is_err(), "a permuted view cannot be viewed flat without a copy");
    assert!(t.view(&[5, 5]).is_err());
    assert!(t.permute(&[0, 0, 1]).is_err());
    assert!(t.narrow(1, 2, 2).is_err());
    assert!(t.get(&[0, 3, 0]).is_err());
    assert!(Tensor::from_vec(vec![0.0; 5], &[2, 3]).is_err());
    // Copy-on-write: mutating a clone leaves the original alone.
    let mut c = t.clone();
    c.make_mut()[0] = 100.0;
    assert_eq!(t.get(&[0, 0, 0]).unwrap(), 0.0);
    let mut pm = p.clone();
    pm.make_mut();
    assert!(pm.is_contiguous());
    assert_eq!(pm, p);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn matmul_of_views_matches_dense(seed in seed(), m in 1usize..20, k in 1usize..20, n in 1usize..20, ta in any::<bool>(), tb in any::<bool>()) {
        let (sa, sb) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
        let a = Tensor::from_vec(data(seed, m * k, 1.0), &sa).unwrap();
        let b = Tensor::from_vec(data(seed ^ 1, k * n, 1.0), &sb).unwrap();
        let a = if ta { a.transpose(0, 1).unwrap() } else { a };
        let b = if tb { b.transpose(0, 1).unwrap() } else { b };
        let c = a.matmul(&b).unwrap();
        let (ad, bd) = (a.contiguous().to_vec(), b.contiguous().to_vec());
        let want = gemm::reference::gemm_f64(gemm::Trans::N, gemm::Trans::N, m, n, k, 1.0, &ad, k, &bd, n, 0.0, &[], n);
        prop_assert!(max_err(&c.to_vec(), &want) < 1e-5);
        // Batched form.
        let a3 = a.contiguous().reshape(&[1, m, k]).unwrap();
        let b3 = b.contiguous().reshape(&[1, k, n]).unwrap();
        prop_assert_eq!(a3.matmul(&b3).unwrap().to_vec(), c.to_vec());
    }

    #[test]
    fn half_roundtrip_is_within_half_precision(seed in seed(), n in 1usize..500) {
        let x = data(seed, n, 100.0);
        let t = Tensor::from_vec(x.clone(), &[n]).unwrap();
        let h = Tensor::from_f16(&t.to_f16(), &[n]).unwrap().to_vec();
        let b = Tensor::from_bf16(&t.to_bf16(), &[n]).unwrap().to_vec();
        for i in 0..n {
            prop_assert!((h[i] - x[i]).abs() <= x[i].abs() * 2f32.powi(-11) + 1e-7);
            prop_assert!((b[i] - x[i]).abs() <= x[i].abs() * 2f32.powi(-8));
        }
    }

    #[test]
    fn exp_is_accurate_on_its_range(x in -87.0f32..88.0) {
        for isa in Isa::available() {
            let got = sg_tensor::simd::with_isa(isa, || {
                let mut y = [x, 0.0];
                // exp through the softmax of a two-element row [x, 0] -> e^x / (e^x + 1)
                sg_tensor::kernels::softmax::forward_inplace(&mut y, 1, 2).unwrap();
                y[0]
            });
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            prop_assert!((got as f64 - want).abs() <= 4e-7 * want.max(1e-30), "{isa:?} {got} vs {want}");
        }
        let s = math::exp::<Scalar>(x) as f64;
        prop_assert!((s - (x as f64).exp()).abs() <= 3e-7 * (x as f64).exp());
    }
}

/// `f` over every input, `S::LANES` at a time (the tail padded with zeros).
fn map_lanes<S: Simd>(xs: &[f32], f: impl Fn(S::V) -> S::V) -> Vec<f32> {
    let mut buf = xs.to_vec();
    buf.resize(xs.len().next_multiple_of(S::LANES), 0.0);
    for c in buf.chunks_mut(S::LANES) {
        // SAFETY: each chunk holds LANES values.
        unsafe { S::store(c.as_mut_ptr(), f(S::load(c.as_ptr()))) };
    }
    buf.truncate(xs.len());
    buf
}

/// `erf` of every input, computed `S::LANES` at a time.
fn erf_lanes<S: Simd>(xs: &[f32]) -> Vec<f32> {
    map_lanes::<S>(xs, math::erf::<S>)
}

#[test]
fn simd_lanes_agree_with_scalar() {
    // The portable vector type computes the same function as one-lane code.
    let xs = data(9, 64, 6.0);
    for (o, s) in erf_lanes::<sg_tensor::simd::Portable>(&xs).iter().zip(erf_lanes::<Scalar>(&xs)) {
        assert!((o - s).abs() <= 2e-7);
    }
}

type SliceFn = fn(&[f32]) -> Vec<f32>;

/// Every lane type this CPU runs, as `erf` over a slice.
fn erf_on_every_lane_type() -> Vec<(&'static str, SliceFn)> {
    let mut v: Vec<(&'static str, SliceFn)> =
        vec![("scalar", erf_lanes::<Scalar>), ("portable", erf_lanes::<sg_tensor::simd::Portable>)];
    #[cfg(target_arch = "x86_64")]
    if Isa::available().contains(&Isa::Avx2Fma) {
        v.push(("avx2+fma", erf_lanes::<sg_tensor::simd::Avx2>));
    }
    v
}

#[test]
fn erf_is_accurate_everywhere_on_every_lane_type() {
    // A dense sweep, both sides of every piece boundary (k / 2, up to the cut to +-1 at 4), tiny
    // values (relative accuracy near 0), and large ones.
    let mut xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 5e-4).collect();
    for k in 1..=8 {
        let b = k as f32 * 0.5;
        for x in [b, f32::from_bits(b.to_bits() - 1), f32::from_bits(b.to_bits() + 1)] {
            xs.extend([x, -x]);
        }
    }
    xs.extend([1e-30, -1e-30, 1e-40, 3e-8, 1e-4, 9.0, 1e30, -1e30]);
    for (name, erf) in erf_on_every_lane_type() {
        for (&x, &g) in xs.iter().zip(&erf(&xs)) {
            let want = math::reference::erf(x as f64);
            let err = (g as f64 - want).abs();
            assert!(err <= 1e-7, "{name}: erf({x:e}) = {g:e}, want {want:e}");
            // Subnormal results have fewer significant bits than this asks for.
            if x.abs() < 0.5 && want.abs() >= f32::MIN_POSITIVE as f64 {
                assert!(err <= 3e-7 * want.abs(), "{name}: erf({x:e}) = {g:e}, relative to {want:e}");
            }
        }
        let y = erf(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0]);
        assert!(y[0].is_nan(), "{name}: NaN must propagate");
        assert_eq!((y[1], y[2]), (1.0, -1.0), "{name}");
        assert_eq!((y[3].to_bits(), y[4].to_bits()), (0f32.to_bits(), (-0f32).to_bits()), "{name}: signed zeros");
    }
}

#[test]
fn table_lookup_agrees_on_every_lane_type() {
    let table = [10.0f32, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0];
    let idx = [7.0f32, 0.0, 3.0, 5.0, 1.0, 6.0, 2.0, 4.0];
    let odd = [f32::NAN, -0.0, 8.0, -1.0, 1e10, f32::INFINITY, f32::NEG_INFINITY, 7.0];
    for ix in [idx, odd] {
        let scalar = map_lanes::<Scalar>(&ix, |i| Scalar::lookup8(&table, i));
        let port = map_lanes::<sg_tensor::simd::Portable>(&ix, |i| sg_tensor::simd::Portable::lookup8(&table, i));
        assert_eq!(scalar, port, "indices {ix:?}");
        #[cfg(target_arch = "x86_64")]
        if Isa::available().contains(&Isa::Avx2Fma) {
            use sg_tensor::simd::Avx2;
            assert_eq!(scalar, map_lanes::<Avx2>(&ix, |i| Avx2::lookup8(&table, i)), "indices {ix:?}");
        }
    }
    let want: Vec<f32> = idx.iter().map(|&i| table[i as usize]).collect();
    assert_eq!(map_lanes::<Scalar>(&idx, |i| Scalar::lookup8(&table, i)), want);
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_roundtrip() {
    let a = ndarray::Array::from_shape_fn((3, 4), |(i, j)| (i * 10 + j) as f32);
    let t = Tensor::from_ndarray(&a.t());
    assert_eq!(t.shape(), &[4, 3]);
    assert_eq!(t.get(&[1, 2]).unwrap(), 21.0);
    assert_eq!(t.to_ndarray().into_dimensionality::<ndarray::Ix2>().unwrap(), a.t());
}

/// Runs `f` in a private pool of `n` threads.
#[test]
fn results_are_bit_identical_for_any_thread_count() {
    let (rows, dim) = (3000, 96);
    let x = data(1, rows * dim, 3.0);
    let dy = data(2, rows * dim, 1.0);
    let gamma = data(3, dim, 1.0);
    let s = AttnShape { batch: 3, seq: 300, heads: 4, head_dim: 24 };
    let qkv = data(4, s.batch * s.seq * 3 * s.heads * s.head_dim, 1.0);
    let w = s.heads * s.head_dim;
    let run = || {
        let (mut mean, mut rstd, mut y) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows * dim]);
        layernorm::forward(&x, &gamma, &gamma, rows, 1e-6, &mut y, Some((&mut mean, &mut rstd))).unwrap();
        let (mut dx, mut dg, mut db) = (vec![0.0; rows * dim], vec![0.0; dim], vec![0.0; dim]);
        layernorm::backward(&x, &gamma, &mean, &rstd, &dy, &mut dx, Dst::Overwrite, &mut dg, &mut db).unwrap();
        let mut cs = vec![0.0; dim];
        reduce::col_sum(&x, rows, dim, &mut cs, Dst::Overwrite).unwrap();
        // Wide enough that each thread count cuts the columns differently.
        let mut cs_wide = vec![0.0; 700];
        reduce::col_sum(&x[..400 * 700], 400, 700, &mut cs_wide, Dst::Overwrite).unwrap();
        cs.extend(cs_wide);
        let total = reduce::sum(&x);
        let mut c = vec![0.0; dim * dim];
        gemm::gemm(gemm::Trans::T, gemm::Trans::N, dim, dim, rows, 1.0, &x, dim, &dy, dim, 0.0, &mut c, dim).unwrap();
        let (q, k, v) = (
            Rows { data: &qkv, ld: 3 * w },
            Rows { data: &qkv[w..], ld: 3 * w },
            Rows { data: &qkv[2 * w..], ld: 3 * w },
        );
        let mut o = vec![0.0; s.batch * s.seq * w];
        let mut lse = vec![0.0; s.batch * s.heads * s.seq];
        attention::forward(s, q, k, v, 0.2, RowsMut { data: &mut o, ld: w }, Some(&mut lse)).unwrap();
        let mut dqkv = vec![0.0; qkv.len()];
        attention::backward(
            s,
            q,
            k,
            v,
            Rows { data: &o, ld: w },
            Rows { data: &o, ld: w },
            &lse,
            0.2,
            QkvGrad::Packed(&mut dqkv),
        )
        .unwrap();
        (y, dx, dg, db, cs, total.to_bits(), c, o, dqkv)
    };
    let one = with_threads(1, run);
    for n in [2, 3] {
        assert!(with_threads(n, run) == one, "{n} threads differ from 1");
    }
}

/// `par::install` runs its closure on a thread of the global pool, returns what the closure
/// returns, and the kernels inside it give the same bits as called from outside the pool.
#[test]
#[cfg(feature = "rayon")]
fn install_runs_on_a_pool_thread_with_the_same_results() {
    assert_eq!(rayon::current_thread_index(), None, "the test thread is outside the pool");
    assert!(sg_tensor::par::install(rayon::current_thread_index).is_some());
    // Nested: already on a pool thread, it runs inline.
    let nested = sg_tensor::par::install(|| {
        let outer = rayon::current_thread_index();
        (outer, sg_tensor::par::install(rayon::current_thread_index))
    });
    assert_eq!(nested.0, nested.1);
    let (m, k, n) = (300, 200, 180);
    let (a, b) = (data(5, m * k, 1.0), data(6, k * n, 1.0));
    let product = || {
        let mut c = vec![0.0; m * n];
        gemm::gemm(gemm::Trans::N, gemm::Trans::N, m, n, k, 1.0, &a, k, &b, n, 0.0, &mut c, n).unwrap();
        c
    };
    let outside = product();
    assert!(sg_tensor::par::install(product) == outside);
}

#[test]
fn ln_is_accurate_on_every_lane_type() {
    // Every binade of the normal range at several mantissas, both sides of the fold at sqrt(2),
    // values next to 1 (relative accuracy near the zero of ln), and a softmax's sums (1 to 1e4).
    let r2 = std::f32::consts::SQRT_2;
    let (below, above) = (f32::from_bits(r2.to_bits() - 1), f32::from_bits(r2.to_bits() + 1));
    let mut xs: Vec<f32> = (-126..=127)
        .flat_map(|e| [1.0f32, 1.1, below, r2, above, 1.5, 1.999_999].map(|m| m * 2f32.powi(e)))
        .filter(|x| x.is_finite())
        .collect();
    xs.extend((1..200).flat_map(|i| [1.0 + i as f32 * f32::EPSILON, 1.0 - i as f32 * f32::EPSILON / 2.0]));
    xs.extend(data(21, 2000, 1.0).iter().map(|u| 10f32.powf(2.0 + 2.0 * u)));
    let lanes: Vec<(&str, SliceFn)> = vec![
        ("scalar", |x| map_lanes::<Scalar>(x, math::ln_pos::<Scalar>)),
        ("portable", |x| map_lanes::<sg_tensor::simd::Portable>(x, math::ln_pos::<sg_tensor::simd::Portable>)),
        #[cfg(target_arch = "x86_64")]
        ("avx2+fma", |x| map_lanes::<sg_tensor::simd::Avx2>(x, math::ln_pos::<sg_tensor::simd::Avx2>)),
    ];
    for (name, ln) in lanes {
        #[cfg(target_arch = "x86_64")]
        if name == "avx2+fma" && !Isa::available().contains(&Isa::Avx2Fma) {
            continue;
        }
        for (&x, y) in xs.iter().zip(ln(&xs)) {
            let want = (x as f64).ln();
            // Two units in the last place of the result.
            let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE) as f64 * f32::EPSILON as f64;
            assert!((y as f64 - want).abs() <= 2.0 * ulp, "{name}: ln {x:e} = {y:e}, want {want:e}");
        }
        let y = ln(&[f32::NAN, f32::INFINITY, 1.0]);
        assert!(y[0].is_nan(), "{name}: NaN must propagate");
        assert_eq!((y[1], y[2]), (f32::INFINITY, 0.0), "{name}");
    }
}

#[test]
fn exp2_nonpos_is_accurate_on_every_lane_type() {
    // Every integer and half-integer of the range (the rounding's ties), values next to them, a
    // dense sweep near 0 (a softmax's largest probabilities) and random values.
    let mut xs: Vec<f32> = (0..=252).map(|i| -(i as f32) / 2.0).collect();
    xs.extend(xs.clone().iter().flat_map(|&x| [f32::from_bits(x.to_bits() + 1), x + f32::EPSILON]));
    xs.extend((0..4000).map(|i| -(i as f32) / 4000.0));
    xs.extend(data(22, 4000, 1.0).iter().map(|u| -126.0 * u.abs()));
    xs.retain(|&x| (-126.0..=0.0).contains(&x));
    let lanes: Vec<(&str, SliceFn)> = vec![
        ("scalar", |x| map_lanes::<Scalar>(x, math::exp2_nonpos::<Scalar>)),
        ("portable", |x| map_lanes::<sg_tensor::simd::Portable>(x, math::exp2_nonpos::<sg_tensor::simd::Portable>)),
        #[cfg(target_arch = "x86_64")]
        ("avx2+fma", |x| map_lanes::<sg_tensor::simd::Avx2>(x, math::exp2_nonpos::<sg_tensor::simd::Avx2>)),
    ];
    for (name, exp2) in lanes {
        #[cfg(target_arch = "x86_64")]
        if name == "avx2+fma" && !Isa::available().contains(&Isa::Avx2Fma) {
            continue;
        }
        let mut worst = 0f64;
        for (&x, y) in xs.iter().zip(exp2(&xs)) {
            let want = (x as f64).exp2();
            worst = worst.max((y as f64 - want).abs() / want);
        }
        // About two units in the last place (2^-23 = 1.2e-7).
        assert!(worst <= 2.5e-7, "{name}: relative error {worst:e}");
        let y = exp2(&[f32::NAN, -1000.0, 0.0]);
        assert!(y[0].is_nan(), "{name}: NaN must propagate");
        assert_eq!((y[1], y[2]), (f32::MIN_POSITIVE, 1.0), "{name}");
    }
}

/// The peak probe does the work it counts, on every instruction set: each of its chains is
/// x <- 0.999999 x + 1e-7 from 0, so n steps leave about n * 1e-7 per lane.
#[test]
fn fma_probe_counts_the_work_it_does() {
    let n = 1000;
    for isa in Isa::available() {
        let (flops, sum) = sg_tensor::simd::with_isa(isa, || sg_tensor::simd::fma_probe(n));
        let lanes = flops / (2 * 12 * n) as f64;
        assert!([1.0, 4.0, 8.0].contains(&lanes), "{isa:?}: {flops} operations for {n} steps");
        let per_lane = (1.0 - 0.999_999f64.powi(n as i32)) / 1e-6 * 1e-7;
        let want = 12.0 * lanes * per_lane;
        assert!((sum as f64 - want).abs() <= 1e-4 * want, "{isa:?}: {sum} vs {want}");
    }
}
