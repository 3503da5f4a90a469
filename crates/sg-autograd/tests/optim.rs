//! Optimisers, schedules and clipping against values worked out by hand from PyTorch's formulas.
use sg_autograd::optim::{
    apply_layer_decay, clip_grad_norm, layer_id, weight_decay_groups, AdamW, CosineSchedule, Sgd,
};
use sg_tensor::ParamStore;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

fn store() -> ParamStore {
    let mut s = ParamStore::new();
    s.add("blocks.0.attn.q.weight", &[2, 2], vec![1.0; 4]).unwrap();
    s.add("blocks.0.attn.q.bias", &[2], vec![1.0; 2]).unwrap();
    s.add("norm.weight", &[2], vec![1.0; 2]).unwrap();
    s
}

#[test]
fn adamw_decays_weights_but_not_biases_or_norms() {
    let mut s = store();
    let groups = weight_decay_groups(&s, 0.1, &[]);
    assert_eq!(groups.iter().map(|g| g.weight_decay).collect::<Vec<_>>(), vec![0.1, 0.0, 0.0]);
    let mut opt = AdamW::new(&s, groups, 0.9, 0.95, 1e-8).unwrap();
    let grads = vec![1.0; s.len()];
    opt.step(&mut s, &grads, 0.1).unwrap();
    // Weight: 1 * (1 - 0.1 * 0.1) = 0.99; m_hat = 1, sqrt(v_hat) = 1: 0.99 - 0.1 = 0.89.
    // Bias and norm: no decay: 1 - 0.1 = 0.9.
    let d = s.data();
    assert!(d[..4].iter().all(|&v| close(v, 0.89)), "{d:?}");
    assert!(d[4..].iter().all(|&v| close(v, 0.9)), "{d:?}");
    // Step 2 with gradient 0.5: m = 0.9*0.1 + 0.1*0.5 = 0.14, v = 0.95*0.05 + 0.05*0.25 = 0.06,
    // m_hat = 0.14/0.19, sqrt(v_hat) = sqrt(0.06/0.0975); bias: 0.9 - 0.1 * m_hat / sqrt(v_hat).
    {
        let g = vec![0.5; s.len()];
        opt.step(&mut s, &g, 0.1)
    }
    .unwrap();
    let want = 0.9 - 0.1 * (0.14f64 / 0.19) / ((0.06f64 / 0.0975).sqrt() + 1e-8);
    assert!(close(s.data()[4], want as f32), "{} vs {want}", s.data()[4]);
}

#[test]
fn frozen_parameters_do_not_move() {
    let mut s = store();
    s.set_trainable("blocks.0", false);
    let mut opt = AdamW::new(&s, weight_decay_groups(&s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    {
        let g = vec![1.0; s.len()];
        opt.step(&mut s, &g, 0.1)
    }
    .unwrap();
    assert!(s.data()[..6].iter().all(|&v| v == 1.0));
    assert!(s.data()[6..].iter().all(|&v| v != 1.0));
}

#[test]
fn layer_wise_lr_decay_follows_beit() {
    let mut s = ParamStore::new();
    for (n, shape) in [
        ("pos_embed", vec![1, 4, 2]),
        ("patch_embed.proj.weight", vec![2, 3]),
        ("blocks.0.norm1.weight", vec![2]),
        ("blocks.1.mlp.fc1.weight", vec![2, 2]),
        ("norm.weight", vec![2]),
        ("head.weight", vec![3, 2]),
    ] {
        let n_el = shape.iter().product();
        s.add(n, &shape, vec![0.0; n_el]).unwrap();
    }
    assert_eq!(layer_id("blocks.11.attn.q.weight", 12), 12);
    assert_eq!(layer_id("fc_norm.weight", 12), 13);
    let mut g = weight_decay_groups(&s, 0.05, &[]);
    apply_layer_decay(&s, &mut g, 2, 0.5);
    let scales: Vec<f32> = g.iter().map(|g| g.lr_scale).collect();
    assert_eq!(scales, vec![0.125, 0.125, 0.25, 0.5, 1.0, 1.0]);
}

#[test]
fn warmup_then_half_cosine() {
    let s = CosineSchedule { base_lr: 1.0, min_lr: 0.1, warmup_steps: 10, total_steps: 110 };
    let lr: Vec<f64> = [0, 5, 10, 60, 110, 500].iter().map(|&t| s.lr(t)).collect();
    let want = [0.0, 0.5, 1.0, 0.55, 0.1, 0.1];
    for (a, b) in lr.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{lr:?}");
    }
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let mut s = ParamStore::new();
    s.add("a", &[2], vec![0.0; 2]).unwrap();
    let mut g = vec![3.0, 4.0];
    let n = clip_grad_norm(&s, &mut g, 1.0).unwrap();
    assert_eq!(n, 5.0);
    assert!(close(g[0], 0.6) && close(g[1], 0.8), "{g:?}");
    let mut small = vec![0.3, 0.4];
    clip_grad_norm(&s, &mut small, 1.0).unwrap();
    assert_eq!(small, vec![0.3, 0.4], "under the limit: untouched");
}

#[test]
fn sgd_momentum_as_pytorch() {
    let mut s = ParamStore::new();
    s.add("p", &[1], vec![1.0]).unwrap();
    let g = weight_decay_groups(&s, 0.0, &[]);
    let mut opt = Sgd::new(&s, g.clone(), 0.9, false).unwrap();
    opt.step(&mut s, &[1.0], 0.1).unwrap();
    assert!(close(s.data()[0], 0.9));
    opt.step(&mut s, &[1.0], 0.1).unwrap();
    assert!(close(s.data()[0], 0.71), "buf = 0.9 + 1 = 1.9: {}", s.data()[0]);
    let mut s2 = ParamStore::new();
    s2.add("p", &[1], vec![1.0]).unwrap();
    let mut nest = Sgd::new(&s2, g, 0.9, true).unwrap();
    nest.step(&mut s2, &[1.0], 0.1).unwrap();
    assert!(close(s2.data()[0], 0.81));
}

#[test]
fn adamw_state_round_trips_exactly() {
    let tmp = tempfile::Builder::new().prefix("sg-optim-").tempdir().unwrap();
    let dir = tmp.path();
    let mut a = store();
    let mut oa = AdamW::new(&a, weight_decay_groups(&a, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    for i in 0..3 {
        {
            let g = vec![0.1 * i as f32 + 0.2; a.len()];
            oa.step(&mut a, &g, 1e-2)
        }
        .unwrap();
    }
    oa.save(dir.join("opt.safetensors"), &a).unwrap();
    let mut b = a.clone();
    let mut ob = AdamW::new(&b, weight_decay_groups(&b, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    ob.load(dir.join("opt.safetensors"), &b).unwrap();
    assert_eq!(ob.step, 3);
    {
        let g = vec![0.7; a.len()];
        oa.step(&mut a, &g, 1e-2)
    }
    .unwrap();
    {
        let g = vec![0.7; b.len()];
        ob.step(&mut b, &g, 1e-2)
    }
    .unwrap();
    assert_eq!(a.data(), b.data(), "resumed optimiser diverged");
    // A state of another model is refused with the name of the tensor.
    let mut other = ParamStore::new();
    other.add("x", &[3], vec![0.0; 3]).unwrap();
    let mut oo = AdamW::new(&other, weight_decay_groups(&other, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    let e = oo.load(dir.join("opt.safetensors"), &other).unwrap_err().to_string();
    assert!(e.contains("exp_avg.x"), "{e}");
}

#[test]
fn mismatched_layouts_are_errors() {
    let mut s = store();
    let mut opt = AdamW::new(&s, weight_decay_groups(&s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    assert!(opt.step(&mut s, &[0.0; 3], 0.1).is_err());
    assert!(AdamW::new(&s, vec![], 0.9, 0.95, 1e-8).is_err());
}

#[test]
fn smoothed_and_mixed_targets() {
    use sg_autograd::targets::{mix, smoothed};
    let t = smoothed(&[1, 0], 4, 0.1).unwrap();
    let want = [0.025, 0.925, 0.025, 0.025, 0.925, 0.025, 0.025, 0.025];
    assert!(t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-7), "{t:?}");
    assert!(smoothed(&[4], 4, 0.1).is_err());
    let m = mix(&smoothed(&[0], 2, 0.0).unwrap(), &smoothed(&[1], 2, 0.0).unwrap(), 0.7).unwrap();
    assert!((m[0] - 0.7).abs() < 1e-7 && (m[1] - 0.3).abs() < 1e-7);
}

#[test]
fn checkpoint_directory_round_trip_and_torn_saves() {
    use sg_autograd::checkpoint;
    use std::collections::HashMap;
    let tmp = tempfile::Builder::new().prefix("sg-ckpt-").tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let mut s = store();
    let mut o = AdamW::new(&s, weight_decay_groups(&s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    let g = vec![0.3; s.len()];
    o.step(&mut s, &g, 1e-2).unwrap();
    let extra = HashMap::from([("epoch".to_string(), "0".to_string())]);
    checkpoint::save(&dir, &s, Some(&o), "{\"embed_dim\": 2}", 1, &extra).unwrap();
    let mut s2 = store();
    let mut o2 = AdamW::new(&s2, weight_decay_groups(&s2, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    let l = checkpoint::load(&dir, &mut s2, Some(&mut o2)).unwrap();
    assert_eq!((l.step, l.config_json.as_str(), l.metadata["epoch"].as_str()), (1, "{\"embed_dim\": 2}", "0"));
    assert_eq!(s2.data(), s.data());
    assert_eq!(o2.exp_avg_sq, o.exp_avg_sq);
    // A save interrupted after the optimiser file: parameters and optimiser disagree on the step.
    o.step(&mut s, &g, 1e-2).unwrap();
    o.save(dir.join(checkpoint::OPTIMIZER), &s).unwrap();
    let e = checkpoint::load(&dir, &mut s2, Some(&mut o2)).unwrap_err().to_string();
    assert!(e.contains("interrupted"), "{e}");
}

/// `Tape::backward_fold` with `AdamW::fold` / `apply` against the flat path, on a graph where one
/// weight is written by two ops through different spans (a fused concat and the weight alone), one
/// parameter is frozen and one is never reached: same bits for parameters and moments, and the
/// shared weight's gradient is handed over once, after both of its writers.
#[test]
fn folded_gradients_match_the_flat_buffer() {
    use sg_autograd::{Grads, Tape};
    use sg_tensor::backend::Cpu;
    use sg_tensor::kernels::linear::Activation;
    use sg_tensor::Exec;
    let mut s = ParamStore::new();
    let v = |n: usize, k: usize| (0..n).map(|i| ((i * 37 + k) % 17) as f32 / 17.0 - 0.5).collect::<Vec<f32>>();
    let aw = s.add("a.weight", &[3, 4], v(12, 1)).unwrap();
    let bw = s.add("b.weight", &[3, 4], v(12, 2)).unwrap();
    let ab = s.add("a.bias", &[3], v(3, 3)).unwrap();
    let bb = s.add("b.bias", &[3], v(3, 4)).unwrap();
    s.add("unused.weight", &[2, 1], v(2, 5)).unwrap();
    let fw = s.add("frozen.weight", &[3, 4], v(12, 6)).unwrap();
    s.set_trainable("frozen", false);
    let (wab, bab) = (s.concat(&[&aw, &bw]).unwrap(), s.concat(&[&ab, &bb]).unwrap());
    let new_opt = |s: &ParamStore| AdamW::new(s, weight_decay_groups(s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    let (mut flat, mut folded) = (s.clone(), s.clone());
    let (mut opt_flat, mut opt_fold) = (new_opt(&s), new_opt(&s));
    let mut grads = Grads::new(&Cpu, &s);
    let x = v(8, 7);
    let mut targets = vec![0.0; 2 * 12];
    targets[5] = 1.0;
    targets[12 + 9] = 1.0;
    let forward = |e: &mut Tape<Cpu>| {
        let x = e.constant(&x, &[2, 4]).unwrap();
        let h1 = e.linear(&x, &wab, Some(&bab), Activation::Gelu).unwrap();
        let h2 = e.linear(&x, &aw, Some(&ab), Activation::Identity).unwrap();
        let h3 = e.linear(&x, &fw, None, Activation::Identity).unwrap();
        let y = e.concat(&[&h1, &h2, &h3], 1).unwrap();
        e.cross_entropy(&y, &targets).unwrap().0
    };
    for step in 0..2 {
        let mut tape = Tape::new(Cpu, &flat);
        let loss = forward(&mut tape);
        grads.restart();
        tape.backward_into(&loss, &mut grads).unwrap();
        grads.zero_unwritten(&Cpu, &flat).unwrap();
        opt_flat.step(&mut flat, &grads.buf, 0.1).unwrap();

        let mut tape = Tape::new(Cpu, &folded);
        let loss = forward(&mut tape);
        let mut handed = Vec::new();
        tape.backward_fold(&loss, &mut |r, g| {
            handed.push(r.clone());
            opt_fold.fold(&folded, r, g)
        })
        .unwrap();
        // One window: the shared weight's two writers merged it with everything between.
        assert_eq!(handed, vec![aw.offset..bb.offset + 3], "step {step}");
        opt_fold.apply(&mut folded, 0.1).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(flat.data()), bits(folded.data()), "step {step}");
        assert_eq!(bits(&opt_flat.exp_avg), bits(&opt_fold.exp_avg), "step {step}");
        assert_eq!(bits(&opt_flat.exp_avg_sq), bits(&opt_fold.exp_avg_sq), "step {step}");
    }
    // The unreached weight decayed; the frozen one did not move.
    assert_ne!(folded.values(&folded.find("unused.weight").unwrap()), s.values(&s.find("unused.weight").unwrap()));
    assert_eq!(folded.values(&fw), s.values(&fw));
}

#[test]
fn fold_rejects_bad_ranges_and_double_folds() {
    let mut s = store();
    let mut opt = AdamW::new(&s, weight_decay_groups(&s, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    // The q weight is values 0..4: a range ending inside it cuts it.
    let e = opt.fold(&s, 0..2, &[1.0; 2]).unwrap_err().to_string();
    assert!(e.contains("cuts parameter `blocks.0.attn.q.weight`"), "{e}");
    let e = opt.fold(&s, 0..4, &[1.0; 3]).unwrap_err().to_string();
    assert!(e.contains("3 values for range 0..4"), "{e}");
    let e = opt.fold(&s, 0..9, &[1.0; 9]).unwrap_err().to_string();
    assert!(e.contains("of 8"), "{e}");
    opt.fold(&s, 0..4, &[1.0; 4]).unwrap();
    let e = opt.fold(&s, 0..6, &[1.0; 6]).unwrap_err().to_string();
    assert!(e.contains("folded twice"), "{e}");
    // Folding the rest and applying equals one step with that gradient.
    opt.fold(&s, 4..8, &[1.0; 4]).unwrap();
    opt.apply(&mut s, 0.1).unwrap();
    let mut want = store();
    let mut o2 = AdamW::new(&want, weight_decay_groups(&want, 0.05, &[]), 0.9, 0.95, 1e-8).unwrap();
    o2.step(&mut want, &[1.0; 8], 0.1).unwrap();
    assert_eq!(s.data(), want.data());
}
