//! EuroSAT-MS: 64 x 64 GeoTIFFs of 13 pixel-interleaved uint16 bands (B1..B12, then B8A last), one
//! folder per class; classes are numbered in alphabetical order. Also reads the original split
//! files (`tif/<Class>/<Class>_<n>.tif <label>` per line).

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bands::{reorder, EUROSAT_FILE_BANDS, MODEL_BANDS};
use crate::raster::read_tiff;

/// One labelled image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    pub label: usize,
}

/// A EuroSAT-MS split: files and labels, read lazily.
#[derive(Clone, Debug)]
pub struct EuroSat {
    pub classes: Vec<String>,
    pub items: Vec<Item>,
}

fn io(path: &Path, e: std::io::Error) -> TensorError {
    TensorError::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn tifs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("tif") || x.eq_ignore_ascii_case("tiff")))
        .collect();
    v.sort();
    Ok(v)
}

impl EuroSat {
    /// Every image under `root/<Class>/`; classes are the sub-folders, in alphabetical order.
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(|e| io(root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut items = Vec::new();
        for (label, c) in classes.iter().enumerate() {
            items.extend(tifs(&root.join(c))?.into_iter().map(|path| Item { path, label }));
        }
        if items.is_empty() {
            return Err(TensorError::Format {
                path: root.display().to_string(),
                msg: "holds no class folders with .tif images".into(),
            });
        }
        Ok(EuroSat { classes, items })
    }

    /// The images listed in an original split file, found under `root` (with or without the
    /// `tif/` prefix of the file's paths). Labels must agree with the class folder names.
    pub fn from_split(root: impl AsRef<Path>, split: impl AsRef<Path>) -> Result<Self> {
        let (root, split) = (root.as_ref(), split.as_ref());
        let all = Self::scan(root)?;
        let text = std::fs::read_to_string(split).map_err(|e| io(split, e))?;
        let bad = |line: usize, msg: String| TensorError::Format { path: format!("{}:{line}", split.display()), msg };
        let mut items = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let mut parts = line.split_whitespace();
            let (Some(rel), Some(label)) = (parts.next(), parts.next()) else {
                return Err(bad(n + 1, format!("expected `path label`, got `{line}`")));
            };
            let label: usize = label.parse().map_err(|_| bad(n + 1, format!("label `{label}` is not a number")))?;
            let rel_path = Path::new(rel);
            let path = [root.join(rel_path), root.join(rel_path.strip_prefix("tif").unwrap_or(rel_path))]
                .into_iter()
                .find(|p| p.is_file())
                .ok_or_else(|| bad(n + 1, format!("`{rel}` does not exist under {}", root.display())))?;
            let class = path.parent().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
            let expected = class.as_ref().and_then(|c| all.classes.iter().position(|k| k == c));
            if expected != Some(label) {
                return Err(bad(n + 1, format!("label {label} does not match the class folder {class:?}")));
            }
            items.push(Item { path, label });
        }
        Ok(EuroSat { classes: all.classes, items })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Image `i` as raw digital numbers in the model's 12-band order `(12, H, W)`, and its label.
    pub fn load(&self, i: usize) -> Result<(Vec<f32>, usize)> {
        let item =
            self.items.get(i).ok_or(TensorError::Index { op: "EuroSat::load", index: i, len: self.items.len() })?;
        Ok((load_image(&item.path)?.0, item.label))
    }
}

/// A EuroSAT-MS file in model band order, with its `(height, width)`.
pub fn load_image(path: &Path) -> Result<(Vec<f32>, (usize, usize))> {
    let r = read_tiff(path)?;
    if r.bands != EUROSAT_FILE_BANDS.len() {
        return Err(TensorError::Format {
            path: path.display().to_string(),
            msg: format!("has {} bands; EuroSAT-MS files have 13 (B1..B12, B8A)", r.bands),
        });
    }
    let img = reorder(&r.data, r.height * r.width, &EUROSAT_FILE_BANDS, &MODEL_BANDS)?;
    Ok((img, (r.height, r.width)))
}
