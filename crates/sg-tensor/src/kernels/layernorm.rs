//! LayerNorm over the last axis: forward keeps each row's mean and 1/std for the backward.
//!
//! Backward, per row with `xhat = (x - mean) * rstd` and `g = dy * gamma`:
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dgamma += sum_rows dy * xhat`,
//! `dbeta += sum_rows dy`. The parameter gradients are summed per fixed block of rows and the blocks
//! are combined in order, so the result does not depend on the thread count.

use super::Dst;
use crate::error::{check_len, Result, TensorError};
use crate::par;
use crate::simd::{isa, Scalar, Simd};

/// Rows per parallel task.
const ROW_BLOCK: usize = 32;

fn check(op: &'static str, x: usize, rows: usize, dim: usize, gamma: usize, beta: usize) -> Result<()> {
    if dim == 0 {
        return Err(TensorError::Shape { op, msg: "layer norm over an empty last axis".into() });
    }
    check_len(op, "x", x, rows * dim)?;
    check_len(op, "gamma", gamma, dim)?;
    check_len(op, "beta", beta, dim)
}

#[inline(always)]
fn row_stats<S: Simd>(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len();
    let mean = super::reduce::row_sum_serial::<S>(x) / n as f32;
    // Second pass over the (cached) row: numerically safer than E[x^2] - E[x]^2.
    let p = x.as_ptr();
    let vm = S::splat(mean);
    let mut acc = S::splat(0.0);
    let mut i = 0;
    while i + S::LANES <= n {
        let d = S::sub(unsafe { S::load(p.add(i)) }, vm);
        acc = S::fma(d, d, acc);
        i += S::LANES;
    }
    let mut var = S::reduce_sum(acc);
    for &v in &x[i..] {
        var += (v - mean) * (v - mean);
    }
    let var = var / n as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn forward_rows<S: Simd>(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    mut stats: Option<(&mut [f32], &mut [f32])>,
) {
    let d = gamma.len();
    for (r, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
        let (mean, rstd) = row_stats::<S>(xr, eps);
        if let Some((m, s)) = stats.as_mut() {
            m[r] = mean;
            s[r] = rstd;
        }
        let (vm, vr) = (S::splat(mean), S::splat(rstd));
        let (xp, yp, gp, bp) = (xr.as_ptr(), yr.as_mut_ptr(), gamma.as_ptr(), beta.as_ptr());
        let mut i = 0;
        while i + S::LANES <= d {
            unsafe {
                let xh = S::mul(S::sub(S::load(xp.add(i)), vm), vr);
                S::store(yp.add(i), S::fma(xh, S::load(gp.add(i)), S::load(bp.add(i))));
            }
            i += S::LANES;
        }
        while i < d {
            yr[i] = Scalar::fma((xr[i] - mean) * rstd, gamma[i], beta[i]);
            i += 1;
        }
    }
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per row of a `rows x dim` buffer; writes each
/// row's mean and 1/std into `mean` and `rstd` (both `rows` long) when given (training).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    eps: f32,
    y: &mut [f32],
    stats: Option<(&mut [f32], &mut [f32])>,
) -> Result<()> {
    let dim = gamma.len();
    check("layernorm::forward", x.len(), rows, dim, gamma.len(), beta.len())?;
    check_len("layernorm::forward", "y", y.len(), x.len())?;
    if eps.is_nan() || eps <= 0.0 {
        return Err(TensorError::Arg { op: "layernorm::forward", msg: format!("eps must be positive, got {eps}") });
    }
    let isa = isa();
    let chunk = ROW_BLOCK * dim;
    let parallel = rows > 2 * ROW_BLOCK && par::can_split();
    match stats {
        None => par::chunks_mut(y, chunk, parallel, |ci, yc| {
            let xc = &x[ci * chunk..ci * chunk + yc.len()];
            crate::dispatch!(isa, forward_rows[](xc, gamma, beta, eps, yc, None))
        }),
        Some((mean, rstd)) => {
            check_len("layernorm::forward", "mean", mean.len(), rows)?;
            check_len("layernorm::forward", "rstd", rstd.len(), rows)?;
            let (mp, sp) = (par::SendPtr(mean.as_mut_ptr()), par::SendPtr(rstd.as_mut_ptr()));
            par::chunks_mut(y, chunk, parallel, |ci, yc| {
                let xc = &x[ci * chunk..ci * chunk + yc.len()];
                let nr = yc.len() / dim;
                // SAFETY: task `ci` writes rows ci*ROW_BLOCK .. +nr of mean and rstd only.
                let (m, s) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(mp.get().add(ci * ROW_BLOCK), nr),
                        std::slice::from_raw_parts_mut(sp.get().add(ci * ROW_BLOCK), nr),
                    )
                };
                crate::dispatch!(isa, forward_rows[](xc, gamma, beta, eps, yc, Some((m, s))))
            })
        }
    }
    Ok(())
}

/// Gradient of one block of rows; `dg`, `db` receive the block's partial parameter gradients.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows<S: Simd>(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dst: Dst,
    dg: &mut [f32],
    db: &mut [f32],
) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    for r in 0..mean.len() {
        let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let dxr = &mut dx[r * d..(r + 1) * d];
        let (vm, vr) = (S::splat(mean[r]), S::splat(rstd[r]));
        let (xp, dyp, gp, dgp, dbp) = (xr.as_ptr(), dyr.as_ptr(), gamma.as_ptr(), dg.as_mut_ptr(), db.as_mut_ptr());
        // Pass 1: the two row means, and the parameter gradients.
        let (mut sg, mut sgx) = (S::splat(0.0), S::splat(0.0));
        let mut i = 0;
        while i + S::LANES <= d {
            unsafe {
                let xh = S::mul(S::sub(S::load(xp.add(i)), vm), vr);
                let dyv = S::load(dyp.add(i));
                let g = S::mul(dyv, S::load(gp.add(i)));
                sg = S::add(sg, g);
                sgx = S::fma(g, xh, sgx);
                S::store(dgp.add(i), S::fma(dyv, xh, S::load(dgp.add(i))));
                S::store(dbp.add(i), S::add(S::load(dbp.add(i)), dyv));
            }
            i += S::LANES;
        }
        let (mut sg, mut sgx) = (S::reduce_sum(sg), S::reduce_sum(sgx));
        for j in i..d {
            let xh = (xr[j] - mean[r]) * rstd[r];
            let g = dyr[j] * gamma[j];
            sg += g;
            sgx += g * xh;
            dg[j] += dyr[j] * xh;
            db[j] += dyr[j];
        }
        let (mg, mgx) = (sg * inv_d, sgx * inv_d);
        // Pass 2: dx.
        let (vmg, vmgx) = (S::splat(mg), S::splat(mgx));
        let dxp = dxr.as_mut_ptr();
        let mut i = 0;
        while i + S::LANES <= d {
            unsafe {
                let xh = S::mul(S::sub(S::load(xp.add(i)), vm), vr);
                let g = S::mul(S::load(dyp.add(i)), S::load(gp.add(i)));
                let v = S::mul(vr, S::sub(S::sub(g, vmg), S::mul(xh, vmgx)));
                super::put::<S>(dxp.add(i), v, dst);
            }
            i += S::LANES;
        }
        for j in i..d {
            let xh = (xr[j] - mean[r]) * rstd[r];
            let v = rstd[r] * (dyr[j] * gamma[j] - mg - xh * mgx);
            match dst {
                Dst::Overwrite => dxr[j] = v,
                Dst::Accumulate => dxr[j] += v,
            }
        }
    }
}

/// LayerNorm backward from the saved `mean` and `rstd`: `dx (=|+=)` the input gradient; the
/// parameter gradients are always accumulated into `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dst: Dst,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let op = "layernorm::backward";
    let dim = gamma.len();
    let rows = mean.len();
    check(op, x.len(), rows, dim, gamma.len(), dim)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    check_len(op, "dy", dy.len(), x.len())?;
    check_len(op, "dx", dx.len(), x.len())?;
    check_len(op, "dgamma", dgamma.len(), dim)?;
    check_len(op, "dbeta", dbeta.len(), dim)?;
    let blocks = rows.div_ceil(ROW_BLOCK);
    // Per-block partials of dgamma and dbeta, side by side.
    let mut partial = vec![0f32; blocks * 2 * dim];
    let parallel = blocks > 2 && par::can_split();
    let isa = isa();
    let dxp = par::SendPtr(dx.as_mut_ptr());
    par::chunks_mut(&mut partial, 2 * dim, parallel, |bi, p| {
        let r0 = bi * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(rows);
        let (dg, db) = p.split_at_mut(dim);
        // SAFETY: block `bi` writes rows r0..r1 of dx only.
        let dxb = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r0 * dim), (r1 - r0) * dim) };
        let rr = r0 * dim..r1 * dim;
        crate::dispatch!(isa, backward_rows[](&x[rr.clone()], gamma, &mean[r0..r1], &rstd[r0..r1], &dy[rr], dxb, dst, dg, db)
        )
    });
    for p in partial.chunks_exact(2 * dim) {
        for j in 0..dim {
            dgamma[j] += p[j];
            dbeta[j] += p[dim + j];
        }
    }
    Ok(())
}

/// Plain f64 loops that the tests trust.
pub mod reference {
    /// Returns `(y, mean, rstd)`.
    pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = gamma.len();
        let (mut y, mut ms, mut rs) = (vec![], vec![], vec![]);
        for r in x.chunks_exact(d) {
            let m = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            y.extend(r.iter().enumerate().map(|(j, &v)| (v as f64 - m) * rstd * gamma[j] as f64 + beta[j] as f64));
            ms.push(m);
            rs.push(rstd);
        }
        (y, ms, rs)
    }

    /// Returns `(dx, dgamma, dbeta)`.
    pub fn backward(x: &[f32], gamma: &[f32], dy: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = gamma.len();
        let (_, ms, rs) = forward(x, gamma, &vec![0.0; d], eps);
        let (mut dx, mut dg, mut db) = (vec![], vec![0.0; d], vec![0.0; d]);
        for (r, (xr, dyr)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
            let xh: Vec<f64> = xr.iter().map(|&v| (v as f64 - ms[r]) * rs[r]).collect();
            let g: Vec<f64> = dyr.iter().zip(gamma).map(|(&a, &b)| a as f64 * b as f64).collect();
            let mg = g.iter().sum::<f64>() / d as f64;
            let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for j in 0..d {
                dx.push(rs[r] * (g[j] - mg - xh[j] * mgx));
                dg[j] += dyr[j] as f64 * xh[j];
                db[j] += dyr[j] as f64;
            }
        }
        (dx, dg, db)
    }
}
