//! The original training script's checkpoint converts to the same parameters as the fixture.
use sg_tensor::io::{load_params, SafetensorsFile};
use sg_tensor::pth::{normalise_names, Checkpoint, PthTensor};

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

#[test]
fn pth_checkpoint_converts_to_the_fixture_parameters() {
    let tmp = tempfile::Builder::new().prefix("sg-convert-").tempdir().unwrap();
    let out = tmp.path().join("model.safetensors");
    let c = xtask::convert::run(fixtures().join("mae3d_tiny_checkpoint.pth"), &out).unwrap();
    let reference = SafetensorsFile::open(fixtures().join("mae3d_tiny.safetensors")).unwrap();
    let converted = SafetensorsFile::open(&out).unwrap();
    let params: Vec<String> = reference.names().into_iter().filter(|n| n.starts_with("param.")).collect();
    assert_eq!(c.tensors, params.len());
    for p in &params {
        let name = &p["param.".len()..];
        assert_eq!(converted.f32(name).unwrap(), reference.f32(p).unwrap(), "{name}");
    }
    // The checkpoint's other entries (optimizer, epoch, scaler, args) are not in the model entry;
    // the converted file loads strictly into the pretraining model of the fixture's config.
    let mut cfg = sg_mae3d::MaeConfig::preset("tiny", 16).unwrap();
    let json = sg_vit::config::parse_json(&reference.metadata()["config"], "config").unwrap();
    cfg.update_from_json(&json).unwrap();
    let mut store = sg_tensor::ParamStore::new();
    sg_mae3d::Mae3d::new(cfg, &mut store, 0).unwrap();
    let r = load_params(&mut store, &converted, "", true).unwrap();
    assert!(r.unexpected.is_empty() && r.missing.is_empty(), "{r:?}");
}

#[test]
fn checkpoint_keeps_its_non_tensor_entries_readable() {
    let ck = Checkpoint::open(fixtures().join("mae3d_tiny_checkpoint.pth")).unwrap();
    assert!(ck.root.get("epoch").is_some());
    // args is an argparse Namespace: an opaque object with its attributes as state.
    match ck.root.get("args") {
        Some(sg_tensor::pth::PyValue::Object { class, .. }) => assert_eq!(class.1, "Namespace"),
        other => panic!("args: {other:?}"),
    }
}

#[test]
fn corrupt_checkpoints_are_errors_not_panics() {
    let bytes = std::fs::read(fixtures().join("mae3d_tiny_checkpoint.pth")).unwrap();
    let tmp = tempfile::Builder::new().prefix("sg-pth-").tempdir().unwrap();
    let dir = tmp.path();
    for (i, cut) in [10, bytes.len() / 3, bytes.len() - 30].into_iter().enumerate() {
        let p = dir.join(format!("cut{i}.pth"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let r = Checkpoint::open(&p).and_then(|mut c| c.state_dict());
        assert!(r.is_err(), "a checkpoint cut at {cut} bytes was accepted");
    }
    // Flipped bytes inside the pickle: an error or a (possibly garbled) result, never a panic.
    for k in (60..1200).step_by(37) {
        let mut b = bytes.clone();
        b[k] ^= 0x5A;
        let p = dir.join("flip.pth");
        std::fs::write(&p, &b).unwrap();
        let _ = Checkpoint::open(&p).and_then(|mut c| c.state_dict());
    }
    std::fs::write(dir.join("text.pth"), b"not a checkpoint").unwrap();
    let e = Checkpoint::open(dir.join("text.pth")).err().unwrap().to_string();
    assert!(e.contains("not a zip archive"), "{e}");
}

#[test]
fn fused_qkv_and_ddp_prefixes_are_normalised() {
    let t = |name: &str, shape: Vec<usize>| PthTensor {
        name: name.into(),
        data: (0..shape.iter().product::<usize>()).map(|v| v as f32).collect(),
        shape,
    };
    let out = normalise_names(vec![
        t("module.blocks.0.attn.qkv.weight", vec![6, 2]),
        t("module.blocks.0.attn.qkv.bias", vec![6]),
    ]);
    let names: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "blocks.0.attn.q.weight",
            "blocks.0.attn.k.weight",
            "blocks.0.attn.v.weight",
            "blocks.0.attn.q.bias",
            "blocks.0.attn.k.bias",
            "blocks.0.attn.v.bias"
        ]
    );
    assert_eq!(out[1].data, vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!(out[1].shape, vec![2, 2]);
}
