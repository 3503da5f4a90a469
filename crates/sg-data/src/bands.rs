//! Sentinel-2 bands by name, and the order the model takes them in.

use sg_tensor::{Result, TensorError};

/// The 13 Sentinel-2 MSI bands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Band {
    B1,
    B2,
    B3,
    B4,
    B5,
    B6,
    B7,
    B8,
    B8A,
    B9,
    B10,
    B11,
    B12,
}

/// The model's band order (SPEC): B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12 (B10, cirrus, dropped).
pub const MODEL_BANDS: [Band; 12] = [
    Band::B1,
    Band::B2,
    Band::B3,
    Band::B4,
    Band::B5,
    Band::B6,
    Band::B7,
    Band::B8,
    Band::B8A,
    Band::B9,
    Band::B11,
    Band::B12,
];

/// The 13 bands in numeric order with B8A after B8 (BigEarthNet statistics, OSCD, L1C products).
pub const ALL_BANDS: [Band; 13] = [
    Band::B1,
    Band::B2,
    Band::B3,
    Band::B4,
    Band::B5,
    Band::B6,
    Band::B7,
    Band::B8,
    Band::B8A,
    Band::B9,
    Band::B10,
    Band::B11,
    Band::B12,
];

/// EuroSAT-MS's file order: B1..B12 in numeric order, then B8A last.
pub const EUROSAT_FILE_BANDS: [Band; 13] = [
    Band::B1,
    Band::B2,
    Band::B3,
    Band::B4,
    Band::B5,
    Band::B6,
    Band::B7,
    Band::B8,
    Band::B9,
    Band::B10,
    Band::B11,
    Band::B12,
    Band::B8A,
];

impl Band {
    /// Ground sampling distance in metres.
    pub fn resolution_m(self) -> u32 {
        match self {
            Band::B2 | Band::B3 | Band::B4 | Band::B8 => 10,
            Band::B5 | Band::B6 | Band::B7 | Band::B8A | Band::B11 | Band::B12 => 20,
            Band::B1 | Band::B9 | Band::B10 => 60,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Band::B1 => "B01",
            Band::B2 => "B02",
            Band::B3 => "B03",
            Band::B4 => "B04",
            Band::B5 => "B05",
            Band::B6 => "B06",
            Band::B7 => "B07",
            Band::B8 => "B08",
            Band::B8A => "B8A",
            Band::B9 => "B09",
            Band::B10 => "B10",
            Band::B11 => "B11",
            Band::B12 => "B12",
        }
    }

    /// Parses `B8A`, `B08`, `B8`, `b11`, ...
    pub fn parse(s: &str) -> Result<Band> {
        let u = s.trim().to_ascii_uppercase();
        if u == "B8A" || u == "B08A" {
            return Ok(Band::B8A);
        }
        let n: Option<u32> = u.strip_prefix('B').and_then(|d| d.parse().ok());
        let b = match n {
            Some(1) => Band::B1,
            Some(2) => Band::B2,
            Some(3) => Band::B3,
            Some(4) => Band::B4,
            Some(5) => Band::B5,
            Some(6) => Band::B6,
            Some(7) => Band::B7,
            Some(8) => Band::B8,
            Some(9) => Band::B9,
            Some(10) => Band::B10,
            Some(11) => Band::B11,
            Some(12) => Band::B12,
            _ => return Err(TensorError::Arg { op: "Band::parse", msg: format!("`{s}` is not a Sentinel-2 band") }),
        };
        Ok(b)
    }
}

/// For each band of `want`, its index in `have`; an error naming the first missing band.
pub fn select(have: &[Band], want: &[Band]) -> Result<Vec<usize>> {
    want.iter()
        .map(|b| {
            have.iter().position(|h| h == b).ok_or_else(|| TensorError::Arg {
                op: "bands",
                msg: format!(
                    "band {} is missing (have {:?})",
                    b.name(),
                    have.iter().map(|b| b.name()).collect::<Vec<_>>()
                ),
            })
        })
        .collect()
}

/// The planes of `data` (band-major, `have` order) in `want` order.
pub fn reorder(data: &[f32], plane: usize, have: &[Band], want: &[Band]) -> Result<Vec<f32>> {
    if data.len() != plane * have.len() {
        return Err(TensorError::Length { op: "reorder", arg: "data", expected: plane * have.len(), got: data.len() });
    }
    let idx = select(have, want)?;
    let mut out = Vec::with_capacity(plane * want.len());
    for i in idx {
        out.extend_from_slice(&data[i * plane..(i + 1) * plane]);
    }
    Ok(out)
}
