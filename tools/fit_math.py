"""Fits the polynomial approximations used by sg-tensor's SIMD kernels (crates/sg-tensor/src/kernels/math.rs).

    pip install numpy mpmath && python3 tools/fit_math.py

erf:
Two pieces, each a relative least-squares fit on Chebyshev nodes against mpmath at 30 digits:
  |x| <= 1:     erf(x) = x * A(x^2)                 (A of degree 6)
  1 < |x| < 4:  erf(x) = 1 - exp(-x^2) * B(1/|x|)   (B of degree 10; erfc(x) exp(x^2) is smooth there)
  |x| >= 4:     erf(x) = +-1 (erfc(4) = 1.5e-8 is below half an f32 ulp of 1)
exp on the reduced range |r| <= ln2/2, for attention's softmax (inputs <= 0):
  e^r = 1 + r + r^2 * P(r)                          (P of degree 3; iteratively reweighted towards minimax)
Prints the coefficients (lowest degree first) as Rust constants and the fit's max relative error.
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 30


def fit(f, lo, hi, deg, var):
    n = 2000
    k = np.arange(n)
    xs = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / n)
    ys = np.array([float(f(x)) for x in xs])
    w = 1 / np.abs(ys)
    v = np.vander(var(xs), deg + 1, increasing=True)
    c, *_ = np.linalg.lstsq(v * w[:, None], ys * w, rcond=None)
    xt = np.linspace(lo, hi, 20001)
    yt = np.array([float(f(x)) for x in xt])
    rel = np.max(np.abs(np.vander(var(xt), deg + 1, increasing=True) @ c - yt) / np.abs(yt))
    return c, rel


a, ra = fit(lambda x: mp.erf(x) / x, 1e-6, 1.0, 6, lambda x: x * x)
b, rb = fit(lambda x: mp.erfc(x) * mp.exp(x * x), 1.0, 4.0, 10, lambda x: 1 / x)
print(f"// erf(x)/x on |x| <= 1 as a polynomial in x^2; max relative error of the fit {ra:.1e}")
print("const ERF_A: [f32; 7] = [" + ", ".join(f"{c:.9e}" for c in a) + "];")
print(f"// erfc(x) exp(x^2) on 1 < x < 4 as a polynomial in 1/x; max relative error of the fit {rb:.1e}")
print("const ERFC_B: [f32; 11] = [" + ", ".join(f"{c:.9e}" for c in b) + "];")


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
