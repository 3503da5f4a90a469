//! AdamW over flat buffers, in PyTorch's order of operations (`torch.optim.AdamW`, not fused):
//! `p *= 1 - lr * wd`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use super::STREAM_CHUNK;
use crate::error::{check_len, Result, TensorError};
use crate::par;
use crate::simd::{isa, Simd};

/// Hyper-parameters of one AdamW step; `step` counts from 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

impl AdamW {
    fn validate(&self) -> Result<()> {
        let op = "adamw";
        let bad = |msg: String| Err(TensorError::Arg { op, msg });
        if self.step == 0 {
            return bad("step counts from 1".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("betas must lie in [0, 1), got ({}, {})", self.beta1, self.beta2));
        }
        if self.eps.is_nan()
            || self.eps <= 0.0
            || !self.lr.is_finite()
            || self.lr < 0.0
            || !self.weight_decay.is_finite()
        {
            return bad(format!("need eps > 0 and finite lr >= 0 and weight decay, got {self:?}"));
        }
        Ok(())
    }

    /// `(decay factor, step size, 1 / sqrt(bias correction 2))`, computed as PyTorch does in f64
    /// and rounded once.
    fn factors(&self) -> (f32, f32, f32) {
        let t = self.step as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        (
            (1.0 - self.lr as f64 * self.weight_decay as f64) as f32,
            (self.lr as f64 / bc1) as f32,
            (1.0 / bc2.sqrt()) as f32,
        )
    }
}

/// One chunk of [`step`]: the moments, then the update from them (both in L2 by then), so each
/// formula is written once, in [`moments_serial`] and [`apply_serial`].
#[inline(always)]
fn step_serial<S: Simd>(h: &AdamW, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    moments_serial::<S>(h, g, m, v);
    apply_serial::<S>(h, p, m, v);
}

/// One AdamW step over a flat parameter buffer and its gradient and moment buffers.
pub fn step(h: &AdamW, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
    h.validate()?;
    let n = param.len();
    check_len("adamw", "grad", grad.len(), n)?;
    check_len("adamw", "exp_avg", m.len(), n)?;
    check_len("adamw", "exp_avg_sq", v.len(), n)?;
    let parallel = n > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    let (mp, vp) = (par::SendPtr(m.as_mut_ptr()), par::SendPtr(v.as_mut_ptr()));
    par::chunks_mut(param, STREAM_CHUNK, parallel, |ci, pc| {
        let r = ci * STREAM_CHUNK..ci * STREAM_CHUNK + pc.len();
        // SAFETY: chunk ci touches only its own range of m and v.
        let (mc, vc) = unsafe {
            (
                std::slice::from_raw_parts_mut(mp.get().add(r.start), pc.len()),
                std::slice::from_raw_parts_mut(vp.get().add(r.start), pc.len()),
            )
        };
        crate::dispatch!(isa, step_serial[](h, pc, &grad[r], mc, vc))
    });
    Ok(())
}

#[inline(always)]
fn moments_serial<S: Simd>(h: &AdamW, g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = m.len();
    let (gp, mp, vp) = (g.as_ptr(), m.as_mut_ptr(), v.as_mut_ptr());
    let (b1, b2) = (S::splat(h.beta1), S::splat(h.beta2));
    let (c1, c2) = (S::splat(1.0 - h.beta1), S::splat(1.0 - h.beta2));
    let mut i = 0;
    while i + S::LANES <= n {
        // SAFETY: the three buffers have length n (checked by the caller).
        unsafe {
            let gv = S::load(gp.add(i));
            S::store(mp.add(i), S::fma(b1, S::load(mp.add(i)), S::mul(c1, gv)));
            S::store(vp.add(i), S::fma(b2, S::load(vp.add(i)), S::mul(c2, S::mul(gv, gv))));
        }
        i += S::LANES;
    }
    for j in i..n {
        let gv = g[j];
        m[j] = h.beta1 * m[j] + (1.0 - h.beta1) * gv;
        v[j] = h.beta2 * v[j] + (1.0 - h.beta2) * gv * gv;
    }
}

#[inline(always)]
fn apply_serial<S: Simd>(h: &AdamW, p: &mut [f32], m: &[f32], v: &[f32]) {
    let (decay, step_size, inv_bc2) = h.factors();
    let n = p.len();
    let (pp, mp, vp) = (p.as_mut_ptr(), m.as_ptr(), v.as_ptr());
    let (vdecay, vstep, vinv, veps) = (S::splat(decay), S::splat(step_size), S::splat(inv_bc2), S::splat(h.eps));
    let mut i = 0;
    while i + S::LANES <= n {
        // SAFETY: the three buffers have length n (checked by the caller).
        unsafe {
            let denom = S::add(S::mul(S::sqrt(S::load(vp.add(i))), vinv), veps);
            let pv = S::mul(S::load(pp.add(i)), vdecay);
            S::store(pp.add(i), S::sub(pv, S::mul(vstep, S::div(S::load(mp.add(i)), denom))));
        }
        i += S::LANES;
    }
    for j in i..n {
        let denom = v[j].sqrt() * inv_bc2 + h.eps;
        p[j] = p[j] * decay - step_size * (m[j] / denom);
    }
}

/// The first half of [`step`]: folds a gradient into the moments. [`moments`] then [`apply`] give
/// the same bits as [`step`]; split, the gradient can be folded as soon as it is final (during a
/// backward) and its buffer freed, so a training step never holds a gradient of the model's size.
pub fn moments(h: &AdamW, grad: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
    h.validate()?;
    let n = grad.len();
    check_len("adamw::moments", "exp_avg", m.len(), n)?;
    check_len("adamw::moments", "exp_avg_sq", v.len(), n)?;
    let parallel = n > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    let vp = par::SendPtr(v.as_mut_ptr());
    par::chunks_mut(m, STREAM_CHUNK, parallel, |ci, mc| {
        let r = ci * STREAM_CHUNK..ci * STREAM_CHUNK + mc.len();
        // SAFETY: chunk ci touches only its own range of v.
        let vc = unsafe { std::slice::from_raw_parts_mut(vp.get().add(r.start), mc.len()) };
        crate::dispatch!(isa, moments_serial[](h, &grad[r], mc, vc))
    });
    Ok(())
}

/// The second half of [`step`]: weight decay and the update from the folded moments.
pub fn apply(h: &AdamW, param: &mut [f32], m: &[f32], v: &[f32]) -> Result<()> {
    h.validate()?;
    let n = param.len();
    check_len("adamw::apply", "exp_avg", m.len(), n)?;
    check_len("adamw::apply", "exp_avg_sq", v.len(), n)?;
    let parallel = n > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    par::chunks_mut(param, STREAM_CHUNK, parallel, |ci, pc| {
        let r = ci * STREAM_CHUNK..ci * STREAM_CHUNK + pc.len();
        crate::dispatch!(isa, apply_serial[](h, pc, &m[r.clone()], &v[r]))
    });
    Ok(())
}

/// PyTorch's formulas line by line in f64, for the tests.
pub mod reference {
    pub fn step(h: &super::AdamW, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
        let t = h.step as i32;
        let (lr, wd, b1, b2, eps) = (h.lr as f64, h.weight_decay as f64, h.beta1 as f64, h.beta2 as f64, h.eps as f64);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for j in 0..p.len() {
            p[j] *= 1.0 - lr * wd;
            m[j] = b1 * m[j] + (1.0 - b1) * g[j];
            v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
            p[j] -= lr / bc1 * m[j] / (v[j].sqrt() / bc2.sqrt() + eps);
        }
    }
}
