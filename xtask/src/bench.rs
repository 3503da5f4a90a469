//! `cargo xtask bench pretrain|infer`: the model timed the way `../shared/bench/torch_baseline.py`
//! times the PyTorch reference, printing, as the last line, one JSON object with the same fields
//! (impl, task, size, img, bands, batch, threads, step_s, samples_per_s, peak_rss_mib).
//! A pretrain step is forward + backward + AdamW at mask ratio 0.9; infer is a classifier forward
//! with no tape. Both start from images, tokenisation timed, as the PyTorch script's patch
//! embedding is. Inputs are random (speed does not depend on their values); the median over the
//! timed steps is reported, after one untimed warm-up step.

use std::time::Instant;

use sg_autograd::optim::{weight_decay_groups, AdamW};
use sg_autograd::Tape;
use sg_mae3d::{Mae3d, MaeConfig, Masking};
use sg_tensor::backend::Cpu;
use sg_tensor::rng::Rng;
use sg_tensor::{Eval, Exec, ParamStore, Result, TensorError};
use sg_vit::config::{PosEmbed, VitConfig};
use sg_vit::Vit;

pub const USAGE: &str = "cargo xtask bench pretrain|infer [--size tiny|base|large|huge] [--img PX] [--bands N] [--batch N] [--steps N] [--threads N] [--profile] [--dtype f32|f16|bf16 (infer)] [--stored-weights (infer: f32 weights as stored, not packed)]";

/// Peak resident memory of this process in MiB (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(task: &str, args: &[String]) -> Result<serde_json::Value> {
    let err = |m: String| TensorError::Arg { op: "bench", msg: format!("{m}\n{USAGE}") };
    let (mut size, mut img, mut bands, mut batch, mut steps, mut threads) =
        ("base".to_string(), 96usize, 12usize, 8usize, 5usize, None);
    let mut it = args.iter();
    let mut profile = false;
    let mut stored = false;
    let mut dtype = sg_tensor::DType::F32;
    while let Some(a) = it.next() {
        if a == "--profile" {
            profile = true;
            continue;
        }
        if a == "--stored-weights" {
            stored = true;
            continue;
        }
        let v = it.next().ok_or_else(|| err(format!("{a} needs a value")))?;
        let n = || v.parse::<usize>().map_err(|_| err(format!("{a}: `{v}` is not a whole number")));
        match a.as_str() {
            "--size" => size = v.clone(),
            "--img" => img = n()?,
            "--bands" => bands = n()?,
            "--batch" => batch = n()?,
            "--steps" => steps = n()?,
            "--threads" => threads = Some(n()?),
            "--dtype" => {
                dtype = match v.as_str() {
                    "f32" => sg_tensor::DType::F32,
                    "f16" => sg_tensor::DType::F16,
                    "bf16" => sg_tensor::DType::BF16,
                    o => return Err(err(format!("--dtype `{o}`: f32, f16 or bf16"))),
                }
            }
            other => return Err(err(format!("unknown option `{other}`"))),
        }
    }
    if batch == 0 || steps == 0 {
        return Err(err("--batch and --steps must be at least 1".into()));
    }
    if let Some(t) = threads {
        sg_tensor::par::set_threads(t)?;
    }
    let mut rng = Rng::new(0);
    let mut times = Vec::new();
    let mut shares: Vec<(&str, f64, f64)> = Vec::new();
    match task {
        "pretrain" => {
            let mut cfg = MaeConfig::preset(&size, img)?;
            cfg.encoder.bands = bands;
            cfg.validate()?;
            let mut store = ParamStore::new();
            let model = Mae3d::new(cfg.clone(), &mut store, 0)?;
            let mut opt = AdamW::new(&store, weight_decay_groups(&store, 0.05, &[]), 0.9, 0.95, 1e-8)?;
            let (l, td) = (cfg.encoder.tokens(), cfg.encoder.token_dim());
            for s in 0..=steps {
                let x: Vec<f32> = (0..batch * bands * img * img).map(|_| rng.uniform() as f32).collect();
                let m = Masking::random(batch, l, 0.9, s as u64)?;
                let t0 = Instant::now();
                let tokens = model.encoder.tokens(&x, batch)?;
                let t_tok = t0.elapsed().as_secs_f64();
                let mut tape = Tape::new(Cpu, &store);
                if profile {
                    tape = tape.profiled();
                }
                let t = tape.constant(&tokens, &[batch, l, td])?;
                let out = model.forward(&mut tape, &t, &m)?;
                // As `xtask pretrain` steps: gradients folded into the moments during the backward.
                let mut t_opt = 0.0;
                let profile = tape.backward_fold(&out.loss, &mut |r, g| {
                    let t1 = Instant::now();
                    let done = opt.fold(&store, r, g);
                    t_opt += t1.elapsed().as_secs_f64();
                    done
                })?;
                let t1 = Instant::now();
                opt.apply(&mut store, 1e-4)?;
                t_opt += t1.elapsed().as_secs_f64();
                if let (Some(mut p), true) = (profile, s > 0) {
                    p.add_other("tokenise", t_tok);
                    p.add_other("optimiser (AdamW)", t_opt);
                    for (f, a, b) in p.families {
                        match shares.iter_mut().find(|x: &&mut (&str, f64, f64)| x.0 == f) {
                            Some(x) => (x.1, x.2) = (x.1 + a, x.2 + b),
                            None => shares.push((f, a, b)),
                        }
                    }
                }
                if s > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        "infer" => {
            let mut cfg = VitConfig::preset(&size, img)?;
            cfg.bands = bands;
            cfg.num_classes = 10;
            cfg.pos_embed = PosEmbed::Joined;
            cfg.validate()?;
            let mut store = ParamStore::new();
            let model = Vit::new(cfg.clone(), &mut store, 0)?;
            // Half-precision weights: only the f16 / bf16 copy stays.
            let half = match dtype {
                sg_tensor::DType::F32 => None,
                d => Some(sg_tensor::HalfParams::from_store(&store, d)?),
            };
            if half.is_some() {
                store = ParamStore::new();
            }
            // One executor for every step. f32: the Linear weights rearranged once for the GEMM, as a
            // deployment would load them (`--stored-weights`: as stored).
            let mut e = match (&half, stored) {
                (Some(h), _) => Eval::half(Cpu, h),
                (None, true) => Eval::new(Cpu, &store),
                (None, false) => Eval::packed(Cpu, std::mem::take(&mut store), &model.linear_weights())?,
            };
            let (l, td) = (cfg.tokens(), cfg.token_dim());
            for s in 0..=steps {
                let x: Vec<f32> = (0..batch * bands * img * img).map(|_| rng.normal() as f32).collect();
                let t0 = Instant::now();
                // The forward on a pool thread (`par::install`), as a deployment would run it.
                let logits = sg_tensor::par::install(|| {
                    let tokens = model.tokens(&x, batch)?;
                    let t = e.constant(&tokens, &[batch, l, td])?;
                    model.logits(&mut e, &t)
                })?;
                std::hint::black_box(&logits);
                if s > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        other => return Err(err(format!("unknown benchmark `{other}`: pretrain or infer"))),
    }
    if !shares.is_empty() {
        let total: f64 = times.iter().sum();
        eprintln!("time per step by op family (forward / backward), over {} steps:", times.len());
        shares.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        let mut covered = 0.0;
        for (f, a, b) in &shares {
            covered += a + b;
            eprintln!(
                "  {f:30} {:5.1}%  {:7.3} s  ({:.3} / {:.3})",
                100.0 * (a + b) / total,
                (a + b) / times.len() as f64,
                a / times.len() as f64,
                b / times.len() as f64
            );
        }
        eprintln!("  {:30} {:5.1}%", "other (setup, freeing)", 100.0 * (total - covered) / total);
    }
    times.sort_by(f64::total_cmp);
    let med = if times.is_empty() { f64::NAN } else { times[times.len() / 2] };
    Ok(serde_json::json!({
        "impl": format!(
            "spectralgpt-rs-{}-{}{}",
            env!("CARGO_PKG_VERSION"),
            sg_tensor::simd::isa().name(),
            if dtype == sg_tensor::DType::F32 { String::new() } else { format!("-{dtype:?}").to_lowercase() }
        ),
        "task": task, "size": size, "img": img, "bands": bands, "batch": batch,
        "threads": sg_tensor::par::threads(), "step_s": (med * 1e4).round() / 1e4,
        "samples_per_s": (batch as f64 / med * 1e3).round() / 1e3,
        "peak_rss_mib": (peak_rss_mib() * 10.0).round() / 10.0,
    }))
}
