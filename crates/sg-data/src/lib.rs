//! `sg-data`: real Sentinel-2 datasets for SpectralGPT, read in pure Rust (no GDAL).
//!
//! - [`raster`]: GeoTIFF rasters (pixel-interleaved or planar) as f32 band planes;
//! - [`bands`]: named bands and the model's order (B1..B8, B8A, B9, B11, B12; B10 dropped);
//! - [`eurosat`]: EuroSAT-MS class folders and split files;
//! - [`bigearthnet`]: BigEarthNet-S2 patches (bands to 120 x 120 by bicubic), the 19-class labels;
//! - [`oscd`]: OSCD city pairs on the 10 m grid with their change maps;
//! - [`sen1floods11`]: Sen1Floods11 chips with water masks (no data ignored);
//! - [`scenes`]: pretraining tiles of whole scenes, read window by window (a scene is never held whole);
//! - [`sources`]: unlabelled images for pretraining from any of these folders, recognised by layout;
//! - [`resample`]: nearest, bilinear and bicubic resizing with PyTorch's conventions;
//! - [`augment`]: random resized crop, flips and rotations (masks transformed identically), eval crops;
//! - [`loader`]: seeded, prefetching, streaming batches from any dataset, with bad samples skipped on request;
//! - [`normalize`]: per-image min-max, z-score and mean +- 2 std, statistics looked up by band name.

pub mod augment;
pub mod bands;
pub mod bigearthnet;
pub mod eurosat;
pub mod loader;
pub mod normalize;
pub mod oscd;
pub mod raster;
pub mod resample;
pub mod scenes;
pub mod sen1floods11;
pub mod sources;

pub use bands::{Band, MODEL_BANDS};
pub use raster::{read_tiff, Raster};
