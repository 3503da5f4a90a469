//! Project tasks behind `cargo xtask` (see `main.rs` for the commands).

pub mod bench;
pub mod convert;
pub mod crop;
pub mod dense;
pub mod finetune;
pub mod parity;
pub mod plot;
pub mod png;
pub mod pretrain;
pub mod reconstruct;
