//! `sg-heads`: SpectralGPT's downstream tasks beyond classification (whose head is part of
//! `sg_vit::Vit`):
//!
//! - [`upernet`]: the segmentation and siamese change-detection model (encoder, spectral merge,
//!   feature pyramid, UPerNet head) and its per-pixel loss;
//! - [`metrics`]: the metrics of the paper's four tasks (EuroSAT accuracy, BigEarthNet macro/micro
//!   mAP, segmentation OA/mIoU, change-detection precision/recall/F1).

pub mod metrics;
pub mod upernet;

pub use upernet::{DenseConfig, NormKind, UperNet};
