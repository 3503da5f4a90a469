//! 3D tokenisation: an image `(N, bands, H, W)` becomes `(N, t*h*w, u*p*p)` tokens, token
//! `k = g*h*w + i*w + j` holding bands `u*g .. u*g+u` of the `p x p` pixels at grid cell `(i, j)`,
//! feature `f = a*p*p + r*p + c` = band `u*g + a` at pixel `(p*i + r, p*j + c)` (the original's order).

use sg_tensor::{Result, TensorError};

/// The sizes of a tokenisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenGeometry {
    pub batch: usize,
    pub bands: usize,
    pub height: usize,
    pub width: usize,
    pub p: usize,
    pub u: usize,
}

impl TokenGeometry {
    /// Checks that the image divides into whole tokens.
    pub fn new(batch: usize, bands: usize, height: usize, width: usize, p: usize, u: usize) -> Result<Self> {
        let g = TokenGeometry { batch, bands, height, width, p, u };
        let bad = |msg: String| Err(TensorError::Shape { op: "patchify", msg });
        if p == 0 || u == 0 {
            return bad(format!("patch sizes must be positive (p {p}, u {u})"));
        }
        if height % p != 0 || width % p != 0 {
            return bad(format!("an image of {height}x{width} pixels is not a multiple of the patch size {p}"));
        }
        if bands % u != 0 {
            return bad(format!("{bands} bands are not a multiple of {u} bands per token"));
        }
        if [batch, bands, height, width].iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
            return bad(format!("{batch} images of {bands} x {height} x {width} overflow the address space"));
        }
        Ok(g)
    }

    /// `(t, h, w)`.
    pub fn grid(&self) -> (usize, usize, usize) {
        (self.bands / self.u, self.height / self.p, self.width / self.p)
    }

    pub fn tokens(&self) -> usize {
        let (t, h, w) = self.grid();
        t * h * w
    }

    pub fn token_dim(&self) -> usize {
        self.u * self.p * self.p
    }

    pub fn image_len(&self) -> usize {
        self.batch * self.bands * self.height * self.width
    }

    /// Index pairs `(token element, pixel)` visited in token order, row by row of pixels.
    fn for_each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (t, h, w) = self.grid();
        let (p, u) = (self.p, self.u);
        let (hh, ww) = (self.height, self.width);
        let td = self.token_dim();
        for n in 0..self.batch {
            for g in 0..t {
                for i in 0..h {
                    for j in 0..w {
                        let tok = ((n * t + g) * h + i) * w + j;
                        for a in 0..u {
                            let band = u * g + a;
                            for r in 0..p {
                                let src = ((n * self.bands + band) * hh + p * i + r) * ww + p * j;
                                let dst = tok * td + a * p * p + r * p;
                                f(src, dst, p);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `(N, bands, H, W)` to `(N, L, u*p*p)`.
pub fn patchify(x: &[f32], g: &TokenGeometry) -> Result<Vec<f32>> {
    if x.len() != g.image_len() {
        return Err(TensorError::Length { op: "patchify", arg: "image", expected: g.image_len(), got: x.len() });
    }
    let mut out = vec![0.0; x.len()];
    g.for_each(|src, dst, run| out[dst..dst + run].copy_from_slice(&x[src..src + run]));
    Ok(out)
}

/// The exact inverse of [`patchify`].
pub fn unpatchify(tokens: &[f32], g: &TokenGeometry) -> Result<Vec<f32>> {
    if tokens.len() != g.image_len() {
        return Err(TensorError::Length {
            op: "unpatchify",
            arg: "tokens",
            expected: g.image_len(),
            got: tokens.len(),
        });
    }
    let mut out = vec![0.0; tokens.len()];
    g.for_each(|src, dst, run| out[src..src + run].copy_from_slice(&tokens[dst..dst + run]));
    Ok(out)
}
