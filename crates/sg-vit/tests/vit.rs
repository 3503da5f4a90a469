//! Tokenisation properties, configuration errors and parameter counts.
use proptest::prelude::*;
use sg_tensor::backend::Cpu;
use sg_tensor::{Eval, Exec, ParamStore};
use sg_vit::config::{parse_json, PosEmbed, VitConfig};
use sg_vit::tokens::{patchify, unpatchify, TokenGeometry};
use sg_vit::Vit;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn unpatchify_inverts_patchify(n in 1usize..3, t in 1usize..4, u in 1usize..4, h in 1usize..4, w in 1usize..4, p in 1usize..5, seed in any::<u32>()) {
        let g = TokenGeometry::new(n, t * u, h * p, w * p, p, u).unwrap();
        let x: Vec<f32> = (0..g.image_len()).map(|i| (i as u32 ^ seed) as f32).collect();
        let tok = patchify(&x, &g).unwrap();
        prop_assert_eq!(unpatchify(&tok, &g).unwrap(), x);
    }

    #[test]
    fn token_layout_is_the_originals(t in 1usize..3, u in 1usize..4, h in 1usize..3, w in 1usize..4, p in 1usize..4) {
        // Feature a*p*p + r*p + c of token g*h*w + i*w + j is band u*g + a at pixel (p*i + r, p*j + c).
        let (bands, hh, ww) = (t * u, h * p, w * p);
        let g = TokenGeometry::new(1, bands, hh, ww, p, u).unwrap();
        let x: Vec<f32> = (0..g.image_len()).map(|i| i as f32).collect();
        let tok = patchify(&x, &g).unwrap();
        let td = u * p * p;
        for gi in 0..t { for i in 0..h { for j in 0..w { for a in 0..u { for r in 0..p { for c in 0..p {
            let k = gi * h * w + i * w + j;
            let px = ((u * gi + a) * hh + p * i + r) * ww + p * j + c;
            prop_assert_eq!(tok[k * td + a * p * p + r * p + c], x[px]);
        }}}}}}
    }
}

#[test]
fn bad_geometry_and_configs_are_named() {
    let e = TokenGeometry::new(1, 12, 30, 32, 8, 3).unwrap_err().to_string();
    assert!(e.contains("30x32") && e.contains("patch size 8"), "{e}");
    let e = TokenGeometry::new(1, 13, 32, 32, 8, 3).unwrap_err().to_string();
    assert!(e.contains("13 bands"), "{e}");
    let mut c = VitConfig::preset("tiny", 96).unwrap();
    let e = c.update_from_json(&parse_json(r#"{"embed_dim": 100, "num_heads": 3}"#, "x").unwrap()).unwrap_err();
    assert!(e.to_string().contains("does not split into 3 heads"), "{e}");
    let e = c.update_from_json(&parse_json(r#"{"img_size": "big"}"#, "x").unwrap()).unwrap_err();
    assert!(e.to_string().contains("img_size"), "{e}");
    assert!(parse_json("{not json", "cfg.json").unwrap_err().to_string().contains("cfg.json"));
    assert!(VitConfig::preset("enormous", 96).is_err());
    // Sizes that would overflow or exhaust memory are errors naming them, before any allocation.
    for (json, says) in [
        (r#"{"embed_dim": 3298534883328, "num_heads": 3}"#, "parameters"),
        (r#"{"depth": 1000000000000}"#, "parameters"),
        (r#"{"mlp_ratio": 1e300}"#, "parameters"),
        (r#"{"img_size": [800000, 800000]}"#, "tokens per image"),
    ] {
        let mut c = VitConfig::preset("tiny", 96).unwrap();
        let e = c.update_from_json(&parse_json(json, "x").unwrap()).unwrap_err().to_string();
        assert!(e.contains(says), "{json}: {e}");
    }
    let mut c = VitConfig::preset("tiny", 96).unwrap();
    c.depth = usize::MAX;
    assert!(Vit::new(c, &mut ParamStore::new(), 0).unwrap_err().to_string().contains("parameters"));
    // Non-square images and other band counts are fine.
    let mut c = VitConfig::preset("tiny", 96).unwrap();
    c.update_from_json(&parse_json(r#"{"img_size": [64, 128], "bands": 102, "t_patch_size": 6}"#, "x").unwrap())
        .unwrap();
    assert_eq!(c.grid(), (17, 8, 16));
}

#[test]
fn wrong_sizes_and_non_finite_pixels_are_errors() {
    let cfg = VitConfig::preset("tiny", 16).unwrap();
    let mut store = ParamStore::new();
    let vit = Vit::new(cfg, &mut store, 1).unwrap();
    let e = vit.tokens(&vec![0.0; 12 * 16 * 15], 1).unwrap_err().to_string();
    assert!(e.contains("not 1 images of 12 bands x 16x16"), "{e}");
    let mut x = vec![0.5; 12 * 16 * 16];
    x[5 * 256 + 3] = f32::NAN;
    let e = vit.tokens(&x, 1).unwrap_err().to_string();
    assert!(e.contains("image 0 band 5") && e.contains("non-finite"), "{e}");
}

#[test]
fn parameter_counts_match_the_built_models() {
    for (name, img, joined, classes) in [("tiny", 96, false, 0), ("tiny", 64, true, 10), ("base", 128, true, 19)] {
        let mut cfg = VitConfig::preset(name, img).unwrap();
        cfg.num_classes = classes;
        if joined {
            cfg.pos_embed = PosEmbed::Joined;
        }
        let mut store = ParamStore::new();
        Vit::new(cfg.clone(), &mut store, 0).unwrap();
        assert_eq!(store.len(), Vit::param_count(&cfg), "{name} {img}");
    }
    // The encoder of base at 96 px (SPEC: 85.3M).
    assert_eq!(Vit::param_count(&VitConfig::preset("base", 96).unwrap()), 85_317_888);
}

#[test]
fn classifier_runs_on_the_inference_executor() {
    let mut cfg = VitConfig::preset("tiny", 16).unwrap();
    cfg.num_classes = 4;
    let mut store = ParamStore::new();
    let vit = Vit::new(cfg.clone(), &mut store, 7).unwrap();
    let x: Vec<f32> = (0..2 * 12 * 256).map(|i| (i % 17) as f32 / 17.0).collect();
    let tokens = vit.tokens(&x, 2).unwrap();
    let mut e = Eval::new(Cpu, &store);
    let t = e.constant(&tokens, &[2, cfg.tokens(), cfg.token_dim()]).unwrap();
    let logits = vit.logits(&mut e, &t).unwrap();
    assert_eq!(logits.shape, vec![2, 4]);
    assert!(e.read(&logits).iter().all(|v| v.is_finite()));
    let emb = vit.embedding(&mut e, &t).unwrap();
    assert_eq!(emb.shape, vec![2, 192]);
}

#[test]
fn packed_weights_give_the_same_logits_and_serve_only_linear_layers() {
    let mut cfg = VitConfig::preset("tiny", 16).unwrap();
    cfg.num_classes = 4;
    let mut store = ParamStore::new();
    let vit = Vit::new(cfg.clone(), &mut store, 7).unwrap();
    let x: Vec<f32> = (0..2 * 12 * 256).map(|i| (i % 17) as f32 / 17.0 - 0.3).collect();
    let tokens = vit.tokens(&x, 2).unwrap();
    let shape = [2, cfg.tokens(), cfg.token_dim()];
    let mut e = Eval::new(Cpu, &store);
    let t = e.constant(&tokens, &shape).unwrap();
    let z = vit.logits(&mut e, &t).unwrap();
    let want = e.read(&z);
    drop(e);

    let weights = vit.linear_weights();
    // Patch embedding, four per block, the head.
    assert_eq!(weights.len(), 2 + 4 * cfg.depth);
    let mut p = Eval::packed(Cpu, store, &weights).unwrap();
    if sg_tensor::kernels::gemm::reads_panels() {
        // All but the 4-class head (not a multiple of 16 wide) are rearranged.
        assert_eq!(p.packed_weights(), 1 + 4 * cfg.depth);
    } else {
        assert_eq!(p.packed_weights(), 0);
    }
    let t = p.constant(&tokens, &shape).unwrap();
    let z = vit.logits(&mut p, &t).unwrap();
    let got = p.read(&z);
    assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "{got:?} vs {want:?}");
    if p.packed_weights() > 0 {
        // A packed weight read as a plain parameter would be scrambled: an error instead.
        let e = p.param(&vit.blocks[0].fc1.weight).unwrap_err();
        assert!(e.to_string().contains("packed for Linear layers only"), "{e}");
    }
}
