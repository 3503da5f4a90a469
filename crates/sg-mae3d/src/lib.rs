//! `sg-mae3d`: SpectralGPT's 3D masked autoencoder for pretraining.
//!
//! - [`masking`]: the original's random masking from injectable (or seeded) noise;
//! - [`model`]: encoder (from `sg-vit`), decoder and the `loss1 + loss3` reconstruction loss,
//!   with the original parameter names.

pub mod masking;
pub mod model;

pub use masking::Masking;
pub use model::{Mae3d, MaeConfig, MaeOutput};
