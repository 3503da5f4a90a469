//! `cargo xtask reconstruct --checkpoint C --input PATH --out PNG`: a pretrained model's
//! reconstruction of any readable image. `C` is a checkpoint directory or `.safetensors` file
//! written by `pretrain` (the configuration travels in its metadata). `PATH` is a GeoTIFF (12 bands
//! in model order, or 13 bands in EuroSAT's order or, with `--band-order s2`, B1..B12 with B8A
//! after B8) or any folder sg-data reads (its first image).

use std::path::{Path, PathBuf};

use sg_data::bands::{reorder, ALL_BANDS, EUROSAT_FILE_BANDS, MODEL_BANDS};
use sg_data::read_tiff;
use sg_data::sources::detect;
use sg_mae3d::{Mae3d, MaeConfig};
use sg_tensor::io::{load_params, SafetensorsFile};
use sg_tensor::{ParamStore, Result, TensorError};
use sg_vit::config::parse_json;

pub const USAGE: &str = "cargo xtask reconstruct --checkpoint DIR|FILE.safetensors --input FILE.tif|DIR --out FILE.png
    [--band-order eurosat|s2] [--mask-ratio R] [--seed N]";

fn arg_err(msg: String) -> TensorError {
    TensorError::Arg { op: "reconstruct", msg }
}

/// A pretraining model and its parameters from a checkpoint.
pub fn load_model(checkpoint: &Path) -> Result<(Mae3d, ParamStore)> {
    let file =
        if checkpoint.is_dir() { checkpoint.join(sg_autograd::checkpoint::PARAMS) } else { checkpoint.to_path_buf() };
    let f = SafetensorsFile::open(&file)?;
    let config = f.metadata().get("config").cloned().ok_or_else(|| TensorError::Format {
        path: file.display().to_string(),
        msg: "has no `config` metadata".into(),
    })?;
    let json = parse_json(&config, &file.display().to_string())?;
    let img = json.get("img_size").and_then(|v| v.as_array()).and_then(|a| a[0].as_u64()).unwrap_or(96) as usize;
    let mut cfg = MaeConfig::preset("tiny", img)?;
    cfg.update_from_json(&json)?;
    let mut store = ParamStore::new();
    let model = Mae3d::new(cfg, &mut store, 0)?;
    load_params(&mut store, &f, "", true)?;
    Ok((model, store))
}

/// The image at `path` in model band order, with its size.
pub fn load_image(path: &Path, s2_order: bool) -> Result<(Vec<f32>, usize, usize)> {
    if path.is_dir() {
        let src = detect(path, 96)?;
        return src.load(0);
    }
    let r = read_tiff(path)?;
    let plane = r.height * r.width;
    let img = match r.bands {
        12 => r.data,
        13 => reorder(&r.data, plane, if s2_order { &ALL_BANDS } else { &EUROSAT_FILE_BANDS }, &MODEL_BANDS)?,
        n => {
            return Err(TensorError::Format {
                path: path.display().to_string(),
                msg: format!("has {n} bands; a reconstruction needs 12 (model order) or 13"),
            })
        }
    };
    Ok((img, r.height, r.width))
}

pub fn run(args: &[String]) -> Result<PathBuf> {
    let (mut ck, mut input, mut out, mut s2, mut ratio, mut seed) = (None, None, None, false, None, 0u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| arg_err(format!("{a} needs a value\n{USAGE}")));
        match a.as_str() {
            "--checkpoint" => ck = Some(PathBuf::from(val()?)),
            "--input" => input = Some(PathBuf::from(val()?)),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--band-order" => {
                s2 = match val()?.as_str() {
                    "s2" => true,
                    "eurosat" => false,
                    other => return Err(arg_err(format!("--band-order `{other}`: eurosat or s2"))),
                }
            }
            "--mask-ratio" => {
                ratio = Some(val()?.parse::<f64>().map_err(|_| arg_err("--mask-ratio needs a number".into()))?)
            }
            "--seed" => seed = val()?.parse().map_err(|_| arg_err("--seed needs a whole number".into()))?,
            other => return Err(arg_err(format!("unknown option `{other}`\n{USAGE}"))),
        }
    }
    let (Some(ck), Some(input), Some(out)) = (ck, input, out) else {
        return Err(arg_err(format!("--checkpoint, --input and --out are required\n{USAGE}")));
    };
    let (mut model, store) = load_model(&ck)?;
    if let Some(r) = ratio {
        model.cfg.mask_ratio = r;
        model.cfg.validate()?;
    }
    let img = load_image(&input, s2)?;
    crate::pretrain::write_recon(&out, &model, &store, &[img], seed)?;
    Ok(out)
}
