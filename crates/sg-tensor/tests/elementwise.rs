//! GELU, elementwise arithmetic, reductions, gathers and AdamW against references.
mod common;
use common::*;
use proptest::prelude::*;
use sg_tensor::kernels::{adamw, elementwise, gather, gelu, reduce};
use sg_tensor::simd::Isa;
use sg_tensor::Dst;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gelu_matches_f64(seed in seed(), n in prop_oneof![1usize..200, 32_769usize..50_000], scale in prop::sample::select(vec![0.5f32, 3.0, 8.0, 50.0])) {
        let x = data(seed, n, scale);
        let dy = data(seed ^ 1, n, 1.0);
        on_every_isa(|isa| {
            let mut y = vec![0.0; n];
            gelu::forward(&x, &mut y).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| gelu::reference::gelu(v as f64)).collect();
            assert!(max_err(&y, &want) <= 1e-6, "{isa:?} forward err {}", max_err(&y, &want));
            let mut dx = vec![0.5; n];
            gelu::backward(&x, &dy, &mut dx, Dst::Accumulate).unwrap();
            let want: Vec<f64> = x.iter().zip(&dy).map(|(&v, &d)| 0.5 + d as f64 * gelu::reference::gelu_grad(v as f64)).collect();
            assert!(max_err(&dx, &want) <= 1e-6, "{isa:?} backward err {}", max_err(&dx, &want));
            // In place: the same bits as writing a fresh buffer.
            gelu::backward(&x, &dy, &mut dx, Dst::Overwrite).unwrap();
            let mut g = dy.clone();
            gelu::backward_inplace(&x, &mut g).unwrap();
            assert_eq!(g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{isa:?} in place");
        });
    }

    #[test]
    fn elementwise_ops_match_reference(seed in seed(), n in 0usize..100_000) {
        let a = data(seed, n, 10.0);
        let b = data(seed ^ 7, n, 10.0);
        on_every_isa(|isa| {
            let mut out = vec![0.0; n];
            let mut want = vec![0.0; n];
            elementwise::add(&a, &b, &mut out, Dst::Overwrite).unwrap();
            elementwise::reference::add(&a, &b, &mut want);
            assert_eq!(out, want, "{isa:?} add");
            elementwise::mul(&a, &b, &mut out, Dst::Overwrite).unwrap();
            elementwise::reference::mul(&a, &b, &mut want);
            assert_eq!(out, want, "{isa:?} mul");
            let mut y = b.clone();
            let mut yr = b.clone();
            elementwise::axpy(0.25, &a, &mut y, Dst::Accumulate).unwrap();
            elementwise::reference::axpy(0.25, &a, &mut yr);
            let e = max_err(&y, &to_f64(&yr));
            assert!(e <= 1e-6, "{isa:?} axpy {e}");
            let mut y = b.clone();
            elementwise::add_assign(&mut y, &a).unwrap();
            elementwise::reference::add(&a, &b, &mut want);
            assert_eq!(y, want, "{isa:?} add_assign");
        });
    }

    #[test]
    fn row_broadcast_and_col_sum(seed in seed(), rows in 1usize..300, cols in 1usize..700) {
        let x = data(seed, rows * cols, 3.0);
        let row = data(seed ^ 3, cols, 3.0);
        on_every_isa(|isa| {
            let mut y = x.clone();
            let mut yr = x.clone();
            elementwise::add_row_broadcast(&mut y, &row).unwrap();
            elementwise::reference::add_row_broadcast(&mut yr, &row);
            assert_eq!(y, yr, "{isa:?}");
            let mut cs = vec![1.0; cols];
            reduce::col_sum(&x, rows, cols, &mut cs, Dst::Accumulate).unwrap();
            let want: Vec<f64> = reduce::reference::col_sum(&x, rows, cols).iter().map(|v| v + 1.0).collect();
            let e = max_err(&cs, &want) / rows as f64;
            assert!(e <= 1e-6, "{isa:?} col_sum {e}");
        });
    }

    #[test]
    fn sums_are_accurate(seed in seed(), n in 0usize..300_000) {
        let x = data(seed, n, 100.0);
        on_every_isa(|isa| {
            // The kernel sums blocks of 1,024 values in f32 on four accumulators per lane, then
            // adds the blocks in f64: each f32 chain is `1024 / (4 * lanes)` terms long, and
            // recursive summation of m terms errs by at most (m - 1) u times the sum of their
            // magnitudes (Higham). (A bound of 2e-7 of that sum, tried first, was typical rather
            // than certain: one-lane chains of 256 squares missed it on a random seed.)
            let lanes = if isa == Isa::Scalar { 1 } else { 8 };
            let tol = (1024 / (4 * lanes) - 1) as f64 * f32::EPSILON as f64 / 2.0;
            let s = reduce::sum(&x);
            let want = reduce::reference::sum(&x);
            let abs: f64 = x.iter().map(|&v| v.abs() as f64).sum();
            assert!((s - want).abs() <= tol * abs.max(1.0), "{isa:?} sum {s} vs {want}");
            let q = reduce::sum_sq(&x);
            let wq: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((q - wq).abs() <= tol * wq.max(1.0), "{isa:?} sum_sq {q} vs {wq}");
            if n > 0 {
                let m = reduce::max(&x).unwrap();
                assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max), "{isa:?} max");
            }
        });
    }

    #[test]
    fn gather_scatter_roundtrip(seed in seed(), batch in 1usize..4, len in 1usize..50, dim in 1usize..40, keep_frac in 0.0f64..1.0) {
        let x = data(seed, batch * len * dim, 1.0);
        let keep = ((len as f64 * keep_frac) as usize).max(1);
        // A permutation per batch, drawn from the seed.
        let mut ids = Vec::new();
        for b in 0..batch {
            let noise = data(seed ^ (b as u64 + 11), len, 1.0);
            let mut order: Vec<usize> = (0..len).collect();
            order.sort_by(|&i, &j| noise[i].total_cmp(&noise[j]));
            ids.extend_from_slice(&order[..keep]);
        }
        let mut g = vec![0.0; batch * keep * dim];
        gather::gather_rows(&x, batch, len, dim, &ids, &mut g).unwrap();
        for b in 0..batch {
            for i in 0..keep {
                let id = ids[b * keep + i];
                assert_eq!(&g[(b * keep + i) * dim..(b * keep + i + 1) * dim], &x[(b * len + id) * dim..(b * len + id + 1) * dim]);
            }
        }
        // Scatter back: kept rows return to their places, the others stay zero.
        let mut back = vec![0.0; x.len()];
        gather::scatter_rows(&g, batch, len, dim, &ids, &mut back).unwrap();
        let mut acc = vec![0.0; x.len()];
        gather::scatter_add_rows(&g, batch, len, dim, &ids, &mut acc).unwrap();
        gather::scatter_add_rows(&g, batch, len, dim, &ids, &mut acc).unwrap();
        for b in 0..batch {
            for t in 0..len {
                let kept = ids[b * keep..(b + 1) * keep].contains(&t);
                for d in 0..dim {
                    let o = (b * len + t) * dim + d;
                    assert_eq!(back[o], if kept { x[o] } else { 0.0 });
                    assert_eq!(acc[o], if kept { 2.0 * x[o] } else { 0.0 });
                }
            }
        }
    }

    #[test]
    fn adamw_matches_pytorch_formulas(seed in seed(), n in 1usize..50_000, step in 1u64..2000, wd in prop::sample::select(vec![0.0f32, 0.05])) {
        let h = adamw::AdamW { lr: 1.5e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd, step };
        let mut p = data(seed, n, 1.0);
        let g = data(seed ^ 5, n, 0.1);
        let mut m = data(seed ^ 6, n, 0.01);
        let mut v: Vec<f32> = data(seed ^ 9, n, 1e-3).iter().map(|x| x.abs()).collect();
        let (mut pr, gr, mut mr, mut vr) = (to_f64(&p), to_f64(&g), to_f64(&m), to_f64(&v));
        adamw::reference::step(&h, &mut pr, &gr, &mut mr, &mut vr);
        adamw::step(&h, &mut p, &g, &mut m, &mut v).unwrap();
        assert!(max_err(&p, &pr) <= 2e-6, "param {}", max_err(&p, &pr));
        assert!(max_err(&m, &mr) <= 1e-7);
        assert!(max_err(&v, &vr) <= 1e-7);
    }

    #[test]
    fn adamw_split_matches_step_bitwise(seed in seed(), n in 1usize..50_000, step in 1u64..2000, wd in prop::sample::select(vec![0.0f32, 0.05])) {
        let h = adamw::AdamW { lr: 1.5e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd, step };
        let g = data(seed ^ 5, n, 0.1);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        on_every_isa(|isa| {
            let mut p = data(seed, n, 1.0);
            let mut m = data(seed ^ 6, n, 0.01);
            let mut v: Vec<f32> = data(seed ^ 9, n, 1e-3).iter().map(|x| x.abs()).collect();
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            adamw::step(&h, &mut p, &g, &mut m, &mut v).unwrap();
            adamw::moments(&h, &g, &mut m2, &mut v2).unwrap();
            adamw::apply(&h, &mut p2, &m2, &v2).unwrap();
            assert_eq!((bits(&p), bits(&m), bits(&v)), (bits(&p2), bits(&m2), bits(&v2)), "{isa:?}");
        });
    }
}

#[test]
fn gelu_special_values() {
    on_every_isa(|isa| {
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e30, -1e30, 4.0, -4.0, 1.0, -1.0];
        let mut y = [0.0; 11];
        gelu::forward(&x, &mut y).unwrap();
        assert!(y[0].is_nan(), "{isa:?} NaN must propagate");
        assert_eq!(y[1], f32::INFINITY, "{isa:?}");
        // -inf * Phi(-inf) = -inf * 0: NaN, as PyTorch's x * Phi(x) gives; non-finite stays visible.
        assert!(y[2].is_nan(), "{isa:?} gelu(-inf) got {}", y[2]);
        assert_eq!(y[3], 0.0);
        assert_eq!(y[5], 1e30, "{isa:?}");
        assert_eq!(y[6], 0.0, "{isa:?}");
    });
}

#[test]
fn adamw_worked_example() {
    // Worked by hand from torch.optim.AdamW's update, step 1 (bias corrections 0.1 and 0.05):
    // p = 1 * (1 - 0.1 * 0.5) = 0.95; m = 0.1 * 2 = 0.2; v = 0.05 * 4 = 0.2;
    // m_hat = 2, sqrt(v_hat) = 2, p = 0.95 - 0.1 * 2 / (2 + 1e-8) = 0.85.
    let h = adamw::AdamW { lr: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.5, step: 1 };
    let (mut p, g, mut m, mut v) = ([1.0f32], [2.0f32], [0.0f32], [0.0f32]);
    adamw::step(&h, &mut p, &g, &mut m, &mut v).unwrap();
    assert!((p[0] - 0.85).abs() < 1e-7, "{}", p[0]);
    assert!((m[0] - 0.2).abs() < 1e-7 && (v[0] - 0.2).abs() < 1e-7);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut y = vec![0.0; 3];
    let e = gelu::forward(&[1.0, 2.0], &mut y).unwrap_err();
    assert!(e.to_string().contains("gelu::forward") && e.to_string().contains("`y` has 3"), "{e}");
    let e = gather::gather_rows(&[0.0; 8], 1, 4, 2, &[0, 9], &mut [0.0; 4]).unwrap_err();
    assert!(e.to_string().contains("index 9"), "{e}");
    let e = elementwise::add_row_broadcast(&mut [0.0; 7], &[1.0, 2.0]).unwrap_err();
    assert!(e.to_string().contains("7 elements"), "{e}");
    let h = adamw::AdamW { lr: 0.1, beta1: 1.0, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, step: 1 };
    assert!(adamw::step(&h, &mut [0.0], &[0.0], &mut [0.0], &mut [0.0]).is_err());
    assert!(reduce::mean(&[]).is_err());
    assert!(!reduce::all_finite(&[1.0, f32::NAN]));
    assert!(!reduce::all_finite(&[f32::INFINITY]));
    assert!(reduce::all_finite(&[1.0, -3.0]));
}

/// `kernels::zeros` clears every value on any thread count, also in memory the allocator hands
/// back from a freed buffer full of NaN (a chunk left unwritten would show it).
#[test]
fn zeros_clears_reused_memory() {
    for threads in [1, 2, 3] {
        for n in [0, 5, (1 << 19) + 1, 3 << 20] {
            let z = with_threads(threads, || {
                drop(vec![f32::NAN; n]);
                sg_tensor::kernels::zeros(n)
            });
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&v| v.to_bits() == 0), "{threads} threads, {n} values");
        }
    }
}
