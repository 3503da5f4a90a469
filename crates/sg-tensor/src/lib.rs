//! `sg-tensor`: the tensor core of SpectralGPT in Rust.
//!
//! - [`Tensor`]: f32 arrays with shapes and strides over shared storage (cheap views), converted to
//!   and from `half` f16/bf16 ([`dtype`]) and `ndarray` (feature `ndarray`).
//! - [`kernels`]: plain slice functions, one module per op family, each with a scalar `reference`
//!   and a fast body chosen at run time for the CPU at hand ([`simd`]): AVX2+FMA, or portable
//!   vectors. Training and inference share them.
//! - [`par`]: the one rayon pool (feature `rayon`, on by default; off gives a single-threaded build).
//!
//! Every public function that takes user data checks it and returns a [`TensorError`] naming the
//! operation and the offending shapes.

pub mod backend;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod io;
pub mod kernels;
pub mod par;
pub mod params;
pub mod pth;
pub mod rng;
pub mod simd;
pub mod tensor;

pub use dtype::DType;
pub use error::{Result, TensorError};
pub use exec::{BatchNorm, Eval, Exec, Value};
pub use kernels::Dst;
pub use params::{HalfParams, ParamRef, ParamStore};
pub use tensor::Tensor;
