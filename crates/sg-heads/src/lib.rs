//! `sg-heads`: SpectralGPT's downstream tasks. So far: [`metrics`] for the four tasks of the paper
//! (EuroSAT accuracy, BigEarthNet macro/micro mAP, segmentation OA/mIoU, change-detection
//! precision/recall/F1). Classification uses `sg_vit::Vit`'s head; the segmentation and change heads
//! (UPerNet) come with their convolution ops.

pub mod metrics;
