//! The dense-prediction ops of the segmentation and change-detection heads, written once as plain
//! f64 loops over either backend's values: resizing, pooling, GroupNorm, channel concatenation and
//! per-channel bias. They run on feature maps far smaller than the encoder's activations, so
//! exactness and one obvious implementation matter more here than SIMD; a backend may override the
//! [`super::Backend`] methods that call them.

use std::ops::Range;

use crate::error::{check_len, Result, TensorError};

/// The two source taps and the weight of the second for each of `out` positions resized from `len`.
/// PyTorch's `align_corners=False` samples at `(i + 0.5) * len / out - 0.5` (clamped at 0);
/// `align_corners=True` maps the corner pixels onto each other: `i * (len - 1) / (out - 1)`.
pub(crate) fn bilinear_taps(len: usize, out: usize, align_corners: bool) -> Vec<(usize, usize, f64)> {
    (0..out)
        .map(|i| {
            let src = if align_corners {
                if out > 1 {
                    i as f64 * (len - 1) as f64 / (out - 1) as f64
                } else {
                    0.0
                }
            } else {
                ((i as f64 + 0.5) * len as f64 / out as f64 - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(len - 1);
            (i0, (i0 + 1).min(len - 1), src - i0 as f64)
        })
        .collect()
}

/// Bilinear resize of `planes` planes of `h x w` to `oh x ow`.
pub(crate) fn bilinear_generic<T: Copy + Into<f64>>(
    x: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    align_corners: bool,
) -> Result<Vec<f64>> {
    check_len("upsample_bilinear", "x", x.len(), planes * h * w)?;
    let (ty, tx) = (bilinear_taps(h, oh, align_corners), bilinear_taps(w, ow, align_corners));
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in x.chunks_exact(h * w) {
        for &(y0, y1, ly) in &ty {
            for &(x0, x1, lx) in &tx {
                let v = |y: usize, xx: usize| p[y * w + xx].into();
                let top = v(y0, x0) * (1.0 - lx) + v(y0, x1) * lx;
                let bot = v(y1, x0) * (1.0 - lx) + v(y1, x1) * lx;
                out.push(top * (1.0 - ly) + bot * ly);
            }
        }
    }
    Ok(out)
}

/// The adjoint of [`bilinear_generic`]: `dy (planes, oh, ow)` scattered back to `(planes, h, w)`.
pub(crate) fn bilinear_backward_generic<T: Copy + Into<f64>>(
    dy: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    align_corners: bool,
) -> Result<Vec<f64>> {
    check_len("upsample_bilinear_backward", "dy", dy.len(), planes * oh * ow)?;
    let (ty, tx) = (bilinear_taps(h, oh, align_corners), bilinear_taps(w, ow, align_corners));
    let mut dx = vec![0.0; planes * h * w];
    for (g, d) in dy.chunks_exact(oh * ow).zip(dx.chunks_exact_mut(h * w)) {
        for (i, &(y0, y1, ly)) in ty.iter().enumerate() {
            for (j, &(x0, x1, lx)) in tx.iter().enumerate() {
                let v: f64 = g[i * ow + j].into();
                d[y0 * w + x0] += v * (1.0 - ly) * (1.0 - lx);
                d[y0 * w + x1] += v * (1.0 - ly) * lx;
                d[y1 * w + x0] += v * ly * (1.0 - lx);
                d[y1 * w + x1] += v * ly * lx;
            }
        }
    }
    Ok(dx)
}

/// PyTorch's adaptive-pooling bin `i` of `out` over `len`: `floor(i len / out) .. ceil((i + 1) len / out)`.
fn pool_bin(i: usize, len: usize, out: usize) -> Range<usize> {
    i * len / out..((i + 1) * len).div_ceil(out)
}

/// Adaptive average pooling of `planes` planes of `h x w` to `oh x ow`.
pub(crate) fn adaptive_avg_pool_generic<T: Copy + Into<f64>>(
    x: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f64>> {
    check_len("adaptive_avg_pool", "x", x.len(), planes * h * w)?;
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in x.chunks_exact(h * w) {
        for i in 0..oh {
            let ys = pool_bin(i, h, oh);
            for j in 0..ow {
                let xs = pool_bin(j, w, ow);
                let n = (ys.len() * xs.len()) as f64;
                out.push(
                    ys.clone().flat_map(|y| xs.clone().map(move |x| y * w + x)).map(|k| p[k].into()).sum::<f64>() / n,
                );
            }
        }
    }
    Ok(out)
}

/// The adjoint of [`adaptive_avg_pool_generic`]: each output gradient spread evenly over its bin.
pub(crate) fn adaptive_avg_pool_backward_generic<T: Copy + Into<f64>>(
    dy: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f64>> {
    check_len("adaptive_avg_pool_backward", "dy", dy.len(), planes * oh * ow)?;
    let mut dx = vec![0.0; planes * h * w];
    for (g, d) in dy.chunks_exact(oh * ow).zip(dx.chunks_exact_mut(h * w)) {
        for i in 0..oh {
            let ys = pool_bin(i, h, oh);
            for j in 0..ow {
                let xs = pool_bin(j, w, ow);
                let v = g[i * ow + j].into() / (ys.len() * xs.len()) as f64;
                for y in ys.clone() {
                    d[y * w + xs.start..y * w + xs.end].iter_mut().for_each(|e| *e += v);
                }
            }
        }
    }
    Ok(dx)
}

/// Adaptive max pooling of `planes` planes of `h x w` to `oh x ow` (PyTorch's bins; the first
/// maximum wins, NaN propagates): the values and, for the backward, each maximum's index in `x`.
pub(crate) fn adaptive_max_pool_generic<T: Copy + Into<f64>>(
    x: &[T],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<(Vec<f64>, Vec<u32>)> {
    check_len("adaptive_max_pool", "x", x.len(), planes * h * w)?;
    if x.len() > u32::MAX as usize {
        return Err(TensorError::Arg {
            op: "adaptive_max_pool",
            msg: format!("{} values exceed u32 indices", x.len()),
        });
    }
    let (mut out, mut idx) = (Vec::with_capacity(planes * oh * ow), Vec::with_capacity(planes * oh * ow));
    for (pi, p) in x.chunks_exact(h * w).enumerate() {
        for i in 0..oh {
            let ys = pool_bin(i, h, oh);
            for j in 0..ow {
                let xs = pool_bin(j, w, ow);
                let mut best = (f64::NEG_INFINITY, ys.start * w + xs.start);
                for k in ys.clone().flat_map(|y| xs.clone().map(move |x| y * w + x)) {
                    let v: f64 = p[k].into();
                    if v > best.0 || v.is_nan() {
                        best = (v, k);
                        if v.is_nan() {
                            break;
                        }
                    }
                }
                out.push(best.0);
                idx.push((pi * h * w + best.1) as u32);
            }
        }
    }
    Ok((out, idx))
}

/// The adjoint of [`adaptive_max_pool_generic`]: each output gradient to its maximum.
pub(crate) fn adaptive_max_pool_backward_generic<T: Copy + Into<f64>>(
    dy: &[T],
    idx: &[u32],
    in_len: usize,
) -> Result<Vec<f64>> {
    check_len("adaptive_max_pool_backward", "dy", dy.len(), idx.len())?;
    let mut dx = vec![0.0; in_len];
    for (&g, &i) in dy.iter().zip(idx) {
        let d = dx.get_mut(i as usize).ok_or_else(|| TensorError::Arg {
            op: "adaptive_max_pool_backward",
            msg: format!("index {i} outside an input of {in_len}"),
        })?;
        *d += g.into();
    }
    Ok(dx)
}

/// Sizes of a GroupNorm over `x (batch, channels, spatial)`: `groups` groups of
/// `channels / groups` channels each, normalised together with their spatial extent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormDims {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNormDims {
    pub(crate) fn check(&self, op: &'static str, x: usize, w: usize, b: usize) -> Result<()> {
        if self.groups == 0 || self.channels % self.groups != 0 {
            return Err(TensorError::Shape {
                op,
                msg: format!("{} channels do not split into {} groups", self.channels, self.groups),
            });
        }
        check_len(op, "x", x, self.batch * self.channels * self.spatial)?;
        check_len(op, "weight", w, self.channels)?;
        check_len(op, "bias", b, self.channels)
    }

    /// Values per normalised group.
    pub(crate) fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// GroupNorm: `(x - mean) / sqrt(var + eps) * w[c] + b[c]` with biased variance over each group;
/// also the per-(sample, group) mean and 1/std for the backward.
pub(crate) fn group_norm_generic<T: Copy + Into<f64>>(
    x: &[T],
    w: &[f64],
    b: &[f64],
    d: GroupNormDims,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    d.check("group_norm", x.len(), w.len(), b.len())?;
    let (m, cg) = (d.group_len(), d.channels / d.groups);
    let (mut y, mut mean, mut rstd) = (Vec::with_capacity(x.len()), Vec::new(), Vec::new());
    for (gi, g) in x.chunks_exact(m).enumerate() {
        let mu = g.iter().map(|&v| v.into()).sum::<f64>() / m as f64;
        let var = g.iter().map(|&v| (v.into() - mu).powi(2)).sum::<f64>() / m as f64;
        let r = 1.0 / (var + d.eps).sqrt();
        let c0 = gi % d.groups * cg;
        for (k, &v) in g.iter().enumerate() {
            let c = c0 + k / d.spatial;
            y.push((v.into() - mu) * r * w[c] + b[c]);
        }
        mean.push(mu);
        rstd.push(r);
    }
    Ok((y, mean, rstd))
}

/// Backward of [`group_norm_generic`] from its input `x` and saved statistics: `dx`, `dw`, `db`.
pub(crate) fn group_norm_backward_generic<T: Copy + Into<f64>>(
    x: &[T],
    w: &[f64],
    mean: &[f64],
    rstd: &[f64],
    dy: &[T],
    d: GroupNormDims,
) -> Result<[Vec<f64>; 3]> {
    d.check("group_norm_backward", x.len(), w.len(), w.len())?;
    check_len("group_norm_backward", "dy", dy.len(), x.len())?;
    check_len("group_norm_backward", "mean", mean.len(), d.batch * d.groups)?;
    let (m, cg) = (d.group_len(), d.channels / d.groups);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; d.channels], vec![0.0; d.channels]);
    for gi in 0..d.batch * d.groups {
        let (mu, r, c0) = (mean[gi], rstd[gi], gi % d.groups * cg);
        let span = gi * m..(gi + 1) * m;
        let xhat = |k: usize| (x[gi * m + k].into() - mu) * r;
        // dxhat = dy * w; dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        let (mut s1, mut s2) = (0.0, 0.0);
        for k in 0..m {
            let (c, g) = (c0 + k / d.spatial, dy[gi * m + k].into());
            let xh = xhat(k);
            s1 += g * w[c];
            s2 += g * w[c] * xh;
            dw[c] += g * xh;
            db[c] += g;
        }
        let (s1, s2) = (s1 / m as f64, s2 / m as f64);
        for (k, o) in dx[span].iter_mut().enumerate() {
            let c = c0 + k / d.spatial;
            *o = r * (dy[gi * m + k].into() * w[c] - s1 - xhat(k) * s2);
        }
    }
    Ok([dx, dw, db])
}

/// Concatenation along one axis: every part is `(outer, widths[i])` row-major; the result is
/// `(outer, sum of widths)`.
pub(crate) fn concat_generic<T: Copy + Into<f64>>(parts: &[&[T]], outer: usize, widths: &[usize]) -> Result<Vec<f64>> {
    if parts.len() != widths.len() {
        return Err(TensorError::Arg { op: "concat", msg: format!("{} parts, {} widths", parts.len(), widths.len()) });
    }
    for (p, &wd) in parts.iter().zip(widths) {
        check_len("concat", "part", p.len(), outer * wd)?;
    }
    let mut out = Vec::with_capacity(outer * widths.iter().sum::<usize>());
    for o in 0..outer {
        for (p, &wd) in parts.iter().zip(widths) {
            out.extend(p[o * wd..(o + 1) * wd].iter().map(|&v| v.into()));
        }
    }
    Ok(out)
}

/// The gradient of part `i` of a [`concat_generic`]: its columns of `dy`.
pub(crate) fn concat_part_generic<T: Copy + Into<f64>>(
    dy: &[T],
    outer: usize,
    widths: &[usize],
    i: usize,
) -> Result<Vec<f64>> {
    let total: usize = widths.iter().sum();
    check_len("concat_backward", "dy", dy.len(), outer * total)?;
    let start: usize = widths[..i].iter().sum();
    Ok((0..outer)
        .flat_map(|o| dy[o * total + start..o * total + start + widths[i]].iter().map(|&v| v.into()))
        .collect())
}

/// `y[n, c, :] += b[c]` over `(batch, channels, plane)`.
pub(crate) fn channel_bias_generic<T: Copy + Into<f64>>(y: &[T], b: &[f64], plane: usize) -> Result<Vec<f64>> {
    if plane == 0 || y.len() % (plane * b.len().max(1)) != 0 {
        return Err(TensorError::Shape {
            op: "channel_bias",
            msg: format!("{} values are not planes of {plane} for {} channels", y.len(), b.len()),
        });
    }
    Ok(y.iter().enumerate().map(|(i, &v)| v.into() + b[i / plane % b.len()]).collect())
}

/// The bias gradient of [`channel_bias_generic`]: `dy` summed per channel.
pub(crate) fn channel_bias_backward_generic<T: Copy + Into<f64>>(dy: &[T], channels: usize, plane: usize) -> Vec<f64> {
    let mut db = vec![0.0; channels];
    for (i, &g) in dy.iter().enumerate() {
        db[i / plane % channels] += g.into();
    }
    db
}

/// BatchNorm in evaluation: `(x - mean[c]) / sqrt(var[c] + eps) * w[c] + b[c]` over
/// `(batch, channels, plane)` with the running statistics.
pub(crate) fn batch_norm_eval_generic<T: Copy + Into<f64>>(
    x: &[T],
    [mean, var, w, b]: [&[f64]; 4],
    plane: usize,
    eps: f64,
) -> Result<Vec<f64>> {
    let c = w.len();
    if plane == 0 || c == 0 || x.len() % (plane * c) != 0 || [mean.len(), var.len(), b.len()] != [c; 3] {
        return Err(TensorError::Shape {
            op: "batch_norm",
            msg: format!("{} values, {c} channels of {plane}, statistics of {} and {}", x.len(), mean.len(), var.len()),
        });
    }
    Ok(x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = i / plane % c;
            (v.into() - mean[k]) / (var[k] + eps).sqrt() * w[k] + b[k]
        })
        .collect())
}
