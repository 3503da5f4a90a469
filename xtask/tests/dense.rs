//! Fine-tuning and evaluation of the dense tasks (segmentation on the Sen1Floods11 chip, change
//! detection on the OSCD city pair) on the bundled fixtures.
mod common;
use common::{args, tmp};

use std::path::{Path, PathBuf};

use xtask::finetune::{eval, finetune};

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

fn losses(r: &serde_json::Value) -> Vec<f64> {
    r["history"].as_array().unwrap().iter().map(|h| h["train_loss"].as_f64().unwrap()).collect()
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect()
}

#[test]
fn segmentation_finetunes_evaluates_and_writes_maps() {
    let (_out_dir, out) = tmp("dense-seg");
    let o = out.to_str().unwrap();
    let m = finetune(&args(&[
        "--task",
        "segmentation",
        "--epochs",
        "3",
        "--steps-per-epoch",
        "4",
        "--batch",
        "2",
        "--img",
        "64",
        "--out",
        o,
    ]))
    .unwrap();
    let l = losses(&report(&out));
    assert!(l[2] < l[0], "training loss did not fall: {l:?}");
    let (oa, miou) = (m["oa"].as_f64().unwrap(), m["miou"].as_f64().unwrap());
    assert!(oa > 0.0 && oa <= 1.0 && (0.0..=1.0).contains(&miou), "{m}");
    assert_eq!(m["per_class_iou"].as_array().unwrap().len(), 2);
    let maps = pngs(&out.join("maps"));
    assert_eq!(maps.len(), 1, "one held-out region, one map");
    assert!(std::fs::read(&maps[0]).unwrap().starts_with(b"\x89PNG"));
    // The checkpoint alone reproduces the held-out numbers; the whole chip is more pixels.
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sen1floods11");
    let e =
        eval(&args(&["--task", "segmentation", "--checkpoint", o, "--data", fx.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(e["miou"], m["miou"]);
    let all =
        eval(&args(&["--task", "segmentation", "--checkpoint", o, "--data", fx.to_str().unwrap(), "--split", "all"]))
            .unwrap();
    assert!(all["pixels"].as_u64().unwrap() > 2 * e["pixels"].as_u64().unwrap());
}

#[test]
fn change_detection_with_batch_norm_finetunes_and_evaluates() {
    let (_out_dir, out) = tmp("dense-change");
    let o = out.to_str().unwrap();
    let m = finetune(&args(&[
        "--task",
        "change",
        "--epochs",
        "3",
        "--steps-per-epoch",
        "4",
        "--batch",
        "2",
        "--img",
        "64",
        "--norm",
        "batch",
        "--pos-embed",
        "joined",
        "--out",
        o,
    ]))
    .unwrap();
    let l = losses(&report(&out));
    assert!(l[2] < l[0], "training loss did not fall: {l:?}");
    for k in ["precision", "recall", "f1"] {
        assert!((0.0..=1.0).contains(&m[k].as_f64().unwrap()), "{k}: {m}");
    }
    // BatchNorm's running statistics moved and were saved with the weights; the position
    // embedding is the original's joined one.
    let f = sg_tensor::io::SafetensorsFile::open(out.join("checkpoint.safetensors")).unwrap();
    assert!(f.contains("pos_embed") && !f.contains("pos_embed_spatial"));
    let (_, rm) = f.f32("conv0.1.running_mean").unwrap();
    assert!(rm.iter().any(|&v| v != 0.0));
    assert_eq!(pngs(&out.join("maps")).len(), 1);
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/oscd");
    let e = eval(&args(&["--task", "change", "--checkpoint", o, "--data", fx.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(e["f1"], m["f1"]);
    // A change checkpoint is not a segmentation model.
    let wrong = eval(&args(&["--task", "segmentation", "--checkpoint", o, "--data", fx.to_str().unwrap()]));
    assert!(wrong.unwrap_err().to_string().contains("not a segmentation checkpoint"));
}

#[test]
fn bad_dense_options_are_errors() {
    let run = |v: &[&str]| {
        let mut a = args(&["--task", "segmentation", "--epochs", "1", "--steps-per-epoch", "1"]);
        a.extend(args(v));
        finetune(&a).unwrap_err().to_string()
    };
    assert!(run(&["--bogus", "1"]).contains("unknown option"));
    assert!(run(&["--img", "40"]).contains("6x6"));
    assert!(run(&["--val-fraction", "0.95"]).contains("smaller than"));
    assert!(run(&["--norm", "layer"]).contains("group or batch"));
    assert!(run(&["--class-weights", "1,x"]).contains("class-weights"));
    assert!(run(&["--pos-embed", "sinusoidal"]).contains("pretrained or joined"));
    assert!(run(&["--class-weights", "1,2,3"]).contains("2 non-negative numbers"));
    assert!(run(&["--data", "/nonexistent/floods"]).contains("/nonexistent/floods"));
    assert!(run(&["--data", "../fixtures/oscd"]).contains("img/ and label/"));
    assert!(eval(&args(&["--task", "change", "--data", "x"])).unwrap_err().to_string().contains("--checkpoint"));
}

/// 13 bands of u16 per pixel, interleaved (a SegMunich-style image).
struct Bands13;
impl tiff::encoder::colortype::ColorType for Bands13 {
    type Inner = u16;
    const TIFF_VALUE: tiff::tags::PhotometricInterpretation = tiff::tags::PhotometricInterpretation::BlackIsZero;
    const BITS_PER_SAMPLE: &'static [u16] = &[16; 13];
    const SAMPLE_FORMAT: &'static [tiff::tags::SampleFormat] = &[tiff::tags::SampleFormat::Uint; 13];
    fn horizontal_predict(_: &[u16], _: &mut Vec<u16>) {
        unreachable!("written without prediction")
    }
}

#[test]
fn image_and_mask_folders_segment_with_many_classes() {
    // Three 13-band scenes cut from the real Sen1Floods11 chip, with 13-class masks made from its
    // water label (water 7, dry 3, no data 255), in the img/ + label/ layout.
    let (_pairs_dir, dir) = tmp("dense-pairs");
    for sub in ["img", "label"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sen1floods11/S2/Spain_7370579_S2Hand.tif");
    let img = sg_data::raster::read_tiff(&f).unwrap();
    let lab = sg_data::raster::read_tiff(f.to_str().unwrap().replace("S2/", "Labels/").replace("S2Hand", "LabelHand"))
        .unwrap();
    let (s, w) = (72usize, img.width);
    for (k, top) in [0usize, 150, 300].into_iter().enumerate() {
        let mut px = vec![0u16; s * s * 13];
        let mut mask = vec![0u8; s * s];
        for y in 0..s {
            for x in 0..s {
                let at = (top + y) * w + x;
                for b in 0..13 {
                    px[(y * s + x) * 13 + b] = img.data[b * img.height * w + at].clamp(0.0, 65535.0) as u16;
                }
                mask[y * s + x] = match lab.data[at] as i32 {
                    1 => 7,
                    0 => 3,
                    _ => 255,
                };
            }
        }
        let name = format!("scene{k}.tif");
        let mut enc =
            tiff::encoder::TiffEncoder::new(std::fs::File::create(dir.join("img").join(&name)).unwrap()).unwrap();
        enc.write_image::<Bands13>(s as u32, s as u32, &px).unwrap();
        let mut enc =
            tiff::encoder::TiffEncoder::new(std::fs::File::create(dir.join("label").join(&name)).unwrap()).unwrap();
        enc.write_image::<tiff::encoder::colortype::Gray8>(s as u32, s as u32, &mask).unwrap();
    }
    let (_out_dir, out) = tmp("dense-pairs-out");
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let m = finetune(&args(&[
        "--task",
        "segmentation",
        "--data",
        d,
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch",
        "2",
        "--img",
        "64",
        "--out",
        o,
    ]))
    .unwrap();
    // Thirteen classes by default; the held-out third scene is one map.
    assert_eq!(m["per_class_iou"].as_array().unwrap().len(), 13);
    assert_eq!(pngs(&out.join("maps")).len(), 1);
    let e = eval(&args(&["--task", "segmentation", "--checkpoint", o, "--data", d, "--json"])).unwrap();
    assert_eq!(e["miou"], m["miou"]);
    // A label outside the classes is an error naming the file.
    let bad = finetune(&args(&["--task", "segmentation", "--data", d, "--classes", "5", "--epochs", "1", "--out", o]));
    let msg = bad.unwrap_err().to_string();
    assert!(msg.contains("label 7") && msg.contains("scene0.tif"), "{msg}");
}
