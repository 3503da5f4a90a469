//! Scene tiles read window by window equal windows of the whole scene resampled at once.
use sg_data::bands::MODEL_BANDS;
use sg_data::raster::{read_tiff, read_window};
use sg_data::resample::{resize, Filter};
use sg_data::scenes::SceneTiles;

fn scene() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/s2-l1c-scene")
}

#[test]
fn windows_are_crops_with_clamped_edges() {
    let path = scene().join("s2_B05.tif");
    let full = read_tiff(&path).unwrap();
    let (h, w) = (full.height, full.width);
    let win = read_window(&path, 10, 20, 30, 40).unwrap();
    for r in 0..30 {
        assert_eq!(&win[r * 40..(r + 1) * 40], &full.data[(10 + r) * w + 20..(10 + r) * w + 60]);
    }
    // Partly outside: edge pixels repeat.
    let edge = read_window(&path, -2, (w - 3) as isize, 4, 5).unwrap();
    assert_eq!(edge[0], full.data[w - 3]);
    assert_eq!(edge[4], full.data[w - 1], "column beyond the edge repeats the last one");
    assert_eq!(edge[3 * 5], full.data[w + w - 3]);
    assert_eq!(h, 96);
}

#[test]
fn tiles_equal_the_whole_scene_resampled() {
    let t = SceneTiles::new(&[scene()], 96, 48).unwrap();
    assert_eq!(t.len(), 9, "starts 0, 48, 96 on both axes of a 192-pixel scene");
    assert_eq!(SceneTiles::new(&[scene()], 96, 70).unwrap().len(), 9, "starts 0 and 70, then the far edge at 96");
    assert_eq!(SceneTiles::new(&[scene()], 96, 96).unwrap().len(), 4);
    // The whole scene on its 10 m grid, band by band, in model order.
    let whole: Vec<Vec<f32>> = MODEL_BANDS
        .iter()
        .map(|b| {
            let r = read_tiff(scene().join(format!("s2_{}.tif", b.name()))).unwrap();
            resize(&r.data, r.height, r.width, 192, 192, Filter::Bicubic).unwrap()
        })
        .collect();
    for (i, &(_, top, left)) in t.tiles.iter().enumerate() {
        let tile = t.load(i).unwrap();
        assert_eq!(tile.len(), 12 * 96 * 96);
        for (b, plane) in whole.iter().enumerate() {
            for r in 0..96 {
                let got = &tile[(b * 96 + r) * 96..(b * 96 + r + 1) * 96];
                let want = &plane[(top + r) * 192 + left..(top + r) * 192 + left + 96];
                let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err <= 1e-3, "tile {i} band {} row {r}: {err}", MODEL_BANDS[b].name());
            }
        }
    }
    assert!(SceneTiles::new(&[scene()], 200, 10).is_err(), "a tile larger than the scene");
    assert!(SceneTiles::new(&[std::path::Path::new("/nonexistent")], 96, 48).is_err());
}
