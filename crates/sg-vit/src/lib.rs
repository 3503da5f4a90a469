//! `sg-vit`: SpectralGPT's spectral vision transformer for inference, on `sg-tensor` alone.
//!
//! - [`config`]: the named sizes and JSON configurations, validated;
//! - [`tokens`]: 3D tokenisation (`patchify` / `unpatchify`) in the original's index order;
//! - [`model`]: the encoder and classifier, written once over [`sg_tensor::Exec`] with the original
//!   parameter names, loadable from safetensors with [`sg_tensor::io`].
//!
//! For speed, hand the Linear weights to [`sg_tensor::Eval::packed`] once at load and run each
//! forward inside [`sg_tensor::par::install`] (see `examples/classify.rs`).

pub mod config;
/// The seeded generator behind initialisation (it lives in `sg-tensor`, shared with data loading).
pub mod init {
    pub use sg_tensor::rng::Rng;
}
pub mod model;
pub mod tokens;

pub use config::{PosEmbed, VitConfig};
pub use model::{Block, LayerNorm, Linear, Vit};
