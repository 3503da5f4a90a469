//! The packed 6 x 16 GEMM (selected by `SG_GEMM=packed` before the first product; one test per
//! process, so the choice cannot leak into other tests) against f64 in every layout, across
//! every cache-block edge, with alpha and beta.
mod common;
use common::*;
use sg_tensor::kernels::gemm::{self, gemm, Trans};

#[test]
fn packed_gemm_matches_f64_everywhere() {
    std::env::set_var("SG_GEMM", "packed");
    let layouts = [(Trans::N, Trans::N), (Trans::N, Trans::T), (Trans::T, Trans::N), (Trans::T, Trans::T)];
    let shapes = [(1, 1, 1), (5, 17, 3), (6, 16, 256), (7, 33, 257), (151, 37, 520), (13, 3100, 300), (456, 200, 300)];
    for (m, n, k) in shapes {
        for (ta, tb) in layouts {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.75, 0.5), (-1.0, 1.0)] {
                let (ar, ac) = if ta == Trans::N { (m, k) } else { (k, m) };
                let (br, bc) = if tb == Trans::N { (k, n) } else { (n, k) };
                let (lda, ldb, ldc) = (ac + 1, bc + 2, n + 3);
                let (a, b, c0) = (data(7, ar * lda, 1.0), data(8, br * ldb, 1.0), data(9, m * ldc, 1.0));
                let want =
                    gemm::reference::gemm_f64(ta, tb, m, n, k, alpha as f64, &a, lda, &b, ldb, beta as f64, &c0, ldc);
                on_every_isa(|isa| {
                    let mut c = c0.clone();
                    gemm(ta, tb, m, n, k, alpha, &a, lda, &b, ldb, beta, &mut c, ldc).unwrap();
                    let got: Vec<f32> = (0..m).flat_map(|i| c[i * ldc..i * ldc + n].to_vec()).collect();
                    let e = max_err(&got, &want) / (k as f64).sqrt();
                    assert!(e <= 1e-6, "{isa:?} {ta:?}{tb:?} {m}x{n}x{k} a{alpha} b{beta}: err {e}");
                    for i in 0..m {
                        assert_eq!(&c[i * ldc + n..(i + 1) * ldc], &c0[i * ldc + n..(i + 1) * ldc], "padding of C");
                    }
                });
            }
        }
    }
}
