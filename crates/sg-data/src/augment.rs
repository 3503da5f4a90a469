//! Augmentation of band-major images `(bands, H, W)` and, identically, of their label masks
//! `(H, W)`: random resized crop (scale 0.2-1, bicubic for images, nearest for masks), flips and
//! 90-degree rotations for training; resize + centre crop for evaluation. Every random choice comes
//! from the generator passed in, so a seed fixes the result.

use sg_tensor::rng::Rng;
use sg_tensor::{Result, TensorError};

use crate::resample::{resize, resize_planes, Filter};

/// An image with its optional per-pixel mask (segmentation labels, change maps).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub img: Vec<f32>,
    pub bands: usize,
    pub height: usize,
    pub width: usize,
    pub mask: Option<Vec<f32>>,
}

impl Sample {
    pub fn new(img: Vec<f32>, bands: usize, height: usize, width: usize, mask: Option<Vec<f32>>) -> Result<Self> {
        if bands == 0 || img.len() != bands * height * width || mask.as_ref().is_some_and(|m| m.len() != height * width)
        {
            return Err(TensorError::Shape {
                op: "Sample::new",
                msg: format!(
                    "{} values for {bands} x {height} x {width}, mask of {:?}",
                    img.len(),
                    mask.as_ref().map(|m| m.len())
                ),
            });
        }
        Ok(Sample { img, bands, height, width, mask })
    }

    fn map_planes(&self, oh: usize, ow: usize, f: impl Fn(&[f32]) -> Vec<f32>) -> Sample {
        let n = self.height * self.width;
        let img = self.img.chunks_exact(n).flat_map(&f).collect();
        Sample { img, bands: self.bands, height: oh, width: ow, mask: self.mask.as_deref().map(&f) }
    }

    /// The window `top, left, h, w` (inside the image).
    pub fn crop(&self, top: usize, left: usize, h: usize, w: usize) -> Result<Sample> {
        if h == 0 || w == 0 || top + h > self.height || left + w > self.width {
            return Err(TensorError::Shape {
                op: "crop",
                msg: format!("{h}x{w} at ({top}, {left}) of a {}x{} image", self.height, self.width),
            });
        }
        let width = self.width;
        Ok(self.map_planes(h, w, |p| {
            (top..top + h).flat_map(|y| p[y * width + left..y * width + left + w].to_vec()).collect()
        }))
    }

    /// Resized to `h x w`: `filter` for the image, nearest for the mask (labels are not blended).
    pub fn resize(&self, h: usize, w: usize, filter: Filter) -> Result<Sample> {
        let img = resize_planes(&self.img, self.bands, self.height, self.width, h, w, filter)?;
        let mask = match &self.mask {
            Some(m) => Some(resize(m, self.height, self.width, h, w, Filter::Nearest)?),
            None => None,
        };
        Ok(Sample { img, bands: self.bands, height: h, width: w, mask })
    }

    /// Mirrored left-right.
    pub fn hflip(&self) -> Sample {
        let w = self.width;
        self.map_planes(self.height, w, |p| p.chunks_exact(w).flat_map(|r| r.iter().rev().copied()).collect())
    }

    /// Mirrored top-bottom.
    pub fn vflip(&self) -> Sample {
        let w = self.width;
        self.map_planes(self.height, w, |p| p.chunks_exact(w).rev().flatten().copied().collect())
    }

    /// Rotated by 90 degrees counter-clockwise `k` times (as `torch.rot90(x, k, (-2, -1))`).
    pub fn rot90(&self, k: usize) -> Sample {
        let mut s = self.clone();
        for _ in 0..k % 4 {
            let (h, w) = (s.height, s.width);
            // Output (w x h): out[i][j] = in[j][w - 1 - i].
            s = s.map_planes(w, h, |p| (0..w).flat_map(|i| (0..h).map(move |j| p[j * w + (w - 1 - i)])).collect());
        }
        s
    }
}

/// torchvision's `RandomResizedCrop` window: area in `scale` of the image, aspect ratio log-uniform
/// in [3/4, 4/3], ten tries, then a centre crop of the clamped ratio. Returns `(top, left, h, w)`.
pub fn random_resized_window(h: usize, w: usize, scale: (f64, f64), rng: &mut Rng) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.uniform());
        let ratio = (lr0 + (lr1 - lr0) * rng.uniform()).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            return (rng.below(h - ch + 1), rng.below(w - cw + 1), ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < 3.0 / 4.0 {
        ((w as f64 / (3.0 / 4.0)).round() as usize, w)
    } else if in_ratio > 4.0 / 3.0 {
        (h, (h as f64 * 4.0 / 3.0).round() as usize)
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Training augmentation: random resized crop to `size` (scale 0.2-1, bicubic), then horizontal and
/// vertical flips with probability 1/2 each and a random multiple of 90 degrees when `rotate`.
pub fn train(s: &Sample, size: usize, rotate: bool, rng: &mut Rng) -> Result<Sample> {
    let (top, left, ch, cw) = random_resized_window(s.height, s.width, (0.2, 1.0), rng);
    let mut out = s.crop(top, left, ch, cw)?.resize(size, size, Filter::Bicubic)?;
    if rng.uniform() < 0.5 {
        out = out.hflip();
    }
    if rotate {
        if rng.uniform() < 0.5 {
            out = out.vflip();
        }
        out = out.rot90(rng.below(4));
    }
    Ok(out)
}

/// Evaluation: the shorter side resized to `resize` (bicubic), then the centre `crop x crop`.
pub fn eval(s: &Sample, resize_to: usize, crop: usize) -> Result<Sample> {
    let (h, w) = (s.height, s.width);
    let (rh, rw) =
        if h <= w { (resize_to, (w * resize_to).div_ceil(h)) } else { ((h * resize_to).div_ceil(w), resize_to) };
    let r = s.resize(rh, rw, Filter::Bicubic)?;
    if crop > rh || crop > rw {
        return Err(TensorError::Shape { op: "eval", msg: format!("crop {crop} of a {rh}x{rw} image") });
    }
    r.crop((rh - crop) / 2, (rw - crop) / 2, crop, crop)
}
