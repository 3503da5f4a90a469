//! Row-wise softmax (max-subtracted, so large logits stay finite) and its backward.

use super::{math, Dst, STREAM_CHUNK};
use crate::error::{check_len, Result, TensorError};
use crate::par;
use crate::simd::{isa, Scalar, Simd};

fn check_rows(op: &'static str, len: usize, rows: usize, dim: usize) -> Result<()> {
    if dim == 0 && rows > 0 {
        return Err(TensorError::Shape { op, msg: "softmax over an empty row".into() });
    }
    check_len(op, "x", len, rows * dim)
}

/// Softmax of one row in place: `y = exp(y - max) / sum`.
#[inline(always)]
pub(crate) fn row_inplace<S: Simd>(y: &mut [f32]) {
    let n = y.len();
    let p = y.as_mut_ptr();
    let m = super::reduce::max_serial::<S>(y);
    let (vm, sm) = (S::splat(m), m);
    let mut acc = S::splat(0.0);
    let mut tail = 0.0f32;
    let mut i = 0;
    while i + S::LANES <= n {
        unsafe {
            let e = math::exp::<S>(S::sub(S::load(p.add(i)), vm));
            S::store(p.add(i), e);
            acc = S::add(acc, e);
        }
        i += S::LANES;
    }
    while i < n {
        unsafe {
            let e = math::exp::<Scalar>(*p.add(i) - sm);
            *p.add(i) = e;
            tail += e;
        }
        i += 1;
    }
    let inv = 1.0 / (S::reduce_sum(acc) + tail);
    super::unary_inplace_serial::<S, Mul>(&Mul(inv), y);
}

struct Mul(f32);
impl super::Unary for Mul {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        S::mul(x, S::splat(self.0))
    }
}

#[inline(always)]
fn rows_inplace<S: Simd>(y: &mut [f32], dim: usize) {
    for r in y.chunks_exact_mut(dim) {
        row_inplace::<S>(r);
    }
}

/// `x = softmax(x)` over each row of a `rows x dim` buffer.
pub fn forward_inplace(x: &mut [f32], rows: usize, dim: usize) -> Result<()> {
    check_rows("softmax::forward", x.len(), rows, dim)?;
    if rows == 0 {
        return Ok(());
    }
    let rows_per_task = (STREAM_CHUNK / dim).max(1);
    let parallel = rows > rows_per_task && par::can_split();
    let isa = isa();
    par::chunks_mut(x, rows_per_task * dim, parallel, |_, c| crate::dispatch!(isa, rows_inplace[](c, dim)));
    Ok(())
}

/// `y = softmax(x)` over each row.
pub fn forward(x: &[f32], y: &mut [f32], rows: usize, dim: usize) -> Result<()> {
    check_len("softmax::forward", "y", y.len(), x.len())?;
    y.copy_from_slice(x);
    forward_inplace(y, rows, dim)
}

#[inline(always)]
fn backward_rows<S: Simd>(y: &[f32], dy: &[f32], dx: &mut [f32], dim: usize, dst: Dst) {
    for ((yr, dyr), dxr) in y.chunks_exact(dim).zip(dy.chunks_exact(dim)).zip(dx.chunks_exact_mut(dim)) {
        let dot = dot_serial::<S>(yr, dyr);
        super::binary_serial::<S, SoftmaxGrad>(&SoftmaxGrad(dot), yr, dyr, dxr, dst);
    }
}

struct SoftmaxGrad(f32);
impl super::Binary for SoftmaxGrad {
    #[inline(always)]
    fn f<S: Simd>(&self, y: S::V, dy: S::V) -> S::V {
        S::mul(y, S::sub(dy, S::splat(self.0)))
    }
}

/// Dot product of two equal-length slices.
#[inline(always)]
pub(crate) fn dot_serial<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = S::splat(0.0);
    let mut acc1 = S::splat(0.0);
    let mut i = 0;
    while i + 2 * S::LANES <= n {
        unsafe {
            acc0 = S::fma(S::load(ap.add(i)), S::load(bp.add(i)), acc0);
            acc1 = S::fma(S::load(ap.add(i + S::LANES)), S::load(bp.add(i + S::LANES)), acc1);
        }
        i += 2 * S::LANES;
    }
    let mut r = S::reduce_sum(S::add(acc0, acc1));
    while i < n {
        r += a[i] * b[i];
        i += 1;
    }
    r
}

/// `dx (=|+=) y * (dy - sum(dy * y))` per row, from the softmax output `y`.
pub fn backward(y: &[f32], dy: &[f32], dx: &mut [f32], rows: usize, dim: usize, dst: Dst) -> Result<()> {
    check_rows("softmax::backward", y.len(), rows, dim)?;
    check_len("softmax::backward", "dy", dy.len(), y.len())?;
    check_len("softmax::backward", "dx", dx.len(), y.len())?;
    if rows == 0 {
        return Ok(());
    }
    let rows_per_task = (STREAM_CHUNK / dim).max(1);
    let parallel = rows > rows_per_task && par::can_split();
    let isa = isa();
    let chunk = rows_per_task * dim;
    par::chunks_mut(dx, chunk, parallel, |ci, dxc| {
        let r = ci * chunk..ci * chunk + dxc.len();
        crate::dispatch!(isa, backward_rows[](&y[r.clone()], &dy[r], dxc, dim, dst))
    });
    Ok(())
}

/// Plain f64 loops that the tests trust.
pub mod reference {
    pub fn forward(x: &[f32], dim: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for r in x.chunks_exact(dim) {
            let m = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            out.extend(e.iter().map(|v| v / s));
        }
        out
    }

    pub fn backward(y: &[f32], dy: &[f32], dim: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(y.len());
        for (yr, dr) in y.chunks_exact(dim).zip(dy.chunks_exact(dim)) {
            let dot: f64 = yr.iter().zip(dr).map(|(&a, &b)| a as f64 * b as f64).sum();
            out.extend(yr.iter().zip(dr).map(|(&y, &d)| y as f64 * (d as f64 - dot)));
        }
        out
    }
}
