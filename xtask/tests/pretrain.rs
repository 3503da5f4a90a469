//! Pretraining on the bundled real data: the loss falls, an interrupted run resumes bit-identically,
//! and a diverging run stops with its last good checkpoint kept.
mod common;
use common::tmp;
use sg_tensor::io::SafetensorsFile;
use xtask::pretrain::{run, Options};

fn opts(out: &std::path::Path, extra: &[&str]) -> Options {
    let mut args: Vec<String> =
        ["--img", "32", "--batch", "4", "--quiet", "--log-every", "1"].iter().map(|s| s.to_string()).collect();
    args.extend(["--out".to_string(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Options::parse(&args).unwrap()
}

fn tensors(dir: &std::path::Path, file: &str) -> Vec<(String, Vec<u32>)> {
    let f = SafetensorsFile::open(dir.join(file)).unwrap();
    f.names().into_iter().map(|n| (n.clone(), f.f32(&n).unwrap().1.iter().map(|v| v.to_bits()).collect())).collect()
}

#[test]
fn loss_falls_on_real_data() {
    let (_out_dir, out) = tmp("pretrain-falls");
    let s = run(&opts(&out, &["--steps", "40"])).unwrap();
    assert_eq!(s.steps, 40);
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            j["loss"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 40);
    let tail = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.5 * losses[0], "first {} last five {tail}", losses[0]);
    for f in ["checkpoint.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The reports are PNGs of the stated sizes (IHDR width and height, big-endian).
    for (f, w, h) in [("loss.png", 720u32, 420u32), ("recon.png", 3 * 64 + 4 * 6, 4 * 64 + 5 * 6)] {
        let b = std::fs::read(out.join(f)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), w, "{f} width");
        assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), h, "{f} height");
    }
    // The checkpoint holds the original parameter names.
    assert!(tensors(&out, "checkpoint.safetensors").iter().any(|(n, _)| n == "blocks.0.attn.q.weight"));
}

#[test]
fn interrupted_run_resumes_bit_identically() {
    let ((_a_dir, a), (_b_dir, b)) = (tmp("pretrain-straight"), tmp("pretrain-resumed"));
    run(&opts(&a, &["--steps", "6"])).unwrap();
    run(&opts(&b, &["--steps", "6", "--stop-at", "3"])).unwrap();
    assert_ne!(tensors(&a, "checkpoint.safetensors"), tensors(&b, "checkpoint.safetensors"), "stopped early");
    run(&opts(&b, &["--steps", "6", "--resume"])).unwrap();
    assert_eq!(tensors(&a, "checkpoint.safetensors"), tensors(&b, "checkpoint.safetensors"));
    assert_eq!(tensors(&a, "optimizer.safetensors"), tensors(&b, "optimizer.safetensors"));
}

#[test]
fn divergence_stops_and_keeps_the_last_good_checkpoint() {
    let (_out_dir, out) = tmp("pretrain-nan");
    let e = run(&opts(&out, &["--steps", "30", "--blr", "1e15", "--save-every", "1", "--warmup", "0"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("the loss became") && e.contains("last good checkpoint"), "{e}");
    let saved = tensors(&out, "checkpoint.safetensors");
    assert!(
        saved.iter().all(|(_, v)| v.iter().all(|&b| f32::from_bits(b).is_finite())),
        "the kept checkpoint is finite"
    );
}

#[test]
fn json_model_configs() {
    let (_out_dir, out) = tmp("pretrain-json");
    std::fs::create_dir_all(&out).unwrap();
    let cfg = out.join("small.json");
    std::fs::write(&cfg, r#"{"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}"#).unwrap();
    run(&opts(&out, &["--steps", "2", "--config", cfg.to_str().unwrap()])).unwrap();
    let f = SafetensorsFile::open(out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(f.f32("norm.weight").unwrap().0, vec![64]);
    std::fs::write(&cfg, r#"{"embed_dim": 65, "num_heads": 2}"#).unwrap();
    let e = run(&opts(&out, &["--steps", "2", "--config", cfg.to_str().unwrap()])).unwrap_err().to_string();
    assert!(e.contains("heads"), "{e}");
}

#[test]
fn bad_options_are_errors() {
    assert!(Options::parse(&["--batch".into(), "zero".into()]).is_err());
    assert!(Options::parse(&["--frobnicate".into()]).unwrap_err().to_string().contains("--frobnicate"));
    assert!(Options::parse(&["--steps".into(), "3".into(), "--epochs".into(), "1".into()]).is_err());
    let o = Options::parse(&["--data".into(), "/nonexistent".into(), "--quiet".into()]).unwrap();
    assert!(run(&o).is_err());
}

#[test]
fn reconstruct_any_readable_image_from_a_checkpoint() {
    let (_out_dir, out) = tmp("pretrain-recon");
    run(&opts(&out, &["--steps", "2"])).unwrap();
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let png = out.join("r.png");
    let args = |input: std::path::PathBuf| {
        vec![
            "--checkpoint".into(),
            out.display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--out".into(),
            png.display().to_string(),
        ]
    };
    // A EuroSAT file (13 bands, B8A last), a scene folder, and the planar flood chip in S2 order.
    xtask::reconstruct::run(&args(fx.join("eurosat-ms/Forest/Forest_1031.tif"))).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    xtask::reconstruct::run(&args(fx.join("s2-l1c-scene"))).unwrap();
    let mut a = args(fx.join("sen1floods11/S2/Spain_7370579_S2Hand.tif"));
    a.extend(["--band-order".into(), "s2".into()]);
    xtask::reconstruct::run(&a).unwrap();
    let e = xtask::reconstruct::run(&args(fx.join("README.md"))).unwrap_err().to_string();
    assert!(e.contains("README.md"), "{e}");
    assert!(xtask::reconstruct::run(&["--input".into(), "x".into()]).unwrap_err().to_string().contains("required"));
}

#[test]
fn progressive_stages_move_the_position_embeddings() {
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/eurosat-ms");
    let stages = |pos: &str| -> Vec<String> {
        let mut v: Vec<String> =
            ["--batch", "4", "--quiet", "--pos-embed", pos].iter().map(|s| s.to_string()).collect();
        v.extend([
            "--stage".into(),
            format!("32:{}:1", fx.display()),
            "--stage".into(),
            format!("48:{}:1", fx.display()),
        ]);
        v
    };
    let ((_a_dir, a), (_b_dir, b), (_c_dir, c)) =
        (tmp("pretrain-stage-interp"), tmp("pretrain-stage-reinit"), tmp("pretrain-stage-resumed"));
    let with_out = |mut v: Vec<String>, out: &std::path::Path, extra: &[&str]| {
        v.extend(["--out".into(), out.display().to_string()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        Options::parse(&v).unwrap()
    };
    let s = run(&with_out(stages("interpolate"), &a, &[])).unwrap();
    assert_eq!(s.steps, 10, "two stages of one epoch of 5 batches");
    let f = SafetensorsFile::open(a.join("checkpoint.safetensors")).unwrap();
    assert_eq!(f.f32("pos_embed_spatial").unwrap().0, vec![1, 36, 192], "the 48 px grid is 6 x 6");
    assert_eq!(f.metadata()["stage"], "1");
    let log = std::fs::read_to_string(a.join("log.jsonl")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"stage\": 0, \"img\": 32"))
            && log.lines().any(|l| l.contains("\"stage\": 1, \"img\": 48"))
    );
    // Re-initialised embeddings differ from interpolated ones; everything else of stage 2 starts from stage 1.
    run(&with_out(stages("reinit"), &b, &[])).unwrap();
    let g = SafetensorsFile::open(b.join("checkpoint.safetensors")).unwrap();
    assert_ne!(f.f32("pos_embed_spatial").unwrap().1, g.f32("pos_embed_spatial").unwrap().1);
    // Interrupted in stage 1 and resumed: the same final weights as the straight run.
    run(&with_out(stages("interpolate"), &c, &["--stop-at", "3"])).unwrap();
    assert_eq!(SafetensorsFile::open(c.join("checkpoint.safetensors")).unwrap().metadata()["stage"], "0");
    run(&with_out(stages("interpolate"), &c, &["--resume"])).unwrap();
    assert_eq!(tensors(&a, "checkpoint.safetensors"), tensors(&c, "checkpoint.safetensors"));
    assert!(Options::parse(&["--stage".into(), "32:x".into()]).is_err());
}
