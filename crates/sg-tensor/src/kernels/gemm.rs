//! Matrix products `C = alpha * op(A) op(B) + beta * C` in row-major storage, every transpose layout.
//!
//! The inner product runs single-threaded on blocks of C that rayon spreads over the one pool (never
//! a pool inside a pool; our kernel's blocks are handed out as threads come free, see
//! `packed_shared`, the others' are one fixed part per thread): on AVX2+FMA our packed kernel
//! (`sgemm.rs`, 85-92 GFLOP/s on one core against `matrixmultiply`'s 74-84 at ViT-B shapes),
//! elsewhere `matrixmultiply` (its own run-time choice of AVX, SSE2 or NEON; `SG_GEMM=mm` selects
//! it on AVX2 too, for A/B runs).
//! Inference can hand B over already packed ([`pack_panels`], once per weight), and a Linear's bias
//! and GELU can ride along into the packed kernel's final store (`Fuse`).
//! `beta = 1` accumulates straight into a gradient buffer. Each element of C is summed over k in the
//! same blocks whatever the split, so results do not depend on the thread count.

use crate::error::{check_len, check_min_len, Result, TensorError};
use crate::par::{self, SendPtr};
use crate::simd::{isa, Isa};

/// Whether an operand is used as stored (`N`) or transposed (`T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// Which inner product runs a block of C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    /// `matrixmultiply`: its own run-time choice of instruction set; the portable path.
    MatrixMultiply,
    /// Our packed AVX2+FMA kernel ([`super::sgemm`]).
    #[cfg(target_arch = "x86_64")]
    Packed,
}

fn kernel() -> Kernel {
    match isa() {
        Isa::Scalar => Kernel::Scalar,
        Isa::Portable => Kernel::MatrixMultiply,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if !matrixmultiply_requested() => Kernel::Packed,
        Isa::Avx2Fma => Kernel::MatrixMultiply,
    }
}

/// `SG_GEMM=mm`: use `matrixmultiply` on AVX2 too (read once per process).
#[cfg(target_arch = "x86_64")]
fn matrixmultiply_requested() -> bool {
    static MM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MM.get_or_init(|| std::env::var("SG_GEMM").as_deref() == Ok("mm"))
}

/// Below this many multiply-adds a split costs more than it saves.
const PAR_MIN_FLOPS: usize = 1 << 20;

fn check_operand(op: &'static str, arg: &'static str, rows: usize, cols: usize, ld: usize, len: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(TensorError::Shape {
            op,
            msg: format!("`{arg}` is stored {rows} x {cols} but its leading dimension is {ld} (< {cols})"),
        });
    }
    check_min_len(op, arg, len, (rows - 1) * ld + cols)
}

/// Row and column strides of `op(X)` for a row-major X with leading dimension `ld`.
fn strides(t: Trans, ld: usize) -> (isize, isize) {
    match t {
        Trans::N => (ld as isize, 1),
        Trans::T => (1, ld as isize),
    }
}

/// `C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C`, all row-major. `A` is stored
/// `m x k` (`N`) or `k x m` (`T`) with leading dimension `lda`; likewise `B`; `C` has `ldc >= n`.
/// With `beta == 0` the old contents of C are not read (NaN in a fresh buffer is harmless).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> Result<()> {
    let out = Out::of(c);
    gemm_epilogue(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, out, ldc, Fuse::NONE, &|_, _| {})
}

/// C's storage for the crate's own callers: a start and a length, so C may be a new buffer that the
/// product fills (its values are never read when `beta` is 0 and only written by the product).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: SendPtr,
    pub len: usize,
}

impl Out {
    pub(crate) fn of(c: &mut [f32]) -> Out {
        Out { ptr: SendPtr(c.as_mut_ptr()), len: c.len() }
    }
}

/// Whether a Linear's product here writes every value of C and of the GELU output itself, without
/// reading them first (our packed kernel with the bias and GELU in its store, `beta = 0`,
/// `k > 0`), so that new output buffers need not be zeroed first.
pub(crate) fn fills_output(k: usize) -> bool {
    fuses_bias_gelu() && k > 0
}

/// Columns per panel of a pre-packed right-hand operand ([`pack_panels`]).
pub const PANEL: usize = 16;

/// Whether the GEMM that runs on this machine reads pre-packed panels in place (our AVX2+FMA
/// kernel). Elsewhere [`pack_panels`] would only add work, so callers keep weights as stored.
pub fn reads_panels() -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel() == Kernel::Packed {
        return true;
    }
    false
}

/// Floats in the panel layout of a `k x n` operand: `ceil(n / 16)` panels of `k x 16`.
pub fn panels_len(k: usize, n: usize) -> usize {
    n.div_ceil(PANEL) * PANEL * k
}

/// A Linear weight `w`, stored `(n, k)` as PyTorch stores it and used as the right-hand operand
/// `W^T (k x n)`, rearranged once into the layout the packed kernel reads: panel `j / 16` holds, for
/// each `p < k`, the 16 values `W^T[p, j0..j0 + 16]` contiguously (zeros past `n`). Inference
/// then skips packing B on every call: the strided, transposing reads of the weight were most of
/// the product's time outside its micro-kernel at batch 1.
pub fn pack_panels(w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    check_min_len("pack_panels", "w", w.len(), n * k)?;
    let mut out = vec![0.0; panels_len(k, n)];
    if out.is_empty() {
        return Ok(out);
    }
    for (q, panel) in out.chunks_exact_mut(PANEL * k).enumerate() {
        for j in 0..PANEL.min(n - q * PANEL) {
            let row = &w[(q * PANEL + j) * k..(q * PANEL + j + 1) * k];
            for (p, &v) in row.iter().enumerate() {
                panel[p * PANEL + j] = v;
            }
        }
    }
    Ok(out)
}

/// A Linear's bias and GELU, applied to C by the kernel as it stores its last k-block (only the
/// packed kernel can: [`fuses_bias_gelu`]); the same bits as a separate pass over C, without one.
/// With `out` (training keeps the pre-activation), C receives the value before GELU and `out`,
/// laid out like C, the value after it.
#[derive(Clone, Copy)]
pub(crate) struct Fuse<'a> {
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
    /// Start and length of the GELU output.
    pub out: Option<(SendPtr, usize)>,
}

impl Fuse<'_> {
    pub(crate) const NONE: Fuse<'static> = Fuse { bias: None, gelu: false, out: None };

    fn is_none(&self) -> bool {
        self.bias.is_none() && !self.gelu
    }
}

/// Whether the kernel that runs here applies a [`Fuse`] itself (our AVX2+FMA kernel); elsewhere
/// callers finish C in their epilogue.
pub(crate) fn fuses_bias_gelu() -> bool {
    reads_panels()
}

/// The right-hand operand of a product.
#[derive(Clone, Copy)]
enum BOp<'a> {
    /// Row-major storage with leading dimension `ld`, used as stored or transposed.
    Strided { data: &'a [f32], t: Trans, ld: usize },
    /// [`pack_panels`] layout.
    Panels(&'a [f32]),
}

/// A block of C handed to an epilogue: rows `r0..r1`, columns `c0..c1`.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub r0: usize,
    pub r1: usize,
    pub c0: usize,
    pub c1: usize,
}

/// [`gemm`] followed, block by block while the block is still in cache, by `epilogue(block, c)`
/// where `c` points at C's first element. The epilogue must touch only its block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_epilogue(
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: Out,
    ldc: usize,
    fuse: Fuse,
    epilogue: &(dyn Fn(Block, SendPtr) + Sync),
) -> Result<()> {
    let (br, bc) = if tb == Trans::N { (k, n) } else { (n, k) };
    check_operand("gemm", "b", br, bc, ldb, b.len())?;
    product(ta, m, n, k, alpha, a, lda, BOp::Strided { data: b, t: tb, ld: ldb }, beta, c, ldc, fuse, epilogue)
}

/// `C (m x n) = alpha * op(A) (m x k) * B + beta * C` with B (`k x n`) in [`pack_panels`] layout,
/// then the epilogue block by block as in [`gemm_epilogue`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_panels_epilogue(
    ta: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    panels: &[f32],
    beta: f32,
    c: Out,
    ldc: usize,
    fuse: Fuse,
    epilogue: &(dyn Fn(Block, SendPtr) + Sync),
) -> Result<()> {
    check_len("gemm", "packed b", panels.len(), panels_len(k, n))?;
    product(ta, m, n, k, alpha, a, lda, BOp::Panels(panels), beta, c, ldc, fuse, epilogue)
}

#[allow(clippy::too_many_arguments)]
fn product(
    ta: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: BOp,
    beta: f32,
    c: Out,
    ldc: usize,
    fuse: Fuse,
    epilogue: &(dyn Fn(Block, SendPtr) + Sync),
) -> Result<()> {
    let op = "gemm";
    let (ar, ac) = if ta == Trans::N { (m, k) } else { (k, m) };
    check_operand(op, "a", ar, ac, lda, a.len())?;
    check_operand(op, "c", m, n, ldc, c.len)?;
    if let Some(b) = fuse.bias {
        check_len(op, "bias", b.len(), n)?;
    }
    if let Some((_, len)) = fuse.out {
        check_operand(op, "gelu output", m, n, ldc, len)?;
    }
    let can_fuse = fuses_bias_gelu() && k > 0 && alpha != 0.0;
    if !fuse.is_none() && !can_fuse {
        return Err(TensorError::Arg { op, msg: "this kernel does not apply a bias or GELU in its store".into() });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (rsa, csa) = strides(ta, lda);
    let cp = c.ptr;
    let ap = a.as_ptr() as usize;
    let kernel = kernel();
    // The fused epilogue from column `c0` on (checked above: only with the packed kernel).
    #[cfg(target_arch = "x86_64")]
    let epi = |blk: &Block| super::sgemm::Epi {
        bias: fuse.bias.map_or(std::ptr::null(), |b| b[blk.c0..].as_ptr()),
        gelu: fuse.gelu,
        // SAFETY: the output's extent was checked like C's.
        out: fuse.out.map_or(std::ptr::null_mut(), |(p, _)| unsafe { p.get().add(blk.r0 * ldc + blk.c0) }),
    };
    let run = |blk: Block| {
        let ap = ap as *const f32;
        // SAFETY: operand extents were checked above; blocks of C are disjoint.
        unsafe {
            let a0 = ap.offset(blk.r0 as isize * rsa);
            let c0 = cp.get().add(blk.r0 * ldc + blk.c0);
            let (bm, bn) = (blk.r1 - blk.r0, blk.c1 - blk.c0);
            match (kernel, b) {
                #[cfg(target_arch = "x86_64")]
                (Kernel::Packed, b) => {
                    // Blocks start on a panel boundary (the split aligns columns to 16).
                    let a = super::sgemm::ASrc::Strided { a: a0, rs: rsa, cs: csa };
                    super::sgemm::sgemm(bm, bn, k, alpha, a, b_source(b, blk.c0, k), beta, c0, ldc, epi(&blk))
                }
                (_, BOp::Strided { data, t, ld }) => {
                    let (rsb, csb) = strides(t, ld);
                    let b0 = data.as_ptr().offset(blk.c0 as isize * csb);
                    portable(kernel, bm, bn, k, alpha, a0, rsa, csa, b0, rsb, csb, beta, c0, ldc)
                }
                // Other kernels take each panel as a strided `k x 16` matrix.
                (_, BOp::Panels(data)) => {
                    let p0 = data.as_ptr().add(blk.c0 * k);
                    for (q, j0) in (0..bn).step_by(PANEL).enumerate() {
                        let (w, bq) = (PANEL.min(bn - j0), p0.add(q * PANEL * k));
                        portable(kernel, bm, w, k, alpha, a0, rsa, csa, bq, PANEL as isize, 1, beta, c0.add(j0), ldc)
                    }
                }
            }
        }
        epilogue(blk, cp);
    };
    let parts = if m * n * k >= PAR_MIN_FLOPS && par::can_split() { par::threads() } else { 1 };
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Packed && parts > 1 {
        // SAFETY: the operands' extents were checked above and our kernel was chosen for this CPU.
        unsafe { packed_shared(m, n, k, alpha, (a, rsa, csa), b, beta, c, ldc, parts, &epi, epilogue) };
        return Ok(());
    }
    // Split the larger side of C: the other operand is packed once per part, so this packs least.
    let (len, align) = if n >= m { (n, PANEL) } else { (m, 8) };
    let chunk = len.div_ceil(parts).div_ceil(align) * align;
    let nblocks = len.div_ceil(chunk);
    par::for_each(nblocks, nblocks > 1, |i| {
        let (s, e) = (i * chunk, ((i + 1) * chunk).min(len));
        run(if n >= m { Block { r0: 0, r1: m, c0: s, c1: e } } else { Block { r0: s, r1: e, c0: 0, c1: n } })
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The packed operand that every block of a [`packed_shared`] product reads, in the buffer of
    /// the thread that calls the product, kept between calls: at most the largest such operand
    /// (9.4 MiB at base pretraining).
    static SHARED_PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Our packed kernel on several threads. C is cut along its longer side into blocks that the
/// threads take one at a time, so the split follows how fast each thread actually runs: a fixed
/// half each left 4-6% of the threads' time in a pretraining step's products idle, one thread
/// waiting for the other (on this shared machine the two vCPUs seldom run at the same speed).
/// Every block reads all of the other operand (all of B for a block of rows, all of A for a block
/// of columns); the threads pack it once, each a share of its panels, before the blocks start,
/// into panels the kernel reads in place. Blocks start on multiples of 24 rows or 16 columns, so
/// C's ragged edge tiles are the same whatever the split, and so are the bits.
///
/// # Safety
/// As for the kernel: the operand extents must have been checked, and the CPU must have AVX2+FMA.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_shared(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    (a, rsa, csa): (&[f32], isize, isize),
    b: BOp,
    beta: f32,
    c: Out,
    ldc: usize,
    threads: usize,
    epi: &(dyn Fn(&Block) -> super::sgemm::Epi + Sync),
    epilogue: &(dyn Fn(Block, SendPtr) + Sync),
) {
    use super::sgemm::{ASrc, BSrc};
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Blocks along C's longer side, except that weights already in panels need no packing at all,
    // so row blocks are cheaper whenever the kernel would cut A into several blocks anyway (each
    // then streams the panels once, as here).
    let rows = m >= n || (matches!(b, BOp::Panels(_)) && m > super::sgemm::ONE_A_BLOCK);
    // Blocks start large and shrink with what is left (guided scheduling), so the last ones,
    // which decide how long one thread waits for the other, are small: at most 240 rows (the
    // kernel then packs each as one block of A, half of L2), at least 48 rows or 64 columns.
    let (len, unit, smallest, largest) = if rows { (m, 24, 48, 240) } else { (n, PANEL, 64, usize::MAX) };
    let next = AtomicUsize::new(0);
    let grab = || {
        let mut s = next.load(Ordering::Relaxed);
        while s < len {
            let size = (len - s).div_ceil(2 * threads).next_multiple_of(unit).clamp(smallest, largest);
            let e = (s + size).min(len);
            match next.compare_exchange_weak(s, e, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some((s, e)),
                Err(now) => s = now,
            }
        }
        None
    };
    let (ap, cp) = (SendPtr(a.as_ptr() as *mut f32), c.ptr);
    // The shared operand in panels (weights already in panels: as given), packed once, its
    // panels split between the threads: packing it once per thread doubled the packing work.
    // This thread's buffer, lent to the pool for the call.
    let mut buf = SHARED_PACK.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let shared: *const f32 = match (rows, b) {
        (true, BOp::Panels(data)) => data.as_ptr(),
        (true, BOp::Strided { data, t, ld }) => {
            let (rs, cs) = strides(t, ld);
            buf.resize(buf.len().max(panels_len(k, n)), 0.0);
            let (src, dst) = (SendPtr(data.as_ptr() as *mut f32), SendPtr(buf.as_mut_ptr()));
            share(n, PANEL, threads, |c0, c1| {
                // SAFETY: the panels of columns c0..c1: this part's only.
                let src = src.get().offset(c0 as isize * cs);
                super::sgemm::pack_b_panels(k, c1 - c0, src, rs, cs, dst.get().add(c0 * k));
            });
            buf.as_ptr()
        }
        (false, _) => {
            buf.resize(buf.len().max(super::sgemm::a_panels_len(m, k)), 0.0);
            let dst = SendPtr(buf.as_mut_ptr());
            share(m, super::sgemm::MR, threads, |r0, r1| {
                // SAFETY: the panels of rows r0..r1: this part's only.
                let src = (ap.get() as *const f32).offset(r0 as isize * rsa);
                super::sgemm::pack_a_panels(r1 - r0, k, src, rsa, csa, dst.get().add(r0 * k));
            });
            buf.as_ptr()
        }
    };
    let shared = SendPtr(shared as *mut f32);
    par::for_each(threads, true, |_| {
        let ap = ap.get() as *const f32;
        let shared = shared.get() as *const f32;
        while let Some((s, e)) = grab() {
            let (blk, asrc, bsrc) = if rows {
                let asrc = ASrc::Strided { a: ap.offset(s as isize * rsa), rs: rsa, cs: csa };
                (Block { r0: s, r1: e, c0: 0, c1: n }, asrc, BSrc::Panels(shared))
            } else {
                (Block { r0: 0, r1: m, c0: s, c1: e }, ASrc::Panels(shared), b_source(b, s, k))
            };
            let c0 = cp.get().add(blk.r0 * ldc + blk.c0);
            super::sgemm::sgemm(blk.r1 - blk.r0, blk.c1 - blk.c0, k, alpha, asrc, bsrc, beta, c0, ldc, epi(&blk));
            epilogue(blk, cp);
        }
    });
    SHARED_PACK.with(|p| *p.borrow_mut() = buf);
}

/// `f(start, end)` in parallel over `0..len` cut into one range per thread, each starting on a
/// multiple of `unit` (a whole packed panel).
#[cfg(target_arch = "x86_64")]
fn share(len: usize, unit: usize, threads: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let step = len.div_ceil(threads).next_multiple_of(unit).max(unit);
    par::for_each(len.div_ceil(step), true, |i| f(i * step, ((i + 1) * step).min(len)));
}

/// Our kernel's view of `b` from column `c0` on (for panels, `c0` a multiple of 16).
///
/// # Safety
/// Column `c0` must lie within `b`.
#[cfg(target_arch = "x86_64")]
unsafe fn b_source(b: BOp, c0: usize, k: usize) -> super::sgemm::BSrc {
    match b {
        BOp::Strided { data, t, ld } => {
            let (rs, cs) = strides(t, ld);
            super::sgemm::BSrc::Strided { b: data.as_ptr().offset(c0 as isize * cs), rs, cs }
        }
        BOp::Panels(data) => super::sgemm::BSrc::Panels(data.as_ptr().add(c0 * k)),
    }
}

/// One block's product on a strided B by a kernel other than ours: the scalar loops or
/// `matrixmultiply`.
///
/// # Safety
/// As for [`reference::gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn portable(
    kernel: Kernel,
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
    if kernel == Kernel::Scalar {
        reference::gemm_raw(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc as isize)
    } else {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc as isize, 1)
    }
}

/// Plain loops: the scalar kernel (`Isa::Scalar`) and what the tests trust.
pub mod reference {
    use super::Trans;

    /// # Safety
    /// The pointers with their strides must address valid `m x k`, `k x n` and `m x n` matrices,
    /// and C must not overlap A or B.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_raw(
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
        rsc: isize,
    ) {
        for i in 0..m as isize {
            for j in 0..n as isize {
                let mut s = 0.0f32;
                for p in 0..k as isize {
                    s += *a.offset(i * rsa + p * csa) * *b.offset(p * rsb + j * csb);
                }
                let cij = c.offset(i * rsc + j);
                *cij = if beta == 0.0 { alpha * s } else { alpha * s + beta * *cij };
            }
        }
    }

    /// The product in f64, for the tests.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_f64(
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        beta: f64,
        c: &[f32],
        ldc: usize,
    ) -> Vec<f64> {
        let at = |i: usize, p: usize| if ta == Trans::N { a[i * lda + p] } else { a[p * lda + i] } as f64;
        let bt = |p: usize, j: usize| if tb == Trans::N { b[p * ldb + j] } else { b[j * ldb + p] } as f64;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                let old = if beta == 0.0 { 0.0 } else { beta * c[i * ldc + j] as f64 };
                out[i * n + j] = alpha * s + old;
            }
        }
        out
    }
}
