//! Unlabelled images for self-supervised pretraining from any folder this crate reads: EuroSAT-MS,
//! BigEarthNet-S2, OSCD (both dates of every city), Sen1Floods11 chips, or a scene folder of band
//! files (cut into tiles). The kind of each folder is recognised from its layout.

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bigearthnet::BigEarthNet;
use crate::eurosat::EuroSat;
use crate::oscd::Oscd;
use crate::scenes::SceneTiles;
use crate::sen1floods11::Sen1Floods11;

/// One recognised folder.
#[derive(Clone, Debug)]
pub enum Source {
    EuroSat(EuroSat),
    BigEarthNet(BigEarthNet),
    Oscd(Oscd),
    Sen1Floods11(Sen1Floods11),
    Scene(SceneTiles),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::EuroSat(_) => "EuroSAT-MS",
            Source::BigEarthNet(_) => "BigEarthNet-S2",
            Source::Oscd(_) => "OSCD",
            Source::Sen1Floods11(_) => "Sen1Floods11",
            Source::Scene(_) => "scene tiles",
        }
    }

    /// Images it provides (OSCD cities count twice: two dates).
    pub fn len(&self) -> usize {
        match self {
            Source::EuroSat(d) => d.len(),
            Source::BigEarthNet(d) => d.len(),
            Source::Oscd(d) => 2 * d.cities.len(),
            Source::Sen1Floods11(d) => d.len(),
            Source::Scene(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as `(12, H, W)` digital numbers in model order, with `(H, W)`.
    pub fn load(&self, i: usize) -> Result<(Vec<f32>, usize, usize)> {
        match self {
            Source::EuroSat(d) => {
                let (img, _) = d.load(i)?;
                let side = ((img.len() / 12) as f64).sqrt() as usize;
                Ok((img, side, side))
            }
            Source::BigEarthNet(d) => Ok((d.load(i)?.0, crate::bigearthnet::PATCH, crate::bigearthnet::PATCH)),
            Source::Oscd(d) => {
                let p = d.load(i / 2)?;
                Ok((if i % 2 == 0 { p.before } else { p.after }, p.height, p.width))
            }
            Source::Sen1Floods11(d) => {
                let c = d.load(i)?;
                Ok((c.img, c.height, c.width))
            }
            Source::Scene(d) => Ok((d.load(i)?, d.tile, d.tile)),
        }
    }
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| TensorError::Io { path: dir.display().to_string(), msg: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect())
}

fn name_ends(p: &Path, suffix: &str) -> bool {
    p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(suffix))
}

/// Recognises the dataset in `dir`; scenes are cut into `tile`-pixel tiles at half-tile stride.
pub fn detect(dir: &Path, tile: usize) -> Result<Source> {
    let items = entries(dir)?;
    if dir.join("images").is_dir() && dir.join("labels").is_dir() {
        return Ok(Source::Oscd(Oscd::scan(dir)?));
    }
    if dir.join("S2").is_dir() && dir.join("Labels").is_dir() {
        return Ok(Source::Sen1Floods11(Sen1Floods11::scan(dir)?));
    }
    if items.iter().any(|p| p.is_file() && name_ends(p, "_B02.tif")) {
        return Ok(Source::Scene(SceneTiles::new(&[dir], tile, (tile / 2).max(1))?));
    }
    let subdirs: Vec<&PathBuf> = items.iter().filter(|p| p.is_dir()).collect();
    let has = |suffix: &str| {
        subdirs.iter().any(|d| entries(d).map(|e| e.iter().any(|p| name_ends(p, suffix))).unwrap_or(false))
    };
    if has("_labels_metadata.json") {
        return Ok(Source::BigEarthNet(BigEarthNet::scan(dir)?));
    }
    if has(".tif") {
        return Ok(Source::EuroSat(EuroSat::scan(dir)?));
    }
    Err(TensorError::Format {
        path: dir.display().to_string(),
        msg: "is none of the layouts sg-data reads (EuroSAT-MS, BigEarthNet-S2, OSCD, Sen1Floods11, a scene folder)"
            .into(),
    })
}

/// Images from several folders, as one indexable collection.
#[derive(Clone, Debug)]
pub struct Images {
    pub sources: Vec<(PathBuf, Source)>,
    offsets: Vec<usize>,
}

impl Images {
    pub fn open(dirs: &[PathBuf], tile: usize) -> Result<Self> {
        let mut sources = Vec::new();
        let mut offsets = vec![0];
        for d in dirs {
            let s = detect(d, tile)?;
            offsets.push(offsets.last().unwrap() + s.len());
            sources.push((d.clone(), s));
        }
        if *offsets.last().unwrap() == 0 {
            return Err(TensorError::Arg { op: "Images", msg: "no images in the given folders".into() });
        }
        Ok(Images { sources, offsets })
    }

    pub fn len(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn locate(&self, i: usize) -> Result<(usize, usize)> {
        if i >= self.len() {
            return Err(TensorError::Index { op: "Images", index: i, len: self.len() });
        }
        let s = self.offsets.partition_point(|&o| o <= i) - 1;
        Ok((s, i - self.offsets[s]))
    }

    pub fn load(&self, i: usize) -> Result<(Vec<f32>, usize, usize)> {
        let (s, j) = self.locate(i)?;
        self.sources[s].1.load(j)
    }

    pub fn describe(&self, i: usize) -> String {
        match self.locate(i) {
            Ok((s, j)) => format!("{} item {j} of {}", self.sources[s].1.kind(), self.sources[s].0.display()),
            Err(_) => format!("image {i}"),
        }
    }
}
