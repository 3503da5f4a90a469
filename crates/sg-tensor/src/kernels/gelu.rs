//! GELU in its exact erf form, `x * Phi(x)`, and its exact derivative `Phi(x) + x * phi(x)` (the
//! backward matches the forward: no tanh approximation on either side).

use super::{math, run_binary, run_binary_inplace, run_unary, run_unary_inplace, Binary, Dst, Unary};
use crate::error::{check_len, Result};
use crate::simd::Simd;

struct Fwd;
impl Unary for Fwd {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        math::gelu::<S>(x)
    }
}

struct Bwd;
impl Binary for Bwd {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V, dy: S::V) -> S::V {
        S::mul(dy, math::gelu_grad::<S>(x))
    }
}

/// `y = gelu(x)`.
pub fn forward(x: &[f32], y: &mut [f32]) -> Result<()> {
    check_len("gelu::forward", "y", y.len(), x.len())?;
    run_unary(&Fwd, x, y, Dst::Overwrite);
    Ok(())
}

/// `x = gelu(x)` in place (inference, where the pre-activation is not needed again).
pub fn forward_inplace(x: &mut [f32]) {
    run_unary_inplace(&Fwd, x);
}

/// `dx (=|+=) dy * gelu'(x)`, with `x` the pre-activation.
pub fn backward(x: &[f32], dy: &[f32], dx: &mut [f32], dst: Dst) -> Result<()> {
    check_len("gelu::backward", "dy", dy.len(), x.len())?;
    check_len("gelu::backward", "dx", dx.len(), x.len())?;
    run_binary(&Bwd, x, dy, dx, dst);
    Ok(())
}

/// `g = g * gelu'(x)` in place: the same values as [`backward`] with `Dst::Overwrite`, without a
/// second buffer of the (4x-wide) hidden activation's size.
pub fn backward_inplace(x: &[f32], g: &mut [f32]) -> Result<()> {
    check_len("gelu::backward_inplace", "g", g.len(), x.len())?;
    run_binary_inplace(&Bwd, x, g);
    Ok(())
}

/// Plain f64 evaluations, rounded once to f32: what the tests hold the kernels to.
pub mod reference {
    use crate::kernels::math::reference::{erf, normal_pdf};

    pub fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
    }

    pub fn gelu_grad(x: f64) -> f64 {
        0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + x * normal_pdf(x)
    }

    pub fn forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu(x as f64) as f32;
        }
    }

    pub fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = (dy as f64 * gelu_grad(x as f64)) as f32;
        }
    }
}
