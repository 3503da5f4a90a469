//! Classifies (or embeds) Sentinel-2 GeoTIFFs with a fine-tuned checkpoint, on `sg-vit` alone at
//! run time (`sg-data` only reads the GeoTIFFs here):
//!
//! ```text
//! cargo run --release -p sg-vit --example classify -- --checkpoint runs/finetune-eurosat \
//!     [--dtype f32|f16|bf16] [--compare] [--threads N] IMAGE.tif...
//! ```
//!
//! The checkpoint is a `cargo xtask finetune` directory (or its `checkpoint.safetensors`): its
//! metadata holds the model configuration and the task, which sets the normalisation (EuroSAT:
//! z-score with the EuroSAT statistics; BigEarthNet: the fMoW mean +- 2 std; otherwise per-image
//! min-max). Images are resized to the model's input size when they differ. f32 weights of the
//! Linear layers are rearranged once at load into the GEMM's panel layout (in place, no extra
//! memory); with `--dtype f16` or `bf16` the weights are held at half precision and widened per layer. A model without a head
//! prints each image's embedding instead. `--compare` also runs the f32 weights and prints the
//! largest logit difference of the half-precision ones.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sg_data::bands::MODEL_BANDS;
use sg_data::normalize::{mean_2std, min_max, zscore, EUROSAT_STATS, FMOW_STATS};
use sg_data::resample::{resize_planes, Filter};
use sg_tensor::backend::Cpu;
use sg_tensor::io::{load_params, SafetensorsFile};
use sg_tensor::{DType, Eval, Exec, HalfParams, ParamStore, Result, TensorError};
use sg_vit::config::parse_json;
use sg_vit::{Vit, VitConfig};

const EUROSAT: [&str; 10] = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
];

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map_or(0.0, |kb: f64| kb / 1024.0)
}

fn usage() -> TensorError {
    TensorError::Arg {
        op: "classify",
        msg: "usage: classify --checkpoint DIR [--dtype f32|f16|bf16] [--compare] [--threads N] IMAGE.tif...".into(),
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut ck, mut dtype, mut images, mut compare) = (None, DType::F32, Vec::new(), false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--checkpoint" => ck = Some(PathBuf::from(args.next().ok_or_else(usage)?)),
            "--dtype" => {
                dtype = match args.next().ok_or_else(usage)?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    _ => return Err(usage()),
                }
            }
            "--threads" => {
                let n = args.next().ok_or_else(usage)?.parse().map_err(|_| usage())?;
                sg_tensor::par::set_threads(n)?;
            }
            "--compare" => compare = true,
            _ if a.starts_with("--") => return Err(usage()),
            _ => images.push(PathBuf::from(a)),
        }
    }
    let ck = ck.ok_or_else(usage)?;
    let file = if ck.is_dir() { ck.join("checkpoint.safetensors") } else { ck };
    let f = SafetensorsFile::open(&file)?;
    let meta = f.metadata();
    let mut cfg = VitConfig::preset("tiny", 64)?;
    cfg.update_from_json(&parse_json(meta.get("config").map_or("{}", String::as_str), "checkpoint config")?)?;
    let task = meta.get("task").cloned().unwrap_or_default();
    let t0 = Instant::now();
    let mut store = ParamStore::new();
    let model = Vit::new(cfg.clone(), &mut store, 0)?;
    load_params(&mut store, &f, "", true)?;
    drop(f);
    // Half precision: keep only the f16/bf16 copy; the f32 store is dropped.
    let half = match dtype {
        DType::F32 => None,
        d => Some(HalfParams::from_store(&store, d)?),
    };
    let weight_mib = half.as_ref().map_or(store.len() * 4, |h| h.bytes()) as f64 / (1 << 20) as f64;
    let reference = (compare && half.is_some()).then(|| store.clone());
    if half.is_some() {
        store = ParamStore::new();
    }
    // One executor for every image: half-precision weights widened per layer, or f32 weights with
    // the Linear layers rearranged once for the GEMM (no copy: the store is given up).
    let mut e = match &half {
        Some(hp) => Eval::half(Cpu, hp),
        None => Eval::packed(Cpu, std::mem::take(&mut store), &model.linear_weights())?,
    };
    let mut worst = 0f64;
    println!(
        "model: {} px, {} bands, D {}, depth {}, {} classes; weights {dtype:?} {weight_mib:.1} MiB; loaded in {:.2} s",
        cfg.img_size.0,
        cfg.bands,
        cfg.embed_dim,
        cfg.depth,
        cfg.num_classes,
        t0.elapsed().as_secs_f64()
    );
    let (h, w) = cfg.img_size;
    for path in &images {
        let (img, (ih, iw)) = sg_data::eurosat::load_image(Path::new(path))?;
        let mut x = if (ih, iw) == (h, w) { img } else { resize_planes(&img, 12, ih, iw, h, w, Filter::Bicubic)? };
        match task.as_str() {
            "eurosat" => zscore(&mut x, &MODEL_BANDS, &EUROSAT_STATS)?,
            "bigearthnet" => mean_2std(&mut x, &MODEL_BANDS, &FMOW_STATS)?,
            _ => min_max(&mut x, 12)?,
        }
        let t = Instant::now();
        let tokens = model.tokens(&x, 1)?;
        let input = e.constant(&tokens, &[1, cfg.tokens(), cfg.token_dim()])?;
        if cfg.num_classes == 0 {
            let z = sg_tensor::par::install(|| model.embedding(&mut e, &input))?;
            let z = e.read(&z);
            let norm = z.iter().map(|v| v * v).sum::<f64>().sqrt();
            println!(
                "{}: embedding of {} values, norm {norm:.4}, first {:?}",
                path.display(),
                z.len(),
                &z[..4.min(z.len())]
            );
            continue;
        }
        // On a pool thread: each parallel kernel then wakes one worker, not two threads.
        let z = sg_tensor::par::install(|| model.logits(&mut e, &input))?;
        let z = e.read(&z);
        if let Some(r) = &reference {
            let mut e32 = Eval::new(Cpu, r);
            let input = e32.constant(&tokens, &[1, cfg.tokens(), cfg.token_dim()])?;
            let z32 = model.logits(&mut e32, &input)?;
            let d = e32.read(&z32).iter().zip(&z).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            worst = worst.max(d);
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let (best, &zb) = z.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("classes");
        let name = if task == "eurosat" { EUROSAT.get(best).copied().unwrap_or("?") } else { "" };
        println!(
            "{}: class {best} {name} (p = {:.3}) in {:.1} ms",
            path.display(),
            (zb - m).exp() / sum,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    if reference.is_some() {
        println!("largest logit difference {dtype:?} vs f32 over {} images: {worst:.3e}", images.len());
    }
    println!("resident memory {:.1} MiB", rss_mib());
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
