//! Project tasks behind `cargo xtask` (see `main.rs` for the commands).

pub mod convert;
pub mod parity;
