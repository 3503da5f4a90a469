//! The dense-prediction model: shapes, original parameter names, gradients reaching every trained
//! parameter, and a loss that falls when training a few steps (segmentation and change).

use sg_autograd::optim::{weight_decay_groups, AdamW};
use sg_autograd::Tape;
use sg_heads::{DenseConfig, NormKind, UperNet};
use sg_tensor::backend::Cpu;
use sg_tensor::rng::Rng;
use sg_tensor::{Eval, Exec, ParamStore};
use sg_vit::VitConfig;

fn config(img: usize, norm: NormKind) -> DenseConfig {
    let mut enc = VitConfig::preset("tiny", img).unwrap();
    enc.embed_dim = 32;
    enc.depth = 1;
    enc.num_heads = 2;
    let mut c = DenseConfig::new(enc, 3);
    (c.channels, c.fpn, c.norm, c.dropout) = (128, 16, norm, 0.0);
    c
}

/// Images with a bright square whose pixels are class 1, a dark stripe class 2, the rest class 0.
fn scene(n: usize, s: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let (mut img, mut lab) = (vec![0f32; n * 12 * s * s], vec![0usize; n * s * s]);
    for i in 0..n {
        let (y0, x0) = (rng.below(s / 2), rng.below(s / 2));
        let stripe = rng.below(s - 4);
        for y in 0..s {
            for x in 0..s {
                let class = if (y0..y0 + s / 3).contains(&y) && (x0..x0 + s / 3).contains(&x) {
                    1
                } else if (stripe..stripe + 4).contains(&x) {
                    2
                } else {
                    0
                };
                lab[(i * s + y) * s + x] = class;
                for b in 0..12 {
                    let v = [0.3, 0.9, 0.05][class] + 0.05 * rng.normal() as f32 + 0.02 * b as f32;
                    img[((i * 12 + b) * s + y) * s + x] = v;
                }
            }
        }
    }
    (img, lab)
}

#[test]
fn original_names_and_shapes() {
    let mut enc = VitConfig::preset("base", 128).unwrap();
    enc.depth = 1;
    let cfg = DenseConfig::new(enc, 13);
    let mut store = ParamStore::new();
    UperNet::new(cfg, &mut store, 0).unwrap();
    let shape = |n: &str| store.get(n).unwrap_or_else(|| panic!("no {n}")).param.shape.clone();
    assert_eq!(shape("fc.0.weight"), [1, 4]);
    assert_eq!(shape("conv0.0.weight"), [512, 768, 1, 1]);
    assert_eq!(shape("conv0.1.weight"), [512]);
    assert_eq!(shape("conv0.3.weight"), [512, 256, 8, 8]);
    assert_eq!(shape("conv2.3.weight"), [1024, 1024, 2, 2]);
    assert_eq!(shape("conv3.0.weight"), [2048, 768, 1, 1]);
    assert!(store.get("conv3.3.weight").is_none());
    assert_eq!(shape("decoder.PPMHead.psp_modules.3.1.weight"), [256, 2048, 1, 1]);
    assert_eq!(shape("decoder.PPMHead.final.0.weight"), [256, 2048 + 4 * 256, 1, 1]);
    assert_eq!(shape("decoder.Conv_fuse1.0.weight"), [256, 1024, 1, 1]);
    assert_eq!(shape("decoder.Conv_fuse3.0.weight"), [256, 256, 1, 1]);
    assert_eq!(shape("decoder.fuse_all.0.weight"), [256, 1024, 1, 1]);
    assert_eq!(shape("decoder.conv_x1.weight"), [256, 256, 1, 1]);
    assert_eq!(shape("cls_seg.0.weight"), [13, 256, 3, 3]);
    // Bad configurations are errors that say why.
    let mut bad = config(48, NormKind::Group);
    bad.channels = 100;
    assert!(UperNet::new(bad, &mut ParamStore::new(), 0).unwrap_err().to_string().contains("multiple of 128"));
    let small = config(40, NormKind::Group);
    assert!(UperNet::new(small, &mut ParamStore::new(), 0).unwrap_err().to_string().contains("6x6"));
}

#[test]
fn every_trained_parameter_gets_a_gradient_and_outputs_have_image_size() {
    for norm in [NormKind::Group, NormKind::Batch] {
        let cfg = config(48, norm);
        let mut store = ParamStore::new();
        let model = UperNet::new(cfg.clone(), &mut store, 1).unwrap();
        let (img, lab) = scene(2, 48, 3);
        let tokens = model.tokens(&img, 2).unwrap();
        let shape = [2, cfg.encoder.tokens(), cfg.encoder.token_dim()];
        let mut tape = Tape::new(Cpu, &store);
        let t = tape.constant(&tokens, &shape).unwrap();
        let logits = model.segment(&mut tape, &t).unwrap();
        assert_eq!(logits.shape, [2, 3, 48, 48]);
        let (loss, l) = UperNet::pixel_loss(&mut tape, &logits, &lab, &[], 255).unwrap();
        assert!(l.is_finite() && l > 0.5, "{l}");
        let running = tape.take_running_stats();
        assert_eq!(running.is_empty(), norm == NormKind::Group);
        let grads = tape.backward(&loss).unwrap();
        for (e, &w) in store.entries().iter().zip(grads.written()) {
            let trained = !e.name.starts_with("norm.") && !e.name.contains("running_");
            assert_eq!(e.trainable, trained, "{}", e.name);
            assert_eq!(w, trained, "{} gradient written", e.name);
        }
        // Change detection: two dates through the same encoder.
        let mut e = Eval::new(Cpu, &store);
        let a = e.constant(&tokens, &shape).unwrap();
        let (img2, _) = scene(2, 48, 4);
        let b = e.constant(&model.tokens(&img2, 2).unwrap(), &shape).unwrap();
        assert_eq!(model.change(&mut e, &a, &b).unwrap().shape, [2, 3, 48, 48]);
        // Wrong label counts are errors.
        assert!(UperNet::pixel_loss(&mut e, &a, &lab, &[], 255).is_err());
    }
}

/// A training loss: segmentation of the first date on even steps, change detection between the
/// two dates on odd ones (weighted NLL: the rarer classes weigh more; label 255 is ignored).
fn task_loss(
    model: &UperNet,
    tape: &mut Tape<Cpu>,
    step: usize,
    (ta, tb): (&[f32], &[f32]),
    shape: &[usize],
    lab: &[usize],
) -> (sg_tensor::exec::Value<Cpu>, f64) {
    let t = tape.constant(ta, shape).unwrap();
    if step % 2 == 0 {
        let z = model.segment(tape, &t).unwrap();
        UperNet::pixel_loss(tape, &z, lab, &[], 255).unwrap()
    } else {
        let u = tape.constant(tb, shape).unwrap();
        let z = model.change(tape, &t, &u).unwrap();
        let mut lab2 = lab.to_vec();
        lab2[0] = 255;
        UperNet::pixel_loss(tape, &z, &lab2, &[0.5, 2.0, 2.0], 255).unwrap()
    }
}

#[test]
fn segmentation_and_change_losses_fall() {
    let cfg = config(48, NormKind::Group);
    let mut store = ParamStore::new();
    let model = UperNet::new(cfg.clone(), &mut store, 2).unwrap();
    let groups = weight_decay_groups(&store, 0.05, &[]);
    let mut opt = AdamW::new(&store, groups, 0.9, 0.999, 1e-8).unwrap();
    let (img, lab) = scene(2, 48, 5);
    let (img2, _) = scene(2, 48, 6);
    let shape = [2, cfg.encoder.tokens(), cfg.encoder.token_dim()];
    let (ta, tb) = (model.tokens(&img, 2).unwrap(), model.tokens(&img2, 2).unwrap());
    let mut seg = Vec::new();
    let mut chg = Vec::new();
    for step in 0..12 {
        let mut tape = Tape::new(Cpu, &store);
        let (loss, l) = task_loss(&model, &mut tape, step, (&ta, &tb), &shape, &lab);
        if step % 2 == 0 { &mut seg } else { &mut chg }.push(l);
        let g = tape.backward(&loss).unwrap();
        opt.step(&mut store, &g.buf, 2e-3).unwrap();
    }
    assert!(seg[5] < 0.7 * seg[0], "segmentation loss {seg:?}");
    assert!(chg[5] < 0.7 * chg[0], "change loss {chg:?}");
}

/// Steps whose gradients AdamW folds in during the backward (`Tape::backward_fold`) move the dense
/// model's parameters, moments and BatchNorm statistics to the same bits as steps over a full
/// gradient: convolutions, transposed convolutions (weight and bias written separately), group and
/// batch norms, segmentation and change detection.
#[test]
fn folded_steps_match_flat_steps() {
    for norm in [NormKind::Group, NormKind::Batch] {
        let cfg = config(48, norm);
        let mut store = ParamStore::new();
        let model = UperNet::new(cfg.clone(), &mut store, 4).unwrap();
        let new_opt = |s: &ParamStore| AdamW::new(s, weight_decay_groups(s, 0.05, &[]), 0.9, 0.999, 1e-8).unwrap();
        let (mut flat, mut folded) = (store.clone(), store.clone());
        let (mut opt_flat, mut opt_fold) = (new_opt(&store), new_opt(&store));
        let (img, lab) = scene(2, 48, 7);
        let (img2, _) = scene(2, 48, 8);
        let shape = [2, cfg.encoder.tokens(), cfg.encoder.token_dim()];
        let (ta, tb) = (model.tokens(&img, 2).unwrap(), model.tokens(&img2, 2).unwrap());
        for step in 0..4usize {
            for fold in [false, true] {
                let s = if fold { &mut folded } else { &mut flat };
                let mut tape = Tape::new(Cpu, s).with_seed(step as u64);
                let (loss, _) = task_loss(&model, &mut tape, step, (&ta, &tb), &shape, &lab);
                let running = tape.take_running_stats();
                if fold {
                    tape.backward_fold(&loss, &mut |r, g| opt_fold.fold(s, r, g)).unwrap();
                    opt_fold.apply(s, 2e-3).unwrap();
                } else {
                    let g = tape.backward(&loss).unwrap();
                    opt_flat.step(s, &g.buf, 2e-3).unwrap();
                }
                for (p, v) in running {
                    s.values_mut(&p).copy_from_slice(&v);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(flat.data()), bits(folded.data()), "{norm:?} parameters, step {step}");
            assert_eq!(bits(&opt_flat.exp_avg), bits(&opt_fold.exp_avg), "{norm:?} exp_avg, step {step}");
            assert_eq!(bits(&opt_flat.exp_avg_sq), bits(&opt_fold.exp_avg_sq), "{norm:?} exp_avg_sq, step {step}");
        }
    }
}
