//! Small dense products for attention tiles: `C (m x n) (=|+=) alpha * A (m x k) B (k x n)` where A
//! is read element by element through strides (so it can be a tile, or a tile's transpose, in
//! place) and B's rows are contiguous. A register-blocked micro-kernel keeps a 6 x (2 vectors) block
//! of C in registers and streams k: per step, two loads of B, six broadcasts of A and twelve FMAs.
//! Nothing is packed per call; attention transposes K and V once per head instead.

use crate::simd::Simd;

/// Rows of C per micro-kernel call.
const MR: usize = 6;

/// What the products are multiplied by as they are stored into C.
#[derive(Clone, Copy)]
pub(crate) enum Scale {
    /// One factor for every element.
    All(f32),
    /// `f[i]` for row `i` of C: the attention forward's `1 / l` per query row, so that P V is
    /// written to the output once, normalised, instead of to a buffer and then scaled across.
    Rows(*const f32),
}

impl Scale {
    /// The factor of row `r`.
    ///
    /// # Safety
    /// For `Rows`, row `r`'s factor must be readable.
    #[inline(always)]
    unsafe fn row(self, r: usize) -> f32 {
        match self {
            Scale::All(a) => a,
            Scale::Rows(f) => *f.add(r),
        }
    }

    /// The same scale for the rows from `r0` on.
    #[inline(always)]
    unsafe fn skip_rows(self, r0: usize) -> Scale {
        match self {
            Scale::All(a) => Scale::All(a),
            Scale::Rows(f) => Scale::Rows(f.add(r0)),
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Simd, const R: usize, const NV: usize>(
    k: usize,
    alpha: Scale,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    accumulate: bool,
) {
    let mut acc = [[S::splat(0.0); NV]; R];
    // Pointers step through k (no multiply per step); A's rows sit at fixed offsets from `ap`.
    let (mut ap, mut bp) = (a, b);
    for _ in 0..k {
        let mut bv = [S::splat(0.0); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(bp.add(v * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*ap.add(r * rsa));
            for v in 0..NV {
                row[v] = S::fma(av, bv[v], row[v]);
            }
        }
        ap = ap.add(csa);
        bp = bp.add(rsb);
    }
    for (r, row) in acc.iter().enumerate() {
        let va = S::splat(alpha.row(r));
        let cp = c.add(r * rsc);
        for (v, &x) in row.iter().enumerate() {
            let p = cp.add(v * S::LANES);
            let y = if accumulate { S::fma(x, va, S::load(p)) } else { S::mul(x, va) };
            S::store(p, y);
        }
    }
}

/// Micro-kernel calls of an `m x n` product (rows by about [`MR`], columns by two vectors).
pub(crate) fn calls<S: Simd>(m: usize, n: usize) -> usize {
    m.div_ceil(MR) * n.div_ceil(2 * S::LANES)
}

/// Prefetches of the rows of `N` strided operands (the next task's), a few rows before each
/// micro-kernel call: spread over a task's products, the fetches overlap its arithmetic, where a
/// burst of them (a head's rows at once) waited on the cache's miss buffers. At 57 tokens this was
/// 0-5% faster on one thread than a burst per head (paired calls), and no slower on two.
pub(crate) struct Ahead<const N: usize> {
    ptrs: [*const f32; N],
    ld: [usize; N],
    rows: usize,
    cols: usize,
    per_call: usize,
    /// The next (row, operand) pair, row-major.
    at: usize,
}

impl<const N: usize> Ahead<N> {
    /// Rows `0..rows` (`cols` values each) of each operand, over a task of `calls` micro-kernel calls:
    /// paced to be done by four fifths of them, so that the last rows still arrive in time.
    pub(crate) fn new(ptrs: [*const f32; N], ld: [usize; N], rows: usize, cols: usize, calls: usize) -> Self {
        let per_call = (5 * rows * N).div_ceil(4 * calls.max(1)).max(1);
        Ahead { ptrs, ld, rows, cols, per_call, at: 0 }
    }

    #[inline(always)]
    fn step<S: Simd>(&mut self) {
        let end = (self.at + self.per_call).min(self.rows * N);
        while self.at < end {
            let (r, o) = (self.at / N, self.at % N);
            let p = self.ptrs[o].wrapping_add(r * self.ld[o]);
            // One touch per 64-byte line.
            for d in (0..self.cols).step_by(16) {
                S::prefetch(p.wrapping_add(d));
            }
            self.at += 1;
        }
    }
}

/// `(first row, rows)` of each micro-kernel call over `m` rows: MR at a time, except that the last
/// 7 to 10 rows are two blocks of 4 or 5 (57 rows: 8 x 6 + 5 + 4, not 9 x 6 + 3): a block of 3
/// rows or fewer keeps too few sums in flight to cover the FMA's latency and loads more per FMA.
#[inline(always)]
fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut r0 = 0;
    std::iter::from_fn(move || {
        let left = m - r0;
        let n = if left > 2 * MR - 2 || left <= MR { left.min(MR) } else { left.div_ceil(2) };
        let block = (r0, n);
        r0 += n;
        (n > 0).then_some(block)
    })
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block<S: Simd, const NV: usize, const N: usize>(
    rows: usize,
    k: usize,
    alpha: Scale,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    acc: bool,
    ahead: &mut Option<Ahead<N>>,
) {
    for (r0, n) in row_blocks(rows) {
        let (a0, c0, alpha) = (a.add(r0 * rsa), c.add(r0 * rsc), alpha.skip_rows(r0));
        if let Some(ah) = ahead.as_mut() {
            ah.step::<S>();
        }
        match n {
            1 => micro::<S, 1, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
            2 => micro::<S, 2, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
            3 => micro::<S, 3, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
            4 => micro::<S, 4, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
            5 => micro::<S, 5, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
            _ => micro::<S, MR, NV>(k, alpha, a0, rsa, csa, b, rsb, c0, rsc, acc),
        }
    }
}

/// `C (=|+=) alpha * A B`. Element `(i, p)` of A is at `a + i * rsa + p * csa`; row `p` of B starts at
/// `b + p * rsb` and holds `n` contiguous values; row `i` of C starts at `c + i * rsc`. `ahead`, if
/// any, issues its next prefetches before each micro-kernel call.
///
/// # Safety
/// All addressed elements must be valid (with `Scale::Rows`, `m` factors), and C must not overlap
/// A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<S: Simd, const N: usize>(
    m: usize,
    n: usize,
    k: usize,
    alpha: Scale,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    accumulate: bool,
    ahead: &mut Option<Ahead<N>>,
) {
    let w2 = 2 * S::LANES;
    let mut c0 = 0;
    while c0 + w2 <= n {
        rows_block::<S, 2, N>(m, k, alpha, a, rsa, csa, b.add(c0), rsb, c.add(c0), rsc, accumulate, ahead);
        c0 += w2;
    }
    if c0 + S::LANES <= n {
        rows_block::<S, 1, N>(m, k, alpha, a, rsa, csa, b.add(c0), rsb, c.add(c0), rsc, accumulate, ahead);
        c0 += S::LANES;
    }
    // Fewer columns than one vector: plain loops.
    for j in c0..n {
        for i in 0..m {
            let mut s = 0.0f32;
            for p in 0..k {
                s += *a.add(i * rsa + p * csa) * *b.add(p * rsb + j);
            }
            let (cp, a) = (c.add(i * rsc + j), alpha.row(i));
            *cp = if accumulate { *cp + a * s } else { a * s };
        }
    }
}

/// Which operand's blocks the outer loop of a product walks.
#[derive(Clone, Copy)]
pub(crate) enum Order {
    /// Column blocks of B outside ([`matmul`]): all of A is read once per column block.
    Columns,
    /// Blocks of A's rows (one micro-kernel call's) outside, each against every column block of
    /// B: A's rows are read once and B whole per row block, which is better where B stays in L1
    /// and A is the larger operand (the attention forward's scores against Q^T, and its P V at
    /// short sequences, where A is the score tile read through strides).
    Rows,
}

/// [`matmul`] with the outer loop over `order`'s blocks.
///
/// # Safety
/// As [`matmul`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_in<S: Simd, const N: usize>(
    order: Order,
    m: usize,
    n: usize,
    k: usize,
    alpha: Scale,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    rsc: usize,
    accumulate: bool,
    ahead: &mut Option<Ahead<N>>,
) {
    let Order::Rows = order else {
        return matmul::<S, N>(m, n, k, alpha, a, rsa, csa, b, rsb, c, rsc, accumulate, ahead);
    };
    // One call's rows at a time: `matmul` over them runs one call per column block.
    for (r0, rows) in row_blocks(m) {
        let (a0, c0, alpha) = (a.add(r0 * rsa), c.add(r0 * rsc), alpha.skip_rows(r0));
        matmul::<S, N>(rows, n, k, alpha, a0, rsa, csa, b, rsb, c0, rsc, accumulate, ahead);
    }
}

/// `dst[d * ld + j] = src[j * lds + d]` for `j < rows`, `d < cols`: one head's K or V transposed so
/// that products over the head dimension read contiguous rows.
///
/// # Safety
/// `src` must address `rows x cols` with row stride `lds`, and `dst` hold `(cols - 1) * ld + rows`.
#[inline(always)]
pub(crate) unsafe fn transpose_into<S: Simd>(
    src: *const f32,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ld: usize,
) {
    debug_assert!(cols == 0 || rows == 0 || dst.len() >= (cols - 1) * ld + rows);
    let dp = dst.as_mut_ptr();
    let l = S::LANES;
    // Square blocks through registers; the ragged right and bottom edges element by element.
    let (rb, cb) = (rows - rows % l, cols - cols % l);
    for j0 in (0..rb).step_by(l) {
        for d0 in (0..cb).step_by(l) {
            S::transpose_block(src.add(j0 * lds + d0), lds, dp.add(d0 * ld + j0), ld);
        }
        for d in cb..cols {
            for j in j0..j0 + l {
                *dp.add(d * ld + j) = *src.add(j * lds + d);
            }
        }
    }
    for j in rb..rows {
        for d in 0..cols {
            *dp.add(d * ld + j) = *src.add(j * lds + d);
        }
    }
}
