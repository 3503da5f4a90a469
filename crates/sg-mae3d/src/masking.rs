//! Random masking as the original: per sample, `ids_shuffle = argsort(noise)`, `ids_restore =
//! argsort(ids_shuffle)`, the first `floor(L * (1 - ratio))` shuffled tokens are kept, and `mask` is
//! 1 for removed tokens in the original order. The noise is injectable (the parity fixtures give
//! it); by default it is drawn from a seed, so a step's mask is reproducible.

use sg_tensor::{Result, TensorError};
use sg_vit::init::Rng;

/// The masking of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Masking {
    pub batch: usize,
    pub len: usize,
    /// Tokens kept per sample.
    pub keep: usize,
    /// `(batch, len)`: tokens in shuffled order.
    pub ids_shuffle: Vec<usize>,
    /// `(batch, len)`: where each token went in the shuffled order.
    pub ids_restore: Vec<usize>,
    /// `(batch, keep)`: the visible tokens.
    pub ids_keep: Vec<usize>,
    /// `(batch, len)`: 1 for removed tokens, 0 for visible ones.
    pub mask: Vec<f32>,
}

/// Visible tokens out of `len` at `ratio`, `floor(len * (1 - ratio))` as the original computes it.
pub fn kept(len: usize, ratio: f64) -> usize {
    (len as f64 * (1.0 - ratio)) as usize
}

impl Masking {
    /// From `noise` (`batch x len`, any finite values) at mask `ratio` in [0, 1).
    pub fn from_noise(noise: &[f32], batch: usize, len: usize, ratio: f64) -> Result<Self> {
        let op = "masking";
        if !(0.0..1.0).contains(&ratio) {
            return Err(TensorError::Arg { op, msg: format!("mask ratio {ratio} is outside [0, 1)") });
        }
        if noise.len() != batch * len {
            return Err(TensorError::Length { op, arg: "noise", expected: batch * len, got: noise.len() });
        }
        if noise.iter().any(|v| !v.is_finite()) {
            return Err(TensorError::Arg { op, msg: "the noise has non-finite values".into() });
        }
        let keep = kept(len, ratio);
        let mut m = Masking {
            batch,
            len,
            keep,
            ids_shuffle: Vec::with_capacity(batch * len),
            ids_restore: vec![0; batch * len],
            ids_keep: Vec::with_capacity(batch * keep),
            mask: vec![0.0; batch * len],
        };
        for n in 0..batch {
            let row = &noise[n * len..(n + 1) * len];
            let mut order: Vec<usize> = (0..len).collect();
            // Stable: equal noise keeps index order (continuous noise has no ties anyway).
            order.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
            for (pos, &tok) in order.iter().enumerate() {
                m.ids_restore[n * len + tok] = pos;
                m.mask[n * len + tok] = if pos < keep { 0.0 } else { 1.0 };
            }
            m.ids_keep.extend_from_slice(&order[..keep]);
            m.ids_shuffle.extend(order);
        }
        Ok(m)
    }

    /// Uniform noise drawn from `seed`.
    pub fn random(batch: usize, len: usize, ratio: f64, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let noise: Vec<f32> = (0..batch * len).map(|_| rng.uniform() as f32).collect();
        Self::from_noise(&noise, batch, len, ratio)
    }
}
