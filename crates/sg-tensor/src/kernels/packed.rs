//! A packed, cache-blocked single-threaded SGEMM around the 6 x 16 register micro-kernel of
//! [`super::tile`]: `C = alpha * op(A) op(B) + beta * C` for any strides (so every transpose
//! layout). Blocks of `KC` steps of k keep a `MC x KC` panel of A in L2 and a `KC x 16` sliver of
//! B in L1; A is packed k-major in 6-row panels (each step of the micro-kernel broadcasts six
//! consecutive values) and B in 16-column panels (two contiguous vector loads per step), zero-padded
//! at the edges. Per step the kernel issues two loads, six broadcasts and twelve FMAs, so it is
//! bound by the FMA units rather than by loads (an 8 x 8 kernel needs nine loads for eight FMAs).
//! Every element of C sees the same k-blocking whatever the caller's split, so results do not
//! depend on the thread count.

use std::cell::RefCell;

use super::tile::{micro, MR};
use crate::simd::Simd;

const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 3072;

thread_local! {
    /// Packing buffers, reused across calls on each thread.
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// # Safety
/// The pointers with their strides must address valid `m x k`, `k x n` and `m x n` (row stride
/// `ldc`) matrices, and C must not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm<S: Simd>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    let nr = 2 * S::LANES;
    if k == 0 || alpha == 0.0 {
        scale_c(m, n, beta, c, ldc);
        return;
    }
    if beta != 0.0 && beta != 1.0 {
        scale_c(m, n, beta, c, ldc);
    }
    // The buffers leave the thread-local for the duration: a closure would not inherit the
    // caller's `target_feature` and every SIMD intrinsic in it would become a call.
    let (mut pa, mut pb) = PACK.with(|p| std::mem::take(&mut *p.borrow_mut()));
    {
        let (pa, pb) = (&mut pa, &mut pb);
        pa.resize(MC.div_ceil(MR) * MR * KC, 0.0);
        pb.resize(NC.div_ceil(nr) * nr * KC, 0.0);
        let mut tile = [0f32; MR * 32];
        for jc in (0..n).step_by(NC) {
            let ncb = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kcb = KC.min(k - pc);
                // The first k-block writes C (or adds to it when beta is not 0); later ones add.
                let accumulate = pc > 0 || beta != 0.0;
                pack_b(kcb, ncb, nr, b.offset(pc as isize * rsb + jc as isize * csb), rsb, csb, pb);
                for ic in (0..m).step_by(MC) {
                    let mcb = MC.min(m - ic);
                    pack_a(mcb, kcb, a.offset(ic as isize * rsa + pc as isize * csa), rsa, csa, pa);
                    for jr in (0..ncb).step_by(nr) {
                        let w = nr.min(ncb - jr);
                        let bp = pb.as_ptr().add(jr * kcb);
                        for ir in (0..mcb).step_by(MR) {
                            let rows = MR.min(mcb - ir);
                            let ap = pa.as_ptr().add(ir * kcb);
                            let cp = c.add((ic + ir) * ldc + jc + jr);
                            if w == nr {
                                kernel::<S>(rows, kcb, alpha, ap, bp, nr, cp, ldc, accumulate);
                            } else {
                                // A ragged right edge: compute the full sliver, keep its columns.
                                kernel::<S>(rows, kcb, 1.0, ap, bp, nr, tile.as_mut_ptr(), nr, false);
                                for r in 0..rows {
                                    for j in 0..w {
                                        let d = cp.add(r * ldc + j);
                                        let v = alpha * tile[r * nr + j];
                                        *d = if accumulate { *d + v } else { v };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    PACK.with(|p| *p.borrow_mut() = (pa, pb));
}

/// `C *= beta` (`beta == 0` clears, so NaN in a fresh buffer does not survive).
unsafe fn scale_c(m: usize, n: usize, beta: f32, c: *mut f32, ldc: usize) {
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<S: Simd>(
    rows: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    b: *const f32,
    nr: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    // Packed A: element (r, p) at a[p * MR + r]; packed B: row p at b[p * nr].
    match rows {
        1 => micro::<S, 1, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
        2 => micro::<S, 2, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
        3 => micro::<S, 3, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
        4 => micro::<S, 4, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
        5 => micro::<S, 5, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
        _ => micro::<S, MR, 2>(k, alpha, a, 1, MR, b, nr, c, ldc, acc),
    }
}

/// A `mc x kc` block of A as 6-row panels, each k-major (`MR` values per step), zero-padded.
#[inline(always)]
unsafe fn pack_a(mc: usize, kc: usize, a: *const f32, rsa: isize, csa: isize, dst: &mut [f32]) {
    for (pi, i0) in (0..mc).step_by(MR).enumerate() {
        let rows = MR.min(mc - i0);
        let panel = &mut dst[pi * MR * kc..(pi + 1) * MR * kc];
        if csa == 1 {
            // Rows contiguous in k: read each row once.
            for r in 0..rows {
                let src = a.offset((i0 + r) as isize * rsa);
                for p in 0..kc {
                    panel[p * MR + r] = *src.add(p);
                }
            }
        } else {
            for p in 0..kc {
                let src = a.offset(p as isize * csa + i0 as isize * rsa);
                for r in 0..rows {
                    panel[p * MR + r] = *src.offset(r as isize * rsa);
                }
            }
        }
        if rows < MR {
            for p in 0..kc {
                panel[p * MR + rows..(p + 1) * MR].fill(0.0);
            }
        }
    }
}

/// A `kc x nc` block of B as `nr`-column panels, each row-major (`nr` values per step), zero-padded.
#[inline(always)]
unsafe fn pack_b(kc: usize, nc: usize, nr: usize, b: *const f32, rsb: isize, csb: isize, dst: &mut [f32]) {
    for (pj, j0) in (0..nc).step_by(nr).enumerate() {
        let cols = nr.min(nc - j0);
        let panel = &mut dst[pj * nr * kc..(pj + 1) * nr * kc];
        if csb == 1 {
            for p in 0..kc {
                let row = &mut panel[p * nr..(p + 1) * nr];
                std::ptr::copy_nonoverlapping(b.offset(p as isize * rsb + j0 as isize), row.as_mut_ptr(), cols);
                row[cols..].fill(0.0);
            }
        } else {
            // op(B) is a transposed matrix: walk each of its columns, contiguous in storage.
            for j in 0..cols {
                let src = b.offset((j0 + j) as isize * csb);
                for p in 0..kc {
                    panel[p * nr + j] = *src.offset(p as isize * rsb);
                }
            }
            if cols < nr {
                for p in 0..kc {
                    panel[p * nr + cols..(p + 1) * nr].fill(0.0);
                }
            }
        }
    }
}
