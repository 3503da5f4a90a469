//! Project tasks, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `bench kernels [FILTER]`: the criterion benchmarks of `sg-tensor`'s kernels on ViT-B shapes;
//!   throughput is printed in elements/s where one element is one floating-point operation, so the
//!   figure reads as FLOP/s.

use std::process::{Command, ExitCode};

fn usage() -> ExitCode {
    eprintln!("usage: cargo xtask bench kernels [FILTER]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["bench", "kernels", rest @ ..] => {
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["bench", "-p", "sg-benches", "--bench", "kernels", "--"]).args(rest);
            match cmd.status() {
                Ok(s) if s.success() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("xtask: cannot run cargo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
