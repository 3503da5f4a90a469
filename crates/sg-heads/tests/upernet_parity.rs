//! The dense head against a PyTorch float64 reference (`tools/upernet_reference.py` wrote
//! `fixtures/parity/upernet_tiny.safetensors`): logits, the weighted cross-entropy with an ignore
//! index, and the gradient of every head parameter and of the encoder features, on the exact f64
//! backend and on the f32 CPU backend (the f64 side differs by about 4e-8, our erf fit).

use std::path::Path;

use sg_autograd::Tape;
use sg_heads::{DenseConfig, UperNet};
use sg_tensor::backend::{Backend, Cpu, CpuF64};
use sg_tensor::io::{load_params, SafetensorsFile};
use sg_tensor::{Exec, ParamStore};
use sg_vit::VitConfig;

fn fixture() -> SafetensorsFile {
    SafetensorsFile::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/upernet_tiny.safetensors"))
        .unwrap()
}

/// Largest difference relative to the reference's largest magnitude, floored at `floor`: the
/// biases of convolutions followed by a one-channel-per-group GroupNorm have an exactly zero
/// gradient, which both sides hold only as rounding noise.
fn max_rel(a: &[f64], b: &[f32], floor: f64) -> f64 {
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs() as f64));
    // A NaN counts as the largest difference (`f64::max` would skip it).
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - *y as f64).abs())
        .fold(0.0, |m: f64, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
        / scale
}

fn check<B: Backend>(be: B, tol: f64) {
    let f = fixture();
    let mut enc = VitConfig::preset("tiny", 48).unwrap();
    (enc.embed_dim, enc.depth, enc.num_heads) = (32, 1, 2);
    let mut cfg = DenseConfig::new(enc, 3);
    (cfg.channels, cfg.fpn, cfg.dropout) = (128, 16, 0.0);
    let mut store = ParamStore::new();
    let model = UperNet::new(cfg, &mut store, 0).unwrap();
    let report = load_params(&mut store, &f, "param.", false).unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    assert!(report.missing.iter().all(|n| !n.starts_with("fc.") && !n.contains("conv") && !n.starts_with("cls")));
    let (fshape, feats) = f.f32("input.features").unwrap();
    let fref = store.add("features", &fshape, feats).unwrap();
    let labels: Vec<usize> = f.f32("input.labels").unwrap().1.iter().map(|&v| v as usize).collect();
    let weights = f.f32("input.weights").unwrap().1;
    let params = be.upload_params(&store);
    let mut tape = Tape::with_params(be.clone(), &store, params);
    let x = tape.param(&fref).unwrap();
    let map = model.merge(&mut tape, &x).unwrap();
    let logits = model.decode(&mut tape, &map).unwrap();
    let want = f.f32("output.logits").unwrap();
    assert_eq!(logits.shape, want.0);
    let err = max_rel(&tape.read(&logits), &want.1, 0.0);
    assert!(err < tol, "{}: logits differ by {err:e}", be.name());
    let (loss, l) = UperNet::pixel_loss(&mut tape, &logits, &labels, &weights, 255).unwrap();
    let lw = f.f32("output.loss").unwrap().1[0] as f64;
    assert!((l - lw).abs() < tol * lw, "{}: loss {l} vs {lw}", be.name());
    let grads = tape.backward(&loss).unwrap();
    let g = be.download(&grads.buf);
    let mut checked = 0;
    let largest = f
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .flat_map(|n| f.f32(n).unwrap().1)
        .fold(0f64, |m, v| m.max(v.abs() as f64));
    for e in store.entries() {
        let key = if e.name == "features" { "grad.features".to_string() } else { format!("grad.{}", e.name) };
        if !f.contains(&key) {
            continue;
        }
        let err = max_rel(&g[e.param.range()], &f.f32(&key).unwrap().1, 1e-3 * largest);
        assert!(err < tol, "{}: gradient of {} differs by {err:e}", be.name(), e.name);
        checked += 1;
    }
    assert_eq!(checked, f.names().iter().filter(|n| n.starts_with("grad.")).count());
}

#[test]
fn head_matches_pytorch_in_f64() {
    check(CpuF64, 1e-6);
}

#[test]
fn head_matches_pytorch_in_f32() {
    check(Cpu, 2e-4);
}
