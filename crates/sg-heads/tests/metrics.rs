//! Metrics against values worked out by hand, including a class absent from the targets.
use sg_heads::metrics::{accuracy, average_precision, confusion, multilabel, Segmentation};

#[test]
fn single_label() {
    assert_eq!(accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]).unwrap(), 0.75);
    assert_eq!(confusion(&[0, 1, 2, 2], &[0, 1, 1, 2], 3).unwrap(), vec![vec![1, 0, 0], vec![0, 1, 1], vec![0, 0, 1]]);
    assert!(accuracy(&[0], &[]).is_err());
    assert!(confusion(&[3], &[0], 3).is_err());
}

#[test]
fn average_precision_by_hand() {
    // Scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AP = (1/1 + 2/3) / 2 = 5/6.
    let ap = average_precision(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]).unwrap();
    assert!((ap - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(average_precision(&[0.3, 0.2], &[false, false]), None);
    // Two samples, three classes; class 2 has no positive and is left out of the macro mean.
    // Class 0: scores [0.9, 0.2], targets [1, 0] -> AP 1. Class 1: scores [0.4, 0.6], targets [1, 0] -> 1/2.
    let m = multilabel(&[0.9, 0.4, 0.1, 0.2, 0.6, 0.3], &[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], 3).unwrap();
    assert_eq!(m.per_class, vec![Some(1.0), Some(0.5), None]);
    assert!((m.macro_map - 0.75).abs() < 1e-12);
    // Micro: order 0.9+, 0.6-, 0.4+, 0.3-, 0.2-, 0.1-: AP = (1 + 2/3) / 2.
    assert!((m.micro_map - 5.0 / 6.0).abs() < 1e-12);
}

#[test]
fn segmentation_and_change() {
    let mut s = Segmentation::new(3);
    // target: 0 0 1 1 255 ; pred: 0 1 1 1 2  (the ignored pixel does not count; class 2 is never a target)
    s.update(&[0, 1, 1, 1, 2], &[0, 0, 1, 1, 255], 255).unwrap();
    assert_eq!(s.overall_accuracy(), 0.75);
    // IoU: class 0 = 1 / (1 + 1) = 0.5, class 1 = 2 / 3, class 2 absent everywhere -> None.
    let iou = s.iou();
    assert_eq!(iou[0], Some(0.5));
    assert!((iou[1].unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou[2], None);
    assert!((s.miou() - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    // Change class 1: precision 2/3, recall 1, F1 0.8.
    let (p, r, f) = s.precision_recall_f1(1);
    assert!((p - 2.0 / 3.0).abs() < 1e-12 && r == 1.0 && (f - 0.8).abs() < 1e-12);
    assert!(s.update(&[0], &[7], 255).is_err());
}
