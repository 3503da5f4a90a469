//! `cargo xtask crop-scene SRC DST TOP LEFT SIZE`: a square region of a scene folder of per-band
//! GeoTIFFs, each band cropped at its own resolution (the window is on the 10 m grid and aligned to
//! 60 m so that every band's window is whole), written as uint16 GeoTIFFs with the same file names.
//! Used to make small real fixtures from large scenes.

use std::path::Path;

use sg_data::raster::{read_window, tiff_size};
use sg_tensor::{Result, TensorError};

pub fn run(src: &Path, dst: &Path, top: usize, left: usize, size: usize) -> Result<usize> {
    if top % 6 != 0 || left % 6 != 0 || size % 6 != 0 || size == 0 {
        return Err(TensorError::Arg {
            op: "crop-scene",
            msg: "TOP, LEFT and SIZE must be multiples of 6 (the 60 m grid)".into(),
        });
    }
    let files: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| TensorError::Io { path: src.display().to_string(), msg: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tif"))
        .collect();
    // The 10 m grid is the largest band.
    let sizes = files.iter().map(tiff_size).collect::<Result<Vec<_>>>()?;
    let full = sizes.iter().map(|s| s.0).max().unwrap_or(0);
    std::fs::create_dir_all(dst)
        .map_err(|e| TensorError::Io { path: dst.display().to_string(), msg: e.to_string() })?;
    for (path, (h, w)) in files.iter().zip(sizes) {
        let f = full / h.max(1);
        if f == 0 || top + size > h * f || left + size > w * f {
            return Err(TensorError::Arg { op: "crop-scene", msg: format!("the region leaves {}", path.display()) });
        }
        let (ch, cw) = (size / f, size / f);
        let win = read_window(path, (top / f) as isize, (left / f) as isize, ch, cw)?;
        let data: Vec<u16> = win.iter().map(|&v| v.clamp(0.0, 65535.0) as u16).collect();
        let out = dst.join(path.file_name().unwrap());
        let file = std::fs::File::create(&out)
            .map_err(|e| TensorError::Io { path: out.display().to_string(), msg: e.to_string() })?;
        let mut enc = tiff::encoder::TiffEncoder::new(file)
            .map_err(|e| TensorError::Io { path: out.display().to_string(), msg: e.to_string() })?;
        enc.write_image::<tiff::encoder::colortype::Gray16>(cw as u32, ch as u32, &data)
            .map_err(|e| TensorError::Io { path: out.display().to_string(), msg: e.to_string() })?;
    }
    Ok(files.len())
}
