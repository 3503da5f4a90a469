//! The Onera Satellite Change Detection dataset, original release: per city, two dates of 13 band
//! files at native resolution (`images/<city>/imgs_{1,2}/*_B??.tif`) and a change map
//! (`labels/<city>/cm/<city>-cm.tif`, 1 = no change, 2 = change, despite the dataset README's 0/1).
//! Each date's bands are resampled onto its B02 grid (10 m) by bicubic interpolation; if the two
//! dates' grids differ, both are resized to the change map's size. Images come out in model band
//! order; the change map as 0 (no change) / 1 (change).

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bands::{Band, MODEL_BANDS};
use crate::raster::read_tiff;
use crate::resample::{resize, resize_planes, Filter};

/// One city's pair of images and its change map.
#[derive(Clone, Debug)]
pub struct CityPair {
    pub city: String,
    pub height: usize,
    pub width: usize,
    /// `(12, H, W)` for each date.
    pub before: Vec<f32>,
    pub after: Vec<f32>,
    /// `(H, W)`: 0 no change, 1 change.
    pub change: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Oscd {
    pub root: PathBuf,
    pub cities: Vec<String>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TensorError {
    TensorError::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn bad(path: &Path, msg: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), msg: msg.into() }
}

/// The file of `band` in a date folder (names end in `_B01.tif`, ..., `_B8A.tif`).
fn band_file(dir: &Path, band: Band) -> Result<PathBuf> {
    let suffix = format!("_{}.tif", band.name());
    std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix)))
        .ok_or_else(|| bad(dir, format!("has no file for band {}", band.name())))
}

/// One date on its 10 m grid: `(12, H, W)` in model order.
fn read_date(dir: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let b2 = read_tiff(band_file(dir, Band::B2)?)?;
    let (h, w) = (b2.height, b2.width);
    let mut out = Vec::with_capacity(12 * h * w);
    for b in MODEL_BANDS {
        let path = band_file(dir, b)?;
        let r = read_tiff(&path)?;
        if r.bands != 1 {
            return Err(bad(&path, format!("has {} bands, expected 1", r.bands)));
        }
        out.extend(resize(&r.data, r.height, r.width, h, w, Filter::Bicubic)?);
    }
    Ok((out, h, w))
}

impl Oscd {
    /// Every city under `root/images` that has a change map.
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let images = root.join("images");
        let mut cities: Vec<String> = std::fs::read_dir(&images)
            .map_err(|e| io(&images, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|c| root.join("labels").join(c).join("cm").join(format!("{c}-cm.tif")).is_file())
            .collect();
        cities.sort();
        if cities.is_empty() {
            return Err(bad(&root, "holds no city with images and a change map"));
        }
        Ok(Oscd { root, cities })
    }

    /// The cities listed (comma-separated) in a split file such as `images/train.txt`.
    pub fn from_list(root: impl AsRef<Path>, list: impl AsRef<Path>) -> Result<Self> {
        let all = Self::scan(root)?;
        let list = list.as_ref();
        let text = std::fs::read_to_string(list).map_err(|e| io(list, e))?;
        let mut cities = Vec::new();
        for c in text.split([',', '\n']).map(str::trim).filter(|c| !c.is_empty()) {
            if !all.cities.iter().any(|k| k == c) {
                return Err(bad(list, format!("names city `{c}`, which has no images and change map")));
            }
            cities.push(c.to_string());
        }
        Ok(Oscd { root: all.root, cities })
    }

    pub fn load(&self, i: usize) -> Result<CityPair> {
        let city =
            self.cities.get(i).ok_or(TensorError::Index { op: "Oscd::load", index: i, len: self.cities.len() })?;
        let dir = self.root.join("images").join(city);
        let (mut before, h1, w1) = read_date(&dir.join("imgs_1"))?;
        let (mut after, h2, w2) = read_date(&dir.join("imgs_2"))?;
        let cm_path = self.root.join("labels").join(city).join("cm").join(format!("{city}-cm.tif"));
        let cm = read_tiff(&cm_path)?;
        let (h, w) = (cm.height, cm.width);
        if (h1, w1) != (h, w) {
            before = resize_planes(&before, 12, h1, w1, h, w, Filter::Bicubic)?;
        }
        if (h2, w2) != (h, w) {
            after = resize_planes(&after, 12, h2, w2, h, w, Filter::Bicubic)?;
        }
        let mut change = cm.data;
        for v in change.iter_mut() {
            *v = match *v as i32 {
                1 => 0.0,
                2 => 1.0,
                other => {
                    return Err(bad(
                        &cm_path,
                        format!("has value {other}; change maps hold 1 (no change) or 2 (change)"),
                    ))
                }
            };
        }
        Ok(CityPair { city: city.clone(), height: h, width: w, before, after, change })
    }
}
