//! `cargo xtask finetune` and `cargo xtask eval` for the dense tasks: semantic segmentation
//! (Sen1Floods11 water / dry, or any folder of image + mask GeoTIFF pairs such as SegMunich's 13
//! classes) and change detection (OSCD city pairs), with `sg_heads::UperNet`.
//!
//! Scenes are whole GeoTIFFs, each band min-max normalised over the scene. Training draws random
//! windows of `--img` pixels with flips and quarter turns (both dates of a pair move together);
//! evaluation covers every pixel of the held-out scenes (or the held-out bottom rows of each scene
//! when there are fewer than three) by sliding windows with half-window overlap, averaging the
//! class probabilities where windows overlap. Held-out maps are written as PNGs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sg_autograd::optim::{apply_layer_decay, weight_decay_groups, AdamW, CosineSchedule};
use sg_autograd::{checkpoint, Tape};
use sg_data::augment::Sample;
use sg_data::normalize::min_max;
use sg_data::oscd::Oscd;
use sg_data::sen1floods11::Sen1Floods11;
use sg_heads::metrics::Segmentation;
use sg_heads::{DenseConfig, NormKind, UperNet};
use sg_tensor::backend::Cpu;
use sg_tensor::rng::Rng;
use sg_tensor::{Eval, Exec, ParamStore, Result, TensorError};
use sg_vit::config::parse_json;
use sg_vit::VitConfig;

pub const USAGE: &str = "cargo xtask finetune --task segmentation|change [--data DIR] [--init PRETRAIN_DIR]
    [--epochs N] [--steps-per-epoch N] [--batch N] [--img PX] [--blr X] [--config tiny|base|...]
    [--norm group|batch] [--classes N] [--val-fraction F] [--eval-every EPOCHS] [--class-weights W0,W1,..]
    [--pos-embed pretrained|joined] [--seed N] [--out DIR]
cargo xtask eval --task segmentation|change --checkpoint DIR --data DIR [--split val|all] [--maps DIR] [--json]";

/// The label that does not count.
pub const IGNORE: usize = 255;

fn arg_err(msg: String) -> TensorError {
    TensorError::Arg { op: "finetune", msg }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseTask {
    Segmentation,
    Change,
}

impl DenseTask {
    pub fn parse(s: &str) -> Option<DenseTask> {
        match s {
            "segmentation" => Some(DenseTask::Segmentation),
            "change" => Some(DenseTask::Change),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DenseTask::Segmentation => "segmentation",
            DenseTask::Change => "change",
        }
    }
}

/// One normalised scene: `bands x h x w` (a change pair stacks both dates) with its labels as
/// the mask, built once so that windows are cropped from it without copying the scene.
pub struct Scene {
    pub name: String,
    pub sample: Sample,
    pub labels: Vec<usize>,
}

impl Scene {
    fn new(name: String, img: Vec<f32>, bands: usize, height: usize, width: usize, labels: Vec<usize>) -> Result<Self> {
        let mask = labels.iter().map(|&l| l as f32).collect();
        Ok(Scene { name, sample: Sample::new(img, bands, height, width, Some(mask))?, labels })
    }

    pub fn height(&self) -> usize {
        self.sample.height
    }

    pub fn width(&self) -> usize {
        self.sample.width
    }
}

fn to_labels(v: &[f32], classes: usize, path: &str) -> Result<Vec<usize>> {
    v.iter()
        .map(|&x| {
            let l = x as usize;
            if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && (l < classes || l == IGNORE) {
                Ok(l)
            } else {
                Err(TensorError::Format {
                    path: path.into(),
                    msg: format!("label {x} is not a class below {classes} or {IGNORE}"),
                })
            }
        })
        .collect()
}

fn normalised(mut img: Vec<f32>, bands: usize) -> Result<Vec<f32>> {
    min_max(&mut img, bands)?;
    Ok(img)
}

/// Image + mask pairs: `DIR/img/*.tif` (12 bands in model order, or 13 with B10) and
/// `DIR/label/*.tif` of the same names.
fn pairs(dir: &Path, classes: usize) -> Result<Vec<Scene>> {
    let (idir, ldir) = (dir.join("img"), dir.join("label"));
    let mut names: Vec<String> = std::fs::read_dir(&idir)
        .map_err(|e| TensorError::Io { path: idir.display().to_string(), msg: e.to_string() })?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".tif") || n.ends_with(".tiff"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let (ip, lp) = (idir.join(&n), ldir.join(&n));
        let img = sg_data::raster::read_tiff(&ip)?;
        let lab = sg_data::raster::read_tiff(&lp)?;
        let plane = img.height * img.width;
        let data = match img.bands {
            12 => img.data,
            // B1..B12 with B8A after B8: drop B10 (index 10), as everywhere in the model.
            13 => img
                .data
                .chunks_exact(plane)
                .enumerate()
                .filter(|(b, _)| *b != 10)
                .flat_map(|(_, p)| p.to_vec())
                .collect(),
            b => {
                return Err(TensorError::Format {
                    path: ip.display().to_string(),
                    msg: format!("has {b} bands; expected 12 (model order) or 13 (B1..B12 with B8A)"),
                })
            }
        };
        if (lab.height, lab.width, lab.bands) != (img.height, img.width, 1) {
            return Err(TensorError::Format {
                path: lp.display().to_string(),
                msg: format!("is {}x{}x{}, the image {}x{}", lab.bands, lab.height, lab.width, img.height, img.width),
            });
        }
        let labels = to_labels(&lab.data, classes, &lp.display().to_string())?;
        out.push(Scene::new(n, normalised(data, 12)?, 12, img.height, img.width, labels)?);
    }
    Ok(out)
}

/// The scenes of `dir` and the number of classes.
pub fn load_scenes(task: DenseTask, dir: &Path, classes: Option<usize>) -> Result<(Vec<Scene>, usize)> {
    let scenes = match task {
        DenseTask::Change => {
            let ds = Oscd::scan(dir)?;
            let mut v = Vec::new();
            for i in 0..ds.cities.len() {
                let c = ds.load(i)?;
                let mut img = normalised(c.before, 12)?;
                img.extend(normalised(c.after, 12)?);
                let labels = c.change.iter().map(|&v| v as usize).collect();
                v.push(Scene::new(c.city, img, 24, c.height, c.width, labels)?);
            }
            (v, 2)
        }
        DenseTask::Segmentation if dir.join("S2").is_dir() => {
            let ds = Sen1Floods11::scan(dir)?;
            let mut v = Vec::new();
            for i in 0..ds.len() {
                let c = ds.load(i)?;
                let labels = to_labels(&c.labels, 2, &ds.chips[i])?;
                v.push(Scene::new(ds.chips[i].clone(), normalised(c.img, 12)?, 12, c.height, c.width, labels)?);
            }
            (v, 2)
        }
        DenseTask::Segmentation if !dir.join("img").is_dir() => {
            return Err(arg_err(format!(
            "{}: segmentation data is a Sen1Floods11 folder (S2/ and Labels/) or image + mask pairs (img/ and label/)",
            dir.display()
        )))
        }
        DenseTask::Segmentation => {
            let k = classes.unwrap_or(13);
            (pairs(dir, k)?, k)
        }
    };
    if scenes.0.is_empty() {
        return Err(arg_err(format!("{} holds no scenes", dir.display())));
    }
    Ok(scenes)
}

/// A region of a scene: rows `rows` of scene `scene`.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub scene: usize,
    pub rows: std::ops::Range<usize>,
}

/// Train and held-out regions: with three or more scenes the last `val_fraction` of them (sorted
/// by name) are held out whole; with fewer, the bottom `val_fraction` of each scene's rows.
pub fn split(scenes: &[Scene], val_fraction: f64, img: usize) -> Result<(Vec<Region>, Vec<Region>)> {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    if scenes.len() >= 3 {
        let nv = ((scenes.len() as f64 * val_fraction).round() as usize).clamp(1, scenes.len() - 1);
        for (i, s) in scenes.iter().enumerate() {
            let r = Region { scene: i, rows: 0..s.height() };
            if i >= scenes.len() - nv {
                val.push(r)
            } else {
                train.push(r)
            }
        }
    } else {
        for (i, s) in scenes.iter().enumerate() {
            let cut = s.height() - (s.height() as f64 * val_fraction).round() as usize;
            train.push(Region { scene: i, rows: 0..cut });
            val.push(Region { scene: i, rows: cut..s.height() });
        }
    }
    for r in train.iter().chain(&val) {
        let s = &scenes[r.scene];
        if r.rows.len() < img || s.width() < img {
            return Err(arg_err(format!(
                "{}: a region of {}x{} pixels is smaller than the {img}-pixel window (use a smaller --img or --val-fraction)",
                s.name,
                r.rows.len(),
                s.width()
            )));
        }
    }
    Ok((train, val))
}

/// Tokens of samples: one image each, or (change) the two dates as two token batches.
fn tokens(task: DenseTask, model: &UperNet, samples: &[Sample]) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let plane = samples.first().map_or(0, |s| s.height * s.width);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in samples {
        a.extend_from_slice(&s.img[..12 * plane]);
        if task == DenseTask::Change {
            b.extend_from_slice(&s.img[12 * plane..]);
        }
    }
    let n = samples.len();
    let ta = model.tokens(&a, n)?;
    let tb = if task == DenseTask::Change { Some(model.tokens(&b, n)?) } else { None };
    Ok((ta, tb))
}

fn logits<E: Exec>(
    e: &mut E,
    task: DenseTask,
    model: &UperNet,
    t: &(Vec<f32>, Option<Vec<f32>>),
    n: usize,
) -> Result<sg_tensor::Value<E::B>> {
    let shape = [n, model.cfg.encoder.tokens(), model.cfg.encoder.token_dim()];
    let a = e.constant(&t.0, &shape)?;
    match (task, &t.1) {
        (DenseTask::Change, Some(b)) => {
            let b = e.constant(b, &shape)?;
            model.change(e, &a, &b)
        }
        _ => model.segment(e, &a),
    }
}

/// Class probabilities over a region by sliding windows (stride half a window, the last window
/// flush with the edge), averaged where windows overlap; returns the argmax map of the region.
pub fn predict_region(
    task: DenseTask,
    model: &UperNet,
    store: &ParamStore,
    s: &Scene,
    r: &Region,
) -> Result<Vec<usize>> {
    let size = model.cfg.encoder.img_size.0;
    let c = model.cfg.classes;
    let starts = |len: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..=len - size).step_by((size / 2).max(1)).collect();
        if *v.last().unwrap_or(&0) != len - size {
            v.push(len - size);
        }
        v
    };
    let (rh, w) = (r.rows.len(), s.width());
    let mut prob = vec![0f32; c * rh * w];
    let mut count = vec![0f32; rh * w];
    let wins: Vec<(usize, usize)> =
        starts(rh).into_iter().flat_map(|y| starts(w).into_iter().map(move |x| (y, x))).collect();
    for chunk in wins.chunks(4) {
        let samples =
            chunk.iter().map(|&(y, x)| s.sample.crop(r.rows.start + y, x, size, size)).collect::<Result<Vec<_>>>()?;
        let t = tokens(task, model, &samples)?;
        let mut e = Eval::new(Cpu, store);
        // On a pool thread (see `par::install`); the windows were cropped above, no loader waits.
        let z = sg_tensor::par::install(|| logits(&mut e, task, model, &t, samples.len()))?;
        let z = e.read(&z);
        for (k, &(y0, x0)) in chunk.iter().enumerate() {
            for yy in 0..size {
                for xx in 0..size {
                    let px = (y0 + yy) * w + x0 + xx;
                    let at = |cl: usize| z[((k * c + cl) * size + yy) * size + xx];
                    let m = (0..c).map(at).fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = (0..c).map(|cl| (at(cl) - m).exp()).sum();
                    for cl in 0..c {
                        prob[cl * rh * w + px] += ((at(cl) - m).exp() / sum) as f32;
                    }
                    count[px] += 1.0;
                }
            }
        }
    }
    Ok((0..rh * w)
        .map(|px| (0..c).max_by(|&a, &b| prob[a * rh * w + px].total_cmp(&prob[b * rh * w + px])).unwrap_or(0))
        .collect())
}

/// Colours of classes in maps (ignored pixels grey).
const PALETTE: [[u8; 3]; 13] = [
    [20, 20, 20],
    [30, 110, 230],
    [60, 180, 75],
    [230, 25, 75],
    [255, 225, 25],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

/// `target | prediction` side by side; for change detection the prediction panel shows true
/// positives white, false positives red and misses blue.
fn write_map(path: &Path, task: DenseTask, target: &[usize], pred: &[usize], h: usize, w: usize) -> Result<()> {
    let mut rgb = vec![0u8; h * (2 * w + 4) * 3];
    let colour = |l: usize| if l == IGNORE { [128, 128, 128] } else { PALETTE[l % PALETTE.len()] };
    for y in 0..h {
        for x in 0..w {
            let (t, p) = (target[y * w + x], pred[y * w + x]);
            let right = match task {
                DenseTask::Change if t != IGNORE => match (t, p) {
                    (1, 1) => [255, 255, 255],
                    (0, 1) => [230, 40, 40],
                    (1, 0) => [40, 90, 255],
                    _ => [0, 0, 0],
                },
                _ => colour(p),
            };
            let left = if task == DenseTask::Change && t == 1 { [255, 255, 255] } else { colour(t) };
            let row = y * (2 * w + 4);
            rgb[(row + x) * 3..(row + x) * 3 + 3].copy_from_slice(&left);
            rgb[(row + w + 4 + x) * 3..(row + w + 4 + x) * 3 + 3].copy_from_slice(&right);
        }
    }
    crate::png::write_rgb(path, 2 * w + 4, h, &rgb)
}

/// Metrics of the regions as JSON: `oa`, `miou`, `per_class_iou` (segmentation) or `precision`,
/// `recall`, `f1` of the change class; maps written to `maps` when given.
pub fn evaluate(
    task: DenseTask,
    model: &UperNet,
    store: &ParamStore,
    scenes: &[Scene],
    regions: &[Region],
    maps: Option<&Path>,
) -> Result<serde_json::Value> {
    let mut m = Segmentation::new(model.cfg.classes);
    let mut pixels = 0usize;
    for r in regions {
        let s = &scenes[r.scene];
        let pred = predict_region(task, model, store, s, r)?;
        let target = &s.labels[r.rows.start * s.width()..r.rows.end * s.width()];
        m.update(&pred, target, IGNORE)?;
        pixels += target.iter().filter(|&&t| t != IGNORE).count();
        if let Some(dir) = maps {
            std::fs::create_dir_all(dir)
                .map_err(|e| TensorError::Io { path: dir.display().to_string(), msg: e.to_string() })?;
            let name = format!("{}-rows{}-{}.png", s.name.trim_end_matches(".tif"), r.rows.start, r.rows.end);
            write_map(&dir.join(name), task, target, &pred, r.rows.len(), s.width())?;
        }
    }
    let iou: Vec<serde_json::Value> =
        m.iou().into_iter().map(|v| v.map_or(serde_json::Value::Null, |v| v.into())).collect();
    Ok(match task {
        DenseTask::Segmentation => serde_json::json!({"task": "segmentation", "pixels": pixels,
            "oa": m.overall_accuracy(), "miou": m.miou(), "per_class_iou": iou, "confusion": m.confusion}),
        DenseTask::Change => {
            let (p, r, f) = m.precision_recall_f1(1);
            serde_json::json!({"task": "change", "pixels": pixels, "precision": p, "recall": r, "f1": f,
                "oa": m.overall_accuracy(), "confusion": m.confusion})
        }
    })
}

fn options(args: &[String], flags: &[&str]) -> Result<(HashMap<String, String>, Vec<String>)> {
    let (mut kv, mut set) = (HashMap::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(k) = a.strip_prefix("--") else { return Err(arg_err(format!("unexpected `{a}`\n{USAGE}"))) };
        if flags.contains(&k) {
            set.push(k.to_string());
            continue;
        }
        let v = it.next().ok_or_else(|| arg_err(format!("{a} needs a value\n{USAGE}")))?;
        kv.insert(k.to_string(), v.clone());
    }
    Ok((kv, set))
}

/// Class weights of the change loss as in the OSCD reference code (Daudt et al.), from the change
/// fraction `r` of the training pixels: `[10 * 2r, 2(1 - r)]`. The rare class weighs more, by
/// about (1 - r) / 10r rather than the full inverse frequency, which floods the maps with false
/// alarms. Other class counts get inverse frequencies with mean 1.
fn class_weights(scenes: &[Scene], regions: &[Region], classes: usize) -> Vec<f32> {
    let mut n = vec![1u64; classes];
    for r in regions {
        let s = &scenes[r.scene];
        for &l in &s.labels[r.rows.start * s.width()..r.rows.end * s.width()] {
            if l < classes {
                n[l] += 1;
            }
        }
    }
    let total: u64 = n.iter().sum();
    if classes == 2 {
        let r = n[1] as f64 / total as f64;
        return vec![(10.0 * 2.0 * r) as f32, (2.0 * (1.0 - r)) as f32];
    }
    let inv: Vec<f64> = n.iter().map(|&c| 1.0 / c as f64).collect();
    let mean = inv.iter().sum::<f64>() / classes as f64;
    inv.iter().map(|v| (v / mean) as f32).collect()
}

/// Fine-tunes a dense task; writes `checkpoint.safetensors`, `config.json`, `metrics.json` and the
/// held-out maps under `--out`; returns the final held-out metrics.
pub fn finetune(task: DenseTask, args: &[String]) -> Result<serde_json::Value> {
    let (kv, _) = options(args, &[])?;
    let known = [
        "task",
        "data",
        "init",
        "epochs",
        "steps-per-epoch",
        "batch",
        "img",
        "blr",
        "config",
        "norm",
        "classes",
        "val-fraction",
        "seed",
        "out",
        "eval-every",
        "class-weights",
        "pos-embed",
    ];
    if let Some(k) = kv.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(arg_err(format!("unknown option --{k}\n{USAGE}")));
    }
    let num = |k: &str, d: f64| -> Result<f64> {
        kv.get(k).map_or(Ok(d), |v| v.parse().map_err(|_| arg_err(format!("--{k}: `{v}` is not a number"))))
    };
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let data = kv
        .get("data")
        .map(PathBuf::from)
        .unwrap_or_else(|| fx.join(if task == DenseTask::Change { "oscd" } else { "sen1floods11" }));
    let (epochs, batch, img) = (num("epochs", 10.0)? as u64, num("batch", 4.0)? as usize, num("img", 96.0)? as usize);
    let (blr, seed, vf) = (num("blr", 0.02)?, num("seed", 0.0)? as u64, num("val-fraction", 0.3)?);
    let eval_every = (num("eval-every", 1.0)? as u64).max(1);
    if epochs == 0 || batch == 0 || !(vf > 0.0 && vf < 1.0) || !(blr > 0.0 && blr.is_finite()) {
        return Err(arg_err(
            "--epochs and --batch must be at least 1, --blr positive, --val-fraction in (0, 1)".into(),
        ));
    }
    let out =
        kv.get("out").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(format!("runs/finetune-{}", task.name())));
    let (scenes, classes) = load_scenes(task, &data, kv.get("classes").and_then(|v| v.parse().ok()))?;
    let (train, val) = split(&scenes, vf, img)?;
    let pretrained = match kv.get("init") {
        Some(p) => Some(crate::reconstruct::load_model(Path::new(p))?),
        None => None,
    };
    let mut enc = match &pretrained {
        Some((m, _)) => m.cfg.encoder.clone(),
        None => VitConfig::preset(kv.get("config").map_or("tiny", String::as_str), img)?,
    };
    enc.img_size = (img, img);
    enc.num_classes = 0;
    // The pretrained spatial + spectral pair (interpolated to the new grid), or the original's
    // fresh joined embedding.
    enc.pos_embed = match kv.get("pos-embed").map(String::as_str) {
        None | Some("pretrained") => sg_vit::PosEmbed::Separate,
        Some("joined") => sg_vit::PosEmbed::Joined,
        Some(o) => return Err(arg_err(format!("--pos-embed `{o}`: pretrained or joined"))),
    };
    enc.drop_path = 0.1;
    let mut cfg = DenseConfig::new(enc, classes);
    cfg.norm = match kv.get("norm").map(String::as_str) {
        None | Some("group") => NormKind::Group,
        Some("batch") => NormKind::Batch,
        Some(o) => return Err(arg_err(format!("--norm `{o}`: group or batch"))),
    };
    let mut store = ParamStore::new();
    let model = UperNet::new(cfg.clone(), &mut store, seed)?;
    if let Some((m, ps)) = &pretrained {
        let (_, h0, w0) = m.cfg.encoder.grid();
        let (_, h1, w1) = cfg.encoder.grid();
        crate::pretrain::transfer(ps, (h0, w0), &mut store, (h1, w1), crate::pretrain::PosTransfer::Interpolate)?;
    }
    let mut groups = weight_decay_groups(&store, 0.05, &["pos_embed", "pos_embed_spatial", "pos_embed_temporal"]);
    apply_layer_decay(&store, &mut groups, cfg.encoder.depth, 0.75);
    let mut opt = AdamW::new(&store, groups, 0.9, 0.999, 1e-8)?;
    let area: usize = train.iter().map(|r| r.rows.len() * scenes[r.scene].width()).sum();
    let per_epoch = num("steps-per-epoch", (area / (img * img * batch)).max(1) as f64)?.max(1.0) as u64;
    let total = epochs * per_epoch;
    let sched = CosineSchedule {
        base_lr: blr * batch as f64 / 256.0,
        min_lr: 1e-6,
        warmup_steps: (total / 10).max(1),
        total_steps: total,
    };
    let weights = match kv.get("class-weights") {
        Some(v) => {
            let w: Vec<f32> = v
                .split(',')
                .map(|x| x.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| arg_err(format!("--class-weights `{v}`: {classes} comma-separated numbers")))?;
            if w.len() != classes || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.iter().all(|&x| x == 0.0) {
                return Err(arg_err(format!("--class-weights `{v}`: {classes} non-negative numbers, not all 0")));
            }
            w
        }
        None if task == DenseTask::Change => class_weights(&scenes, &train, classes),
        None => Vec::new(),
    };
    let mut step = 0u64;
    let (mut history, mut last) = (Vec::new(), serde_json::Value::Null);
    let config = serde_json::json!({"task": task.name(), "dense": cfg.to_json()}).to_string();
    for epoch in 0..epochs {
        let mut epoch_loss = 0.0;
        for _ in 0..per_epoch {
            let mut rng = Rng::derive(seed, &[epoch, step, 0xDE5E]);
            let mut samples = Vec::new();
            for _ in 0..batch {
                // A training region in proportion to its area, a random window, a random flip/turn.
                let mut pick = rng.below(area);
                let r = train
                    .iter()
                    .find(|r| {
                        let a = r.rows.len() * scenes[r.scene].width();
                        if pick < a {
                            true
                        } else {
                            pick -= a;
                            false
                        }
                    })
                    .unwrap_or(&train[0]);
                let s = &scenes[r.scene];
                let top = r.rows.start + rng.below(r.rows.len() - img + 1);
                let left = rng.below(s.width() - img + 1);
                let mut x = s.sample.crop(top, left, img, img)?;
                if rng.uniform() < 0.5 {
                    x = x.hflip();
                }
                x = x.rot90(rng.below(4));
                samples.push(x);
            }
            let labels: Vec<usize> =
                samples.iter().flat_map(|x| x.mask.as_ref().expect("labels").iter().map(|&v| v as usize)).collect();
            let t = tokens(task, &model, &samples)?;
            let mut tape = Tape::new(Cpu, &store).with_seed(seed ^ step);
            let z = logits(&mut tape, task, &model, &t, samples.len())?;
            let (loss, l) = UperNet::pixel_loss(&mut tape, &z, &labels, &weights, IGNORE)?;
            if !l.is_finite() {
                return Err(arg_err(format!("the loss became {l} at step {step}")));
            }
            let running = tape.take_running_stats();
            // Folded into the optimiser's moments as the backward finishes each gradient (no clipping).
            tape.backward_fold(&loss, &mut |r, g| opt.fold(&store, r, g))?;
            opt.apply(&mut store, sched.lr(step))?;
            for (p, v) in running {
                store.values_mut(&p).copy_from_slice(&v);
            }
            step += 1;
            epoch_loss += l;
        }
        let mean = epoch_loss / per_epoch as f64;
        let final_epoch = epoch + 1 == epochs;
        if final_epoch || (epoch + 1) % eval_every == 0 {
            let maps = final_epoch.then(|| out.join("maps"));
            last = evaluate(task, &model, &store, &scenes, &val, maps.as_deref())?;
            let head = ["f1", "miou"].iter().find_map(|k| last.get(*k)).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let what = if task == DenseTask::Change { "F1" } else { "mIoU" };
            println!("epoch {}/{epochs}  train loss {mean:.4}  held-out {what} {head:.4}", epoch + 1);
            history.push(serde_json::json!({"epoch": epoch, "train_loss": mean, "val": last.clone()}));
        } else {
            println!("epoch {}/{epochs}  train loss {mean:.4}", epoch + 1);
            history.push(serde_json::json!({"epoch": epoch, "train_loss": mean}));
        }
        // Each epoch's weights are saved atomically: an interrupted run keeps the last finished epoch.
        checkpoint::save(
            &out,
            &store,
            None,
            &config,
            step,
            &HashMap::from([("task".to_string(), task.name().to_string())]),
        )?;
    }
    let report = serde_json::json!({"task": task.name(), "train_regions": train.len(), "val_regions": val.len(), "class_weights": weights,
        "steps": step, "init": kv.get("init"), "final": last, "history": history});
    sg_tensor::io::write_atomic(
        out.join("metrics.json"),
        serde_json::to_string_pretty(&report).unwrap_or_default().as_bytes(),
    )?;
    Ok(last)
}

/// A fine-tuned dense checkpoint's metrics on the held-out regions (or every pixel) of `--data`.
pub fn eval(task: DenseTask, args: &[String]) -> Result<serde_json::Value> {
    let (kv, flags) = options(args, &["json"])?;
    let ck =
        kv.get("checkpoint").map(PathBuf::from).ok_or_else(|| arg_err(format!("--checkpoint is required\n{USAGE}")))?;
    let data = kv.get("data").map(PathBuf::from).ok_or_else(|| arg_err(format!("--data is required\n{USAGE}")))?;
    let f = sg_tensor::io::SafetensorsFile::open(ck.join(checkpoint::PARAMS))?;
    let meta = parse_json(f.metadata().get("config").map(String::as_str).unwrap_or("{}"), "checkpoint config")?;
    if meta.get("task").and_then(|v| v.as_str()) != Some(task.name()) {
        return Err(arg_err(format!("{} is not a {} checkpoint", ck.display(), task.name())));
    }
    let cfg = DenseConfig::from_json(meta.get("dense").unwrap_or(&serde_json::Value::Null))?;
    let mut store = ParamStore::new();
    let model = UperNet::new(cfg.clone(), &mut store, 0)?;
    sg_tensor::io::load_params(&mut store, &f, "", true)?;
    let (scenes, classes) = load_scenes(task, &data, Some(cfg.classes))?;
    if classes != cfg.classes {
        return Err(arg_err(format!("{} has {classes} classes, the checkpoint {}", data.display(), cfg.classes)));
    }
    let img = cfg.encoder.img_size.0;
    let regions = match kv.get("split").map(String::as_str) {
        None | Some("val") => {
            split(&scenes, kv.get("val-fraction").and_then(|v| v.parse().ok()).unwrap_or(0.3), img)?.1
        }
        Some("all") => (0..scenes.len()).map(|i| Region { scene: i, rows: 0..scenes[i].height() }).collect(),
        Some(o) => return Err(arg_err(format!("--split `{o}`: val or all"))),
    };
    let maps = kv.get("maps").map(PathBuf::from);
    let m = evaluate(task, &model, &store, &scenes, &regions, maps.as_deref())?;
    if flags.iter().any(|f| f == "json") {
        println!("{m}");
    } else {
        println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
    }
    Ok(m)
}
