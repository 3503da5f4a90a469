//! Augmentations (masks follow images exactly) and the loader (seeded, streaming, skipping bad samples).
use proptest::prelude::*;
use sg_data::augment::{eval, random_resized_window, train, Sample};
use sg_data::eurosat::EuroSat;
use sg_data::loader::{Dataset, Loader, LoaderConfig};
use sg_tensor::rng::Rng;
use sg_tensor::{Result, TensorError};

/// An image whose every band equals its mask plus the band index: any geometric transform applied
/// to both keeps that relation, so mask and image must move together.
fn sample(bands: usize, h: usize, w: usize) -> Sample {
    let mask: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
    let img = (0..bands).flat_map(|b| mask.iter().map(move |m| m + 1000.0 * b as f32)).collect();
    Sample::new(img, bands, h, w, Some(mask)).unwrap()
}

fn consistent(s: &Sample) -> bool {
    let n = s.height * s.width;
    let m = s.mask.as_ref().unwrap();
    (0..s.bands).all(|b| (0..n).all(|i| s.img[b * n + i] == m[i] + 1000.0 * b as f32))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn dihedral_moves_keep_masks_aligned(h in 1usize..9, w in 1usize..9, k in 0usize..8) {
        let s = sample(3, h, w);
        prop_assert_eq!(s.hflip().hflip(), s.clone());
        prop_assert_eq!(s.vflip().vflip(), s.clone());
        prop_assert_eq!(s.rot90(4), s.clone());
        let r = s.rot90(k);
        prop_assert_eq!((r.height, r.width), if k % 2 == 1 { (w, h) } else { (h, w) });
        prop_assert!(consistent(&r) && consistent(&s.hflip()) && consistent(&s.vflip()));
        // rot90 by 1 is counter-clockwise: the top-right pixel goes to the top-left.
        prop_assert_eq!(s.rot90(1).mask.unwrap()[0], (w - 1) as f32);
    }

    #[test]
    fn crop_windows_lie_inside(h in 1usize..200, w in 1usize..200, seed in any::<u64>()) {
        let (t, l, ch, cw) = random_resized_window(h, w, (0.2, 1.0), &mut Rng::new(seed));
        prop_assert!(ch > 0 && cw > 0 && t + ch <= h && l + cw <= w);
    }
}

#[test]
fn train_and_eval_transforms() {
    let s = sample(2, 64, 48);
    let a = train(&s, 32, true, &mut Rng::new(7)).unwrap();
    assert_eq!((a.bands, a.height, a.width), (2, 32, 32));
    assert_eq!(a, train(&s, 32, true, &mut Rng::new(7)).unwrap(), "the seed fixes the result");
    assert_ne!(a, train(&s, 32, true, &mut Rng::new(8)).unwrap());
    // Masks are resized by nearest neighbour: every mask value is one of the original labels.
    assert!(a.mask.as_ref().unwrap().iter().all(|&v| v.fract() == 0.0 && v >= 0.0 && v < (64 * 48) as f32));
    let e = eval(&s, 40, 32).unwrap();
    assert_eq!((e.height, e.width), (32, 32));
    assert!(eval(&s, 20, 32).is_err());
    assert!(Sample::new(vec![0.0; 5], 2, 2, 2, None).is_err());
}

/// Numbers, where multiples of 7 fail to load.
struct Numbers(usize);
impl Dataset for Numbers {
    type Item = (usize, u64);
    fn len(&self) -> usize {
        self.0
    }
    fn get(&self, i: usize, rng: &mut Rng) -> Result<(usize, u64)> {
        if i % 7 == 6 {
            return Err(TensorError::Format { path: format!("n{i}.tif"), msg: "corrupt".into() });
        }
        Ok((i, rng.next_u64()))
    }
    fn describe(&self, i: usize) -> String {
        format!("n{i}.tif")
    }
}

#[test]
fn loader_orders_are_seeded_permutations_and_bad_samples_are_reported() {
    let cfg = LoaderConfig { batch: 4, seed: 3, skip_bad: true, drop_last: false, ..Default::default() };
    let l = Loader::new(Numbers(30), cfg.clone()).unwrap();
    let o0 = l.order(0);
    let mut sorted = o0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..30).collect::<Vec<_>>());
    assert_ne!(o0, l.order(1), "each epoch has its own order");
    assert_eq!(o0, Loader::new(Numbers(30), cfg.clone()).unwrap().order(0), "the seed fixes it");
    let mut ep = l.epoch(0);
    let got: Vec<(usize, u64)> = ep.by_ref().flat_map(|b| b.unwrap().items).collect();
    assert_eq!(got.len(), 30 - 4, "indices 6, 13, 20, 27 fail");
    let skipped = ep.skipped();
    assert_eq!(skipped.len(), 4);
    assert!(skipped.iter().all(|s| s.name.ends_with(".tif") && s.error.contains("corrupt")));
    // Augmentation draws depend on (seed, epoch, index) only: a second pass is identical.
    let again: Vec<(usize, u64)> = l.epoch(0).flat_map(|b| b.unwrap().items).collect();
    assert_eq!(got, again);
    // Resuming at batch 3 gives exactly the tail of the epoch.
    let tail: Vec<usize> = l.epoch_from(0, 3).flat_map(|b| b.unwrap().indices).collect();
    let full: Vec<usize> = l.epoch(0).skip(3).flat_map(|b| b.unwrap().indices).collect();
    assert_eq!(tail, full);
    // Without skipping, the first failure surfaces as an error naming the file.
    let strict = Loader::new(Numbers(30), LoaderConfig { skip_bad: false, ..cfg }).unwrap();
    let e = strict.epoch(0).find_map(|b| b.err()).unwrap().to_string();
    assert!(e.contains(".tif") && e.contains("corrupt"), "{e}");
    // Dropping an epoch early does not hang the producer.
    drop(l.epoch(1).next());
}

/// EuroSAT through the loader with training augmentation.
struct EuroSatTrain(EuroSat);
impl Dataset for EuroSatTrain {
    type Item = (Vec<f32>, usize);
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize, rng: &mut Rng) -> Result<(Vec<f32>, usize)> {
        let (img, label) = self.0.load(i)?;
        let s = train(&Sample::new(img, 12, 64, 64, None)?, 32, false, rng)?;
        Ok((s.img, label))
    }
}

#[test]
fn eurosat_batches_end_to_end() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/eurosat-ms");
    let l = Loader::new(EuroSatTrain(EuroSat::scan(root).unwrap()), LoaderConfig { batch: 6, ..Default::default() })
        .unwrap();
    let batches: Vec<_> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3, "20 images, batches of 6, last dropped");
    for b in &batches {
        assert!(b.items.iter().all(|(img, label)| img.len() == 12 * 32 * 32 && *label < 10));
    }
}
