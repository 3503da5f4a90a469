//! Multi-head scaled-dot-product attention, forward and backward, without the `seq x seq`
//! probability matrix: queries are taken in blocks of [`BLOCK_Q`] rows against key blocks of up to
//! [`BLOCK_K`] with an online softmax (running max and sum), and the forward keeps only each row's
//! log-sum-exp; the backward recomputes the probabilities tile by tile (FlashAttention-2's scheme).
//! Tasks are (batch, head) pairs spread over the pool; inside a task, the tile products run on a
//! register-blocked micro-kernel (`tile.rs`) whose row-contiguous operand is transposed once (Q^T
//! per query block in the forward, K^T and V^T per head in the backward). Data movement
//! is a large share at the encoder's short sequences (57 visible tokens): there the forward reads K
//! in place (V, read many times, is copied to contiguous rows) and the backward writes dQ, dK and dV
//! in place, and each task prefetches the rows of the head its thread runs next. The forward
//! computes its scores transposed (keys down, queries across), so that the softmax runs down
//! columns a vector of queries at a time.
//!
//! Layout: token `t` of batch `b` is row `b * seq + t` of a row-major buffer with leading dimension
//! `ld`, and head `h` occupies columns `h * head_dim .. (h + 1) * head_dim` of that row. So q, k and v
//! can be three offset views of one fused QKV projection (`ld = 3 * heads * head_dim`) and the output
//! feeds the output projection directly: no head transposes anywhere.

use super::tile::{self, Order, Scale};
use super::{math, softmax::dot_serial};
use crate::error::{check_len, check_min_len, Result, TensorError};
use crate::par::{self, SendPtr};
use crate::simd::{isa, Simd};
use std::f32::consts::{LN_2, LOG2_E};

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
// The forward's per-row arrays are processed whole vectors at a time.
const _: () = assert!(BLOCK_Q % 8 == 0);
/// Most key rows per tile (sequences up to this length use one key tile).
pub const BLOCK_K: usize = 256;

/// The sizes of an attention problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.head_dim == 0 || self.heads == 0 {
            return Err(TensorError::Shape { op, msg: format!("{self:?} has no columns") });
        }
        Ok(())
    }

    /// Floating-point operations of the forward (two products of `seq^2 * head_dim` each).
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.batch * self.heads) as f64 * (self.seq * self.seq * self.head_dim) as f64
    }
}

/// A read-only row-strided operand: `data` starts at the operand's first column.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// A writable row-strided operand.
#[derive(Debug)]
pub struct RowsMut<'a> {
    pub data: &'a mut [f32],
    pub ld: usize,
}

/// Where the backward writes dq, dk and dv.
#[derive(Debug)]
pub enum QkvGrad<'a> {
    /// Three separate buffers.
    Separate { dq: RowsMut<'a>, dk: RowsMut<'a>, dv: RowsMut<'a> },
    /// One buffer whose rows are `[dq | dk | dv]`, each `heads * head_dim` wide (the gradient of a
    /// fused QKV projection).
    Packed(&'a mut [f32]),
}

fn check_rows(op: &'static str, arg: &'static str, s: &AttnShape, ld: usize, len: usize) -> Result<()> {
    let w = s.width();
    if ld < w {
        return Err(TensorError::Shape {
            op,
            msg: format!("`{arg}` has row stride {ld}, less than heads x head_dim = {w}"),
        });
    }
    let rows = s.batch * s.seq;
    if rows == 0 {
        return Ok(());
    }
    check_min_len(op, arg, len, (rows - 1) * ld + w)
}

/// Attention forward: `out = softmax(scale * q k^T) v` per batch and head. `lse` (training: `batch x
/// heads x seq`) receives each query row's log-sum-exp for the backward.
pub fn forward(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    scale: f32,
    out: RowsMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let lse = lse.map(|l| (SendPtr(l.as_mut_ptr()), l.len()));
    forward_to(s, q, k, v, scale, (SendPtr(out.data.as_mut_ptr()), out.data.len(), out.ld), lse)
}

/// [`forward`] into new buffers: `out` (`batch * seq` rows of `heads * head_dim`) and, with
/// `keep_lse`, the log-sum-exps. Every value is written by the kernel, so neither is zeroed first.
pub fn forward_new(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    scale: f32,
    keep_lse: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let n_out = s.batch * s.seq * s.width();
    let n_lse = s.batch * s.heads * s.seq;
    let (mut out, mut lse) = (Vec::<f32>::with_capacity(n_out), keep_lse.then(|| Vec::<f32>::with_capacity(n_lse)));
    let lse_to = lse.as_mut().map(|l| (SendPtr(l.as_mut_ptr()), n_lse));
    forward_to(s, q, k, v, scale, (SendPtr(out.as_mut_ptr()), n_out, s.width()), lse_to)?;
    // SAFETY: the kernel returned Ok, so every task wrote its head's columns of every row of its
    // batch (together: all of `out`, whose row stride is exactly heads x head_dim) and its `seq`
    // log-sum-exps, through raw pointers, before anything read them.
    unsafe {
        out.set_len(n_out);
        if let Some(l) = lse.as_mut() {
            l.set_len(n_lse);
        }
    }
    Ok((out, lse))
}

/// The forward behind both entry points: `out` as (start, length, row stride), `lse` as (start,
/// length); both are only written, through raw pointers.
fn forward_to(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    scale: f32,
    (out_ptr, out_len, ld_out): (SendPtr, usize, usize),
    lse: Option<(SendPtr, usize)>,
) -> Result<()> {
    let op = "attention::forward";
    s.check(op)?;
    check_rows(op, "q", &s, q.ld, q.data.len())?;
    check_rows(op, "k", &s, k.ld, k.data.len())?;
    check_rows(op, "v", &s, v.ld, v.data.len())?;
    check_rows(op, "out", &s, ld_out, out_len)?;
    let lse_ptr = match lse {
        Some((p, len)) => {
            check_len(op, "lse", len, s.batch * s.heads * s.seq)?;
            Some(p)
        }
        None => None,
    };
    if s.seq == 0 || s.batch == 0 {
        return Ok(());
    }
    let isa = isa();
    let tasks = s.batch * s.heads;
    par::for_each(tasks, tasks > 1 && par::can_split(), |t| {
        let at = |t: usize, ld: usize| head_offset(&s, t, ld);
        // SAFETY: task t writes only its head's columns of its batch's rows of `out`, and its own
        // `seq` entries of `lse`; extents were checked above.
        unsafe {
            let qh = q.data.as_ptr().add(at(t, q.ld));
            let kh = k.data.as_ptr().add(at(t, k.ld));
            let vh = v.data.as_ptr().add(at(t, v.ld));
            let oh = out_ptr.get().add(at(t, ld_out));
            let lh = lse_ptr.map(|p| p.get().add(t * s.seq));
            // The task this thread most likely runs next (rayon hands out ranges of tasks).
            let next = (t + 1 < tasks && s.seq <= PREFETCH_SEQ).then(|| {
                let n = t + 1;
                [q.data.as_ptr().add(at(n, q.ld)), k.data.as_ptr().add(at(n, k.ld)), v.data.as_ptr().add(at(n, v.ld))]
            });
            crate::dispatch!(isa, forward_head[](&s, qh, q.ld, kh, k.ld, vh, v.ld, scale, oh, ld_out, lh, next))
        }
    });
    Ok(())
}

/// Where task `t` (batch `t / heads`, head `t % heads`) starts in a buffer of row stride `ld`.
fn head_offset(s: &AttnShape, t: usize, ld: usize) -> usize {
    (t / s.heads) * s.seq * ld + (t % s.heads) * s.head_dim
}

/// `f(bq, nk)` summed over a head's tiles, `bq` queries against `nk` keys each: with `f` the
/// micro-kernel calls of the tile's products, the pace of the next head's prefetches.
fn sum_over_tiles(seq: usize, bk: usize, f: impl Fn(usize, usize) -> usize) -> usize {
    let mut sum = 0;
    for i0 in (0..seq).step_by(BLOCK_Q) {
        for j0 in (0..seq).step_by(bk) {
            sum += f(BLOCK_Q.min(seq - i0), bk.min(seq - j0));
        }
    }
    sum
}

/// Most values of V (one head) for which the forward's single-tile P V runs rows outer
/// ([`Order::Rows`]): 16 KiB, so that V stays in L1 while it is read once per six
/// queries (measured at 57 tokens; at 256, V alone would fill two L1s).
const ROWS_OUTER_PV: usize = 4096;

/// Score rows are padded to this many columns, so the tile kernel never falls back to scalar columns.
const PAD: usize = 8;

/// Up to this many tokens a head prefetches the next head's rows ([`tile::Ahead`]): measured faster
/// at 57, 102 and 256 tokens (the forward at 256 by 7%), no better at 576, where a head's own
/// copies fill L2.
const PREFETCH_SEQ: usize = 256;

/// Key tile length: the sequence cut into near-equal tiles of at most [`BLOCK_K`], a multiple of
/// [`PAD`] so that every tile but the last is unpadded.
fn key_block(seq: usize) -> usize {
    seq.div_ceil(seq.div_ceil(BLOCK_K)).next_multiple_of(PAD)
}

/// `row[..valid] = 2^(row[..valid] - m)` in place, with `m` at least their maximum, and the
/// padding after them 0. `row` is a padded score row (its length a multiple of the lane count, at
/// least `valid`): a ragged end is one more vector with the padding lanes set to 0, not a scalar
/// exponential per value (at 57 tokens a row is seven vectors and one value).
#[inline(always)]
fn exp2_shift<S: Simd>(row: &mut [f32], valid: usize, m: f32) {
    debug_assert!(valid <= row.len() && row.len() % S::LANES == 0);
    let p = row.as_mut_ptr();
    let vm = S::splat(m);
    let mut i = 0;
    // SAFETY (every load and store): each vector lies within `row`, whose length is a multiple of
    // the lane count.
    unsafe {
        while i < valid {
            let mut e = math::exp2_nonpos::<S>(S::sub(S::load(p.add(i)), vm));
            if i + S::LANES > valid {
                let lane = S::load(LANE_INDEX.as_ptr());
                e = S::select_lt(lane, S::splat((valid - i) as f32), e, S::splat(0.0));
            }
            S::store(p.add(i), e);
            i += S::LANES;
        }
    }
}

/// Each lane's index (as many as the widest lane type has).
static LANE_INDEX: [f32; 8] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];

/// `dst[j] = src[j] * a`, written through a raw pointer (into a buffer that may be new and not
/// yet initialised); the same product as [`scale_row`].
#[inline(always)]
unsafe fn scale_to<S: Simd>(src: &[f32], a: f32, dst: *mut f32) {
    let (n, sp, va) = (src.len(), src.as_ptr(), S::splat(a));
    let mut i = 0;
    while i + S::LANES <= n {
        S::store(dst.add(i), S::mul(S::load(sp.add(i)), va));
        i += S::LANES;
    }
    while i < n {
        *dst.add(i) = *sp.add(i) * a;
        i += 1;
    }
}

#[inline(always)]
fn scale_row<S: Simd>(row: &mut [f32], a: f32) {
    super::unary_inplace_serial::<S, Mul>(&Mul(a), row);
}

struct Mul(f32);
impl super::Unary for Mul {
    #[inline(always)]
    fn f<S: Simd>(&self, x: S::V) -> S::V {
        S::mul(x, S::splat(self.0))
    }
}

/// One key tile's scores, transposed (`nk` key rows of `cols` query columns, rows `ld` apart), made
/// unnormalised probabilities in place. Scores are in base-2 units (the product's scale carries
/// log2 e). Per query column: `m = max(m_old, column max)`, `l = l_old * 2^(m_old - m) + sum of
/// 2^(s - m)`, and with `first` false `alpha = 2^(m_old - m)` for rescaling the accumulated
/// output. Every step runs down the columns a vector of queries at a time, so no query needs a
/// horizontal maximum or sum (the per-row form, scores with keys along
/// the rows, took 16% of the forward at 57 tokens; this one 10-12%).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_columns<S: Simd>(
    st: *mut f32,
    nk: usize,
    cols: usize,
    ld: usize,
    first: bool,
    m: *mut f32,
    l: *mut f32,
    alpha: *mut f32,
) {
    for c in (0..cols).step_by(S::LANES) {
        let col = st.add(c);
        // Two chains each for the maximum and the sum, so neither paces the loop on its latency.
        let mut mx = [S::splat(f32::NEG_INFINITY); 2];
        let mut r = 0;
        while r + 2 <= nk {
            for (j, x) in mx.iter_mut().enumerate() {
                *x = S::max(S::load(col.add((r + j) * ld)), *x);
            }
            r += 2;
        }
        if r < nk {
            mx[0] = S::max(S::load(col.add(r * ld)), mx[0]);
        }
        let mut m_new = S::max(mx[0], mx[1]);
        let m_old = S::load(m.add(c));
        if !first {
            m_new = S::max(m_new, m_old);
        }
        // Four partial sums (rows r mod 4), added pairwise at the end: each sum has a quarter of
        // the terms, which keeps its rounding error near the per-row form's (with two, the
        // encoder output of the small parity fixture drifted past its tolerance).
        let mut sum = [S::splat(0.0); 4];
        let mut r = 0;
        while r + 4 <= nk {
            for (j, x) in sum.iter_mut().enumerate() {
                let at = col.add((r + j) * ld);
                let e = math::exp2_nonpos::<S>(S::sub(S::load(at), m_new));
                S::store(at, e);
                *x = S::add(*x, e);
            }
            r += 4;
        }
        for (j, x) in sum.iter_mut().enumerate().take(nk - r) {
            let at = col.add((r + j) * ld);
            let e = math::exp2_nonpos::<S>(S::sub(S::load(at), m_new));
            S::store(at, e);
            *x = S::add(*x, e);
        }
        let sum = S::add(S::add(sum[0], sum[1]), S::add(sum[2], sum[3]));
        if first {
            S::store(l.add(c), sum);
        } else {
            let a = math::exp2_nonpos::<S>(S::sub(m_old, m_new));
            S::store(alpha.add(c), a);
            S::store(l.add(c), S::fma(S::load(l.add(c)), a, sum));
        }
        S::store(m.add(c), m_new);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_head<S: Simd>(
    s: &AttnShape,
    q: *const f32,
    ldq: usize,
    k: *const f32,
    ldk: usize,
    v: *const f32,
    ldv: usize,
    scale: f32,
    out: *mut f32,
    ldo: usize,
    lse: Option<*mut f32>,
    next: Option<[*const f32; 3]>,
) {
    let (seq, hd) = (s.seq, s.head_dim);
    let bk = key_block(seq);
    let one_tile = seq <= bk;
    // Scores are computed transposed, S^T = K Q^T (keys down, queries across), so that the softmax
    // runs down columns a vector of queries at a time (`softmax_columns`), and P V reads P^T
    // through strides. Q^T of the query block is the one transposed operand, its columns padded
    // with zeros to a multiple of PAD.
    let sizes =
        [hd * BLOCK_Q, seq * hd, seq * hd, bk * (BLOCK_Q + PAD), BLOCK_Q * hd, BLOCK_Q, BLOCK_Q, BLOCK_Q, BLOCK_Q];
    let mut scratch = Scratch::take(sizes.iter().sum());
    // `m`, `l` and `alpha` (each query's running maximum, sum and rescaling factor) are written by
    // `softmax_columns` before anything reads them, `inv` (1 / l) before the last tile's product:
    // stack arrays would be zeroed by a `memset` per head.
    let [qt, kc, vc, st, acc, m, l, alpha, inv] = scratch.carve(sizes);
    // Row strides of the next task's q, k and v (as this task's, before any copy). Its output rows
    // are not prefetched: they are only written, at the end (with the spread prefetches, leaving
    // them out was 0 to +5% on the medians of paired runs). The backward, whose products write
    // dq, dk and dv as they go, is slower without its write targets (0.945).
    let next_ld = [ldq, ldk, ldv];
    // V is copied out to contiguous rows: the P V product reads every row of V once per six rows
    // of P, and in place those rows are kilobytes apart, each on its own page (at 57 tokens the
    // copy made the forward 5% faster: fewer TLB misses). K, the scores' row operand, is read once
    // per query block: copied only when there is more than one.
    copy_rows(v, ldv, vc.as_mut_ptr(), hd, seq, hd);
    let (v, ldv) = (vc.as_ptr(), hd);
    let (k, ldk) = if seq <= BLOCK_Q {
        (k, ldk)
    } else {
        copy_rows(k, ldk, kc.as_mut_ptr(), hd, seq, hd);
        (kc.as_ptr(), hd)
    };
    // The next head's rows, a few with each micro-kernel call of this one.
    let calls = |bq: usize, nk: usize| tile::calls::<S>(nk, bq.next_multiple_of(PAD)) + tile::calls::<S>(bq, hd);
    let mut ahead = next.map(|ptrs| tile::Ahead::new(ptrs, next_ld, seq, hd, sum_over_tiles(seq, bk, calls)));
    for i0 in (0..seq).step_by(BLOCK_Q) {
        let bq = BLOCK_Q.min(seq - i0);
        let bqp = bq.next_multiple_of(PAD);
        // S^T's row stride: one vector more than the queries, so that rows 16 apart do not share
        // their address's low 12 bits (at 64 queries, 256-byte rows did: the column passes' loads
        // then waited on stores 16 rows back, a false dependency).
        let lds = bqp + PAD;
        transpose_padded::<S>(q.add(i0 * ldq), ldq, bq, hd, &mut qt[..hd * bqp], bqp);
        for j0 in (0..seq).step_by(bk) {
            let nk = bk.min(seq - j0);
            let first = j0 == 0;
            // S^T of this tile: scale * K_j Q_i^T (padding columns come out 0 and stay unused), in
            // base-2 units (times log2 e) for `exp2_nonpos`. Rows outer: each block of K's rows
            // is read once, against Q^T whole (16 KiB at head_dim 64, in L1) (paired calls, one thread:
            // 0.8-2.5% faster at 57 tokens, 2.3% at 256, 3.6% at 576).
            let stp = st.as_mut_ptr();
            tile::matmul_in::<S, _>(
                Order::Rows,
                nk,
                bqp,
                hd,
                Scale::All(scale * LOG2_E),
                k.add(j0 * ldk),
                ldk,
                1,
                qt.as_ptr(),
                bqp,
                stp,
                lds,
                false,
                &mut ahead,
            );
            softmax_columns::<S>(stp, nk, bqp, lds, first, m.as_mut_ptr(), l.as_mut_ptr(), alpha.as_mut_ptr());
            if !first {
                for (r, &a) in alpha[..bq].iter().enumerate() {
                    scale_row::<S>(&mut acc[r * hd..(r + 1) * hd], a);
                }
            }
            // P V with P = (S^T)^T read through strides; V's rows are contiguous over the head
            // dimension.
            let pv = v.add(j0 * ldv);
            if one_tile {
                // out = (P V) / l, written once: the normalisation rides in the product's store.
                for c in (0..bqp).step_by(S::LANES) {
                    S::store(inv.as_mut_ptr().add(c), S::div(S::splat(1.0), S::load(l.as_ptr().add(c))));
                }
                let o = out.add(i0 * ldo);
                // While V's copy fits half of L1, P's rows are read once and V per block of
                // rows (57 tokens, paired calls in nine runs: 0.6-2.8% faster than all of P per block of
                // V's columns).
                let order = if seq * hd <= ROWS_OUTER_PV { Order::Rows } else { Order::Columns };
                tile::matmul_in::<S, _>(
                    order,
                    bq,
                    hd,
                    nk,
                    Scale::Rows(inv.as_ptr()),
                    stp,
                    1,
                    lds,
                    pv,
                    ldv,
                    o,
                    ldo,
                    false,
                    &mut ahead,
                );
            } else {
                // acc (=|+=) P V_j.
                tile::matmul::<S, _>(
                    bq,
                    hd,
                    nk,
                    Scale::All(1.0),
                    stp,
                    1,
                    lds,
                    pv,
                    ldv,
                    acc.as_mut_ptr(),
                    hd,
                    !first,
                    &mut ahead,
                );
            }
        }
        if !one_tile {
            for r in 0..bq {
                scale_to::<S>(&acc[r * hd..(r + 1) * hd], 1.0 / l[r], out.add((i0 + r) * ldo));
            }
        }
        if let Some(lp) = lse {
            // lse = m ln 2 + ln l (m is in base-2 units), a vector of queries at a time, into `l`;
            // entries past `bq` are padding, computed on and never stored.
            for c in (0..bqp).step_by(S::LANES) {
                let ln_l = math::ln_pos::<S>(S::load(l.as_ptr().add(c)));
                let lse = S::fma(S::load(m.as_ptr().add(c)), S::splat(LN_2), ln_l);
                S::store(l.as_mut_ptr().add(c), lse);
            }
            std::ptr::copy_nonoverlapping(l.as_ptr(), lp.add(i0), bq);
        }
    }
}

/// Attention backward from the forward's output `o`, its gradient `dout` and the saved `lse`;
/// overwrites dq, dk and dv.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    o: Rows,
    dout: Rows,
    lse: &[f32],
    scale: f32,
    grads: QkvGrad,
) -> Result<()> {
    backward_to(s, q, k, v, o, dout, lse, scale, Dest::Given(grads))
}

/// [`backward`] into a new packed buffer (rows `[dq | dk | dv]`, as [`QkvGrad::Packed`]). Every
/// value is written by the kernel, so it is not zeroed first.
#[allow(clippy::too_many_arguments)]
pub fn backward_new(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    o: Rows,
    dout: Rows,
    lse: &[f32],
    scale: f32,
) -> Result<Vec<f32>> {
    let n = s.batch * s.seq * 3 * s.width();
    let mut g = Vec::<f32>::with_capacity(n);
    backward_to(s, q, k, v, o, dout, lse, scale, Dest::New(SendPtr(g.as_mut_ptr())))?;
    // SAFETY: the kernel returned Ok, so every task wrote dq, dk and dv of its head for every row
    // of its batch (together: every value of the `batch * seq` rows of `3 * heads * head_dim`),
    // through raw pointers, before anything read them.
    unsafe { g.set_len(n) };
    Ok(g)
}

/// Where [`backward_to`] writes.
enum Dest<'a> {
    Given(QkvGrad<'a>),
    /// The start of a new packed buffer of exactly `batch * seq * 3 * heads * head_dim` values.
    New(SendPtr),
}

#[allow(clippy::too_many_arguments)]
fn backward_to(
    s: AttnShape,
    q: Rows,
    k: Rows,
    v: Rows,
    o: Rows,
    dout: Rows,
    lse: &[f32],
    scale: f32,
    grads: Dest,
) -> Result<()> {
    let op = "attention::backward";
    s.check(op)?;
    for (name, r) in [("q", &q), ("k", &k), ("v", &v), ("o", &o), ("dout", &dout)] {
        check_rows(op, name, &s, r.ld, r.data.len())?;
    }
    check_len(op, "lse", lse.len(), s.batch * s.heads * s.seq)?;
    let w = s.width();
    // Base pointers and row strides of dq, dk, dv.
    // Rows [dq | dk | dv] from `p`: offsets w and 2w lie inside the buffer (or it is empty and
    // never written: `wrapping_add` then makes no claim about an allocation).
    let packed =
        |p: *mut f32| (SendPtr(p), SendPtr(p.wrapping_add(w)), SendPtr(p.wrapping_add(2 * w)), 3 * w, 3 * w, 3 * w);
    let (dq, dk, dv, lddq, lddk, lddv) = match grads {
        Dest::New(p) => packed(p.get()),
        Dest::Given(QkvGrad::Separate { dq, dk, dv }) => {
            check_rows(op, "dq", &s, dq.ld, dq.data.len())?;
            check_rows(op, "dk", &s, dk.ld, dk.data.len())?;
            check_rows(op, "dv", &s, dv.ld, dv.data.len())?;
            (
                SendPtr(dq.data.as_mut_ptr()),
                SendPtr(dk.data.as_mut_ptr()),
                SendPtr(dv.data.as_mut_ptr()),
                dq.ld,
                dk.ld,
                dv.ld,
            )
        }
        Dest::Given(QkvGrad::Packed(buf)) => {
            check_len(op, "dqkv", buf.len(), s.batch * s.seq * 3 * w)?;
            packed(buf.as_mut_ptr())
        }
    };
    if s.seq == 0 || s.batch == 0 {
        return Ok(());
    }
    let isa = isa();
    let tasks = s.batch * s.heads;
    par::for_each(tasks, tasks > 1 && par::can_split(), |t| {
        // SAFETY: task t writes only its head's columns of its batch's rows of dq, dk, dv.
        unsafe {
            let head = |t: usize| {
                let at = |ld: usize| head_offset(&s, t, ld);
                HeadPtrs {
                    q: q.data.as_ptr().add(at(q.ld)),
                    k: k.data.as_ptr().add(at(k.ld)),
                    v: v.data.as_ptr().add(at(v.ld)),
                    o: o.data.as_ptr().add(at(o.ld)),
                    dout: dout.data.as_ptr().add(at(dout.ld)),
                    dq: dq.get().add(at(lddq)),
                    dk: dk.get().add(at(lddk)),
                    dv: dv.get().add(at(lddv)),
                    ld: [q.ld, k.ld, v.ld, o.ld, dout.ld, lddq, lddk, lddv],
                }
            };
            let ptrs = head(t);
            // The task this thread most likely runs next: every operand it reads or writes.
            let next = (t + 1 < tasks && s.seq <= PREFETCH_SEQ).then(|| {
                let n = head(t + 1);
                [n.q, n.k, n.v, n.o, n.dout, n.dq, n.dk, n.dv]
            });
            let lse_h = &lse[t * s.seq..(t + 1) * s.seq];
            crate::dispatch!(isa, backward_head[](&s, &ptrs, lse_h, scale, next))
        }
    });
    Ok(())
}

struct HeadPtrs {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    o: *const f32,
    dout: *const f32,
    dq: *mut f32,
    dk: *mut f32,
    dv: *mut f32,
    /// Row strides of q, k, v, o, dout, dq, dk, dv.
    ld: [usize; 8],
}

#[inline(always)]
unsafe fn backward_head<S: Simd>(s: &AttnShape, p: &HeadPtrs, lse: &[f32], scale: f32, next: Option<[*const f32; 8]>) {
    let (seq, hd) = (s.seq, s.head_dim);
    let [ldq, ldk, ldv, ldo, lddo, lddq, lddk, lddv] = p.ld;
    let bk = key_block(seq);
    let sp = seq.next_multiple_of(PAD);
    let sizes =
        [seq, hd * sp, hd * sp, seq * hd, seq * hd, seq * hd, seq * hd, BLOCK_Q * bk, BLOCK_Q * bk, bk * hd, bk * hd];
    let mut scratch = Scratch::take(sizes.iter().sum());
    let [dvec, kt, vt, qc, kc, doc, dqc, pm, dp, dk_blk, dv_blk] = scratch.carve(sizes);
    // dO as contiguous rows first, then D_i = dout_i . o_i (the softmax backward's row term) from
    // that copy: the strided rows of dout are read once.
    copy_rows(p.dout, lddo, doc.as_mut_ptr(), hd, seq, hd);
    for (i, d) in dvec.iter_mut().enumerate() {
        let a = std::slice::from_raw_parts(doc.as_ptr().add(i * hd), hd);
        let b = std::slice::from_raw_parts(p.o.add(i * ldo), hd);
        *d = dot_serial::<S>(a, b);
    }
    // Q and K as contiguous rows too, and K^T and V^T of this head, once, for the two products over
    // the head dimension (K^T from K's copy: the strided rows are read once). dQ accumulates over
    // key tiles in `dqc` and is written out once. With a single tile (short sequences) a gradient
    // is final after one product, which then writes it in place.
    let one_key_tile = seq <= bk;
    let (dqp, lddqp) = if one_key_tile { (p.dq, lddq) } else { (dqc.as_mut_ptr(), hd) };
    let one_query_block = seq <= BLOCK_Q;
    copy_rows(p.q, ldq, qc.as_mut_ptr(), hd, seq, hd);
    copy_rows(p.k, ldk, kc.as_mut_ptr(), hd, seq, hd);
    transpose_padded::<S>(kc.as_ptr(), hd, seq, hd, kt, sp);
    transpose_padded::<S>(p.v, ldv, seq, hd, vt, sp);
    let (pq, ldq, pk, ldk, pdo, lddo) = (qc.as_ptr(), hd, kc.as_ptr(), hd, doc.as_ptr(), hd);
    // The next head's rows, a few with each micro-kernel call of this one.
    let calls = |bq: usize, nk: usize| {
        2 * tile::calls::<S>(bq, nk.next_multiple_of(PAD)) + tile::calls::<S>(bq, hd) + 2 * tile::calls::<S>(nk, hd)
    };
    let mut ahead = next.map(|ptrs| tile::Ahead::new(ptrs, p.ld, seq, hd, sum_over_tiles(seq, bk, calls)));
    for j0 in (0..seq).step_by(bk) {
        let nk = bk.min(seq - j0);
        let nkp = nk.next_multiple_of(PAD);
        let ((dkp, lddkp), (dvp, lddvp)) = if one_query_block {
            ((p.dk.add(j0 * lddk), lddk), (p.dv.add(j0 * lddv), lddv))
        } else {
            ((dk_blk.as_mut_ptr(), hd), (dv_blk.as_mut_ptr(), hd))
        };
        for i0 in (0..seq).step_by(BLOCK_Q) {
            let bq = BLOCK_Q.min(seq - i0);
            let first = i0 == 0;
            let (qi, doi) = (pq.add(i0 * ldq), pdo.add(i0 * lddo));
            // P = exp(scale * Q_i K_j^T - lse_i), as 2^(...) of both in base-2 units.
            tile::matmul::<S, _>(
                bq,
                nkp,
                hd,
                Scale::All(scale * LOG2_E),
                qi,
                ldq,
                1,
                kt.as_ptr().add(j0),
                sp,
                pm.as_mut_ptr(),
                nkp,
                false,
                &mut ahead,
            );
            for r in 0..bq {
                exp2_shift::<S>(&mut pm[r * nkp..(r + 1) * nkp], nk, lse[i0 + r] * LOG2_E);
            }
            // dV_j (=|+=) P^T dO_i.
            tile::matmul::<S, _>(
                nk,
                hd,
                bq,
                Scale::All(1.0),
                pm.as_ptr(),
                1,
                nkp,
                doi,
                lddo,
                dvp,
                lddvp,
                !first,
                &mut ahead,
            );
            // dP = dO_i V_j^T; dS = P * (dP - D_i).
            tile::matmul::<S, _>(
                bq,
                nkp,
                hd,
                Scale::All(1.0),
                doi,
                lddo,
                1,
                vt.as_ptr().add(j0),
                sp,
                dp.as_mut_ptr(),
                nkp,
                false,
                &mut ahead,
            );
            // Whole padded rows, so no scalar tail: P's padding is 0, which zeroes dS's.
            for r in 0..bq {
                let row = r * nkp..(r + 1) * nkp;
                ds_inplace::<S>(&pm[row.clone()], &mut dp[row], dvec[i0 + r]);
            }
            // dQ_i += scale * dS K_j (the first key tile overwrites);  dK_j (=|+=) scale * dS^T Q_i.
            tile::matmul::<S, _>(
                bq,
                hd,
                nk,
                Scale::All(scale),
                dp.as_ptr(),
                nkp,
                1,
                pk.add(j0 * ldk),
                ldk,
                dqp.add(i0 * lddqp),
                lddqp,
                j0 > 0,
                &mut ahead,
            );
            tile::matmul::<S, _>(
                nk,
                hd,
                bq,
                Scale::All(scale),
                dp.as_ptr(),
                1,
                nkp,
                qi,
                ldq,
                dkp,
                lddkp,
                !first,
                &mut ahead,
            );
        }
        if !one_query_block {
            copy_rows(dk_blk.as_ptr(), hd, p.dk.add(j0 * lddk), lddk, nk, hd);
            copy_rows(dv_blk.as_ptr(), hd, p.dv.add(j0 * lddv), lddv, nk, hd);
        }
    }
    if !one_key_tile {
        copy_rows(dqc.as_ptr(), hd, p.dq, lddq, seq, hd);
    }
}

/// `rows x cols` values from rows `lds` apart to rows `ldd` apart: a head's rows copied out of a
/// strided buffer (the tile products then stream contiguous rows instead of one row per `ld`,
/// kilobytes apart, a TLB entry per row or two), or its finished gradient rows written back.
///
/// # Safety
/// Both regions must be valid for those rows and must not overlap.
#[inline(always)]
unsafe fn copy_rows(src: *const f32, lds: usize, dst: *mut f32, ldd: usize, rows: usize, cols: usize) {
    for r in 0..rows {
        // An inlined loop, not a `memcpy` call per row: rows are a few hundred bytes.
        let (s, d) = (std::slice::from_raw_parts(src.add(r * lds), cols), dst.add(r * ldd));
        for (j, x) in s.iter().enumerate() {
            *d.add(j) = *x;
        }
    }
}

/// [`tile::transpose_into`] into a reused buffer, the key columns past `seq` zeroed, so that padded
/// scores are 0 (finite; their probabilities are then masked to 0).
#[inline(always)]
unsafe fn transpose_padded<S: Simd>(src: *const f32, ld: usize, seq: usize, hd: usize, dst: &mut [f32], sp: usize) {
    // Zero vectors over each row's padding first (a store or two per row), then the transpose
    // overwrites the part of the last vector that holds keys. The zero goes through `black_box`:
    // the compiler recognised these constant stores and made them a `memset` call per row (0.5%
    // of the forward at 57 tokens, each call with a `vzeroupper`).
    let first_pad = seq - seq % S::LANES;
    if first_pad < sp {
        let zero = std::hint::black_box(S::splat(0.0));
        for row in dst.chunks_exact_mut(sp) {
            for j in (first_pad..sp).step_by(S::LANES) {
                S::store(row.as_mut_ptr().add(j), zero);
            }
        }
    }
    tile::transpose_into::<S>(src, ld, seq, hd, dst, sp);
}

thread_local! {
    /// Per-thread working memory of the head kernels, kept between calls: a fresh, zeroed
    /// allocation per (batch, head) task cost about as much as the products at 57 tokens.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The thread's scratch buffer, taken out while a head kernel uses it (no closure around the
/// kernel: it would not inherit the caller's `target_feature`) and put back when dropped. Its
/// contents are stale: every part is written before it is read.
struct Scratch(Vec<f32>);

impl Scratch {
    fn take(n: usize) -> Self {
        let mut v = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if v.len() < n {
            v.resize(n, 0.0);
        }
        Scratch(v)
    }

    /// Consecutive disjoint parts of the given lengths.
    fn carve<const N: usize>(&mut self, sizes: [usize; N]) -> [&mut [f32]; N] {
        let mut rest = &mut self.0[..];
        sizes.map(|n| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            head
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        SCRATCH.with(|s| *s.borrow_mut() = v);
    }
}

/// `dp = p * (dp - d)` in place: the softmax backward of one row.
#[inline(always)]
fn ds_inplace<S: Simd>(p: &[f32], dp: &mut [f32], d: f32) {
    let n = p.len().min(dp.len());
    let (pp, dpp) = (p.as_ptr(), dp.as_mut_ptr());
    let vd = S::splat(d);
    let mut i = 0;
    while i + S::LANES <= n {
        // SAFETY: i + LANES <= n for both rows.
        unsafe { S::store(dpp.add(i), S::mul(S::load(pp.add(i)), S::sub(S::load(dpp.add(i)), vd))) };
        i += S::LANES;
    }
    while i < n {
        dp[i] = p[i] * (dp[i] - d);
        i += 1;
    }
}

/// The textbook computation in f64 with the full probability matrix, for the tests. Operands are
/// dense `(batch, seq, heads * head_dim)`.
pub mod reference {
    use super::AttnShape;

    pub fn forward(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], scale: f64) -> (Vec<f64>, Vec<f64>) {
        let w = s.heads * s.head_dim;
        let mut out = vec![0.0; s.batch * s.seq * w];
        let mut probs = vec![0.0; s.batch * s.heads * s.seq * s.seq];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |x: &[f32], t: usize, d: usize| x[(b * s.seq + t) * w + h * s.head_dim + d] as f64;
                for i in 0..s.seq {
                    let sc: Vec<f64> = (0..s.seq)
                        .map(|j| (0..s.head_dim).map(|d| at(q, i, d) * at(k, j, d)).sum::<f64>() * scale)
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..s.seq {
                        probs[((b * s.heads + h) * s.seq + i) * s.seq + j] = e[j] / z;
                    }
                    for d in 0..s.head_dim {
                        out[(b * s.seq + i) * w + h * s.head_dim + d] =
                            (0..s.seq).map(|j| e[j] / z * at(v, j, d)).sum();
                    }
                }
            }
        }
        (out, probs)
    }

    /// Returns `(dq, dk, dv)`.
    #[allow(clippy::type_complexity)]
    pub fn backward(
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        scale: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let w = s.heads * s.head_dim;
        let (_, probs) = forward(s, q, k, v, scale);
        let n = s.batch * s.seq * w;
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for b in 0..s.batch {
            for h in 0..s.heads {
                let idx = |t: usize, d: usize| (b * s.seq + t) * w + h * s.head_dim + d;
                let p = |i: usize, j: usize| probs[((b * s.heads + h) * s.seq + i) * s.seq + j];
                for i in 0..s.seq {
                    let dp: Vec<f64> = (0..s.seq)
                        .map(|j| (0..s.head_dim).map(|d| dout[idx(i, d)] as f64 * v[idx(j, d)] as f64).sum())
                        .collect();
                    let dot: f64 = (0..s.seq).map(|j| p(i, j) * dp[j]).sum();
                    for j in 0..s.seq {
                        let ds = p(i, j) * (dp[j] - dot) * scale;
                        for d in 0..s.head_dim {
                            dq[idx(i, d)] += ds * k[idx(j, d)] as f64;
                            dk[idx(j, d)] += ds * q[idx(i, d)] as f64;
                            dv[idx(j, d)] += p(i, j) * dout[idx(i, d)] as f64;
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}
