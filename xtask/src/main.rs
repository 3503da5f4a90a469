//! Project tasks, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `pretrain [OPTIONS]`: masked-autoencoder pretraining (defaults: tiny model, bundled real data).
//! - `reconstruct --checkpoint C --input PATH --out PNG`: a pretrained model's reconstruction.
//! - `finetune --task eurosat|bigearthnet|segmentation|change ...` and `eval --task ...`: the
//!   paper's four downstream tasks (`finetune.rs` for classification, `dense.rs` for the rest).
//! - `bench pretrain|infer [--profile] [--dtype ..]`: the model timed like the PyTorch baseline.
//! - `parity FIXTURE.safetensors...`: reproduce PyTorch reference dumps (forward and gradients);
//!   exits non-zero if any tensor is outside its tolerance.
//! - `convert IN.pth OUT.safetensors`: an original PyTorch checkpoint's model as safetensors.
//! - `crop-scene SRC DST TOP LEFT SIZE`: a region of a folder of per-band GeoTIFFs (fixtures).
//! - `bench attention [--seq N ...]`: attention forward and backward as fractions of the FMA peak
//!   measured around each call (which removes the compute-side swings of a shared host).
//! - `bench kernels [FILTER]`: the criterion benchmarks of `sg-tensor`'s kernels on ViT-B shapes;
//!   throughput is printed in elements/s where one element is one floating-point operation.

use std::process::{Command, ExitCode};

const USAGE: &str = "usage:
  cargo xtask pretrain [--help for options]
  cargo xtask reconstruct --checkpoint DIR --input FILE.tif|DIR --out FILE.png
  cargo xtask finetune --task eurosat|bigearthnet|segmentation|change [--data DIR] [--init PRETRAIN_DIR] [--epochs N] [--out DIR]
  cargo xtask eval --task eurosat|bigearthnet|segmentation|change --checkpoint DIR --data DIR [--json]
  cargo xtask parity FIXTURE.safetensors...
  cargo xtask convert IN.pth OUT.safetensors
  cargo xtask crop-scene SRC_DIR DST_DIR TOP LEFT SIZE
  cargo xtask bench pretrain|infer [--size base --img 96 --batch 8 --steps 5 --threads N]
  cargo xtask bench attention [--seq 57 --heads 12 --head-dim 64 --batch 8 --threads N --calls 400]
  cargo xtask bench kernels [FILTER]";

fn parity(files: &[&str]) -> ExitCode {
    if files.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut ok = true;
    for file in files {
        match xtask::parity::run(file) {
            Ok(r) => {
                println!("{file}: {}", r.model);
                for c in &r.checks {
                    let verdict = if c.passed() { "ok" } else { "FAIL" };
                    println!(
                        "  {verdict:4} {:48} max abs err {:.3e}  ({:.2} of tolerance)",
                        c.name, c.max_abs_err, c.ratio
                    );
                }
                let failed = r.checks.iter().filter(|c| !c.passed()).count();
                println!("  {} of {} tensors within tolerance", r.checks.len() - failed, r.checks.len());
                ok &= failed == 0;
            }
            Err(e) => {
                eprintln!("{file}: error: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    sg_tensor::par::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["pretrain", rest @ ..] => {
            if rest.contains(&"--help") {
                println!("{}", xtask::pretrain::USAGE);
                return ExitCode::SUCCESS;
            }
            let opts = match xtask::pretrain::Options::parse(&rest.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match xtask::pretrain::run(&opts) {
                Ok(s) if s.steps == 0 => {
                    println!("nothing left to train at this step count; reports rewritten in {}", opts.out.display());
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    println!(
                        "done: {} steps, loss {:.4} -> {:.4}, {:.1} samples/s; wrote {}",
                        s.steps,
                        s.first_loss,
                        s.last_loss,
                        s.samples_per_s,
                        opts.out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["reconstruct", rest @ ..] => {
            match xtask::reconstruct::run(&rest.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
                Ok(p) => {
                    println!("wrote {}", p.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["finetune", rest @ ..] | ["eval", rest @ ..] => {
            let v: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let r = if args[0] == "finetune" { xtask::finetune::finetune(&v) } else { xtask::finetune::eval(&v) };
            match r {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["parity", files @ ..] => parity(files),
        ["convert", input, output] => match xtask::convert::run(input, output) {
            Ok(c) => {
                println!("{output}: {} tensors, {} parameters", c.tensors, c.scalars);
                if !c.skipped.is_empty() {
                    println!("skipped (not tensors): {}", c.skipped.join(", "));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{input}: error: {e}");
                ExitCode::FAILURE
            }
        },
        ["crop-scene", src, dst, top, left, size] => {
            let nums: Option<Vec<usize>> = [top, left, size].iter().map(|v| v.parse().ok()).collect();
            let Some(n) = nums else {
                eprintln!("crop-scene: TOP, LEFT and SIZE must be whole numbers");
                return ExitCode::from(2);
            };
            match xtask::crop::run(src.as_ref(), dst.as_ref(), n[0], n[1], n[2]) {
                Ok(k) => {
                    println!("{dst}: {k} band files of a {}-pixel region", n[2]);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["bench", task @ ("pretrain" | "infer" | "attention"), rest @ ..] => {
            match xtask::bench::run(task, &rest.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
                Ok(j) => {
                    println!("{j}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
