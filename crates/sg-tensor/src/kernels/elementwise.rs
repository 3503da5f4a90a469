//! Lane-wise arithmetic: sums, products, scaling, residual adds and row broadcasts.

use super::{run_binary, run_unary, run_unary_inplace, Binary, Dst, Unary};
use crate::error::{check_len, Result, TensorError};
use crate::par;
use crate::simd::Simd;

struct Add;
impl Binary for Add {
    #[inline(always)]
    fn f<S: Simd>(&self, a: S::V, b: S::V) -> S::V {
        S::add(a, b)
    }
}

struct Sub;
impl Binary for Sub {
    #[inline(always)]
    fn f<S: Simd>(&self, a: S::V, b: S::V) -> S::V {
        S::sub(a, b)
    }
}

struct Mul;
impl Binary for Mul {
    #[inline(always)]
    fn f<S: Simd>(&self, a: S::V, b: S::V) -> S::V {
        S::mul(a, b)
    }
}

struct Scale(f32);
impl Unary for Scale {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        S::mul(x, S::splat(self.0))
    }
}

fn check3(op: &'static str, a: &[f32], b: &[f32], out: &[f32]) -> Result<()> {
    check_len(op, "b", b.len(), a.len())?;
    check_len(op, "out", out.len(), a.len())
}

/// `out (=|+=) a + b`.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32], dst: Dst) -> Result<()> {
    check3("add", a, b, out)?;
    run_binary(&Add, a, b, out, dst);
    Ok(())
}

/// `out (=|+=) a - b`.
pub fn sub(a: &[f32], b: &[f32], out: &mut [f32], dst: Dst) -> Result<()> {
    check3("sub", a, b, out)?;
    run_binary(&Sub, a, b, out, dst);
    Ok(())
}

/// `out (=|+=) a * b` (the backward of a product is two of these with `Accumulate`).
pub fn mul(a: &[f32], b: &[f32], out: &mut [f32], dst: Dst) -> Result<()> {
    check3("mul", a, b, out)?;
    run_binary(&Mul, a, b, out, dst);
    Ok(())
}

/// `y += x`: the residual connection, and the way gradients of a reused value are summed.
pub fn add_assign(y: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("add_assign", "x", x.len(), y.len())?;
    run_unary(&super::Identity, x, y, Dst::Accumulate);
    Ok(())
}

/// `y (=|+=) alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32], dst: Dst) -> Result<()> {
    check_len("axpy", "y", y.len(), x.len())?;
    run_unary(&Scale(alpha), x, y, dst);
    Ok(())
}

/// `x *= alpha` in place.
pub fn scale(x: &mut [f32], alpha: f32) {
    run_unary_inplace(&Scale(alpha), x);
}

/// `y[r, :] += row` for every row of `y` (rows x `row.len()`): position embeddings, biases.
pub fn add_row_broadcast(y: &mut [f32], row: &[f32]) -> Result<()> {
    let d = row.len();
    if d == 0 || y.len() % d != 0 {
        return Err(TensorError::Shape {
            op: "add_row_broadcast",
            msg: format!("a buffer of {} elements is not a whole number of rows of {d}", y.len()),
        });
    }
    let rows_per_task = (super::STREAM_CHUNK / d).max(1);
    let parallel = y.len() > 2 * super::STREAM_CHUNK && par::can_split();
    let isa = crate::simd::isa();
    par::chunks_mut(y, rows_per_task * d, parallel, |_, yc| {
        for yr in yc.chunks_exact_mut(d) {
            crate::dispatch!(isa, super::unary_serial[super::Identity](&super::Identity, row, yr, Dst::Accumulate));
        }
    });
    Ok(())
}

/// Plain loops that the tests trust.
pub mod reference {
    pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    }

    pub fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a * b;
        }
    }

    pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }

    pub fn add_row_broadcast(y: &mut [f32], row: &[f32]) {
        for yr in y.chunks_exact_mut(row.len()) {
            for (y, &r) in yr.iter_mut().zip(row) {
                *y += r;
            }
        }
    }
}
