//! `y = act(x W^T + b)` with PyTorch's `(out, in)` weight layout and its backward. The bias and
//! the optional exact-erf GELU are applied as the GEMM stores its last k-block where the kernel can
//! (our AVX2+FMA kernel: C is written once), elsewhere in an epilogue pass over each block of y
//! while it is still in cache; the same operations in the same order either way.

use super::gemm::{self, gemm, gemm_epilogue, Block, Fuse, Out, Trans};
use super::{gelu, math, reduce, unary_inplace_serial, Dst, Unary};
use crate::error::{check_len, Result, TensorError};
use crate::par::SendPtr;
use crate::simd::{isa, Simd};

/// The activation fused into a Linear's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// Exact-erf GELU.
    Gelu,
}

fn check_dims(op: &'static str, x: usize, w: usize, bias: Option<usize>, m: usize, k: usize, n: usize) -> Result<()> {
    check_len(op, "x", x, m * k)?;
    check_len(op, "weight", w, n * k)?;
    if let Some(b) = bias {
        check_len(op, "bias", b, n)?;
    }
    Ok(())
}

#[inline(always)]
fn epilogue_rows<S: Simd>(blk: Block, ld: usize, src: *mut f32, dst: *mut f32, bias: Option<&[f32]>, act: Activation) {
    if bias.is_none() && act == Activation::Identity {
        return;
    }
    let w = blk.c1 - blk.c0;
    for r in blk.r0..blk.r1 {
        // SAFETY: the block's rows and columns lie inside both buffers (checked by the caller).
        let s = unsafe { std::slice::from_raw_parts_mut(src.add(r * ld + blk.c0), w) };
        if let Some(b) = bias {
            super::unary_serial::<S, super::Identity>(&super::Identity, &b[blk.c0..blk.c1], s, Dst::Accumulate);
        }
        if act == Activation::Gelu {
            if src == dst {
                unary_inplace_serial::<S, GeluOp>(&GeluOp, s);
            } else {
                let d = unsafe { std::slice::from_raw_parts_mut(dst.add(r * ld + blk.c0), w) };
                super::unary_serial::<S, GeluOp>(&GeluOp, s, d, Dst::Overwrite);
            }
        }
    }
}

/// Splits a Linear's bias and activation between the GEMM's store (where the kernel can apply
/// them: [`Fuse`]) and the epilogue pass (what is left: nothing, or everything). `y`: where
/// GELU goes when C keeps the pre-activation (training).
fn split_epilogue<'a>(
    k: usize,
    bias: Option<&'a [f32]>,
    act: Activation,
    y: Option<(SendPtr, usize)>,
) -> (Fuse<'a>, Option<&'a [f32]>, Activation) {
    if gemm::fuses_bias_gelu() && k > 0 {
        let gelu = act == Activation::Gelu;
        (Fuse { bias, gelu, out: y.filter(|_| gelu) }, None, Activation::Identity)
    } else {
        (Fuse::NONE, bias, act)
    }
}

struct GeluOp;
impl Unary for GeluOp {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        math::gelu::<S>(x)
    }
}

/// `y (m x n) = act(x (m x k) W^T + bias)` with `W` stored `(n, k)` as PyTorch stores Linear weights.
/// With GELU and `pre` given, `pre` receives the pre-activation that the backward needs; without
/// `pre` (inference) the activation is applied in place.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
    pre: Option<&mut [f32]>,
    y: &mut [f32],
) -> Result<()> {
    forward_to(x, Weight::Stored(w), bias, m, k, n, act, pre.map(Out::of), Out::of(y))
}

/// [`forward`] for inference with a weight already in the GEMM's panel layout
/// ([`super::gemm::pack_panels`] of the `(n, k)` weight); the activation is applied in place.
#[allow(clippy::too_many_arguments)]
pub fn forward_panels(
    x: &[f32],
    w_panels: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
    y: &mut [f32],
) -> Result<()> {
    forward_to(x, Weight::Panels(w_panels), bias, m, k, n, act, None, Out::of(y))
}

/// [`forward`] into new buffers: `y`, and the pre-activation when `keep_pre`. Where the product
/// writes every value itself (our packed AVX2+FMA kernel, which also applies the bias and GELU)
/// they are not zeroed first: zeroing them took about 1% of a training or inference step.
#[allow(clippy::too_many_arguments)]
pub fn forward_new(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
    keep_pre: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    new_outputs(m * n, k, keep_pre, |pre, y| forward_to(x, Weight::Stored(w), bias, m, k, n, act, pre, y))
}

/// [`forward_panels`] into a new buffer, as [`forward_new`].
#[allow(clippy::too_many_arguments)]
pub fn forward_panels_new(
    x: &[f32],
    w_panels: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
) -> Result<Vec<f32>> {
    let run = |_, y| forward_to(x, Weight::Panels(w_panels), bias, m, k, n, act, None, y);
    Ok(new_outputs(m * n, k, false, run)?.0)
}

/// Buffers of `len` values for y (and the pre-activation), filled by `run`: left uninitialised
/// where the product writes all of them ([`gemm::fills_output`]), zeroed otherwise.
fn new_outputs(
    len: usize,
    k: usize,
    keep_pre: bool,
    run: impl FnOnce(Option<Out>, Out) -> Result<()>,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let fills = gemm::fills_output(k);
    let new = |len: usize| if fills { Vec::with_capacity(len) } else { vec![0f32; len] };
    let (mut y, mut pre) = (new(len), keep_pre.then(|| new(len)));
    // The capacity's start and length: `run` writes there through raw pointers only.
    let out = |v: &mut Vec<f32>| Out { ptr: SendPtr(v.as_mut_ptr()), len };
    run(pre.as_mut().map(out), out(&mut y))?;
    if fills {
        // SAFETY: `run` returned Ok, so the product wrote all `len` values of each buffer: under
        // `fills_output` its first k-block stores every element of C and its last every element
        // of the GELU output, and nothing reads them before (beta is 0). The tests check this on
        // buffers filled with NaN.
        unsafe {
            y.set_len(len);
            if let Some(p) = pre.as_mut() {
                p.set_len(len);
            }
        }
    }
    Ok((y, pre))
}

/// The weight operand of [`forward_to`].
#[derive(Clone, Copy)]
enum Weight<'a> {
    /// `(n, k)`, as PyTorch stores it.
    Stored(&'a [f32]),
    /// In the GEMM's panel layout ([`super::gemm::pack_panels`]).
    Panels(&'a [f32]),
}

/// Every forward entry point above. The product writes `y` and `pre` before anything reads them
/// (where the kernel does not fuse, the epilogue pass reads only values the product wrote).
#[allow(clippy::too_many_arguments)]
fn forward_to(
    x: &[f32],
    w: Weight,
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
    pre: Option<Out>,
    y: Out,
) -> Result<()> {
    let op = match w {
        Weight::Stored(w) => {
            check_dims("linear::forward", x.len(), w.len(), bias.map(|b| b.len()), m, k, n)?;
            "linear::forward"
        }
        Weight::Panels(p) => {
            let op = "linear::forward_panels";
            check_dims(op, x.len(), n * k, bias.map(|b| b.len()), m, k, n)?;
            check_len(op, "weight panels", p.len(), super::gemm::panels_len(k, n))?;
            op
        }
    };
    check_len(op, "y", y.len, m * n)?;
    // C: the pre-activation when kept (GELU then goes to y), else y itself.
    let (c, gelu_to) = match pre {
        Some(pre) => {
            check_len(op, "pre", pre.len, m * n)?;
            if act != Activation::Gelu {
                return Err(TensorError::Arg { op, msg: "a pre-activation buffer needs an activation".into() });
            }
            (pre, Some(y))
        }
        None => (y, None),
    };
    let (fuse, bias, act) = split_epilogue(k, bias, act, gelu_to.map(|o| (o.ptr, o.len)));
    let isa = isa();
    let epilogue = |blk: Block, p: SendPtr| {
        let dst = gelu_to.map_or(p, |o| o.ptr);
        crate::dispatch!(isa, epilogue_rows[](blk, n, p.get(), dst.get(), bias, act))
    };
    match w {
        Weight::Stored(w) => gemm_epilogue(Trans::N, Trans::T, m, n, k, 1.0, x, k, w, k, 0.0, c, n, fuse, &epilogue),
        Weight::Panels(p) => gemm::gemm_panels_epilogue(Trans::N, m, n, k, 1.0, x, k, p, 0.0, c, n, fuse, &epilogue),
    }
}

/// Backward of [`forward`] without activation: `dw += dy^T x`, `db += sum_rows dy`, and, when asked,
/// `dx (=|+=) dy W`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
    dx: Option<(&mut [f32], Dst)>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    let op = "linear::backward";
    check_dims(op, x.len(), w.len(), None, m, k, n)?;
    check_len(op, "dy", dy.len(), m * n)?;
    check_len(op, "dweight", dw.len(), n * k)?;
    if let Some((dx, dst)) = dx {
        check_len(op, "dx", dx.len(), m * k)?;
        let beta = if dst == Dst::Accumulate { 1.0 } else { 0.0 };
        gemm(Trans::N, Trans::N, m, k, n, 1.0, dy, n, w, k, beta, dx, k)?;
    }
    gemm(Trans::T, Trans::N, n, k, m, 1.0, dy, n, x, k, 1.0, dw, k)?;
    if let Some(db) = db {
        reduce::col_sum(dy, m, n, db, Dst::Accumulate)?;
    }
    Ok(())
}

/// Backward of a Linear with fused GELU, from the saved pre-activation: `dpre = dy * gelu'(pre)`,
/// then [`backward`]. `dy` is the gradient of the activated output.
#[allow(clippy::too_many_arguments)]
pub fn backward_gelu(
    x: &[f32],
    w: &[f32],
    pre: &[f32],
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
    dx: Option<(&mut [f32], Dst)>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    check_len("linear::backward_gelu", "pre", pre.len(), m * n)?;
    let mut dpre = vec![0f32; m * n];
    gelu::backward(pre, dy, &mut dpre, Dst::Overwrite)?;
    backward(x, w, &dpre, m, k, n, dx, dw, db)
}

/// Plain f64 loops that the tests trust.
pub mod reference {
    use super::Activation;

    pub fn forward(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        act: Activation,
    ) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                if let Some(b) = bias {
                    s += b[j] as f64;
                }
                y[i * n + j] = if act == Activation::Gelu { crate::kernels::gelu::reference::gelu(s) } else { s };
            }
        }
        y
    }
}
