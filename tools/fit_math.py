"""Fits the polynomial approximations used by sg-tensor's SIMD kernels (crates/sg-tensor/src/kernels/math.rs).

    pip install numpy mpmath && python3 tools/fit_math.py

erf on |x| < 4 in eight pieces of width 1/2, each a degree-7 polynomial in t = |x| - centre
(centre 0 for the first piece, written x * Q(x) so that it has no constant term, else the piece's
midpoint); least squares on Chebyshev nodes over the piece widened by 0.02 at each end, reweighted
towards minimax (absolute error; relative for the first piece), against mpmath at 30 digits.
  |x| >= 4:  erf(x) = +-1 (erfc(4) = 1.5e-8 is below half an f32 ulp of 1)
The kernel looks each lane's coefficients up by piece (one vpermps per coefficient).
exp on the reduced range |r| <= ln2/2, for attention's softmax (inputs <= 0):
  e^r = 1 + r + r^2 * P(r)                          (P of degree 3; iteratively reweighted towards minimax)
Prints the coefficients (lowest degree first) as Rust constants and the fit's max relative error.
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 30


DEG, WIDTH, MARGIN = 7, 0.5, 0.02


def horner_f32(c, t):
    """Evaluates as the kernel does: f32 coefficients, one rounding per FMA step."""
    p = np.full_like(t, np.float32(c[-1]), dtype=np.float32)
    for ci in c[-2::-1]:
        p = (p.astype(np.float64) * t.astype(np.float64) + float(np.float32(ci))).astype(np.float32)
    return p


pieces, worst = [], 0.0
for i in range(8):
    lo, hi = i * WIDTH, (i + 1) * WIDTH
    centre = 0.0 if i == 0 else lo + WIDTH / 2
    a, b = max(0.0, lo - MARGIN), hi + MARGIN
    k = np.arange(3000)
    xs = (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (k + 0.5) / 3000)
    ys = np.array([float(mp.erf(x)) for x in xs])
    t = xs - centre
    if i == 0:
        v, scale = np.vander(t, DEG, increasing=True) * t[:, None], 1 / np.abs(ys)
    else:
        v, scale = np.vander(t, DEG + 1, increasing=True), np.ones_like(ys)
    w = scale.copy()
    for _ in range(40):
        c, *_ = np.linalg.lstsq(v * w[:, None], ys * w, rcond=None)
        err = (v @ c - ys) * scale
        w = w * (1 + 3 * np.abs(err) / np.abs(err).max())
    if i == 0:
        c = np.concatenate([[0.0], c])
    c32 = np.array([np.float32(x) for x in c])
    xt = np.linspace(a, b, 20001).astype(np.float32)
    got = horner_f32(c32, (xt - np.float32(centre)).astype(np.float32)).astype(np.float64)
    worst = max(worst, np.max(np.abs(got - np.array([float(mp.erf(float(x))) for x in xt]))))
    pieces.append(c32)
print(f"// erf in 8 pieces of degree {DEG}; largest absolute error evaluated in f32 {worst:.1e}")
print("const ERF_CENTRE: [f32; 8] = [" + ", ".join(str(0.0 if i == 0 else i * WIDTH + WIDTH / 2) for i in range(8)) + "];")
print(f"const ERF_PW: [[f32; 8]; {DEG + 1}] = [")
for row in np.array(pieces).T:
    print("    [" + ", ".join(f"{x:.9e}" for x in row) + "],")
print("];")

lo, hi = -np.log(2) / 2, np.log(2) / 2
k = np.arange(4000)
xs = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / 4000)
ys = np.exp(xs)
v = np.vander(xs, 4, increasing=True) * (xs**2)[:, None]
w = 1 / ys
for _ in range(30):
    c, *_ = np.linalg.lstsq(v * w[:, None], (ys - 1 - xs) * w, rcond=None)
    err = (v @ c - (ys - 1 - xs)) / ys
    w = w * (1 + 5 * np.abs(err) / np.abs(err).max())
xt = np.linspace(lo, hi, 200001)
rel = np.max(np.abs(1 + xt + xt**2 * (np.vander(xt, 4, increasing=True) @ c) - np.exp(xt)) / np.exp(xt))
print(f"// e^r = 1 + r + r^2 P(r) on |r| <= ln2/2; max relative error of the fit {rel:.1e}")
print("const EXP5_P: [f32; 4] = [" + ", ".join(f"{x:.9e}" for x in c) + "];")
