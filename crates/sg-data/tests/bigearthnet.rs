//! Resampling conventions and the BigEarthNet-S2 reader on real patches.
use sg_data::bands::{Band, MODEL_BANDS};
use sg_data::bigearthnet::{labels_19, BigEarthNet, CLASSES_19, LABELS_43, PATCH};
use sg_data::read_tiff;
use sg_data::resample::{resize, Filter};

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bigearthnet-s2")
}

#[test]
fn resampling_follows_pytorch_half_pixel_centres() {
    // interpolate([0, 1], size=4, mode="bilinear", align_corners=False) = [0, 0.25, 0.75, 1].
    assert_eq!(resize(&[0.0, 1.0], 1, 2, 1, 4, Filter::Bilinear).unwrap(), vec![0.0, 0.25, 0.75, 1.0]);
    assert_eq!(resize(&[1.0, 2.0, 3.0, 4.0], 2, 2, 4, 4, Filter::Nearest).unwrap()[..4], [1.0, 1.0, 2.0, 2.0]);
    // Every filter keeps a constant plane constant, up- and downsampling.
    for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
        for (oh, ow) in [(12, 7), (3, 2)] {
            let out = resize(&[5.0; 6 * 5], 6, 5, oh, ow, f).unwrap();
            assert!(out.iter().all(|&v| (v - 5.0).abs() < 1e-5), "{f:?} {out:?}");
        }
    }
    // Bicubic overshoots at a step (PyTorch's a = -0.75 kernel): the first sample is negative.
    let b = resize(&[0.0, 1.0], 1, 2, 1, 4, Filter::Bicubic).unwrap();
    assert!(b[0] < 0.0 && b[3] > 1.0 && (b[1] + b[2] - 1.0).abs() < 1e-6, "{b:?}");
    assert!(resize(&[1.0; 5], 2, 3, 4, 4, Filter::Bilinear).is_err());
}

#[test]
fn nomenclature_maps_43_labels_onto_19() {
    assert_eq!(LABELS_43.len(), 43);
    let dropped = LABELS_43.iter().filter(|(_, c)| c.is_none()).count();
    assert_eq!(
        dropped, 11,
        "roads, ports, airports, mines, dumps, construction, green urban, sport, bare rock, burnt, intertidal"
    );
    for (k, name) in CLASSES_19.iter().enumerate() {
        assert!(LABELS_43.iter().any(|(_, c)| *c == Some(k)), "{name} has no source label");
    }
    let t = labels_19(&["Sea and ocean".into(), "Estuaries".into(), "Bare rock".into()]).unwrap();
    assert_eq!(t.iter().sum::<f32>(), 1.0);
    assert_eq!(t[18], 1.0);
    assert!(labels_19(&["Moon dust".into()]).unwrap_err().contains("Moon dust"));
}

#[test]
fn patches_load_in_model_order_on_the_10m_grid() {
    let ds = BigEarthNet::scan(root()).unwrap();
    assert_eq!(ds.len(), 5);
    let train = BigEarthNet::from_csv(root(), root().join("train.csv")).unwrap();
    assert_eq!(train.len(), 3);
    let i = ds.patches.iter().position(|p| p == "S2A_MSIL2A_20170613T101031_87_48").unwrap();
    let (img, target) = ds.load(i).unwrap();
    // "Non-irrigated arable land" -> Arable land (2); "Land principally occupied by agriculture, ..." -> 6.
    let on: Vec<usize> = (0..19).filter(|&k| target[k] == 1.0).collect();
    assert_eq!(on, vec![2, 6]);
    let plane = PATCH * PATCH;
    assert_eq!(img.len(), 12 * plane);
    let p = &ds.patches[i];
    for (k, b) in MODEL_BANDS.iter().enumerate() {
        let raw = read_tiff(root().join(p).join(format!("{p}_{}.tif", b.name()))).unwrap();
        let ours = &img[k * plane..(k + 1) * plane];
        if b.resolution_m() == 10 {
            assert_eq!(ours, &raw.data[..], "10 m band {} must pass through unchanged", b.name());
        } else {
            // Upsampling keeps the band's mean (bicubic ringing averages out).
            let m = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            assert!(
                (m(ours) - m(&raw.data)).abs() < 0.02 * m(&raw.data),
                "{}: {} vs {}",
                b.name(),
                m(ours),
                m(&raw.data)
            );
        }
    }
    // Vegetation index sanity on this agricultural patch: NIR above red.
    let mean = |b: Band| {
        let k = MODEL_BANDS.iter().position(|&x| x == b).unwrap();
        img[k * plane..(k + 1) * plane].iter().map(|&v| v as f64).sum::<f64>() / plane as f64
    };
    assert!(mean(Band::B8) > mean(Band::B4));
}

#[test]
fn missing_bands_and_bad_splits_are_named() {
    let tmp = tempfile::Builder::new().prefix("sg-ben-").tempdir().unwrap();
    let dir = tmp.path();
    let src = root().join("S2A_MSIL2A_20170613T101031_87_48");
    let dst = dir.join("S2A_MSIL2A_20170613T101031_87_48");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if !e.file_name().to_string_lossy().ends_with("B8A.tif") {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let ds = BigEarthNet::scan(dir).unwrap();
    let e = ds.load(0).unwrap_err().to_string();
    assert!(e.contains("B8A") && e.contains("missing"), "{e}");
    std::fs::write(dir.join("split.csv"), "nope_patch\n").unwrap();
    let e = BigEarthNet::from_csv(dir, dir.join("split.csv")).unwrap_err().to_string();
    assert!(e.contains("split.csv:1") && e.contains("nope_patch"), "{e}");
}
