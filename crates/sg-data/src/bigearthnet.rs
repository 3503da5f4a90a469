//! BigEarthNet-S2 v1 in its original layout: one folder per patch holding `<patch>_<band>.tif` for 12
//! bands (B02 B03 B04 B08 at 120 x 120 / 10 m, B05 B06 B07 B8A B11 B12 at 60 x 60 / 20 m, B01 B09 at
//! 20 x 20 / 60 m; no B10) and `<patch>_labels_metadata.json` with CORINE level-3 labels (43
//! classes). Bands are brought to 120 x 120 with bicubic interpolation (PyTorch's kernel) and handed
//! out in the model order; labels are mapped to the 19-class nomenclature of Sumbul et al. (2020).

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bands::MODEL_BANDS;
use crate::raster::read_tiff;
use crate::resample::{resize, Filter};

/// The 19 classes (Sumbul et al., "BigEarthNet Deep Learning Models with a New Class-Nomenclature").
pub const CLASSES_19: [&str; 19] = [
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
];

/// The 43 original labels and their 19-class index (`None`: dropped from the 19-class nomenclature).
pub const LABELS_43: [(&str, Option<usize>); 43] = [
    ("Continuous urban fabric", Some(0)),
    ("Discontinuous urban fabric", Some(0)),
    ("Industrial or commercial units", Some(1)),
    ("Road and rail networks and associated land", None),
    ("Port areas", None),
    ("Airports", None),
    ("Mineral extraction sites", None),
    ("Dump sites", None),
    ("Construction sites", None),
    ("Green urban areas", None),
    ("Sport and leisure facilities", None),
    ("Non-irrigated arable land", Some(2)),
    ("Permanently irrigated land", Some(2)),
    ("Rice fields", Some(2)),
    ("Vineyards", Some(3)),
    ("Fruit trees and berry plantations", Some(3)),
    ("Olive groves", Some(3)),
    ("Pastures", Some(4)),
    ("Annual crops associated with permanent crops", Some(3)),
    ("Complex cultivation patterns", Some(5)),
    ("Land principally occupied by agriculture, with significant areas of natural vegetation", Some(6)),
    ("Agro-forestry areas", Some(7)),
    ("Broad-leaved forest", Some(8)),
    ("Coniferous forest", Some(9)),
    ("Mixed forest", Some(10)),
    ("Natural grassland", Some(11)),
    ("Moors and heathland", Some(12)),
    ("Sclerophyllous vegetation", Some(12)),
    ("Transitional woodland/shrub", Some(13)),
    ("Beaches, dunes, sands", Some(14)),
    ("Bare rock", None),
    ("Sparsely vegetated areas", Some(11)),
    ("Burnt areas", None),
    ("Inland marshes", Some(15)),
    ("Peatbogs", Some(15)),
    ("Salt marshes", Some(16)),
    ("Salines", Some(16)),
    ("Intertidal flats", None),
    ("Water courses", Some(17)),
    ("Water bodies", Some(17)),
    ("Coastal lagoons", Some(18)),
    ("Estuaries", Some(18)),
    ("Sea and ocean", Some(18)),
];

/// Side of a patch on the 10 m grid.
pub const PATCH: usize = 120;

/// The 19-class multi-hot target of a list of original label names; an unknown name is an error.
pub fn labels_19(names: &[String]) -> std::result::Result<[f32; 19], String> {
    let mut t = [0f32; 19];
    for n in names {
        match LABELS_43.iter().find(|(k, _)| k == n) {
            Some((_, Some(i))) => t[*i] = 1.0,
            Some((_, None)) => {}
            None => return Err(format!("unknown label `{n}`")),
        }
    }
    Ok(t)
}

/// A list of patches, read lazily.
#[derive(Clone, Debug)]
pub struct BigEarthNet {
    pub root: PathBuf,
    pub patches: Vec<String>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TensorError {
    TensorError::Io { path: path.display().to_string(), msg: e.to_string() }
}

impl BigEarthNet {
    /// Every patch folder under `root`, sorted.
    pub fn scan(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut patches: Vec<String> = std::fs::read_dir(&root)
            .map_err(|e| io(&root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        patches.sort();
        if patches.is_empty() {
            return Err(TensorError::Format { path: root.display().to_string(), msg: "holds no patch folders".into() });
        }
        Ok(BigEarthNet { root, patches })
    }

    /// The patches named in a split CSV (first column), which must exist under `root`.
    pub fn from_csv(root: impl AsRef<Path>, csv: impl AsRef<Path>) -> Result<Self> {
        let (root, csv) = (root.as_ref().to_path_buf(), csv.as_ref());
        let text = std::fs::read_to_string(csv).map_err(|e| io(csv, e))?;
        let mut patches = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let name = line.split(',').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !root.join(name).is_dir() {
                return Err(TensorError::Format {
                    path: format!("{}:{}", csv.display(), n + 1),
                    msg: format!("patch `{name}` is not under {}", root.display()),
                });
            }
            patches.push(name.to_string());
        }
        Ok(BigEarthNet { root, patches })
    }

    pub fn len(&self) -> usize {
        self.patches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// The original label names of patch `i`.
    pub fn label_names(&self, i: usize) -> Result<Vec<String>> {
        let p = &self.patches[i];
        let path = self.root.join(p).join(format!("{p}_labels_metadata.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let bad = |msg: String| TensorError::Format { path: path.display().to_string(), msg };
        let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        j.get("labels")
            .and_then(|l| l.as_array())
            .ok_or_else(|| bad("has no `labels` list".into()))?
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad("a label is not a string".into())))
            .collect()
    }

    /// Patch `i` as `(12, 120, 120)` raw digital numbers in model order, and its 19-class target.
    pub fn load(&self, i: usize) -> Result<(Vec<f32>, [f32; 19])> {
        if i >= self.patches.len() {
            return Err(TensorError::Index { op: "BigEarthNet::load", index: i, len: self.patches.len() });
        }
        let p = &self.patches[i];
        let dir = self.root.join(p);
        let mut img = Vec::with_capacity(12 * PATCH * PATCH);
        for b in MODEL_BANDS {
            let path = dir.join(format!("{p}_{}.tif", b.name()));
            if !path.is_file() {
                return Err(TensorError::Format {
                    path: path.display().to_string(),
                    msg: format!("missing band {}", b.name()),
                });
            }
            let r = read_tiff(&path)?;
            let side = PATCH * 10 / b.resolution_m() as usize;
            if r.bands != 1 || r.height != side || r.width != side {
                return Err(TensorError::Format {
                    path: path.display().to_string(),
                    msg: format!(
                        "is {}x{}x{}; band {} should be 1x{side}x{side}",
                        r.bands,
                        r.height,
                        r.width,
                        b.name()
                    ),
                });
            }
            img.extend(resize(&r.data, side, side, PATCH, PATCH, Filter::Bicubic)?);
        }
        let names = self.label_names(i)?;
        let target = labels_19(&names).map_err(|msg| TensorError::Format {
            path: dir.join(format!("{p}_labels_metadata.json")).display().to_string(),
            msg,
        })?;
        Ok((img, target))
    }
}
