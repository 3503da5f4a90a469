//! Pretraining tiles from whole Sentinel-2 scenes: a folder of per-band GeoTIFFs at native
//! resolution (`*_B01.tif` ... `*_B12.tif`, `*_B8A.tif`) is cut into `tile x tile` windows of the
//! 10 m grid every `stride` pixels (overlap = tile - stride). A tile is read as a window of each band
//! file (only the strips that cover it), 20 m and 60 m bands with a 2-pixel margin and bicubic
//! resampling, so a tile equals the same window of the whole scene resampled at once, and memory
//! holds one tile, never a scene.

use std::path::{Path, PathBuf};

use sg_tensor::{Result, TensorError};

use crate::bands::{Band, MODEL_BANDS};
use crate::raster::{read_window, tiff_size};
use crate::resample::{resize, Filter};

/// Input pixels kept around a coarse window so that bicubic resampling sees its full reach.
const MARGIN: usize = 2;

#[derive(Clone, Debug)]
struct Scene {
    files: Vec<PathBuf>,
    /// The 10 m grid (B02's size).
    height: usize,
    width: usize,
}

/// Tiles of one or more scenes.
#[derive(Clone, Debug)]
pub struct SceneTiles {
    scenes: Vec<Scene>,
    pub tile: usize,
    /// `(scene, top, left)` of every tile.
    pub tiles: Vec<(usize, usize, usize)>,
}

fn band_file(dir: &Path, b: Band) -> Result<PathBuf> {
    let suffix = format!("_{}.tif", b.name());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TensorError::Io { path: dir.display().to_string(), msg: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix)))
        .collect();
    found.sort();
    found.pop().ok_or_else(|| TensorError::Format {
        path: dir.display().to_string(),
        msg: format!("has no file for band {}", b.name()),
    })
}

impl SceneTiles {
    /// Every `tile`-pixel window at `stride` of the scenes in `dirs` (a last row and column of tiles
    /// is aligned to the far edge, so the whole scene is covered).
    pub fn new(dirs: &[impl AsRef<Path>], tile: usize, stride: usize) -> Result<Self> {
        if tile == 0 || stride == 0 {
            return Err(TensorError::Arg { op: "SceneTiles", msg: "tile and stride must be positive".into() });
        }
        let mut scenes = Vec::new();
        let mut tiles = Vec::new();
        for dir in dirs {
            let dir = dir.as_ref();
            let files = MODEL_BANDS.iter().map(|&b| band_file(dir, b)).collect::<Result<Vec<_>>>()?;
            let (h, w) = tiff_size(&files[MODEL_BANDS.iter().position(|&b| b == Band::B2).unwrap()])?;
            if h < tile || w < tile {
                return Err(TensorError::Format {
                    path: dir.display().to_string(),
                    msg: format!("a {h}x{w} scene is smaller than a {tile}-pixel tile"),
                });
            }
            let starts = |n: usize| {
                let mut v: Vec<usize> = (0..=n - tile).step_by(stride).collect();
                if *v.last().unwrap() != n - tile {
                    v.push(n - tile);
                }
                v
            };
            for top in starts(h) {
                for left in starts(w) {
                    tiles.push((scenes.len(), top, left));
                }
            }
            scenes.push(Scene { files, height: h, width: w });
        }
        if tiles.is_empty() {
            return Err(TensorError::Arg { op: "SceneTiles", msg: "no scene given".into() });
        }
        Ok(SceneTiles { scenes, tile, tiles })
    }

    pub fn len(&self) -> usize {
        self.tiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }

    /// Tile `i` as `(12, tile, tile)` digital numbers in model order.
    pub fn load(&self, i: usize) -> Result<Vec<f32>> {
        let &(s, top, left) =
            self.tiles.get(i).ok_or(TensorError::Index { op: "SceneTiles::load", index: i, len: self.tiles.len() })?;
        let sc = &self.scenes[s];
        let t = self.tile;
        let mut out = Vec::with_capacity(12 * t * t);
        for (b, path) in MODEL_BANDS.iter().zip(&sc.files) {
            let (bh, bw) = tiff_size(path)?;
            // Integer scale between this band's grid and the 10 m grid (1, 2 or 6 for Sentinel-2).
            let f = sc.height / bh;
            if f == 0 || bh * f != sc.height || bw * f != sc.width {
                return Err(TensorError::Format {
                    path: path.display().to_string(),
                    msg: format!(
                        "is {bh}x{bw}, not an integer fraction of the {}x{} 10 m grid of band {}",
                        sc.height,
                        sc.width,
                        b.name()
                    ),
                });
            }
            if f == 1 {
                out.extend(read_window(path, top as isize, left as isize, t, t)?);
                continue;
            }
            // The coarse window covering the tile, plus a margin; resized by f, then cropped.
            let (ct, cl) = ((top / f) as isize - MARGIN as isize, (left / f) as isize - MARGIN as isize);
            let (chh, cww) =
                ((top + t).div_ceil(f) - top / f + 2 * MARGIN, (left + t).div_ceil(f) - left / f + 2 * MARGIN);
            let win = read_window(path, ct, cl, chh, cww)?;
            let up = resize(&win, chh, cww, chh * f, cww * f, Filter::Bicubic)?;
            let (oy, ox) = (top - (top / f) * f + MARGIN * f, left - (left / f) * f + MARGIN * f);
            for r in 0..t {
                out.extend_from_slice(&up[(oy + r) * cww * f + ox..(oy + r) * cww * f + ox + t]);
            }
        }
        Ok(out)
    }
}
