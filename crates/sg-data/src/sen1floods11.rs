//! Sen1Floods11 hand-labelled chips: `S2/<chip>_S2Hand.tif` (13 bands B1..B12 with B8A after B8,
//! int16, 512 x 512) and `Labels/<chip>_LabelHand.tif` (-1 no data, 0 dry, 1 water). Images come out
//! in model band order; labels as class indices with no data mapped to [`IGNORE`].

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bands::{reorder, ALL_BANDS, MODEL_BANDS};
use crate::raster::read_tiff;

/// The label of pixels that do not count (the segmentation loss's ignore index).
pub const IGNORE: f32 = 255.0;

/// One chip: `(12, H, W)` digital numbers in model order and `(H, W)` labels (0 dry, 1 water,
/// [`IGNORE`]).
#[derive(Clone, Debug)]
pub struct Chip {
    pub img: Vec<f32>,
    pub labels: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// The chips of a Sen1Floods11 folder that have both an S2 image and a hand label.
#[derive(Clone, Debug)]
pub struct Sen1Floods11 {
    pub root: PathBuf,
    pub chips: Vec<String>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TensorError {
    TensorError::Io { path: path.display().to_string(), msg: e.to_string() }
}

impl Sen1Floods11 {
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let s2 = root.join("S2");
        let mut chips: Vec<String> = std::fs::read_dir(&s2)
            .map_err(|e| io(&s2, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix("_S2Hand.tif").map(str::to_string))
            .filter(|c| root.join("Labels").join(format!("{c}_LabelHand.tif")).is_file())
            .collect();
        chips.sort();
        if chips.is_empty() {
            return Err(TensorError::Format {
                path: root.display().to_string(),
                msg: "holds no S2 chip with a hand label".into(),
            });
        }
        Ok(Sen1Floods11 { root, chips })
    }

    pub fn len(&self) -> usize {
        self.chips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chips.is_empty()
    }

    /// Chip `i`.
    pub fn load(&self, i: usize) -> Result<Chip> {
        let c = self.chips.get(i).ok_or(TensorError::Index {
            op: "Sen1Floods11::load",
            index: i,
            len: self.chips.len(),
        })?;
        let ip = self.root.join("S2").join(format!("{c}_S2Hand.tif"));
        let lp = self.root.join("Labels").join(format!("{c}_LabelHand.tif"));
        let img = read_tiff(&ip)?;
        if img.bands != 13 {
            return Err(TensorError::Format {
                path: ip.display().to_string(),
                msg: format!("has {} bands, expected 13", img.bands),
            });
        }
        let lab = read_tiff(&lp)?;
        if (lab.bands, lab.height, lab.width) != (1, img.height, img.width) {
            return Err(TensorError::Format {
                path: lp.display().to_string(),
                msg: format!(
                    "is {}x{}x{}, the image is {}x{}",
                    lab.bands, lab.height, lab.width, img.height, img.width
                ),
            });
        }
        let mut labels = lab.data;
        for v in labels.iter_mut() {
            *v = match *v as i32 {
                0 => 0.0,
                1 => 1.0,
                -1 => IGNORE,
                other => {
                    return Err(TensorError::Format {
                        path: lp.display().to_string(),
                        msg: format!("has label {other}"),
                    })
                }
            };
        }
        let x = reorder(&img.data, img.height * img.width, &ALL_BANDS, &MODEL_BANDS)?;
        Ok(Chip { img: x, labels, height: img.height, width: img.width })
    }
}
