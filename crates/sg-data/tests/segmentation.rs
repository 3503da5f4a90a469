//! Sen1Floods11 and OSCD on their real samples.
use sg_data::bands::{Band, MODEL_BANDS};
use sg_data::oscd::Oscd;
use sg_data::sen1floods11::{Sen1Floods11, IGNORE};

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn band(b: Band) -> usize {
    MODEL_BANDS.iter().position(|&x| x == b).unwrap()
}

#[test]
fn flood_chip_and_its_water_mask() {
    let ds = Sen1Floods11::scan(fixtures().join("sen1floods11")).unwrap();
    assert_eq!(ds.len(), 1);
    let c = ds.load(0).unwrap();
    let (img, labels, h, w) = (c.img, c.labels, c.height, c.width);
    assert_eq!((h, w, img.len(), labels.len()), (512, 512, 12 * 512 * 512, 512 * 512));
    assert!(labels.iter().all(|&v| v == 0.0 || v == 1.0 || v == IGNORE));
    let count = |c: f32| labels.iter().filter(|&&v| v == c).count();
    assert!(count(1.0) > 0 && count(0.0) > 0, "water {} dry {}", count(1.0), count(0.0));
    // Water is dark in the near infrared: its mean B8 is well below that of dry land.
    let plane = h * w;
    let nir = &img[band(Band::B8) * plane..][..plane];
    let mean_of = |c: f32| {
        let v: Vec<f64> = labels.iter().zip(nir).filter(|(&l, _)| l == c).map(|(_, &x)| x as f64).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(mean_of(1.0) < 0.8 * mean_of(0.0), "water {} dry {}", mean_of(1.0), mean_of(0.0));
}

#[test]
fn oscd_city_pair_on_the_10m_grid() {
    let root = fixtures().join("oscd");
    let ds = Oscd::scan(&root).unwrap();
    assert_eq!(ds.cities, vec!["bercy"]);
    let train = Oscd::from_list(&root, root.join("images/train.txt")).unwrap();
    assert_eq!(train.cities, vec!["bercy"]);
    let p = ds.load(0).unwrap();
    let n = p.height * p.width;
    assert_eq!((p.before.len(), p.after.len(), p.change.len()), (12 * n, 12 * n, n));
    let changed = p.change.iter().filter(|&&v| v == 1.0).count();
    assert!(p.change.iter().all(|&v| v == 0.0 || v == 1.0));
    assert!(changed > 0 && changed < n / 4, "{changed} of {n} pixels changed");
    // The two dates differ more where the map says change than where it does not.
    let diff = |i: usize| (0..12).map(|b| (p.before[b * n + i] - p.after[b * n + i]).abs() as f64).sum::<f64>();
    let mean = |c: f32| {
        let v: Vec<f64> = (0..n).filter(|&i| p.change[i] == c).map(diff).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(mean(1.0) > mean(0.0), "change {} vs no change {}", mean(1.0), mean(0.0));
    let list = tempfile::Builder::new().prefix("sg-oscd-").suffix(".txt").tempfile().unwrap();
    std::fs::write(list.path(), "bercy,atlantis").unwrap();
    let e = Oscd::from_list(&root, list.path()).unwrap_err().to_string();
    assert!(e.contains("atlantis"), "{e}");
}
