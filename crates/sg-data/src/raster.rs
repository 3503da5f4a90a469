//! GeoTIFF rasters as f32 band planes, decoded in pure Rust (the `tiff` crate). Both layouts
//! Sentinel-2 products use are read: pixel-interleaved (EuroSAT's 13-sample files) and one plane per
//! band (Sen1Floods11's chips). Values are the stored digital numbers, unscaled.

use std::path::Path;

use sg_tensor::{Result, TensorError};
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

/// An image of `bands` planes of `height x width` pixels, stored band-major: `data[(b * h + y) * w + x]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Raster {
    pub bands: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Raster {
    /// Band `b` as one `height x width` plane.
    pub fn band(&self, b: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[b * n..(b + 1) * n]
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), msg: msg.into() }
}

fn to_f32(r: DecodingResult, path: &Path) -> Result<Vec<f32>> {
    Ok(match r {
        DecodingResult::U8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::F32(v) => v,
        DecodingResult::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        _ => return Err(bad(path, "has a sample type this reader does not handle")),
    })
}

/// One plane per band, each cut into strips or tiles: chunk `c` is plane `c / per_plane`, and within
/// a plane chunks run row by row. Each chunk's data is placed at its position (edge chunks cropped).
fn read_planar<R: std::io::Read + std::io::Seek>(
    d: &mut Decoder<R>,
    w: usize,
    h: usize,
    samples: usize,
    path: &Path,
) -> Result<Vec<f32>> {
    let tiff_err = |e: tiff::TiffError| bad(path, format!("is not a readable TIFF: {e}"));
    let (cw, ch) = d.chunk_dimensions();
    let (cw, ch) = (cw as usize, ch as usize);
    if cw == 0 || ch == 0 {
        return Err(bad(path, "has empty strips or tiles"));
    }
    let (across, down) = (w.div_ceil(cw), h.div_ceil(ch));
    let per_plane = across * down;
    let total = match d.get_chunk_type() {
        tiff::decoder::ChunkType::Tile => d.tile_count().map_err(tiff_err)? as usize,
        tiff::decoder::ChunkType::Strip => d.strip_count().map_err(tiff_err)? as usize,
    };
    if total != per_plane * samples {
        return Err(bad(path, format!("has {total} chunks for {samples} planes of {per_plane}")));
    }
    let n = w * h;
    let mut out = vec![0f32; n * samples];
    for c in 0..total {
        let (plane, t) = (c / per_plane, c % per_plane);
        let (x0, y0) = ((t % across) * cw, (t / across) * ch);
        let vals = to_f32(d.read_chunk(c as u32).map_err(tiff_err)?, path)?;
        let (dw, dh) = d.chunk_data_dimensions(c as u32);
        let (dw, dh) = (dw as usize, dh as usize);
        if vals.len() < dw * dh {
            return Err(bad(path, format!("chunk {c} holds {} values, expected {}", vals.len(), dw * dh)));
        }
        let (vw, vh) = (dw.min(w - x0), dh.min(h - y0));
        for r in 0..vh {
            let dst = plane * n + (y0 + r) * w + x0;
            out[dst..dst + vw].copy_from_slice(&vals[r * dw..r * dw + vw]);
        }
    }
    Ok(out)
}

/// The size of a single-band TIFF without decoding it: `(height, width)`.
pub fn tiff_size(path: impl AsRef<Path>) -> Result<(usize, usize)> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)
        .map_err(|e| TensorError::Io { path: path.display().to_string(), msg: e.to_string() })?;
    let mut d =
        Decoder::new(std::io::BufReader::new(file)).map_err(|e| bad(path, format!("is not a readable TIFF: {e}")))?;
    let (w, h) = d.dimensions().map_err(|e| bad(path, format!("is not a readable TIFF: {e}")))?;
    Ok((h as usize, w as usize))
}

/// The window `top..top+h, left..left+w` of a single-band TIFF, decoding only the strips or tiles
/// that intersect it (a full Sentinel-2 tile never has to be held in memory). Parts of the window
/// outside the image repeat the nearest edge pixel.
pub fn read_window(path: impl AsRef<Path>, top: isize, left: isize, h: usize, w: usize) -> Result<Vec<f32>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)
        .map_err(|e| TensorError::Io { path: path.display().to_string(), msg: e.to_string() })?;
    let tiff_err = |e: tiff::TiffError| bad(path, format!("is not a readable TIFF: {e}"));
    let mut d = Decoder::new(std::io::BufReader::new(file)).map_err(tiff_err)?;
    let (iw, ih) = d.dimensions().map_err(tiff_err)?;
    let (iw, ih) = (iw as usize, ih as usize);
    let samples = d.find_tag_unsigned::<u32>(Tag::SamplesPerPixel).map_err(tiff_err)?.unwrap_or(1);
    if samples != 1 {
        return Err(bad(path, format!("has {samples} samples per pixel; windows are read from single-band files")));
    }
    if iw == 0 || ih == 0 || h == 0 || w == 0 {
        return Err(bad(path, "empty image or window"));
    }
    let (cw, ch) = d.chunk_dimensions();
    let (cw, ch) = (cw as usize, ch as usize);
    let across = iw.div_ceil(cw);
    // Source rows and columns of the window, clamped into the image.
    let rows: Vec<usize> = (0..h).map(|r| (top + r as isize).clamp(0, ih as isize - 1) as usize).collect();
    let cols: Vec<usize> = (0..w).map(|c| (left + c as isize).clamp(0, iw as isize - 1) as usize).collect();
    let (r0, r1) = (rows[0] / ch, rows[h - 1] / ch);
    let (c0, c1) = (cols[0] / cw, cols[w - 1] / cw);
    let mut out = vec![0f32; h * w];
    for cy in r0..=r1 {
        for cx in c0..=c1 {
            let idx = cy * across + cx;
            let vals = to_f32(d.read_chunk(idx as u32).map_err(tiff_err)?, path)?;
            let (dw, _) = d.chunk_data_dimensions(idx as u32);
            let dw = dw as usize;
            for (r, &sy) in rows.iter().enumerate().filter(|(_, &sy)| sy / ch == cy) {
                for (c, &sx) in cols.iter().enumerate().filter(|(_, &sx)| sx / cw == cx) {
                    out[r * w + c] = vals[(sy - cy * ch) * dw + (sx - cx * cw)];
                }
            }
        }
    }
    Ok(out)
}

/// Reads the first image of a TIFF file.
pub fn read_tiff(path: impl AsRef<Path>) -> Result<Raster> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)
        .map_err(|e| TensorError::Io { path: path.display().to_string(), msg: e.to_string() })?;
    let tiff_err = |e: tiff::TiffError| bad(path, format!("is not a readable TIFF: {e}"));
    // Sentinel-2 tiles are at most a few hundred MB; refuse absurd headers instead of allocating them.
    let mut limits = Limits::default();
    limits.decoding_buffer_size = 1 << 31;
    let mut d = Decoder::new(std::io::BufReader::new(file)).map_err(tiff_err)?.with_limits(limits);
    let (w, h) = d.dimensions().map_err(tiff_err)?;
    let (w, h) = (w as usize, h as usize);
    let samples = d.find_tag_unsigned::<u32>(Tag::SamplesPerPixel).map_err(tiff_err)?.unwrap_or(1) as usize;
    // TIFF's PlanarConfiguration: 1 = pixel-interleaved ("chunky"), 2 = one plane per sample.
    let planar = d.find_tag_unsigned::<u16>(Tag::PlanarConfiguration).map_err(tiff_err)?.unwrap_or(1) == 2;
    let n = w * h;
    if n == 0 || samples == 0 {
        return Err(bad(path, "has an empty image"));
    }
    let data = if planar && samples > 1 {
        read_planar(&mut d, w, h, samples, path)?
    } else {
        let pix = to_f32(d.read_image().map_err(tiff_err)?, path)?;
        if samples == 1 {
            pix
        } else {
            // Pixel-interleaved: transpose to band-major.
            let mut out = vec![0.0; pix.len()];
            for (i, px) in pix.chunks_exact(samples).enumerate() {
                for (b, &v) in px.iter().enumerate() {
                    out[b * n + i] = v;
                }
            }
            out
        }
    };
    if data.len() != n * samples {
        return Err(bad(path, format!("decoded {} values for {samples} bands of {w}x{h}", data.len())));
    }
    Ok(Raster { bands: samples, height: h, width: w, data })
}
