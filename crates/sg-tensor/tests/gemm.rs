//! GEMM in every layout, Linear with its fused epilogues, against f64.
mod common;
use common::*;
use proptest::prelude::*;
use sg_tensor::kernels::gemm::{self, gemm, Trans};
use sg_tensor::kernels::linear::{self, Activation};
use sg_tensor::Dst;

fn layout() -> impl Strategy<Value = Trans> {
    prop::sample::select(vec![Trans::N, Trans::T])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn gemm_every_layout(seed in seed(), m in 1usize..70, n in 1usize..70, k in 1usize..90,
                         ta in layout(), tb in layout(), pad in 0usize..3,
                         alpha in prop::sample::select(vec![1.0f32, -0.5]), beta in prop::sample::select(vec![0.0f32, 1.0, 0.5])) {
        let (ar, ac) = if ta == Trans::N { (m, k) } else { (k, m) };
        let (br, bc) = if tb == Trans::N { (k, n) } else { (n, k) };
        let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
        let a = data(seed, ar * lda, 1.0);
        let b = data(seed ^ 1, br * ldb, 1.0);
        let c0 = data(seed ^ 2, m * ldc, 1.0);
        let want = gemm::reference::gemm_f64(ta, tb, m, n, k, alpha as f64, &a, lda, &b, ldb, beta as f64, &c0, ldc);
        on_every_isa(|isa| {
            let mut c = c0.clone();
            gemm(ta, tb, m, n, k, alpha, &a, lda, &b, ldb, beta, &mut c, ldc).unwrap();
            let got: Vec<f32> = (0..m).flat_map(|i| c[i * ldc..i * ldc + n].to_vec()).collect();
            let e = max_err(&got, &want) / (k as f64).sqrt();
            assert!(e <= 1e-6, "{isa:?} {ta:?}{tb:?} {m}x{n}x{k} err {e}");
            // Padding columns of C are untouched.
            for i in 0..m {
                assert_eq!(&c[i * ldc + n..i * ldc + ldc], &c0[i * ldc + n..i * ldc + ldc]);
            }
        });
    }

    #[test]
    fn linear_forward_and_backward(seed in seed(), m in 1usize..200, k in 1usize..80, n in 1usize..150, gelu in any::<bool>()) {
        let x = data(seed, m * k, 2.0);
        let w = data(seed ^ 1, n * k, 0.5);
        let b = data(seed ^ 2, n, 0.5);
        let dy = data(seed ^ 3, m * n, 1.0);
        let act = if gelu { Activation::Gelu } else { Activation::Identity };
        let want = linear::reference::forward(&x, &w, Some(&b), m, k, n, act);
        let pre_want = linear::reference::forward(&x, &w, Some(&b), m, k, n, Activation::Identity);
        on_every_isa(|isa| {
            let mut y = vec![f32::NAN; m * n];
            let mut pre = vec![f32::NAN; m * n];
            let pre_opt = if gelu { Some(&mut pre[..]) } else { None };
            linear::forward(&x, &w, Some(&b), m, k, n, act, pre_opt, &mut y).unwrap();
            let e = max_err(&y, &want) / (k as f64).sqrt();
            assert!(e <= 2e-6, "{isa:?} y err {e}");
            if gelu {
                assert!(max_err(&pre, &pre_want) / (k as f64).sqrt() <= 2e-6);
                // Inference form (GELU in place) gives the same y.
                let mut y2 = vec![0.0; m * n];
                linear::forward(&x, &w, Some(&b), m, k, n, act, None, &mut y2).unwrap();
                assert_eq!(y, y2);
            }
            // Backward: dpre = dy * gelu'(pre); dx = dpre W; dw += dpre^T x; db += colsum dpre.
            let dpre: Vec<f64> = if gelu {
                pre_want.iter().zip(&dy).map(|(&p, &d)| d as f64 * sg_tensor::kernels::gelu::reference::gelu_grad(p)).collect()
            } else { to_f64(&dy) };
            let (mut dx, mut dw, mut db) = (vec![0.0; m * k], vec![1.0; n * k], vec![1.0; n]);
            if gelu {
                linear::backward_gelu(&x, &w, &pre, &dy, m, k, n, Some((&mut dx, Dst::Overwrite)), &mut dw, Some(&mut db)).unwrap();
            } else {
                linear::backward(&x, &w, &dy, m, k, n, Some((&mut dx, Dst::Overwrite)), &mut dw, Some(&mut db)).unwrap();
            }
            let wdx: Vec<f64> = (0..m * k).map(|i| (0..n).map(|j| dpre[i / k * n + j] * w[j * k + i % k] as f64).sum()).collect();
            let wdw: Vec<f64> = (0..n * k).map(|i| 1.0 + (0..m).map(|r| dpre[r * n + i / k] * x[r * k + i % k] as f64).sum::<f64>()).collect();
            let wdb: Vec<f64> = (0..n).map(|j| 1.0 + (0..m).map(|r| dpre[r * n + j]).sum::<f64>()).collect();
            assert!(rel_to_max(&dx, &wdx) <= 1e-5, "{isa:?} dx {}", rel_to_max(&dx, &wdx));
            assert!(rel_to_max(&dw, &wdw) <= 1e-5, "{isa:?} dw {}", rel_to_max(&dw, &wdw));
            assert!(rel_to_max(&db, &wdb) <= 1e-5, "{isa:?} db {}", rel_to_max(&db, &wdb));
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    #[test]
    fn linear_with_a_packed_weight_equals_the_stored_one(seed in seed(), m in 1usize..120, k in 1usize..80,
                                                          n in 1usize..90, gelu in any::<bool>()) {
        let x = data(seed, m * k, 2.0);
        let w = data(seed ^ 1, n * k, 0.5);
        let b = data(seed ^ 2, n, 0.5);
        let act = if gelu { Activation::Gelu } else { Activation::Identity };
        let panels = gemm::pack_panels(&w, n, k).unwrap();
        assert_eq!(panels.len(), gemm::panels_len(k, n));
        on_every_isa(|isa| {
            let mut want = vec![f32::NAN; m * n];
            linear::forward(&x, &w, Some(&b), m, k, n, act, None, &mut want).unwrap();
            let mut got = vec![f32::NAN; m * n];
            linear::forward_panels(&x, &panels, Some(&b), m, k, n, act, &mut got).unwrap();
            // Same kernel, same blocks over k: the same bits, not just close.
            assert!(same_bits(&got, &want), "{isa:?} {m}x{k}x{n}");
        });
    }
}

/// `forward_new` (uninitialised buffers where the product writes every value) against `forward`
/// into buffers of NaN: the same bits, y and the pre-activation.
fn check_new_outputs(m: usize, k: usize, n: usize, gelu: bool, seed: u64) {
    let x = data(seed, m * k, 2.0);
    let w = data(seed ^ 1, n * k, 0.5);
    let b = data(seed ^ 2, n, 0.5);
    let act = if gelu { Activation::Gelu } else { Activation::Identity };
    let panels = gemm::pack_panels(&w, n, k).unwrap();
    on_every_isa(|isa| {
        let (mut y, mut pre) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        linear::forward(&x, &w, Some(&b), m, k, n, act, gelu.then_some(&mut pre[..]), &mut y).unwrap();
        let (y_new, pre_new) = linear::forward_new(&x, &w, Some(&b), m, k, n, act, gelu).unwrap();
        assert!(same_bits(&y_new, &y), "{isa:?} {m}x{k}x{n} y");
        assert_eq!(pre_new.is_some(), gelu);
        if let Some(p) = pre_new {
            assert!(same_bits(&p, &pre), "{isa:?} {m}x{k}x{n} pre");
        }
        let mut y = vec![f32::NAN; m * n];
        linear::forward_panels(&x, &panels, Some(&b), m, k, n, act, &mut y).unwrap();
        let y_new = linear::forward_panels_new(&x, &panels, Some(&b), m, k, n, act).unwrap();
        assert!(same_bits(&y_new, &y), "{isa:?} {m}x{k}x{n} panels");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    #[test]
    fn linear_into_new_buffers_equals_linear_into_given_ones(seed in seed(), m in 0usize..120, k in 0usize..80,
                                                             n in 0usize..90, gelu in any::<bool>()) {
        check_new_outputs(m, k, n, gelu, seed);
    }
}

#[test]
fn linear_into_new_buffers_across_cache_blocks_and_thread_splits() {
    for (m, k, n) in [(151, 520, 48), (13, 300, 3100), (456, 200, 304), (300, 520, 40)] {
        check_new_outputs(m, k, n, true, 5);
    }
    // Shapes are checked before anything is written.
    let e = linear::forward_new(&[0.0; 6], &[0.0; 5], None, 2, 3, 2, Activation::Identity, false).unwrap_err();
    assert!(e.to_string().contains("weight"), "{e}");
    let e = linear::forward_new(&[0.0; 6], &[0.0; 6], None, 2, 3, 2, Activation::Identity, true).unwrap_err();
    assert!(e.to_string().contains("pre-activation"), "{e}");
}

#[test]
fn packed_weights_cross_cache_blocks_and_thread_splits() {
    // k past one k-block, n past one column block (and not a multiple of 16), m split over threads.
    for (m, k, n) in [(151, 520, 48), (13, 300, 3100), (456, 200, 304), (300, 520, 40)] {
        let (x, w, b) = (data(7, m * k, 1.0), data(8, n * k, 1.0), data(9, n, 1.0));
        let want = linear::reference::forward(&x, &w, Some(&b), m, k, n, Activation::Identity);
        let panels = gemm::pack_panels(&w, n, k).unwrap();
        on_every_isa(|isa| {
            let mut y = vec![f32::NAN; m * n];
            linear::forward_panels(&x, &panels, Some(&b), m, k, n, Activation::Identity, &mut y).unwrap();
            let e = max_err(&y, &want) / (k as f64).sqrt();
            assert!(e <= 1e-6, "{isa:?} {m}x{k}x{n} err {e}");
        });
    }
    // Empty weights pack to nothing (no panic), and
    assert!(gemm::pack_panels(&[], 0, 5).unwrap().is_empty());
    assert!(gemm::pack_panels(&[], 4, 0).unwrap().is_empty());
    // a panel buffer of the wrong length is an error naming it.
    let mut y = vec![0.0; 4];
    let e = linear::forward_panels(&[0.0; 6], &[0.0; 6], None, 2, 3, 2, Activation::Identity, &mut y).unwrap_err();
    assert!(e.to_string().contains("weight panels"), "{e}");
}

#[test]
fn gemm_crosses_cache_block_edges() {
    // Past typical cache blocks (m > 144, k > 256, n > 3072) with ragged edges, in every layout,
    // with alpha and beta other than 0 and 1; several row blocks through several k-blocks, and a
    // long k (a dozen k-blocks) on a thin A.
    for (m, n, k) in [(151, 37, 520), (13, 3100, 300), (300, 40, 600), (7, 1100, 2900)] {
        for (ta, tb) in [(Trans::N, Trans::N), (Trans::N, Trans::T), (Trans::T, Trans::N), (Trans::T, Trans::T)] {
            let (ar, ac) = if ta == Trans::N { (m, k) } else { (k, m) };
            let (br, bc) = if tb == Trans::N { (k, n) } else { (n, k) };
            let (a, b, c0) = (data(4, ar * ac, 1.0), data(5, br * bc, 1.0), data(6, m * n, 1.0));
            let want = gemm::reference::gemm_f64(ta, tb, m, n, k, 0.75, &a, ac, &b, bc, 0.5, &c0, n);
            on_every_isa(|isa| {
                let mut c = c0.clone();
                gemm(ta, tb, m, n, k, 0.75, &a, ac, &b, bc, 0.5, &mut c, n).unwrap();
                let e = max_err(&c, &want) / (k as f64).sqrt();
                assert!(e <= 1e-6, "{isa:?} {ta:?}{tb:?} {m}x{n}x{k} err {e}");
            });
        }
    }
}

#[test]
fn large_gemm_splits_over_threads_and_matches() {
    // Big enough to be split across the pool, in the three layouts of a Linear's passes.
    let (m, k, n) = (456, 200, 300);
    let x = data(1, m * k, 1.0);
    let w = data(2, n * k, 1.0);
    let dy = data(3, m * n, 1.0);
    let cases = [
        (Trans::N, Trans::T, m, n, k, &x, k, &w, k),  // forward: x W^T
        (Trans::N, Trans::N, m, k, n, &dy, n, &w, k), // input gradient: dy W
        (Trans::T, Trans::N, n, k, m, &dy, n, &x, k), // weight gradient: dy^T x
    ];
    for (ta, tb, mm, nn, kk, a, lda, b, ldb) in cases {
        let mut c = vec![0.0; mm * nn];
        gemm(ta, tb, mm, nn, kk, 1.0, a, lda, b, ldb, 0.0, &mut c, nn).unwrap();
        let want = gemm::reference::gemm_f64(ta, tb, mm, nn, kk, 1.0, a, lda, b, ldb, 0.0, &c, nn);
        assert!(max_err(&c, &want) < 1e-4, "{ta:?}{tb:?}");
    }
}

#[test]
fn bad_gemm_operands_are_errors() {
    let mut c = vec![0.0; 4];
    let e = gemm(Trans::N, Trans::N, 2, 2, 3, 1.0, &[0.0; 5], 3, &[0.0; 6], 2, 0.0, &mut c, 2).unwrap_err();
    assert!(e.to_string().contains("`a` has 5 elements, expected 6"), "{e}");
    let e = gemm(Trans::N, Trans::N, 2, 2, 3, 1.0, &[0.0; 6], 2, &[0.0; 6], 2, 0.0, &mut c, 2).unwrap_err();
    assert!(e.to_string().contains("leading dimension is 2"), "{e}");
    let e = linear::forward(&[0.0; 6], &[0.0; 5], None, 2, 3, 2, Activation::Identity, None, &mut c).unwrap_err();
    assert!(e.to_string().contains("`weight` has 5 elements, expected 6"), "{e}");
}

#[test]
fn products_give_the_same_bits_on_any_thread_count() {
    // Blocks of C are handed to threads as they come free, so which thread computes which block
    // varies from run to run; the bits must not. Tall and wide C (row and column blocks), ragged
    // edges, alpha and beta other than 0 and 1, packed weights with the fused bias and GELU (kept
    // pre-activation too), and a shape small enough for one block per thread.
    let run = || {
        let mut out = Vec::new();
        for (ta, tb, m, n, k) in [
            (Trans::N, Trans::T, 1001, 150, 77),
            (Trans::T, Trans::N, 50, 1300, 300),
            (Trans::N, Trans::N, 260, 270, 530),
            (Trans::T, Trans::T, 30, 200, 400),
        ] {
            let (ar, ac) = if ta == Trans::N { (m, k) } else { (k, m) };
            let (br, bc) = if tb == Trans::N { (k, n) } else { (n, k) };
            let (a, b) = (data(11, ar * ac, 1.0), data(12, br * bc, 1.0));
            let mut c = data(13, m * n, 1.0);
            gemm(ta, tb, m, n, k, 0.75, &a, ac, &b, bc, 0.5, &mut c, n).unwrap();
            out.push(c);
        }
        for (m, k, n) in [(700, 96, 200), (40, 256, 900)] {
            let (x, w, b) = (data(14, m * k, 1.0), data(15, n * k, 1.0), data(16, n, 1.0));
            let panels = gemm::pack_panels(&w, n, k).unwrap();
            let mut y = vec![0.0; m * n];
            linear::forward_panels(&x, &panels, Some(&b), m, k, n, Activation::Gelu, &mut y).unwrap();
            let (y2, pre) = linear::forward_new(&x, &w, Some(&b), m, k, n, Activation::Gelu, true).unwrap();
            out.extend([y, y2, pre.unwrap()]);
        }
        out
    };
    let one = with_threads(1, run);
    for n in [2, 3, 4] {
        let got = with_threads(n, run);
        for (i, (g, o)) in got.iter().zip(&one).enumerate() {
            assert!(same_bits(g, o), "product {i}: {n} threads differ from 1");
        }
    }
}
