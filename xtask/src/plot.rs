//! Small raster drawing for run reports: loss curves (`loss.png`) and image grids (`recon.png`),
//! with a 3 x 5 pixel font for tick labels and legends.

use std::path::Path;

use sg_tensor::Result;

use crate::png::write_rgb;

pub type Rgb = [u8; 3];

/// A named, coloured curve of `(x, y)` points.
pub type Series<'a> = (&'a str, Rgb, Vec<(f64, f64)>);

/// An RGB canvas.
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<u8>,
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' | 's' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [7, 5, 7, 4, 7],
        'l' => [4, 4, 4, 4, 7],
        'o' => [0, 7, 5, 5, 7],
        't' => [2, 7, 2, 2, 3],
        'p' => [7, 5, 7, 4, 4],
        'r' => [0, 7, 4, 4, 4],
        'n' => [0, 7, 5, 5, 5],
        'i' => [2, 0, 2, 2, 2],
        'u' => [0, 5, 5, 5, 7],
        'c' => [0, 7, 4, 4, 7],
        'm' => [0, 7, 7, 5, 5],
        'a' => [0, 7, 1, 7, 7],
        'k' => [4, 5, 6, 5, 5],
        'd' => [1, 7, 5, 5, 7],
        _ => [0; 5],
    }
}

impl Canvas {
    pub fn new(w: usize, h: usize, bg: Rgb) -> Self {
        Canvas { w, h, px: bg.iter().copied().cycle().take(w * h * 3).collect() }
    }

    pub fn set(&mut self, x: isize, y: isize, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            self.set((x0 + t * (x1 - x0)).round() as isize, (y0 + t * (y1 - y0)).round() as isize, c);
        }
    }

    /// Text at `(x, y)` (top-left), each font pixel `scale` x `scale`.
    pub fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            for (r, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    (x + k * 4 * scale + col * scale + dx) as isize,
                                    (y + r * scale + dy) as isize,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_rgb(path, self.w, self.h, &self.px)
    }
}

fn label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Curves `(name, colour, points)` over a shared x axis, y on a log scale.
pub fn curves(path: &Path, series: &[Series]) -> Result<()> {
    let (w, h) = (720usize, 420usize);
    let (l, r, t, b) = (70.0, 20.0, 20.0, 40.0);
    let mut c = Canvas::new(w, h, [255, 255, 255]);
    let pts = series.iter().flat_map(|s| s.2.iter()).filter(|p| p.1 > 0.0 && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y.log10());
        y1 = y1.max(y.log10());
    }
    if x0 > x1 {
        return c.save(path);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-6 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w as f64 - l - r);
    let py = |ly: f64| t + (y1 - ly) / (y1 - y0) * (h as f64 - t - b);
    let grey = [200, 200, 200];
    for k in 0..=4 {
        let ly = y0 + (y1 - y0) * k as f64 / 4.0;
        c.line(l, py(ly), w as f64 - r, py(ly), grey);
        c.text(4, py(ly) as usize - 5, &label(10f64.powf(ly)), 2, [60, 60, 60]);
        let x = x0 + (x1 - x0) * k as f64 / 4.0;
        c.line(px(x), t, px(x), h as f64 - b, grey);
        c.text((px(x) as usize).saturating_sub(10), h - b as usize + 8, &format!("{x:.0}"), 2, [60, 60, 60]);
    }
    c.text(w / 2 - 16, h - 14, "step", 2, [60, 60, 60]);
    for (i, (name, col, p)) in series.iter().enumerate() {
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in p.iter().filter(|p| p.1 > 0.0 && p.1.is_finite()) {
            let cur = (px(x), py(y.log10()));
            if let Some(pv) = prev {
                c.line(pv.0, pv.1, cur.0, cur.1, *col);
            }
            prev = Some(cur);
        }
        let ly = t as usize + 8 + 16 * i;
        c.line(w as f64 - 150.0, ly as f64 + 4.0, w as f64 - 120.0, ly as f64 + 4.0, *col);
        c.text(w - 112, ly, name, 2, *col);
    }
    c.save(path)
}

/// Maps three planes to 8-bit RGB with a 2-98% stretch over their finite values; NaN is grey.
pub fn rgb_stretch(r: &[f32], g: &[f32], b: &[f32]) -> Vec<u8> {
    let mut v: Vec<f32> = r.iter().chain(g).chain(b).copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    let (lo, hi) =
        if v.is_empty() { (0.0, 1.0) } else { (v[v.len() * 2 / 100], v[(v.len() * 98 / 100).min(v.len() - 1)]) };
    let span = (hi - lo).max(1e-12);
    let q = |x: f32| if x.is_finite() { (((x - lo) / span).clamp(0.0, 1.0) * 255.0) as u8 } else { 128 };
    r.iter().zip(g).zip(b).flat_map(|((&r, &g), &b)| [q(r), q(g), q(b)]).collect()
}
