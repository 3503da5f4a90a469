//! CPU kernels, one file per op family. Each family has:
//! - a public, shape-checked entry point that picks the instruction set at run time
//!   ([`crate::simd::isa`]) and parallelises over the one rayon pool where it pays;
//! - the fast body, written once over [`crate::simd::Simd`] (AVX2+FMA, portable `wide`, scalar);
//! - a `reference` module: plain scalar loops that the tests trust and compare against.
//!
//! Model code calls the entry points and never sees instruction sets, so a kernel can be rewritten
//! without touching a model.

pub mod adamw;
pub mod attention;
pub mod elementwise;
pub mod gather;
pub mod gelu;
pub mod gemm;
pub mod layernorm;
pub mod linear;
pub mod math;
pub mod reduce;
pub(crate) mod sgemm;
pub mod softmax;
mod tile;

use crate::par;
use crate::simd::{isa, Scalar, Simd};

/// What a kernel does with its output buffer: gradients of a value used twice are summed in place
/// (`Accumulate`), never by zeroing a temporary and adding it afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dst {
    Overwrite,
    Accumulate,
}

/// Elements per parallel task for streaming kernels (fits in L2 with its operands).
pub(crate) const STREAM_CHUNK: usize = 1 << 14;

/// `n` zeros, written by all threads when long: a step's fresh activation and gradient buffers
/// are tens of MiB (reused heap memory, so the allocator must clear them), and one thread
/// clearing them leaves the others idle.
pub fn zeros(n: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 18;
    if n <= 2 * CHUNK || !par::can_split() {
        return vec![0.0; n];
    }
    let mut v = Vec::<f32>::with_capacity(n);
    let p = par::SendPtr(v.as_mut_ptr());
    par::for_each(n.div_ceil(CHUNK), true, |i| {
        let start = i * CHUNK;
        // SAFETY: chunk i is in the capacity and no other task writes it.
        unsafe { std::ptr::write_bytes(p.get().add(start), 0, CHUNK.min(n - start)) };
    });
    // SAFETY: every chunk, so all n values, was written above (all-zero bytes are 0.0).
    unsafe { v.set_len(n) };
    v
}

/// A lane-wise function of one input.
pub(crate) trait Unary: Sync {
    fn f<S: Simd>(&self, x: S::V) -> S::V;
}

/// `f(x) = x`: with `Dst::Accumulate`, the `y += x` building block.
pub(crate) struct Identity;
impl Unary for Identity {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        x
    }
}

/// A lane-wise function of two inputs.
pub(crate) trait Binary: Sync {
    fn f<S: Simd>(&self, a: S::V, b: S::V) -> S::V;
}

#[inline(always)]
fn put<S: Simd>(p: *mut f32, v: S::V, dst: Dst) {
    // SAFETY: callers pass pointers valid for `S::LANES` floats.
    unsafe {
        match dst {
            Dst::Overwrite => S::store(p, v),
            Dst::Accumulate => S::store(p, S::add(S::load(p), v)),
        }
    }
}

#[inline(always)]
pub(crate) fn unary_serial<S: Simd, O: Unary>(op: &O, x: &[f32], y: &mut [f32], dst: Dst) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        // SAFETY: i + LANES <= n for both slices.
        unsafe { put::<S>(yp.add(i), op.f::<S>(S::load(xp.add(i))), dst) };
        i += S::LANES;
    }
    while i < n {
        unsafe { put::<Scalar>(yp.add(i), op.f::<Scalar>(*xp.add(i)), dst) };
        i += 1;
    }
}

#[inline(always)]
pub(crate) fn unary_inplace_serial<S: Simd, O: Unary>(op: &O, y: &mut [f32]) {
    let n = y.len();
    let yp = y.as_mut_ptr();
    let mut i = 0;
    while i + S::LANES <= n {
        unsafe { S::store(yp.add(i), op.f::<S>(S::load(yp.add(i)))) };
        i += S::LANES;
    }
    while i < n {
        unsafe { *yp.add(i) = op.f::<Scalar>(*yp.add(i)) };
        i += 1;
    }
}

#[inline(always)]
pub(crate) fn binary_serial<S: Simd, O: Binary>(op: &O, a: &[f32], b: &[f32], y: &mut [f32], dst: Dst) {
    let n = y.len().min(a.len()).min(b.len());
    let (ap, bp, yp) = (a.as_ptr(), b.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        unsafe { put::<S>(yp.add(i), op.f::<S>(S::load(ap.add(i)), S::load(bp.add(i))), dst) };
        i += S::LANES;
    }
    while i < n {
        unsafe { put::<Scalar>(yp.add(i), op.f::<Scalar>(*ap.add(i), *bp.add(i)), dst) };
        i += 1;
    }
}

/// `y = op(a, y)` in place.
#[inline(always)]
pub(crate) fn binary_inplace_serial<S: Simd, O: Binary>(op: &O, a: &[f32], y: &mut [f32]) {
    let n = y.len().min(a.len());
    let (ap, yp) = (a.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        unsafe { S::store(yp.add(i), op.f::<S>(S::load(ap.add(i)), S::load(yp.add(i)))) };
        i += S::LANES;
    }
    while i < n {
        unsafe { *yp.add(i) = op.f::<Scalar>(*ap.add(i), *yp.add(i)) };
        i += 1;
    }
}

/// `y (=|+=) op(x)` over the active instruction set, parallel for long buffers. Lengths checked by callers.
pub(crate) fn run_unary<O: Unary>(op: &O, x: &[f32], y: &mut [f32], dst: Dst) {
    let parallel = y.len() > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    par::chunks_mut(y, STREAM_CHUNK, parallel, |ci, yc| {
        let xc = &x[ci * STREAM_CHUNK..ci * STREAM_CHUNK + yc.len()];
        crate::dispatch!(isa, unary_serial[O](op, xc, yc, dst))
    });
}

/// `y = op(y)` in place.
pub(crate) fn run_unary_inplace<O: Unary>(op: &O, y: &mut [f32]) {
    let parallel = y.len() > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    par::chunks_mut(y, STREAM_CHUNK, parallel, |_, yc| crate::dispatch!(isa, unary_inplace_serial[O](op, yc)));
}

/// `y = op(a, y)` in place.
pub(crate) fn run_binary_inplace<O: Binary>(op: &O, a: &[f32], y: &mut [f32]) {
    let parallel = y.len() > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    par::chunks_mut(y, STREAM_CHUNK, parallel, |ci, yc| {
        let ac = &a[ci * STREAM_CHUNK..ci * STREAM_CHUNK + yc.len()];
        crate::dispatch!(isa, binary_inplace_serial[O](op, ac, yc))
    });
}

/// `y (=|+=) op(a, b)`.
pub(crate) fn run_binary<O: Binary>(op: &O, a: &[f32], b: &[f32], y: &mut [f32], dst: Dst) {
    let parallel = y.len() > 2 * STREAM_CHUNK && par::can_split();
    let isa = isa();
    par::chunks_mut(y, STREAM_CHUNK, parallel, |ci, yc| {
        let r = ci * STREAM_CHUNK..ci * STREAM_CHUNK + yc.len();
        crate::dispatch!(isa, binary_serial[O](op, &a[r.clone()], &b[r], yc, dst))
    });
}
