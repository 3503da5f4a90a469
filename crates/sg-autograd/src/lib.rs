//! `sg-autograd`: training for SpectralGPT.
//!
//! - [`Tape`]: an executor of [`sg_tensor::Exec`] that runs the same kernels as inference, records
//!   each coarse op (Linear, LayerNorm, attention, ...) with only the operands its backward needs,
//!   and runs hand-written fused backwards in reverse. Model code is the same generic function for
//!   training and inference. A training step without clipping or accumulation runs
//!   [`Tape::backward_fold`] into [`optim::AdamW::fold`] and then [`optim::AdamW::apply`]: each
//!   gradient is folded into the moments once final, so no model-sized gradient is ever held;
//!   [`Tape::backward_into`] and [`optim::AdamW::step`] keep the flat gradient for loops that clip
//!   or accumulate.
//! - [`optim`]: AdamW and SGD over the flat parameter buffer, weight-decay groups, layer-wise lr
//!   decay, warm-up + cosine schedule, gradient clipping, optimiser state as safetensors.
//! - [`checkpoint`]: parameters, optimiser state and configuration saved and loaded together.
//! - [`targets`]: one-hot, label-smoothed and mixed target distributions.
//!
//! Every recorded op has its backward in one exhaustive `match`: an op without a backward does not
//! compile, so no gradient is ever cut silently.

pub mod checkpoint;
pub mod optim;
mod tape;
pub mod targets;

pub use tape::{GradSink, Grads, Profile, Tape};
