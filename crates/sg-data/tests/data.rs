//! Readers on the real Sentinel-2 samples in `fixtures/`.
use sg_data::bands::{reorder, Band, ALL_BANDS, EUROSAT_FILE_BANDS, MODEL_BANDS};
use sg_data::eurosat::EuroSat;
use sg_data::normalize::{mean_2std, min_max, zscore, EUROSAT_STATS, FMOW_STATS};
use sg_data::read_tiff;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn mean(p: &[f32]) -> f64 {
    p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64
}

#[test]
fn eurosat_classes_are_alphabetical_with_every_file() {
    let ds = EuroSat::scan(fixtures().join("eurosat-ms")).unwrap();
    assert_eq!(
        ds.classes,
        [
            "AnnualCrop",
            "Forest",
            "HerbaceousVegetation",
            "Highway",
            "Industrial",
            "Pasture",
            "PermanentCrop",
            "Residential",
            "River",
            "SeaLake"
        ]
    );
    assert_eq!(ds.len(), 20);
    assert!(ds.items.iter().all(|i| i.path.parent().unwrap().ends_with(&ds.classes[i.label])));
}

#[test]
fn eurosat_bands_come_out_in_model_order() {
    let ds = EuroSat::scan(fixtures().join("eurosat-ms")).unwrap();
    let plane = 64 * 64;
    for (i, item) in ds.items.iter().enumerate() {
        let raw = read_tiff(&item.path).unwrap();
        assert_eq!((raw.bands, raw.height, raw.width), (13, 64, 64));
        let (img, label) = ds.load(i).unwrap();
        assert_eq!(label, item.label);
        assert_eq!(img.len(), 12 * plane);
        // Exact mapping: model band k is the file band of the same name (B8A is stored last).
        for (k, b) in MODEL_BANDS.iter().enumerate() {
            let f = EUROSAT_FILE_BANDS.iter().position(|x| x == b).unwrap();
            assert_eq!(&img[k * plane..(k + 1) * plane], raw.band(f), "{} of {}", b.name(), item.path.display());
        }
        // B10 (cirrus) is near zero in these clear scenes, and it is the band that is dropped.
        assert!(mean(raw.band(9)) < 50.0, "file band 9 should be B10: {}", mean(raw.band(9)));
        assert!((0..12).all(|k| mean(&img[k * plane..(k + 1) * plane]) > 15.0), "no near-zero band survives");
    }
    // Vegetation: near infrared (B8, B8A) far above red (B4) in every Forest image.
    for (i, item) in ds.items.iter().enumerate().filter(|(_, it)| ds.classes[it.label] == "Forest") {
        let (img, _) = ds.load(i).unwrap();
        let band = |b: Band| mean(&img[MODEL_BANDS.iter().position(|&x| x == b).unwrap() * plane..][..plane]);
        assert!(band(Band::B8) > 3.0 * band(Band::B4), "{}", item.path.display());
        assert!(band(Band::B8A) > 3.0 * band(Band::B4), "{}", item.path.display());
    }
}

#[test]
fn planar_tiled_int16_chip_reads_every_band() {
    let r = read_tiff(fixtures().join("sen1floods11/S2/Spain_7370579_S2Hand.tif")).unwrap();
    assert_eq!((r.bands, r.height, r.width), (13, 512, 512));
    let means: Vec<f64> = (0..13).map(|b| mean(r.band(b))).collect();
    // Stored B1..B8, B8A, B9, B10, B11, B12: cirrus near zero, the other bands in reflectance units.
    assert!(means[10] < 50.0, "{means:?}");
    assert!(means.iter().enumerate().filter(|(i, _)| *i != 10).all(|(_, &m)| m > 200.0), "{means:?}");
    // The planes differ (a reader that returned the first plane 13 times would fail here).
    assert!(r.band(0) != r.band(7));
    let model = reorder(&r.data, 512 * 512, &ALL_BANDS, &MODEL_BANDS).unwrap();
    assert_eq!(model.len(), 12 * 512 * 512);
}

#[test]
fn split_files_and_bad_inputs() {
    let tmp = tempfile::Builder::new().prefix("sg-data-").tempdir().unwrap();
    let dir = tmp.path();
    let root = fixtures().join("eurosat-ms");
    let split = dir.join("split.txt");
    std::fs::write(&split, "tif/Forest/Forest_1031.tif 1\ntif/SeaLake/SeaLake_1005.tif 9\n\n").unwrap();
    let ds = EuroSat::from_split(&root, &split).unwrap();
    assert_eq!(ds.items.iter().map(|i| i.label).collect::<Vec<_>>(), vec![1, 9]);
    std::fs::write(&split, "tif/Forest/Forest_1031.tif 3\n").unwrap();
    let e = EuroSat::from_split(&root, &split).unwrap_err().to_string();
    assert!(e.contains("split.txt:1") && e.contains("does not match"), "{e}");
    std::fs::write(&split, "tif/Forest/Forest_9.tif 1\n").unwrap();
    assert!(EuroSat::from_split(&root, &split).unwrap_err().to_string().contains("does not exist"));
    // A truncated TIFF names the file; so does a text file; an empty folder is an error.
    let bytes = std::fs::read(root.join("Forest/Forest_1031.tif")).unwrap();
    let cut = dir.join("cut.tif");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_tiff(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.tif"), "{e}");
    std::fs::write(dir.join("text.tif"), b"hello").unwrap();
    assert!(read_tiff(dir.join("text.tif")).is_err());
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(EuroSat::scan(&empty).unwrap_err().to_string().contains("no class folders"));
    // A 13-band chip in another band layout is accepted by the raster reader but a 1-band file is
    // not a EuroSAT image.
    let one_band = dir.join("one.tif");
    {
        let f = std::fs::File::create(&one_band).unwrap();
        let mut enc = tiff::encoder::TiffEncoder::new(f).unwrap();
        enc.write_image::<tiff::encoder::colortype::Gray16>(4, 4, &[7u16; 16]).unwrap();
    }
    let e = sg_data::eurosat::load_image(&one_band).unwrap_err().to_string();
    assert!(e.contains("has 1 bands"), "{e}");
}

#[test]
fn normalisations_use_statistics_by_band_name() {
    // Two bands (B8A, B4) of two pixels each, in model order positions.
    let bands = [Band::B8A, Band::B4];
    let mut img = vec![1805.07, 1805.07 + 1343.48, 1297.47, 1297.47 - 2.0 * 1368.11];
    zscore(&mut img, &bands, &EUROSAT_STATS).unwrap();
    let want = [0.0, 1.0, 0.0, -2.0];
    assert!(img.iter().zip(want).all(|(a, b)| (*a - b).abs() < 1e-5), "{img:?}");
    // mean +- 2 std of fMoW for B1: mean - 2 std maps to 0, mean + 2 std to 1, beyond clips.
    let (m, s) = (1370.19f32, 633.15f32);
    let mut y = vec![m - 2.0 * s, m, m + 2.0 * s, m + 5.0 * s];
    mean_2std(&mut y, &[Band::B1], &FMOW_STATS).unwrap();
    assert!(y.iter().zip([0.0, 0.5, 1.0, 1.0]).all(|(a, b)| (*a - b).abs() < 1e-5), "{y:?}");
    let mut z = vec![2.0, 4.0, 6.0, 5.0, 5.0, 5.0];
    min_max(&mut z, 2).unwrap();
    assert_eq!(z, vec![0.0, 0.5, 1.0, 0.0, 0.0, 0.0]);
    assert!(min_max(&mut z, 4).is_err());
}
