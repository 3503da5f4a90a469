//! Fine-tuning and evaluation of the classification tasks on the bundled samples.
mod common;
use common::{args, tmp};
fn history_losses(out: &std::path::Path) -> Vec<f64> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    m["history"].as_array().unwrap().iter().map(|h| h["train_loss"].as_f64().unwrap()).collect()
}

#[test]
fn eurosat_finetunes_and_evaluates() {
    let (_out_dir, out) = tmp("ft-eurosat");
    let o = out.display().to_string();
    let m = xtask::finetune::finetune(&args(&[
        "--task", "eurosat", "--epochs", "12", "--batch", "5", "--blr", "0.2", "--out", &o,
    ]))
    .unwrap();
    let acc = m["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(m["confusion"].as_array().unwrap().len(), 10);
    let losses = history_losses(&out);
    assert!(losses[losses.len() - 3..].iter().sum::<f64>() / 3.0 < losses[0], "{losses:?}");
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/eurosat-ms");
    let e = xtask::finetune::eval(&args(&[
        "--task",
        "eurosat",
        "--checkpoint",
        &o,
        "--data",
        fx.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(e["accuracy"], m["accuracy"], "eval on the same split reproduces the final validation accuracy");
    let all = xtask::finetune::eval(&args(&[
        "--task",
        "eurosat",
        "--checkpoint",
        &o,
        "--data",
        fx.to_str().unwrap(),
        "--split",
        "all",
    ]))
    .unwrap();
    assert_eq!(all["samples"], 20);
}

#[test]
fn bigearthnet_multilabel_finetunes_from_a_pretraining_checkpoint() {
    let (_pre_dir, pre) = tmp("ft-pre");
    xtask::pretrain::run(
        &xtask::pretrain::Options::parse(&args(&[
            "--steps",
            "2",
            "--img",
            "32",
            "--quiet",
            "--out",
            pre.to_str().unwrap(),
        ]))
        .unwrap(),
    )
    .unwrap();
    let (_out_dir, out) = tmp("ft-ben");
    let m = xtask::finetune::finetune(&args(&[
        "--task",
        "bigearthnet",
        "--epochs",
        "4",
        "--batch",
        "3",
        "--init",
        pre.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    for k in ["macro_map", "micro_map"] {
        let v = m[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} {v}");
    }
    let losses = history_losses(&out);
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    // The pretrained 4 x 4 grid of 32 px was interpolated to the 16 x 16 grid of 128 px.
    let f = sg_tensor::io::SafetensorsFile::open(out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(f.f32("pos_embed_spatial").unwrap().0, vec![1, 256, 192]);
}

#[test]
fn unsupported_tasks_and_options_are_errors() {
    let e = xtask::finetune::finetune(&args(&["--task", "panoptic"])).unwrap_err().to_string();
    assert!(e.contains("segmentation or change"), "{e}");
    assert!(xtask::finetune::finetune(&args(&["--task", "eurosat", "--bogus", "1"])).is_err());
    assert!(xtask::finetune::eval(&args(&["--task", "eurosat"])).is_err());
    for bad in [["--batch", "0"], ["--epochs", "0"], ["--val-fraction", "1.5"], ["--blr", "-1"]] {
        let mut a = args(&["--task", "eurosat"]);
        a.extend(args(&bad));
        assert!(xtask::finetune::finetune(&a).is_err(), "{bad:?} accepted");
    }
    assert!(xtask::bench::run("pretrain", &args(&["--batch", "0"])).is_err());
    assert!(xtask::bench::run("infer", &args(&["--steps", "0"])).is_err());
}
