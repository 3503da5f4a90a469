//! Resampling of band planes, with PyTorch's `interpolate(..., align_corners=False)` conventions:
//! output pixel `i` samples the input at `(i + 0.5) * in / out - 0.5`, borders clamped. Bicubic uses
//! PyTorch's kernel (a = -0.75) and is the filter this crate uses to bring 20 m and 60 m bands to the
//! 10 m grid; bilinear and nearest are there for masks and speed.

use sg_tensor::{Result, TensorError};

/// Interpolation filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Nearest neighbour (label masks).
    Nearest,
    Bilinear,
    /// Cubic convolution, a = -0.75 as PyTorch.
    Bicubic,
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Taps and weights along one axis: for each output index, `(input index, weight)` pairs.
fn taps(inp: usize, out: usize, f: Filter) -> Vec<Vec<(usize, f64)>> {
    let scale = inp as f64 / out as f64;
    let clamp = |i: isize| i.clamp(0, inp as isize - 1) as usize;
    (0..out)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            match f {
                // PyTorch's nearest: floor(o * scale).
                Filter::Nearest => vec![(((o as f64 * scale).floor() as usize).min(inp - 1), 1.0)],
                Filter::Bilinear => {
                    let s = src.max(0.0);
                    let i0 = s.floor() as isize;
                    let t = s - i0 as f64;
                    vec![(clamp(i0), 1.0 - t), (clamp(i0 + 1), t)]
                }
                Filter::Bicubic => {
                    let i0 = src.floor() as isize;
                    let t = src - i0 as f64;
                    (-1..=2).map(|k| (clamp(i0 + k), cubic(t - k as f64))).collect()
                }
            }
        })
        .collect()
}

/// One `h x w` plane resized to `oh x ow`.
pub fn resize(plane: &[f32], h: usize, w: usize, oh: usize, ow: usize, f: Filter) -> Result<Vec<f32>> {
    if plane.len() != h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(TensorError::Shape {
            op: "resize",
            msg: format!("{} values as {h}x{w} resized to {oh}x{ow}", plane.len()),
        });
    }
    if (h, w) == (oh, ow) {
        return Ok(plane.to_vec());
    }
    let (ty, tx) = (taps(h, oh, f), taps(w, ow, f));
    // Separable: rows first (h x ow), then columns.
    let mut tmp = vec![0f64; h * ow];
    for y in 0..h {
        for (x, t) in tx.iter().enumerate() {
            tmp[y * ow + x] = t.iter().map(|&(i, wt)| wt * plane[y * w + i] as f64).sum();
        }
    }
    let mut out = vec![0f32; oh * ow];
    for (y, t) in ty.iter().enumerate() {
        for x in 0..ow {
            out[y * ow + x] = t.iter().map(|&(i, wt)| wt * tmp[i * ow + x]).sum::<f64>() as f32;
        }
    }
    Ok(out)
}

/// Every plane of a band-major image resized.
pub fn resize_planes(
    img: &[f32],
    bands: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    f: Filter,
) -> Result<Vec<f32>> {
    if bands == 0 || img.len() != bands * h * w {
        return Err(TensorError::Shape { op: "resize", msg: format!("{} values as {bands} x {h}x{w}", img.len()) });
    }
    let mut out = Vec::with_capacity(bands * oh * ow);
    for p in img.chunks_exact(h * w) {
        out.extend(resize(p, h, w, oh, ow, f)?);
    }
    Ok(out)
}
