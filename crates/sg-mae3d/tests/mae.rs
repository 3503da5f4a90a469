//! Masking properties, parameter counts of SPEC's sizes, and gradients reaching every parameter.
use proptest::prelude::*;
use sg_autograd::Tape;
use sg_mae3d::masking::kept;
use sg_mae3d::{Mae3d, MaeConfig, Masking};
use sg_tensor::backend::Cpu;
use sg_tensor::{Exec, ParamStore};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn masking_invariants(batch in 1usize..4, len in 1usize..700, ratio in 0.0f64..0.99, seed in any::<u64>()) {
        let m = Masking::random(batch, len, ratio, seed).unwrap();
        let keep = (len as f64 * (1.0 - ratio)) as usize;
        prop_assert_eq!(m.keep, keep);
        for n in 0..batch {
            let sh = &m.ids_shuffle[n * len..(n + 1) * len];
            let re = &m.ids_restore[n * len..(n + 1) * len];
            // ids_restore inverts ids_shuffle.
            for (pos, &tok) in sh.iter().enumerate() {
                prop_assert_eq!(re[tok], pos);
            }
            let ones = m.mask[n * len..(n + 1) * len].iter().filter(|&&v| v == 1.0).count();
            prop_assert_eq!(ones, len - keep);
            for &k in &m.ids_keep[n * keep..(n + 1) * keep] {
                prop_assert_eq!(m.mask[n * len + k], 0.0);
            }
        }
        prop_assert_eq!(Masking::random(batch, len, ratio, seed).unwrap(), m, "the same noise gives the same mask");
    }
}

#[test]
fn spec_masking_counts_and_bad_ratios() {
    assert_eq!(kept(576, 0.9), 57);
    assert_eq!(kept(1024, 0.9), 102);
    assert!(Masking::random(1, 10, 1.0, 0).is_err());
    assert!(Masking::random(1, 10, -0.1, 0).is_err());
    assert!(Masking::from_noise(&[0.1, f32::NAN], 1, 2, 0.5).is_err());
    assert!(Masking::from_noise(&[0.1; 3], 1, 2, 0.5).is_err());
}

#[test]
fn parameter_counts_equal_spec() {
    let count = |name: &str, img: usize| Mae3d::param_count(&MaeConfig::preset(name, img).unwrap());
    assert_eq!(count("base", 96), 98_496_960);
    assert_eq!(count("base", 128), 98_640_320);
    assert_eq!(count("large", 128), 316_142_784);
    assert_eq!(count("huge", 128), 643_759_040);
    // A decoder too large to hold is a config error, not an aborting allocation.
    let mut cfg = MaeConfig::preset("tiny", 96).unwrap();
    cfg.decoder_embed_dim = 1 << 40;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("parameters") && e.contains("decoder"), "{e}");
    assert!(Mae3d::new(cfg, &mut ParamStore::new(), 0).is_err());
    // The count is the one the built model has (base is built: 394 MB of f32).
    for (name, img) in [("tiny", 96), ("base", 96)] {
        let cfg = MaeConfig::preset(name, img).unwrap();
        let mut store = ParamStore::new();
        Mae3d::new(cfg.clone(), &mut store, 0).unwrap();
        assert_eq!(store.len(), Mae3d::param_count(&cfg), "{name}");
    }
}

/// A tiny model at 32 px with two encoder blocks and 75% masking, two images as tokens, and a
/// masking of them: the gradient tests' setup.
fn tiny_pair() -> (MaeConfig, ParamStore, Mae3d, Vec<f32>, Masking) {
    let mut cfg = MaeConfig::preset("tiny", 32).unwrap();
    cfg.encoder.depth = 2;
    cfg.mask_ratio = 0.75;
    let mut store = ParamStore::new();
    let model = Mae3d::new(cfg.clone(), &mut store, 3).unwrap();
    let x: Vec<f32> = (0..2 * 12 * 32 * 32).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let tokens = model.encoder.tokens(&x, 2).unwrap();
    let m = Masking::random(2, cfg.encoder.tokens(), cfg.mask_ratio, 5).unwrap();
    (cfg, store, model, tokens, m)
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let (cfg, store, model, tokens, m) = tiny_pair();
    let (n, l, td) = (2, cfg.encoder.tokens(), cfg.encoder.token_dim());
    let mut tape = Tape::new(Cpu, &store);
    let t = tape.constant(&tokens, &[n, l, td]).unwrap();
    let out = model.forward(&mut tape, &t, &m).unwrap();
    assert!(out.parts.loss.is_finite() && out.parts.loss1 > 0.0 && out.parts.loss3 > 0.0);
    let grads = tape.backward(&out.loss).unwrap();
    for e in store.entries() {
        // The key bias is the one parameter whose gradient is zero in exact arithmetic.
        if e.name.ends_with("attn.k.bias") {
            continue;
        }
        let norm: f64 = grads.buf[e.param.range()].iter().map(|&v| (v as f64).powi(2)).sum();
        assert!(norm > 0.0, "{} gets no gradient", e.name);
    }
}

#[test]
fn reconstructions_become_images() {
    let cfg = MaeConfig::preset("tiny", 16).unwrap();
    let mut store = ParamStore::new();
    let model = Mae3d::new(cfg.clone(), &mut store, 1).unwrap();
    let x: Vec<f32> = (0..2 * 12 * 16 * 16).map(|i| i as f32).collect();
    let tokens = model.encoder.tokens(&x, 2).unwrap();
    assert_eq!(model.images(&tokens, 2).unwrap(), x);
    let m = Masking::random(2, cfg.encoder.tokens(), 0.5, 1).unwrap();
    let masked = model.compose(&tokens, None, &m, -1.0).unwrap();
    let pred = vec![7.0; tokens.len()];
    let pasted = model.compose(&tokens, Some(&pred), &m, 0.0).unwrap();
    let td = cfg.encoder.token_dim();
    for (t, &mv) in m.mask.iter().enumerate() {
        let r = t * td..(t + 1) * td;
        if mv == 1.0 {
            assert!(masked[r.clone()].iter().all(|&v| v == -1.0) && pasted[r].iter().all(|&v| v == 7.0));
        } else {
            assert_eq!(&masked[r.clone()], &tokens[r.clone()]);
            assert_eq!(&pasted[r.clone()], &tokens[r]);
        }
    }
    assert!(model.compose(&tokens[1..], None, &m, 0.0).is_err());
}

/// A pretraining step whose gradients the optimiser folds in during the backward
/// (`Tape::backward_fold`, `AdamW::fold` / `apply`) moves every parameter and moment to the same
/// bits as the step through one flat gradient buffer, frozen parameters included.
#[test]
fn folded_steps_match_flat_steps() {
    use sg_autograd::optim::{weight_decay_groups, AdamW};
    let mut cfg = MaeConfig::preset("tiny", 32).unwrap();
    cfg.encoder.depth = 2;
    let mut store = ParamStore::new();
    let model = Mae3d::new(cfg.clone(), &mut store, 3).unwrap();
    assert!(store.set_trainable("blocks.0.", false) > 0);
    let (n, l, td) = (2, cfg.encoder.tokens(), cfg.encoder.token_dim());
    let new_opt = |s: &ParamStore| AdamW::new(s, weight_decay_groups(s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    let (mut flat, mut folded) = (store.clone(), store.clone());
    let (mut opt_flat, mut opt_fold) = (new_opt(&store), new_opt(&store));
    let mut grads = sg_autograd::Grads::new(&Cpu, &store);
    for step in 0..3u64 {
        let x: Vec<f32> =
            (0..n * 12 * 32 * 32).map(|i| ((i * 7919 + step as usize * 31) % 1000) as f32 / 1e3).collect();
        let tokens = model.encoder.tokens(&x, n).unwrap();
        let m = Masking::random(n, l, cfg.mask_ratio, step).unwrap();
        {
            let mut tape = Tape::new(Cpu, &flat);
            let t = tape.constant(&tokens, &[n, l, td]).unwrap();
            let out = model.forward(&mut tape, &t, &m).unwrap();
            grads.restart();
            tape.backward_into(&out.loss, &mut grads).unwrap();
        }
        grads.zero_unwritten(&Cpu, &flat).unwrap();
        opt_flat.step(&mut flat, &grads.buf, 1e-3).unwrap();
        {
            let mut tape = Tape::new(Cpu, &folded);
            let t = tape.constant(&tokens, &[n, l, td]).unwrap();
            let out = model.forward(&mut tape, &t, &m).unwrap();
            let mut handed = 0;
            tape.backward_fold(&out.loss, &mut |r, g| {
                handed += r.len();
                opt_fold.fold(&folded, r, g)
            })
            .unwrap();
            let trainable: usize = folded.entries().iter().filter(|e| e.trainable).map(|e| e.param.len()).sum();
            assert!(handed >= trainable && handed < folded.len(), "{handed} of {trainable} trainable values");
        }
        // `step` is refused while folded gradients wait for `apply`.
        if step == 0 {
            assert!(opt_fold.step(&mut folded.clone(), &grads.buf, 1e-3).is_err());
        }
        opt_fold.apply(&mut folded, 1e-3).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(flat.data()), bits(folded.data()), "parameters after step {step}");
        assert_eq!(bits(&opt_flat.exp_avg), bits(&opt_fold.exp_avg), "exp_avg after step {step}");
        assert_eq!(bits(&opt_flat.exp_avg_sq), bits(&opt_fold.exp_avg_sq), "exp_avg_sq after step {step}");
    }
    let frozen = store.entries().iter().find(|e| !e.trainable).unwrap();
    assert_eq!(folded.values(&frozen.param), store.values(&frozen.param));
}

/// A batch of two (the decoder's first block then runs q, k, v once per position for the masked
/// tokens, shared by the samples) gives the mean of each sample's loss and gradients computed
/// alone (a batch of one, where every row runs): the losses are means over samples with equal
/// mask counts.
#[test]
fn a_batch_gives_the_mean_of_its_samples() {
    let (cfg, store, model, tokens, m) = tiny_pair();
    let (l, td) = (cfg.encoder.tokens(), cfg.encoder.token_dim());
    let run = |tokens: &[f32], m: &Masking| {
        let mut tape = Tape::new(Cpu, &store);
        let t = tape.constant(tokens, &[m.batch, l, td]).unwrap();
        let out = model.forward(&mut tape, &t, m).unwrap();
        let pred = tape.read(&out.pred);
        (out.parts.loss, pred, tape.backward(&out.loss).unwrap().buf.to_vec())
    };
    let (loss, pred, grads) = run(&tokens, &m);
    let mut singles = Vec::new();
    for s in 0..2 {
        let k = m.keep;
        let one = Masking {
            batch: 1,
            len: l,
            keep: k,
            ids_shuffle: m.ids_shuffle[s * l..(s + 1) * l].to_vec(),
            ids_restore: m.ids_restore[s * l..(s + 1) * l].to_vec(),
            ids_keep: m.ids_keep[s * k..(s + 1) * k].to_vec(),
            mask: m.mask[s * l..(s + 1) * l].to_vec(),
        };
        singles.push(run(&tokens[s * l * td..(s + 1) * l * td], &one));
    }
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
    close(loss, (singles[0].0 + singles[1].0) / 2.0, "loss");
    for (i, &p) in pred.iter().enumerate() {
        close(p, singles[i / (l * td)].1[i % (l * td)], "pred");
    }
    let scale = grads.iter().fold(0f32, |a, g| a.max(g.abs()));
    for (i, &g) in grads.iter().enumerate() {
        let want = (singles[0].2[i] + singles[1].2[i]) / 2.0;
        assert!((g - want).abs() <= 1e-4 * scale, "gradient {i}: {g} vs {want} (largest {scale})");
    }
}
