//! The original's normalisations (SPEC, "Data normalisation"), applied to band-major images in any
//! band order: statistics are looked up by band name, never by position.

use sg_tensor::{Result, TensorError};

use crate::bands::{Band, ALL_BANDS, EUROSAT_FILE_BANDS};

/// Per-band mean and standard deviation, for the bands named in `bands`.
#[derive(Clone, Copy, Debug)]
pub struct BandStats {
    pub bands: &'static [Band; 13],
    pub mean: [f64; 13],
    pub std: [f64; 13],
}

impl BandStats {
    fn get(&self, b: Band) -> Result<(f64, f64)> {
        let i = self
            .bands
            .iter()
            .position(|&x| x == b)
            .ok_or_else(|| TensorError::Arg { op: "normalize", msg: format!("no statistics for band {}", b.name()) })?;
        Ok((self.mean[i], self.std[i]))
    }
}

/// EuroSAT's z-score statistics, in EuroSAT's file order (SPEC).
pub const EUROSAT_STATS: BandStats = BandStats {
    bands: &EUROSAT_FILE_BANDS,
    mean: [
        752.40, 884.30, 1144.16, 1297.47, 1624.91, 2194.64, 2422.21, 2517.76, 2581.65, 2645.52, 582.73, 2368.51,
        1805.07,
    ],
    std: [
        1108.03, 1155.15, 1183.63, 1368.11, 1370.27, 1355.55, 1416.51, 1474.79, 1439.31, 1582.28, 472.38, 1455.52,
        1343.48,
    ],
};

/// fMoW-Sentinel statistics (B1..B12 with B8A after B8), used for BigEarthNet fine-tuning (SPEC).
pub const FMOW_STATS: BandStats = BandStats {
    bands: &ALL_BANDS,
    mean: [
        1370.19, 1184.38, 1120.77, 1136.26, 1263.74, 1645.40, 1846.87, 1762.60, 1972.62, 582.73, 14.77, 1732.16,
        1247.92,
    ],
    std: [633.15, 650.28, 712.13, 965.23, 948.98, 1108.07, 1258.36, 1233.15, 1364.39, 472.38, 14.31, 1310.37, 1087.60],
};

fn planes<'a>(img: &'a mut [f32], bands: &[Band]) -> Result<std::slice::ChunksExactMut<'a, f32>> {
    if bands.is_empty() || img.len() % bands.len() != 0 {
        return Err(TensorError::Length { op: "normalize", arg: "image", expected: bands.len(), got: img.len() });
    }
    let plane = img.len() / bands.len();
    Ok(img.chunks_exact_mut(plane))
}

/// Each band scaled to [0, 1] by its own minimum and maximum in this image (pretraining, SPEC); a
/// constant band becomes 0.
pub fn min_max(img: &mut [f32], bands: usize) -> Result<()> {
    if bands == 0 || img.len() % bands != 0 {
        return Err(TensorError::Length { op: "min_max", arg: "image", expected: bands, got: img.len() });
    }
    for p in img.chunks_exact_mut(img.len() / bands) {
        let (lo, hi) = p.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let span = hi - lo;
        for v in p.iter_mut() {
            *v = if span > 0.0 { (*v - lo) / span } else { 0.0 };
        }
    }
    Ok(())
}

/// `(x - mean) / std` per band.
pub fn zscore(img: &mut [f32], bands: &[Band], stats: &BandStats) -> Result<()> {
    for (p, &b) in planes(img, bands)?.zip(bands) {
        let (m, s) = stats.get(b)?;
        for v in p.iter_mut() {
            *v = ((*v as f64 - m) / s) as f32;
        }
    }
    Ok(())
}

/// `(x - (mean - 2 std)) / (4 std)` clipped to [0, 1] per band (BigEarthNet fine-tuning, SPEC).
pub fn mean_2std(img: &mut [f32], bands: &[Band], stats: &BandStats) -> Result<()> {
    for (p, &b) in planes(img, bands)?.zip(bands) {
        let (m, s) = stats.get(b)?;
        let lo = m - 2.0 * s;
        for v in p.iter_mut() {
            *v = ((*v as f64 - lo) / (4.0 * s)).clamp(0.0, 1.0) as f32;
        }
    }
    Ok(())
}
