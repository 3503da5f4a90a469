//! Softmax and LayerNorm, forward and backward, against f64.
mod common;
use common::*;
use proptest::prelude::*;
use sg_tensor::kernels::{layernorm, softmax};
use sg_tensor::Dst;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn softmax_matches_f64(seed in seed(), rows in 1usize..70, dim in 1usize..600,
                           scale in prop::sample::select(vec![1.0f32, 30.0, 1e4])) {
        let x = data(seed, rows * dim, scale);
        let dy = data(seed ^ 2, rows * dim, 1.0);
        on_every_isa(|isa| {
            let mut y = vec![0.0; x.len()];
            softmax::forward(&x, &mut y, rows, dim).unwrap();
            let want = softmax::reference::forward(&x, dim);
            let e = max_err(&y, &want);
            assert!(e <= 1e-6, "{isa:?} forward {e}");
            for r in y.chunks(dim) {
                let s: f32 = r.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{isa:?} row sums to {s}");
            }
            let mut dx = vec![0.0; x.len()];
            softmax::backward(&y, &dy, &mut dx, rows, dim, Dst::Overwrite).unwrap();
            let want = softmax::reference::backward(&y, &dy, dim);
            let e = max_err(&dx, &want);
            assert!(e <= 1e-6, "{isa:?} backward {e}");
        });
    }

    #[test]
    fn layernorm_matches_f64(seed in seed(), rows in 1usize..150, dim in 1usize..900,
                             scale in prop::sample::select(vec![1.0f32, 100.0]), shift in -50.0f32..50.0) {
        let x: Vec<f32> = data(seed, rows * dim, scale).iter().map(|v| v + shift).collect();
        let gamma = data(seed ^ 1, dim, 1.5);
        let beta = data(seed ^ 2, dim, 0.5);
        let dy = data(seed ^ 3, rows * dim, 1.0);
        let eps = 1e-6;
        on_every_isa(|isa| {
            let mut y = vec![0.0; x.len()];
            let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm::forward(&x, &gamma, &beta, rows, eps, &mut y, Some((&mut mean, &mut rstd))).unwrap();
            let (wy, wm, wr) = layernorm::reference::forward(&x, &gamma, &beta, eps as f64);
            // What any f32 implementation can achieve depends on the conditioning: rounding the mean
            // costs ~eps * |mean|, measured in units of the row's standard deviation.
            let cond = wm.iter().zip(&wr).map(|(m, r)| 1.0 + m.abs() * r).fold(1.0, f64::max);
            let tol = 4e-7 * cond * (dim as f64).sqrt().max(2.0);
            assert!(max_err(&y, &wy) <= tol * 4.0, "{isa:?} y {}", max_err(&y, &wy));
            assert!(max_err(&mean, &wm) <= 1e-6 * (scale + shift.abs()) as f64);
            assert!(rel_to_max(&rstd, &wr) <= tol, "{isa:?} rstd {}", rel_to_max(&rstd, &wr));
            // Inference form gives the same y.
            let mut y2 = vec![0.0; x.len()];
            layernorm::forward(&x, &gamma, &beta, rows, eps, &mut y2, None).unwrap();
            assert_eq!(y, y2);
            let mut dx = vec![0.25; x.len()];
            let (mut dg, mut db) = (vec![1.0; dim], vec![-1.0; dim]);
            layernorm::backward(&x, &gamma, &mean, &rstd, &dy, &mut dx, Dst::Accumulate, &mut dg, &mut db).unwrap();
            let (wdx, wdg, wdb) = layernorm::reference::backward(&x, &gamma, &dy, eps as f64);
            let wdx: Vec<f64> = wdx.iter().map(|v| v + 0.25).collect();
            let wdg: Vec<f64> = wdg.iter().map(|v| v + 1.0).collect();
            let wdb: Vec<f64> = wdb.iter().map(|v| v - 1.0).collect();
            // dx is a difference of terms of size rstd * |dy * gamma|, which can cancel almost fully.
            let term = wr.iter().fold(0.0f64, |m, &r| m.max(r)) * 1.5;
            assert!(rel_to_max_floor(&dx, &wdx, term) <= tol * 8.0, "{isa:?} dx {}", rel_to_max_floor(&dx, &wdx, term));
            assert!(rel_to_max(&dg, &wdg) <= tol * 8.0, "{isa:?} dgamma {}", rel_to_max(&dg, &wdg));
            assert!(rel_to_max(&db, &wdb) <= 1e-5, "{isa:?} dbeta {}", rel_to_max(&db, &wdb));
        });
    }
}

#[test]
fn softmax_is_stable_for_huge_logits() {
    on_every_isa(|isa| {
        let mut x = vec![1e30f32, -1e30, 3.0e38, 0.0, 3.0e38];
        softmax::forward_inplace(&mut x, 1, 5).unwrap();
        assert_eq!(x, vec![0.0, 0.0, 0.5, 0.0, 0.5], "{isa:?}");
        let mut single = vec![-7.0f32];
        softmax::forward_inplace(&mut single, 1, 1).unwrap();
        assert_eq!(single, vec![1.0]);
    });
}

#[test]
fn bad_shapes_are_errors() {
    let mut y = vec![0.0; 6];
    assert!(softmax::forward(&[0.0; 6], &mut y, 4, 2).is_err());
    let e = layernorm::forward(&[0.0; 6], &[1.0; 3], &[0.0; 2], 2, 1e-6, &mut y, None).unwrap_err();
    assert!(e.to_string().contains("`beta` has 2 elements, expected 3"), "{e}");
    assert!(layernorm::forward(&[0.0; 6], &[1.0; 3], &[0.0; 3], 2, 0.0, &mut y, None).is_err());
}
