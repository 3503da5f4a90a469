//! Reductions: sums (for losses and norms), column sums (bias gradients), extrema and finiteness.
//!
//! Long sums are cut into fixed chunks whose partial sums (f32 lanes) are combined in f64 in chunk
//! order: accurate, and the same bits whatever the thread count.

use super::{Dst, STREAM_CHUNK};
use crate::error::{check_len, Result, TensorError};
use crate::par;
use crate::simd::{isa, Scalar, Simd};

/// Elements summed in f32 lanes before the partial is moved into the f64 total.
const FLUSH: usize = 1024;

#[inline(always)]
fn sum_serial<S: Simd>(x: &[f32], square: bool) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(FLUSH) {
        let n = block.len();
        let p = block.as_ptr();
        // Four independent accumulators hide the add latency.
        let mut acc = [S::splat(0.0); 4];
        let mut i = 0;
        while i + 4 * S::LANES <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = unsafe { S::load(p.add(i + j * S::LANES)) };
                *a = if square { S::fma(v, v, *a) } else { S::add(*a, v) };
            }
            i += 4 * S::LANES;
        }
        total += S::reduce_sum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]))) as f64;
        for &v in &block[i..] {
            total += if square { (v * v) as f64 } else { v as f64 };
        }
    }
    total
}

fn chunked_sum(x: &[f32], square: bool) -> f64 {
    let chunks = x.len().div_ceil(STREAM_CHUNK);
    let mut partial = vec![0f64; chunks];
    let parallel = chunks > 2 && par::can_split();
    let isa = isa();
    par::chunks_mut(&mut partial, 1, parallel, |ci, out| {
        let c = &x[ci * STREAM_CHUNK..((ci + 1) * STREAM_CHUNK).min(x.len())];
        out[0] = crate::dispatch!(isa, sum_serial[](c, square));
    });
    partial.iter().sum()
}

/// Sum of a short slice (a row) in f32 lanes.
#[inline(always)]
pub(crate) fn row_sum_serial<S: Simd>(x: &[f32]) -> f32 {
    sum_serial::<S>(x, false) as f32
}

/// Sum of all elements, accumulated in f64.
pub fn sum(x: &[f32]) -> f64 {
    chunked_sum(x, false)
}

/// Sum of squares (global gradient norms), accumulated in f64.
pub fn sum_sq(x: &[f32]) -> f64 {
    chunked_sum(x, true)
}

/// Mean of all elements; an error for an empty buffer.
pub fn mean(x: &[f32]) -> Result<f64> {
    if x.is_empty() {
        return Err(TensorError::Arg { op: "mean", msg: "mean of an empty buffer".into() });
    }
    Ok(sum(x) / x.len() as f64)
}

/// The largest element (NaN if any element is NaN); an error for an empty buffer.
pub fn max(x: &[f32]) -> Result<f32> {
    if x.is_empty() {
        return Err(TensorError::Arg { op: "max", msg: "max of an empty buffer".into() });
    }
    if x.iter().any(|v| v.is_nan()) {
        return Ok(f32::NAN);
    }
    Ok(crate::dispatch!(isa(), max_serial[](x)))
}

#[inline(always)]
pub(crate) fn max_serial<S: Simd>(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    // Four independent chains: one chain waits out the max's latency on every vector (attention's
    // score rows are a few dozen vectors, and this pass sat on their critical path).
    let mut m = [S::splat(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 4 * S::LANES <= n {
        for (j, mj) in m.iter_mut().enumerate() {
            *mj = S::max(unsafe { S::load(p.add(i + j * S::LANES)) }, *mj);
        }
        i += 4 * S::LANES;
    }
    while i + S::LANES <= n {
        m[0] = S::max(unsafe { S::load(p.add(i)) }, m[0]);
        i += S::LANES;
    }
    let mut r = S::reduce_max(S::max(S::max(m[0], m[1]), S::max(m[2], m[3])));
    for &v in &x[i..] {
        r = Scalar::max(v, r);
    }
    r
}

/// True when no element is NaN or infinite (the training loop's guard).
pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// `out[j] (=|+=) sum_i x[i, j]` over a `rows x cols` row-major buffer: the bias gradient. Columns are
/// split between tasks, so each output element is summed by one task in row order: the same bits
/// whatever the split.
pub fn col_sum(x: &[f32], rows: usize, cols: usize, out: &mut [f32], dst: Dst) -> Result<()> {
    check_len("col_sum", "x", x.len(), rows * cols)?;
    check_len("col_sum", "out", out.len(), cols)?;
    // One wide block per thread: each task then streams long runs of every row (256-column blocks
    // read 1 KiB per row, a stride memory streams badly: 3.5 GB/s against 8-10 for whole rows of
    // a 4608 x 2048 gradient). At most 4096 columns, so the sums stay in L1.
    let block = cols.div_ceil(par::threads()).next_multiple_of(16).clamp(256, 4096);
    let parallel = rows * cols > 2 * STREAM_CHUNK && cols > block && par::can_split();
    let isa = isa();
    par::chunks_mut(
        out,
        block,
        parallel,
        |bi, oc| crate::dispatch!(isa, col_sum_serial[](x, rows, cols, bi * block, oc, dst)),
    );
    Ok(())
}

#[inline(always)]
fn col_sum_serial<S: Simd>(x: &[f32], rows: usize, cols: usize, c0: usize, out: &mut [f32], dst: Dst) {
    if dst == Dst::Overwrite {
        out.fill(0.0);
    }
    let w = out.len();
    for r in 0..rows {
        let row = &x[r * cols + c0..r * cols + c0 + w];
        super::unary_serial::<S, super::Identity>(&super::Identity, row, out, Dst::Accumulate);
    }
}

/// `out[i] = sum_j x[i, j]` over a `rows x cols` buffer.
pub fn row_sum(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    check_len("row_sum", "x", x.len(), rows * cols)?;
    check_len("row_sum", "out", out.len(), rows)?;
    let isa = isa();
    for (o, r) in out.iter_mut().zip(x.chunks_exact(cols.max(1))) {
        *o = crate::dispatch!(isa, sum_serial[](r, false)) as f32;
    }
    Ok(())
}

/// Plain loops in f64 that the tests trust.
pub mod reference {
    pub fn sum(x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64).sum()
    }

    pub fn col_sum(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0.0; cols];
        for r in 0..rows {
            for c in 0..cols {
                out[c] += x[r * cols + c] as f64;
            }
        }
        out
    }
}
