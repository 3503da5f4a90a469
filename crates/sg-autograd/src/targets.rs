//! Target distributions for [`sg_tensor::Exec::cross_entropy`]: one-hot, label smoothing (timm's
//! `LabelSmoothingCrossEntropy` is cross-entropy against these) and mixup/cutmix mixtures.

use sg_tensor::{Result, TensorError};

/// `(1 - eps) * one_hot(label) + eps / classes` per row (`eps = 0`: plain one-hot).
pub fn smoothed(labels: &[usize], classes: usize, eps: f32) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&eps) {
        return Err(TensorError::Arg { op: "smoothed", msg: format!("smoothing {eps} is outside [0, 1]") });
    }
    let mut t = vec![eps / classes as f32; labels.len() * classes];
    for (r, &l) in labels.iter().enumerate() {
        if l >= classes {
            return Err(TensorError::Index { op: "smoothed", index: l, len: classes });
        }
        t[r * classes + l] += 1.0 - eps;
    }
    Ok(t)
}

/// `lam * a + (1 - lam) * b`: the targets of a mixup or cutmix batch (`lam` is the share of `a`).
pub fn mix(a: &[f32], b: &[f32], lam: f32) -> Result<Vec<f32>> {
    if a.len() != b.len() {
        return Err(TensorError::Length { op: "mix", arg: "b", expected: a.len(), got: b.len() });
    }
    Ok(a.iter().zip(b).map(|(x, y)| lam * x + (1.0 - lam) * y).collect())
}
