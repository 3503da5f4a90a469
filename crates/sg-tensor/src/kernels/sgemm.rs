//! Our own packed single-threaded SGEMM for AVX2+FMA: `C = alpha * op(A) op(B) + beta * C` for any
//! strides (so every transpose layout), GotoBLAS blocking around a 6 x 16 register micro-kernel.
//!
//! - B is packed `KC x NC` at a time in 16-column panels (row `p` of a panel is 16 contiguous
//!   values), A `MC x KC` at a time in 6-row panels (step `p` holds the panel's 6 values of column
//!   `p`); both zero-padded at the edges, so the micro-kernel never branches on shape.
//! - The micro-kernel's k loop is inline assembly: twelve accumulators, two loads of B, six
//!   broadcasts of A and twelve FMAs per step, unrolled by four, so its schedule (the shape of the
//!   BLIS Haswell/Zen kernel) does not depend on the compiler. Alone, in cache, it runs at 97-98
//!   GFLOP/s on the project machine (peak about 100).
//! - C's tile is prefetched before the k loop: without it every tile's first touch missed to
//!   memory at the end of the loop (about 15% of the whole product).
//! - B may arrive already in panels (pre-packed inference weights: `BSrc::Panels`), read in place;
//!   so may either operand when the threaded driver in `gemm.rs` packs, once per thread, the
//!   operand that all its blocks of C share (`pack_b_panels`, `pack_a_panels`).
//! - The last k-block's store can add a bias and apply GELU (`Epi`), so a Linear writes y once.
//! - Each element of C is summed over k in the same blocks whatever the caller's split, so results
//!   do not depend on the thread count.

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::{a_panels_len, pack_a_panels, pack_b_panels, sgemm, ASrc, BSrc, Epi, MR, ONE_A_BLOCK};

#[cfg(target_arch = "x86_64")]
mod imp {
    use crate::simd::transpose8;
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Rows of C per micro-kernel call (and of A per packed panel).
    pub(crate) const MR: usize = 6;
    const NR: usize = super::super::gemm::PANEL;
    /// k-block: a `KC x 16` panel of B (16 KiB) stays in L1 while a block of A streams past it.
    const KC: usize = 256;
    /// Rows of A per block: `MC x KC` (120 KiB) stays in L2.
    const MC: usize = 120;
    /// Columns of B per block: `KC x NC` (3 MiB) lives in L3.
    const NC: usize = 3072;
    /// Up to this many rows (batch-1 inference: 256 tokens) A goes in as one block (at most 264
    /// KiB, half of L2), so each panel of B is streamed once instead of once per `MC` rows.
    pub(crate) const ONE_A_BLOCK: usize = 264;

    thread_local! {
        /// Packing buffers, reused across calls on each thread.
        static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Where A comes from.
    #[derive(Clone, Copy)]
    pub(crate) enum ASrc {
        /// Element `(i, p)` at `a + i * rs + p * cs`: packed here, a block at a time.
        Strided { a: *const f32, rs: isize, cs: isize },
        /// Already in 6-row panels ([`pack_a_panels`], the caller's first row a panel boundary):
        /// panel `i / 6` holds `k` steps of 6 values, so any k-block of a panel is read in place.
        Panels(*const f32),
    }

    /// Where B comes from.
    #[derive(Clone, Copy)]
    pub(crate) enum BSrc {
        /// Element `(p, j)` at `b + p * rs + j * cs`: packed here, a block at a time.
        Strided { b: *const f32, rs: isize, cs: isize },
        /// Already in panels ([`super::super::gemm::pack_panels`]): panel `j / 16` holds `k` steps of
        /// 16 values, so any k-block of a panel is contiguous and is read in place.
        Panels(*const f32),
    }

    /// What the last k-block's store applies to C's values before writing them: `+ bias[j]`
    /// (`bias` addresses the bias of C's first column; null for none), then exact-erf GELU. The
    /// same operations, in the same order, as a separate pass afterwards, so the same bits; but
    /// C is written once instead of written, read back and written again.
    /// With `out` set (training keeps the pre-activation), C receives the value before GELU and
    /// `out` (same layout as C) the value after it.
    #[derive(Clone, Copy)]
    pub(crate) struct Epi {
        pub bias: *const f32,
        pub gelu: bool,
        pub out: *mut f32,
    }

    impl Epi {
        pub(crate) const NONE: Epi = Epi { bias: std::ptr::null(), gelu: false, out: std::ptr::null_mut() };

        /// The same epilogue for C's element `(i, j)` on (row stride `ldc`).
        unsafe fn at(self, i: usize, j: usize, ldc: usize) -> Epi {
            Epi {
                bias: if self.bias.is_null() { self.bias } else { self.bias.add(j) },
                out: if self.out.is_null() { self.out } else { self.out.add(i * ldc + j) },
                ..self
            }
        }

        /// Writes a finished vector: to `c`, or pre-activation to `c` and GELU to `out + off`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(&self, x: __m256, bias: *const f32, c: *mut f32, off: usize) {
            let x = if self.bias.is_null() { x } else { _mm256_add_ps(x, _mm256_loadu_ps(bias)) };
            if !self.gelu {
                _mm256_storeu_ps(c, x);
            } else if self.out.is_null() {
                _mm256_storeu_ps(c, crate::kernels::math::gelu::<crate::simd::Avx2>(x));
            } else {
                _mm256_storeu_ps(c, x);
                _mm256_storeu_ps(self.out.add(off), crate::kernels::math::gelu::<crate::simd::Avx2>(x));
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA. The pointers with their strides must address valid
    /// `m x k`, `k x n` (or its `ceil(n / 16)` panels) and `m x n` (row stride `ldc`) matrices,
    /// and C must not overlap A or B; `epi.bias`, when set, `n` values. With an epilogue, `k > 0`
    /// and `alpha != 0`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sgemm(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: ASrc,
        b: BSrc,
        beta: f32,
        c: *mut f32,
        ldc: usize,
        epi: Epi,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 || alpha == 0.0 || (beta != 0.0 && beta != 1.0) {
            scale_c(m, n, beta, c, ldc);
            if k == 0 || alpha == 0.0 {
                return;
            }
        }
        // The buffers leave the thread-local while in use: a closure would not inherit this
        // function's `target_feature`, and every intrinsic in it would become a call.
        let (mut pa, mut pb) = PACK.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let mc = if m <= ONE_A_BLOCK { m.next_multiple_of(MR) } else { MC };
        let need_a = match a {
            ASrc::Strided { .. } => mc.div_ceil(MR) * MR * KC,
            ASrc::Panels(_) => 0,
        };
        let need_b = match b {
            BSrc::Strided { .. } => NC.min(n.div_ceil(NR) * NR) * KC.min(k),
            BSrc::Panels(_) => 0,
        };
        if pa.len() < need_a {
            pa.resize(need_a, 0.0);
        }
        if pb.len() < need_b {
            pb.resize(need_b, 0.0);
        }
        let mut jc = 0;
        while jc < n {
            let ncb = NC.min(n - jc);
            let mut pc = 0;
            while pc < k {
                let kcb = KC.min(k - pc);
                // The first k-block writes C (or adds to it when beta is not 0); later ones add.
                let accumulate = pc > 0 || beta != 0.0;
                let epi_k = if pc + KC >= k { epi } else { Epi::NONE };
                // Panel `jr / NR` of this block starts at `bblk + jr * bstride`.
                let (bblk, bstride) = match b {
                    BSrc::Strided { b, rs, cs } => {
                        pack::<NR>(kcb, ncb, b.offset(pc as isize * rs + jc as isize * cs), rs, cs, pb.as_mut_ptr());
                        (pb.as_ptr(), kcb)
                    }
                    BSrc::Panels(p) => (p.add(jc * k + pc * NR), k),
                };
                let mut ic = 0;
                while ic < m {
                    let mcb = mc.min(m - ic);
                    // Panel `ir / MR` of this block starts at `ablk + ir * astride`.
                    let (ablk, astride) = match a {
                        ASrc::Strided { a, rs, cs } => {
                            // A's block goes in transposed: its columns become the packed steps.
                            pack::<MR>(
                                kcb,
                                mcb,
                                a.offset(ic as isize * rs + pc as isize * cs),
                                cs,
                                rs,
                                pa.as_mut_ptr(),
                            );
                            (pa.as_ptr(), kcb)
                        }
                        ASrc::Panels(p) => (p.add(ic * k + pc * MR), k),
                    };
                    let mut jr = 0;
                    while jr < ncb {
                        let cols = NR.min(ncb - jr);
                        let bp = bblk.add(jr * bstride);
                        let mut ir = 0;
                        while ir < mcb {
                            let rows = MR.min(mcb - ir);
                            let ap = ablk.add(ir * astride);
                            let cp = c.add((ic + ir) * ldc + jc + jr);
                            micro(kcb, ap, bp, alpha, cp, ldc, rows, cols, accumulate, epi_k.at(ic + ir, jc + jr, ldc));
                            ir += MR;
                        }
                        jr += NR;
                    }
                    ic += mc;
                }
                pc += KC;
            }
            jc += NC;
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

    /// One step of the k loop at byte offsets `$ao` into the A panel and `$bo` into the B panel.
    macro_rules! step {
        ($ao0:literal, $ao1:literal, $ao2:literal, $ao3:literal, $ao4:literal, $ao5:literal, $bo0:literal, $bo1:literal) => {
            concat!(
                "vmovups ymm12, [{b} + ",
                $bo0,
                "]\n",
                "vmovups ymm13, [{b} + ",
                $bo1,
                "]\n",
                "vbroadcastss ymm14, [{a} + ",
                $ao0,
                "]\n",
                "vfmadd231ps ymm0, ymm14, ymm12\n",
                "vfmadd231ps ymm1, ymm14, ymm13\n",
                "vbroadcastss ymm15, [{a} + ",
                $ao1,
                "]\n",
                "vfmadd231ps ymm2, ymm15, ymm12\n",
                "vfmadd231ps ymm3, ymm15, ymm13\n",
                "vbroadcastss ymm14, [{a} + ",
                $ao2,
                "]\n",
                "vfmadd231ps ymm4, ymm14, ymm12\n",
                "vfmadd231ps ymm5, ymm14, ymm13\n",
                "vbroadcastss ymm15, [{a} + ",
                $ao3,
                "]\n",
                "vfmadd231ps ymm6, ymm15, ymm12\n",
                "vfmadd231ps ymm7, ymm15, ymm13\n",
                "vbroadcastss ymm14, [{a} + ",
                $ao4,
                "]\n",
                "vfmadd231ps ymm8, ymm14, ymm12\n",
                "vfmadd231ps ymm9, ymm14, ymm13\n",
                "vbroadcastss ymm15, [{a} + ",
                $ao5,
                "]\n",
                "vfmadd231ps ymm10, ymm15, ymm12\n",
                "vfmadd231ps ymm11, ymm15, ymm13\n",
            )
        };
    }

    /// The 6 x 16 block of `A_panel (6 x k) * B_panel (k x 16)` in twelve registers, row `r` in
    /// `(acc[2r], acc[2r + 1])`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn product(k: usize, a: *const f32, b: *const f32) -> [__m256; 12] {
        let (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11): (
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
            __m256,
        );
        asm!(
            "vxorps ymm0, ymm0, ymm0",
            "vxorps ymm1, ymm1, ymm1",
            "vxorps ymm2, ymm2, ymm2",
            "vxorps ymm3, ymm3, ymm3",
            "vxorps ymm4, ymm4, ymm4",
            "vxorps ymm5, ymm5, ymm5",
            "vxorps ymm6, ymm6, ymm6",
            "vxorps ymm7, ymm7, ymm7",
            "vxorps ymm8, ymm8, ymm8",
            "vxorps ymm9, ymm9, ymm9",
            "vxorps ymm10, ymm10, ymm10",
            "vxorps ymm11, ymm11, ymm11",
            // Four steps per trip while at least four remain.
            "cmp {k4}, 0",
            "je 3f",
            "2:",
            step!(0, 4, 8, 12, 16, 20, 0, 32),
            step!(24, 28, 32, 36, 40, 44, 64, 96),
            step!(48, 52, 56, 60, 64, 68, 128, 160),
            step!(72, 76, 80, 84, 88, 92, 192, 224),
            "add {a}, 96",
            "add {b}, 256",
            "dec {k4}",
            "jnz 2b",
            "3:",
            "cmp {k1}, 0",
            "je 5f",
            "4:",
            step!(0, 4, 8, 12, 16, 20, 0, 32),
            "add {a}, 24",
            "add {b}, 64",
            "dec {k1}",
            "jnz 4b",
            "5:",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            k4 = inout(reg) k / 4 => _,
            k1 = inout(reg) k % 4 => _,
            out("ymm0") c0,
            out("ymm1") c1,
            out("ymm2") c2,
            out("ymm3") c3,
            out("ymm4") c4,
            out("ymm5") c5,
            out("ymm6") c6,
            out("ymm7") c7,
            out("ymm8") c8,
            out("ymm9") c9,
            out("ymm10") c10,
            out("ymm11") c11,
            out("ymm12") _,
            out("ymm13") _,
            out("ymm14") _,
            out("ymm15") _,
            options(readonly, nostack),
        );
        [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11]
    }

    /// `C[rows x cols] (=|+=) alpha * A_panel B_panel` for one 6 x 16 tile (smaller at the edges).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro(
        k: usize,
        a: *const f32,
        b: *const f32,
        alpha: f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
        epi: Epi,
    ) {
        // C's tile is needed only after the k loop: start fetching its lines now (a miss to memory
        // at the end of every tile cost 15% before this).
        for r in 0..rows {
            let p = c.add(r * ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.add(60));
        }
        let acc = product(k, a, b);
        let va = _mm256_set1_ps(alpha);
        if rows == MR && cols == NR {
            for r in 0..MR {
                let p = c.add(r * ldc);
                let (mut x0, mut x1) = (acc[2 * r], acc[2 * r + 1]);
                if accumulate {
                    x0 = _mm256_fmadd_ps(x0, va, _mm256_loadu_ps(p));
                    x1 = _mm256_fmadd_ps(x1, va, _mm256_loadu_ps(p.add(8)));
                } else {
                    x0 = _mm256_mul_ps(x0, va);
                    x1 = _mm256_mul_ps(x1, va);
                }
                epi.store(x0, epi.bias, p, r * ldc);
                epi.store(x1, epi.bias.wrapping_add(8), p.add(8), r * ldc + 8);
            }
        } else {
            // A ragged edge: the padded tile is finished in a buffer (with the epilogue, if any,
            // still on whole vectors: the same bits as inside), and only its valid part is copied
            // out, to C and, when GELU goes elsewhere, to `out`.
            let mut tile = [0f32; MR * NR];
            let mut bias = [0f32; NR];
            if !epi.bias.is_null() {
                std::ptr::copy_nonoverlapping(epi.bias, bias.as_mut_ptr(), cols);
            }
            for (r, pair) in acc.chunks_exact(2).enumerate() {
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), _mm256_mul_ps(pair[0], va));
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), _mm256_mul_ps(pair[1], va));
            }
            let mut act = [0f32; MR * NR];
            let local = Epi { out: if epi.out.is_null() { epi.out } else { act.as_mut_ptr() }, ..epi };
            for r in 0..rows {
                let (p, t) = (c.add(r * ldc), tile.as_mut_ptr().add(r * NR));
                if accumulate {
                    for j in 0..cols {
                        *t.add(j) += *p.add(j);
                    }
                }
                local.store(_mm256_loadu_ps(t), bias.as_ptr(), t, r * NR);
                local.store(_mm256_loadu_ps(t.add(8)), bias.as_ptr().add(8), t.add(8), r * NR + 8);
                std::ptr::copy_nonoverlapping(t, p, cols);
                if !epi.out.is_null() {
                    std::ptr::copy_nonoverlapping(act.as_ptr().add(r * NR), epi.out.add(r * ldc), cols);
                }
            }
        }
    }

    /// Packs all of `op(B)` (`k x n`, element `(p, j)` at `b + p * rs + j * cs`) into the panels that
    /// [`BSrc::Panels`] reads: `ceil(n / 16) * 16 * k` values at `dst`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `b` must address the operand and `dst` hold the panels.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn pack_b_panels(k: usize, n: usize, b: *const f32, rs: isize, cs: isize, dst: *mut f32) {
        pack::<NR>(k, n, b, rs, cs, dst)
    }

    /// Floats in the panels of an `m x k` A ([`pack_a_panels`]).
    pub(crate) fn a_panels_len(m: usize, k: usize) -> usize {
        m.div_ceil(MR) * MR * k
    }

    /// Packs all of `op(A)` (`m x k`, element `(i, p)` at `a + i * rs + p * cs`) into the panels
    /// that [`ASrc::Panels`] reads: [`a_panels_len`] values at `dst`.
    ///
    /// # Safety
    /// As for [`pack_b_panels`].
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn pack_a_panels(m: usize, k: usize, a: *const f32, rs: isize, cs: isize, dst: *mut f32) {
        pack::<MR>(k, m, a, cs, rs, dst)
    }

    /// Packs a `k x cols` operand whose element `(p, j)` is at `src + p * rs + j * cs` into
    /// `W`-column panels: panel `j0 / W` holds, step by step, the `W` values `(p, j0..j0 + W)`
    /// contiguously, zero-padded past `cols`. B is packed as stored (`W = NR`), a block of A as its
    /// transpose (`W = MR`: each step holds one column of a 6-row panel).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack<const W: usize>(k: usize, cols: usize, src: *const f32, rs: isize, cs: isize, dst: *mut f32) {
        let mut j0 = 0;
        if cs == 1 && W == NR {
            // Each step's values are contiguous, and so are a row's values for all the full
            // panels: row by row, so the source streams in order. Panel by panel read each row's
            // 64 bytes a row stride apart, k lines per panel, and the next panel read the line
            // beside each again: on a weight-gradient product's shared operand (4608 rows of a
            // 9 MiB activation) 20% slower, from memory. (A's 6-value steps stay panel by panel:
            // its blocks are small and cached, and 24-byte writes to every panel were slower.)
            let full = cols / W;
            for p in 0..k {
                let row = src.offset(p as isize * rs);
                for q in 0..full {
                    std::ptr::copy_nonoverlapping(row.add(q * W), dst.add(q * W * k + p * W), W);
                }
            }
            j0 = full * W;
        }
        while j0 < cols {
            let w = W.min(cols - j0);
            let panel = dst.add(j0 * k);
            let src = src.offset(j0 as isize * cs);
            if cs == 1 && w == W {
                // Each step's values are contiguous.
                for p in 0..k {
                    std::ptr::copy_nonoverlapping(src.offset(p as isize * rs), panel.add(p * W), W);
                }
            } else if rs == 1 && w == W {
                // Each panel column is contiguous in k (a Linear weight for B, a transposed
                // operand for A): 8 x 8 transposes through registers, eight steps at a time.
                let mut p = 0;
                while p + 8 <= k {
                    let mut g = 0;
                    while g < W {
                        let rows = 8.min(W - g);
                        // Rows past `rows` stay zero (no closures here: they would not inherit
                        // this function's target_feature).
                        let mut v = [_mm256_setzero_ps(); 8];
                        for (j, x) in v.iter_mut().take(rows).enumerate() {
                            *x = _mm256_loadu_ps(src.offset((g + j) as isize * cs).add(p));
                        }
                        let t = transpose8(v);
                        for (q, x) in t.iter().enumerate() {
                            let d = panel.add((p + q) * W + g);
                            if rows == 8 || (W < 8 && (q < 7 || p + 8 < k || j0 + W < cols)) {
                                // A narrow panel (A's 6 rows) takes whole vectors too: the lanes
                                // past its width land on the next step's first values, which the
                                // next store (or the next panel) writes afterwards; only the very
                                // last step of the last panel would write past the buffer.
                                _mm256_storeu_ps(d, *x);
                            } else {
                                let mut buf = [0f32; 8];
                                _mm256_storeu_ps(buf.as_mut_ptr(), *x);
                                std::ptr::copy_nonoverlapping(buf.as_ptr(), d, rows);
                            }
                        }
                        g += 8;
                    }
                    p += 8;
                }
                for p in p..k {
                    for j in 0..W {
                        *panel.add(p * W + j) = *src.offset(j as isize * cs + p as isize);
                    }
                }
            } else {
                for p in 0..k {
                    let d = panel.add(p * W);
                    for j in 0..W {
                        *d.add(j) = if j < w { *src.offset(p as isize * rs + j as isize * cs) } else { 0.0 };
                    }
                }
            }
            j0 += W;
        }
    }
}
