//! Metrics of the paper's four tasks, with their conventions stated:
//! - single-label: top-1 accuracy and the confusion matrix (rows: true class, columns: predicted);
//! - multi-label: average precision per class as scikit-learn computes it (the sum over positives,
//!   in descending score order, of the precision at each positive, over the number of positives),
//!   macro mAP over the classes that have a positive (a class absent from the targets has no AP and
//!   is left out, and reported as `None`), micro mAP over all (sample, class) pairs;
//! - segmentation: overall accuracy and per-class IoU over pixels not ignored; mIoU over classes
//!   present in the targets or the predictions (a class in neither has no IoU);
//! - change detection: precision, recall and F1 of the change class (0 where undefined).

use sg_tensor::{Result, TensorError};

/// Top-1 accuracy.
pub fn accuracy(pred: &[usize], labels: &[usize]) -> Result<f64> {
    if pred.len() != labels.len() || pred.is_empty() {
        return Err(TensorError::Length { op: "accuracy", arg: "labels", expected: pred.len(), got: labels.len() });
    }
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / pred.len() as f64)
}

/// `m[true][predicted]` counts.
pub fn confusion(pred: &[usize], labels: &[usize], classes: usize) -> Result<Vec<Vec<usize>>> {
    let mut m = vec![vec![0; classes]; classes];
    for (&p, &l) in pred.iter().zip(labels) {
        if p >= classes || l >= classes {
            return Err(TensorError::Index { op: "confusion", index: p.max(l), len: classes });
        }
        m[l][p] += 1;
    }
    Ok(m)
}

/// Average precision of `scores` against binary `targets`; `None` without a positive.
pub fn average_precision(scores: &[f32], targets: &[bool]) -> Option<f64> {
    let positives = targets.iter().filter(|&&t| t).count();
    if positives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Descending score; ties keep their order (scikit-learn groups ties, which only matters for exact ties).
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut sum) = (0usize, 0f64);
    for (rank, &i) in order.iter().enumerate() {
        if targets[i] {
            tp += 1;
            sum += tp as f64 / (rank + 1) as f64;
        }
    }
    Some(sum / positives as f64)
}

/// Multi-label results.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiLabel {
    pub macro_map: f64,
    pub micro_map: f64,
    /// AP of each class (`None`: no positive in the targets).
    pub per_class: Vec<Option<f64>>,
}

/// Macro and micro mAP of `scores (n, classes)` against 0/1 `targets (n, classes)`.
pub fn multilabel(scores: &[f32], targets: &[f32], classes: usize) -> Result<MultiLabel> {
    if classes == 0 || scores.len() != targets.len() || scores.len() % classes != 0 || scores.is_empty() {
        return Err(TensorError::Shape {
            op: "multilabel",
            msg: format!("{} scores, {} targets, {classes} classes", scores.len(), targets.len()),
        });
    }
    let n = scores.len() / classes;
    let per_class: Vec<Option<f64>> = (0..classes)
        .map(|c| {
            let s: Vec<f32> = (0..n).map(|i| scores[i * classes + c]).collect();
            let t: Vec<bool> = (0..n).map(|i| targets[i * classes + c] > 0.5).collect();
            average_precision(&s, &t)
        })
        .collect();
    let present: Vec<f64> = per_class.iter().flatten().copied().collect();
    let macro_map = if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 };
    let t: Vec<bool> = targets.iter().map(|&v| v > 0.5).collect();
    let micro_map = average_precision(scores, &t).unwrap_or(0.0);
    Ok(MultiLabel { macro_map, micro_map, per_class })
}

/// Pixel counts for segmentation (`confusion[true][predicted]`, ignored pixels left out).
#[derive(Clone, Debug, PartialEq)]
pub struct Segmentation {
    pub classes: usize,
    pub confusion: Vec<Vec<u64>>,
}

impl Segmentation {
    pub fn new(classes: usize) -> Self {
        Segmentation { classes, confusion: vec![vec![0; classes]; classes] }
    }

    /// Adds a map of predictions against targets; targets equal to `ignore` do not count.
    pub fn update(&mut self, pred: &[usize], target: &[usize], ignore: usize) -> Result<()> {
        if pred.len() != target.len() {
            return Err(TensorError::Length {
                op: "Segmentation::update",
                arg: "target",
                expected: pred.len(),
                got: target.len(),
            });
        }
        for (&p, &t) in pred.iter().zip(target) {
            if t == ignore {
                continue;
            }
            if p >= self.classes || t >= self.classes {
                return Err(TensorError::Index { op: "Segmentation::update", index: p.max(t), len: self.classes });
            }
            self.confusion[t][p] += 1;
        }
        Ok(())
    }

    pub fn overall_accuracy(&self) -> f64 {
        let total: u64 = self.confusion.iter().flatten().sum();
        let right: u64 = (0..self.classes).map(|c| self.confusion[c][c]).sum();
        if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        }
    }

    /// IoU of each class; `None` for a class in neither targets nor predictions.
    pub fn iou(&self) -> Vec<Option<f64>> {
        (0..self.classes)
            .map(|c| {
                let tp = self.confusion[c][c];
                let fn_: u64 = self.confusion[c].iter().sum::<u64>() - tp;
                let fp: u64 = (0..self.classes).map(|t| self.confusion[t][c]).sum::<u64>() - tp;
                let union = tp + fn_ + fp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    pub fn miou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Precision, recall and F1 of class `c` (change detection: the change class).
    pub fn precision_recall_f1(&self, c: usize) -> (f64, f64, f64) {
        let tp = self.confusion[c][c] as f64;
        let predicted: u64 = (0..self.classes).map(|t| self.confusion[t][c]).sum();
        let actual: u64 = self.confusion[c].iter().sum();
        let p = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
        let r = if actual > 0 { tp / actual as f64 } else { 0.0 };
        let f = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
        (p, r, f)
    }
}
