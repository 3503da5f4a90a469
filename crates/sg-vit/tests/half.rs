//! Half-precision weights: the same classifier with f16 / bf16 weights (widened per op) gives the
//! f32 logits on real EuroSAT images within the precision of the format.

use std::path::Path;

use sg_data::bands::MODEL_BANDS;
use sg_data::normalize::{zscore, EUROSAT_STATS};
use sg_tensor::backend::Cpu;
use sg_tensor::rng::Rng;
use sg_tensor::{DType, Eval, Exec, HalfParams, ParamStore};
use sg_vit::{Vit, VitConfig};

#[test]
fn half_weights_match_f32_logits_on_eurosat() {
    let mut cfg = VitConfig::preset("tiny", 64).unwrap();
    cfg.num_classes = 10;
    let mut store = ParamStore::new();
    let model = Vit::new(cfg.clone(), &mut store, 7).unwrap();
    // A head of ordinary scale (the fine-tuning init is 2e-5, which would make every logit ~0).
    let head = model.head.as_ref().unwrap().weight.clone();
    let w = Rng::new(1).xavier(10, cfg.embed_dim);
    store.values_mut(&head).copy_from_slice(&w);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/eurosat-ms");
    let mut tokens = Vec::new();
    let mut n = 0;
    for class in ["Forest", "River", "Industrial"] {
        for e in std::fs::read_dir(dir.join(class)).unwrap() {
            let (mut img, _) = sg_data::eurosat::load_image(&e.unwrap().path()).unwrap();
            zscore(&mut img, &MODEL_BANDS, &EUROSAT_STATS).unwrap();
            tokens.extend(model.tokens(&img, 1).unwrap());
            n += 1;
        }
    }
    let shape = [n, cfg.tokens(), cfg.token_dim()];
    let logits = |e: &mut Eval<Cpu>| {
        let x = e.constant(&tokens, &shape).unwrap();
        let z = model.logits(e, &x).unwrap();
        e.read(&z)
    };
    let full = logits(&mut Eval::new(Cpu, &store));
    let scale = full.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "logits too small to compare: {scale}");
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 2e-2)] {
        let h = HalfParams::from_store(&store, dtype).unwrap();
        assert_eq!(h.bytes(), 2 * store.len());
        let z = logits(&mut Eval::half(Cpu, &h));
        // A NaN counts as the largest difference (`f64::max` would skip it).
        let diff = full.iter().zip(&z).map(|(a, b)| (a - b).abs()).fold(0.0, |m: f64, e| {
            if e.is_nan() {
                f64::INFINITY
            } else {
                m.max(e)
            }
        });
        assert!(diff <= tol * scale, "{dtype:?}: largest logit difference {diff} of {scale}");
        assert!(diff > 0.0, "{dtype:?} weights were not rounded");
    }
    // A half store that does not match the model is an error, not a panic.
    let mut small = ParamStore::new();
    small.add("x", &[4], vec![0.0; 4]).unwrap();
    let h = HalfParams::from_store(&small, DType::F16).unwrap();
    let mut e = Eval::half(Cpu, &h);
    let x = e.constant(&tokens, &shape).unwrap();
    assert!(model.logits(&mut e, &x).is_err());
    assert!(HalfParams::from_store(&store, DType::F32).is_err());
}
