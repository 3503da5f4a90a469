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
    if task == "attention" {
        return attention(args);
    }
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
    let med = median(times);
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

/// The upper median (NaN for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub const ATTENTION_USAGE: &str =
    "cargo xtask bench attention [--seq 57] [--heads 12] [--head-dim 64] [--batch 8] [--threads N] [--calls 400]";

/// Steps of each FMA chain per probe: about 1 ms per thread at 100 GFLOP/s, as long as an attention
/// call (1.4 ms for the forward of 57 tokens on one thread), so that waking the other threads
/// (tens of microseconds) stays small beside it.
const PROBE_STEPS: usize = 500_000;

/// `cargo xtask bench attention`: the attention kernels' rates read against the FMA peak measured
/// just before and just after each call (`simd::fma_probe` on every thread). On a shared host the
/// peak itself moves (stretches at 2/3 of it were seen on this machine), so the median of these
/// per-call fractions says how close the kernel runs to what the cores can do, where a rate alone
/// says as much about the neighbours. FLOPs are counted as the criterion benchmarks count them:
/// `4 batch heads seq^2 head_dim` forward and 2.5 times that backward.
fn attention(args: &[String]) -> Result<serde_json::Value> {
    use sg_tensor::kernels::attention::{self as attn, AttnShape, QkvGrad, Rows, RowsMut};
    let err = |m: String| TensorError::Arg { op: "bench attention", msg: format!("{m}\n{ATTENTION_USAGE}") };
    let (mut seq, mut heads, mut hd, mut batch, mut calls, mut threads) = (57, 12, 64, 8, 400, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| err(format!("{a} needs a value")))?;
        let n = v.parse::<usize>().map_err(|_| err(format!("{a}: `{v}` is not a whole number")))?;
        match a.as_str() {
            "--seq" => seq = n,
            "--heads" => heads = n,
            "--head-dim" => hd = n,
            "--batch" => batch = n,
            "--calls" => calls = n,
            "--threads" => threads = Some(n),
            other => return Err(err(format!("unknown option `{other}`"))),
        }
    }
    if [seq, heads, hd, batch, calls].contains(&0) {
        return Err(err("--seq, --heads, --head-dim, --batch and --calls must be at least 1".into()));
    }
    if let Some(t) = threads {
        sg_tensor::par::set_threads(t)?;
    }
    let s = AttnShape { batch, seq, heads, head_dim: hd };
    let w = heads * hd;
    let mut rng = Rng::new(0);
    let qkv = rng.normals(batch * seq * 3 * w, 1.0);
    let dout = rng.normals(batch * seq * w, 1.0);
    let (mut o, mut lse, mut dqkv) = (vec![0.0; batch * seq * w], vec![0.0; batch * heads * seq], vec![0.0; qkv.len()]);
    let (q, k, v) =
        (Rows { data: &qkv, ld: 3 * w }, Rows { data: &qkv[w..], ld: 3 * w }, Rows { data: &qkv[2 * w..], ld: 3 * w });
    let scale = 1.0 / (hd as f32).sqrt();
    let probe = || {
        let t0 = Instant::now();
        let r = sg_tensor::par::on_every_thread(|| sg_tensor::simd::fma_probe(PROBE_STEPS));
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(r.iter().map(|x| x.1).sum::<f32>());
        r.iter().map(|x| x.0).sum::<f64>() / dt / 1e9
    };
    let flops = s.forward_flops();
    // Per call: (forward GFLOP/s, backward GFLOP/s, peak GFLOP/s around each).
    let mut rates: Vec<[f64; 4]> = Vec::with_capacity(calls);
    sg_tensor::par::install(|| -> Result<()> {
        for i in 0..calls + 5 {
            let p0 = probe();
            let t0 = Instant::now();
            attn::forward(s, q, k, v, scale, RowsMut { data: &mut o, ld: w }, Some(&mut lse))?;
            let f = flops / t0.elapsed().as_secs_f64() / 1e9;
            let p1 = probe();
            let t0 = Instant::now();
            let (o, d) = (Rows { data: &o, ld: w }, Rows { data: &dout, ld: w });
            attn::backward(s, q, k, v, o, d, &lse, scale, QkvGrad::Packed(&mut dqkv))?;
            let b = 2.5 * flops / t0.elapsed().as_secs_f64() / 1e9;
            let p2 = probe();
            // The first five calls warm the caches and the pool.
            if i >= 5 {
                rates.push([f, b, (p0 + p1) / 2.0, (p1 + p2) / 2.0]);
            }
        }
        Ok(())
    })?;
    let col = |j: usize| rates.iter().map(|r| r[j]).collect::<Vec<_>>();
    let (fwd, bwd) = (median(col(0)), median(col(1)));
    let peak = median(rates.iter().flat_map(|r| [r[2], r[3]]).collect());
    let fwd_of_peak = median(rates.iter().map(|r| r[0] / r[2]).collect());
    let bwd_of_peak = median(rates.iter().map(|r| r[1] / r[3]).collect());
    let r3 = |x: f64| (x * 1e3).round() / 1e3;
    eprintln!(
        "attention b{batch} h{heads} s{seq} d{hd}, {} threads, medians of {calls} calls: forward {fwd:.1} GFLOP/s \
         ({:.1}% of the peak around it), backward {bwd:.1} ({:.1}%); peak {peak:.1}",
        sg_tensor::par::threads(),
        100.0 * fwd_of_peak,
        100.0 * bwd_of_peak
    );
    Ok(serde_json::json!({
        "impl": format!("spectralgpt-rs-{}-{}", env!("CARGO_PKG_VERSION"), sg_tensor::simd::isa().name()),
        "task": "attention", "batch": batch, "seq": seq, "heads": heads, "head_dim": hd,
        "threads": sg_tensor::par::threads(), "calls": calls,
        "fwd_gflops": r3(fwd), "bwd_gflops": r3(bwd), "peak_gflops": r3(peak),
        "fwd_of_peak": r3(fwd_of_peak), "bwd_of_peak": r3(bwd_of_peak),
    }))
}
