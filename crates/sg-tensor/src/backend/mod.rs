//! Backends: where buffers live and which kernels run on them. Model code never names a backend;
//! it calls [`crate::exec::Exec`] ops, which an executor (inference [`crate::exec::Eval`], or the
//! training tape of `sg-autograd`) carries out on a backend:
//!
//! - [`Cpu`]: f32 buffers and the SIMD kernels of [`crate::kernels`] — the real thing;
//! - [`CpuF64`]: f64 buffers and plain loops — slow and exact, so gradient checks by finite
//!   differences of the real tape code are meaningful;
//! - `sg-cuda` (later): device buffers.
//!
//! Operands that are parameters are ranges of one flat parameter buffer ([`Slice`]); parameter
//! gradients accumulate into ranges of one flat gradient buffer ([`SliceMut`]).

mod cpu;
mod dense;
mod f64ref;

pub use cpu::Cpu;
pub use dense::GroupNormDims;
pub use f64ref::CpuF64;

pub(crate) use dense::*;

use std::ops::Range;

use crate::error::{Result, TensorError};
use crate::kernels::attention::AttnShape;
use crate::kernels::linear::Activation;
use crate::kernels::Dst;

/// A read-only range of a buffer (a parameter inside the flat parameter buffer).
pub struct Slice<'a, B: Backend> {
    pub buf: &'a B::Buf,
    pub range: Range<usize>,
}

impl<B: Backend> Clone for Slice<'_, B> {
    fn clone(&self) -> Self {
        Slice { buf: self.buf, range: self.range.clone() }
    }
}

/// A writable range of a buffer (a parameter's gradient inside the flat gradient buffer), and
/// whether this write is the first of the step (`Overwrite`) or adds to earlier ones.
pub struct SliceMut<'a, B: Backend> {
    pub buf: &'a mut B::Buf,
    pub range: Range<usize>,
    pub dst: Dst,
}

/// Where a backward writes a layer's weight and bias gradients: two disjoint ranges of the flat
/// gradient buffer, each with its write mode; `None` for a frozen parameter.
pub struct ParamGrads<'a, B: Backend> {
    pub buf: &'a mut B::Buf,
    pub w: Option<(Range<usize>, Dst)>,
    pub b: Option<(Range<usize>, Dst)>,
}

/// A LayerNorm's saved per-row mean and 1/std.
pub type LnStats<B> = (<B as Backend>::Buf, <B as Backend>::Buf);

/// The gradient of an intermediate value: empty until its first contributor writes it (overwriting,
/// into a fresh buffer); later contributors accumulate. Never zeros-then-add.
pub type Grad<B> = Option<<B as Backend>::Buf>;

/// Two disjoint mutable ranges of one slice (either may be absent).
pub(crate) fn split_two<T>(
    buf: &mut [T],
    a: Option<Range<usize>>,
    b: Option<Range<usize>>,
) -> (Option<&mut [T]>, Option<&mut [T]>) {
    match (a, b) {
        (None, None) => (None, None),
        (Some(a), None) => (Some(&mut buf[a]), None),
        (None, Some(b)) => (None, Some(&mut buf[b])),
        (Some(a), Some(b)) => {
            assert!(a.end <= b.start || b.end <= a.start, "weight and bias gradient ranges overlap");
            if a.start < b.start {
                let (lo, hi) = buf.split_at_mut(b.start);
                (Some(&mut lo[a]), Some(&mut hi[..b.end - b.start]))
            } else {
                let (lo, hi) = buf.split_at_mut(a.start);
                (Some(&mut hi[..a.end - a.start]), Some(&mut lo[b]))
            }
        }
    }
}

/// Sizes of a 2-d convolution (no groups, no dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dDims {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        ((self.h + 2 * self.pad - self.kh) / self.stride + 1, (self.w + 2 * self.pad - self.kw) / self.stride + 1)
    }

    /// Rows of the unfolded input (`cin * kh * kw`).
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
}

/// The source pixel of unfolded row `r` (channel, ki, kj) at output position (i, j), or `None` in
/// the zero padding.
#[inline]
pub(crate) fn conv_src(d: &Conv2dDims, r: usize, i: usize, j: usize) -> Option<usize> {
    let (c, ki, kj) = (r / (d.kh * d.kw), r / d.kw % d.kh, r % d.kw);
    let y = (i * d.stride + ki) as isize - d.pad as isize;
    let x = (j * d.stride + kj) as isize - d.pad as isize;
    (y >= 0 && x >= 0 && (y as usize) < d.h && (x as usize) < d.w).then(|| (c * d.h + y as usize) * d.w + x as usize)
}

/// Dimensions of the MAE reconstruction loss: `batch` images of `groups` spectral groups of
/// `spatial` tokens, each token `feat` values (`u * p * p`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaeLossDims {
    pub batch: usize,
    pub groups: usize,
    pub spatial: usize,
    pub feat: usize,
    /// The optional spectral-angle term (off when `None`).
    pub spectral_angle: Option<SpectralAngle>,
}

/// The spectral-angle term: `weight` times the mean over pixels of the angle between predicted and
/// target spectra; a token holds `pixels` (`p * p`) pixels of `feat / pixels` bands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpectralAngle {
    pub weight: f64,
    pub pixels: usize,
}

/// Values of the MAE loss: `loss = loss1 + loss3 (+ weight * sam)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaeLoss {
    pub loss: f64,
    pub loss1: f64,
    pub loss3: f64,
    /// The mean spectral angle in radians (0 when the term is off).
    pub sam: f64,
}

/// Buffers and the coarse kernels that the ops of [`crate::exec::Exec`] need, forward and backward.
/// Forward kernels return fresh buffers, plus what their backward needs when `keep` is true.
/// Backward kernels write gradients into [`Grad`] slots (first write overwrites, later ones add)
/// and parameter gradients into [`SliceMut`] ranges.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Clone + Send + Sync + 'static {
    /// A shared, cheaply cloned buffer; writers get unique access through `&mut`.
    type Buf: Clone + Send + Sync + std::fmt::Debug;

    fn name(&self) -> &'static str;
    fn upload(&self, x: &[f32]) -> Self::Buf;
    /// Like [`Backend::upload`], taking the values by value (a host backend keeps them, no copy).
    fn upload_vec(&self, x: Vec<f32>) -> Self::Buf {
        self.upload(&x)
    }
    /// The parameters of `store` as one buffer (the CPU backend shares the store's storage).
    fn upload_params(&self, store: &crate::params::ParamStore) -> Self::Buf {
        self.upload(store.data())
    }
    /// The values, widened to f64 (exact for both CPU backends).
    fn download(&self, b: &Self::Buf) -> Vec<f64>;
    /// A buffer holding `v` in the backend's precision (results of the shared f64 loops).
    fn upload_f64(&self, v: &[f64]) -> Self::Buf;
    /// A parameter's values.
    fn download_slice(&self, s: Slice<Self>) -> Vec<f64> {
        self.download(&self.copy_range(s.buf, s.range))
    }
    /// Weight and bias gradients from the shared f64 loops, written in each range's mode.
    fn write_param_grads(&self, pg: ParamGrads<Self>, dw: &[f64], db: &[f64]) -> Result<()> {
        let ParamGrads { buf, w, b } = pg;
        if let Some((range, dst)) = w {
            self.accumulate(SliceMut { buf: &mut *buf, range, dst }, &self.upload_f64(dw))?;
        }
        if let Some((range, dst)) = b {
            self.accumulate(SliceMut { buf, range, dst }, &self.upload_f64(db))?;
        }
        Ok(())
    }
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A one-element buffer (a loss), in the backend's precision.
    fn scalar(&self, v: f64) -> Self::Buf;
    fn buf_len(&self, b: &Self::Buf) -> usize;
    /// A copy of a range.
    fn copy_range(&self, b: &Self::Buf, r: Range<usize>) -> Self::Buf;
    /// `dst[range] (=|+=) src`.
    fn accumulate(&self, dst: SliceMut<Self>, src: &Self::Buf) -> Result<()>;
    /// `slot (=|+=) src`; a fresh slot shares `src`'s storage instead of copying it.
    fn accumulate_grad(&self, slot: &mut Grad<Self>, src: &Self::Buf) -> Result<()>;
    /// True when every element is finite.
    fn all_finite(&self, b: &Self::Buf) -> bool;

    /// `y = act(x W^T + b)` for `x (m, k)`, `W (n, k)`; with `keep` and GELU, also the pre-activation.
    fn linear(
        &self,
        x: &Self::Buf,
        w: Slice<Self>,
        b: Option<Slice<Self>>,
        m: usize,
        k: usize,
        n: usize,
        act: Activation,
        keep: bool,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;
    /// A Linear weight `(n, k)` rearranged once for this backend's inference products, the same
    /// length so that it can replace the weight in a parameter buffer; `None` where the backend
    /// reads the stored layout best (the weight is then used as stored).
    fn pack_linear_weight(&self, _w: &[f32], _n: usize, _k: usize) -> Option<Vec<f32>> {
        None
    }
    /// [`Backend::linear`] for inference with a weight from [`Backend::pack_linear_weight`].
    #[allow(clippy::too_many_arguments)]
    fn linear_packed(
        &self,
        _x: &Self::Buf,
        _w: Slice<Self>,
        _b: Option<Slice<Self>>,
        _m: usize,
        _k: usize,
        _n: usize,
        _act: Activation,
    ) -> Result<Self::Buf> {
        Err(TensorError::Arg { op: "linear_packed", msg: format!("the {} backend packs no weights", self.name()) })
    }
    /// Backward of [`Backend::linear`] with `dpre = dy * act'(pre)`: `dx = dpre W`, `dw = dpre^T x`
    /// (`x` is needed only for it), `db = colsum dpre`. `x` and `dy` are handed over so that a
    /// backend may reuse their storage where nothing else holds them (`dpre` in `dy`'s, `dx` in
    /// the recomputed input's): the MLP's 4x-wide buffers are then not doubled at the step's peak.
    fn linear_backward(
        &self,
        x: Option<Self::Buf>,
        w: Slice<Self>,
        pre: Option<&Self::Buf>,
        dy: Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()>;

    /// LayerNorm over rows of `w.len()`; with `keep`, also each row's mean and 1/std.
    fn layernorm(
        &self,
        x: &Self::Buf,
        w: Slice<Self>,
        b: Slice<Self>,
        rows: usize,
        eps: f32,
        keep: bool,
    ) -> Result<(Self::Buf, Option<LnStats<Self>>)>;
    fn layernorm_backward(
        &self,
        x: &Self::Buf,
        w: Slice<Self>,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()>;

    /// Attention over a packed `(batch * seq, 3 * heads * head_dim)` QKV buffer; output
    /// `(batch * seq, heads * head_dim)`; with `keep`, the log-sum-exp rows.
    fn attention(&self, qkv: &Self::Buf, s: AttnShape, keep: bool) -> Result<(Self::Buf, Option<Self::Buf>)>;
    /// The gradient of the packed QKV buffer.
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        s: AttnShape,
        dqkv: &mut Grad<Self>,
    ) -> Result<()>;

    /// The axes of a row-major `shape` reordered: output axis `i` is input axis `perm[i]`.
    fn permute(&self, x: &Self::Buf, shape: &[usize], perm: &[usize]) -> Result<Self::Buf>;

    /// `max(x, 0)`; NaN stays NaN, as in PyTorch.
    fn relu(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// Backward of [`Backend::relu`] from its output `y` (`dy` passes where `y > 0`), as PyTorch does.
    fn relu_backward(&self, y: &Self::Buf, dy: &Self::Buf, dx: &mut Grad<Self>) -> Result<()>;

    /// Adaptive average pooling of `planes` planes from `hw` to `out_hw` (PyTorch's bins).
    fn adaptive_avg_pool(
        &self,
        x: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
    ) -> Result<Self::Buf> {
        Ok(self.upload_f64(&adaptive_avg_pool_generic(&self.download(x), planes, hw, out_hw)?))
    }
    /// Backward of [`Backend::adaptive_avg_pool`].
    fn adaptive_avg_pool_backward(
        &self,
        dy: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let g = adaptive_avg_pool_backward_generic(&self.download(dy), planes, hw, out_hw)?;
        self.accumulate_grad(dx, &self.upload_f64(&g))
    }
    /// Bilinear resize of `planes` planes from `hw` to `out_hw` (PyTorch's `align_corners` flag).
    fn upsample_bilinear(
        &self,
        x: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
        align_corners: bool,
    ) -> Result<Self::Buf> {
        Ok(self.upload_f64(&bilinear_generic(&self.download(x), planes, hw, out_hw, align_corners)?))
    }
    /// Backward of [`Backend::upsample_bilinear`].
    fn upsample_bilinear_backward(
        &self,
        dy: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
        align_corners: bool,
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let g = bilinear_backward_generic(&self.download(dy), planes, hw, out_hw, align_corners)?;
        self.accumulate_grad(dx, &self.upload_f64(&g))
    }

    /// Adaptive max pooling of `planes` planes from `hw` to `out_hw`, and the index of each maximum.
    fn adaptive_max_pool(
        &self,
        x: &Self::Buf,
        planes: usize,
        hw: (usize, usize),
        out_hw: (usize, usize),
    ) -> Result<(Self::Buf, Vec<u32>)> {
        let (y, idx) = adaptive_max_pool_generic(&self.download(x), planes, hw, out_hw)?;
        Ok((self.upload_f64(&y), idx))
    }
    /// Backward of [`Backend::adaptive_max_pool`] into an input of `in_len` values.
    fn adaptive_max_pool_backward(
        &self,
        dy: &Self::Buf,
        idx: &[u32],
        in_len: usize,
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let g = adaptive_max_pool_backward_generic(&self.download(dy), idx, in_len)?;
        self.accumulate_grad(dx, &self.upload_f64(&g))
    }

    /// GroupNorm of `x (batch, channels, spatial)` with per-channel affine `w`, `b`: the output and
    /// the per-(sample, group) mean and 1/std.
    fn group_norm(
        &self,
        x: &Self::Buf,
        w: Slice<Self>,
        b: Slice<Self>,
        d: GroupNormDims,
    ) -> Result<(Self::Buf, Vec<f64>, Vec<f64>)> {
        let (w, b) = (self.download_slice(w), self.download_slice(b));
        let (y, mean, rstd) = group_norm_generic(&self.download(x), &w, &b, d)?;
        Ok((self.upload_f64(&y), mean, rstd))
    }
    /// Backward of [`Backend::group_norm`] from its input and statistics.
    fn group_norm_backward(
        &self,
        x: &Self::Buf,
        w: Slice<Self>,
        (mean, rstd): (&[f64], &[f64]),
        dy: &Self::Buf,
        d: GroupNormDims,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let w = self.download_slice(w);
        let [gx, gw, gb] = group_norm_backward_generic(&self.download(x), &w, mean, rstd, &self.download(dy), d)?;
        if let Some(dx) = dx {
            self.accumulate_grad(dx, &self.upload_f64(&gx))?;
        }
        if let Some(pg) = pg {
            self.write_param_grads(pg, &gw, &gb)?;
        }
        Ok(())
    }

    /// Concatenation of `(outer, widths[i])` parts along their second axis.
    fn concat(&self, parts: &[&Self::Buf], outer: usize, widths: &[usize]) -> Result<Self::Buf> {
        let host: Vec<Vec<f64>> = parts.iter().map(|p| self.download(p)).collect();
        let refs: Vec<&[f64]> = host.iter().map(Vec::as_slice).collect();
        Ok(self.upload_f64(&concat_generic(&refs, outer, widths)?))
    }
    /// Backward of [`Backend::concat`] for part `i`.
    fn concat_backward(
        &self,
        dy: &Self::Buf,
        outer: usize,
        widths: &[usize],
        i: usize,
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let g = concat_part_generic(&self.download(dy), outer, widths, i)?;
        self.accumulate_grad(dx, &self.upload_f64(&g))
    }

    /// `y[n, c, :] + b[c]` over `(batch, channels, plane)` (the bias of a transposed convolution).
    fn channel_bias(&self, y: &Self::Buf, b: Slice<Self>, plane: usize) -> Result<Self::Buf> {
        Ok(self.upload_f64(&channel_bias_generic(&self.download(y), &self.download_slice(b), plane)?))
    }
    /// Backward of [`Backend::channel_bias`] for the bias: `dy` summed per channel.
    fn channel_bias_backward(&self, dy: &Self::Buf, channels: usize, plane: usize, db: SliceMut<Self>) -> Result<()> {
        let g = channel_bias_backward_generic(&self.download(dy), channels, plane);
        self.accumulate(db, &self.upload_f64(&g))
    }

    /// Exact-erf GELU elementwise (the dense heads' activations on feature maps).
    fn gelu(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// Backward of [`Backend::gelu`] with the exact derivative.
    fn gelu_backward(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Grad<Self>) -> Result<()>;

    /// 2-d convolution of `x (batch, cin, h, w)` by `w (cout, cin, kh, kw)` (+ bias), zero padding.
    fn conv2d(&self, x: &Self::Buf, w: Slice<Self>, b: Option<Slice<Self>>, d: Conv2dDims) -> Result<Self::Buf>;
    /// Backward of [`Backend::conv2d`]: `dx`, and `dw` / `db` (`x` is needed only for `dw`).
    fn conv2d_backward(
        &self,
        x: Option<&Self::Buf>,
        w: Slice<Self>,
        dy: &Self::Buf,
        d: Conv2dDims,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()>;

    /// `a + b` (equal lengths).
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// `a - b` (equal lengths): the siamese change-detection difference.
    fn sub(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf>;
    /// `-dy` written or added into `dx` (the backward of `sub` for its second operand).
    fn neg_accumulate_grad(&self, dx: &mut Grad<Self>, dy: &Self::Buf) -> Result<()> {
        let g: Vec<f64> = self.download(dy).into_iter().map(|v| -v).collect();
        self.accumulate_grad(dx, &self.upload_f64(&g))
    }
    /// `x[i, :] + rows[i % rows_count, :]`: `rows` (`rows_count x dim`) repeats over the leading axis.
    fn add_rows(&self, x: &Self::Buf, rows: &Self::Buf, dim: usize) -> Result<Self::Buf>;
    /// `drows (=|+=) sum over repeats of dy`, with `rows_count` rows.
    fn add_rows_backward(&self, dy: &Self::Buf, rows_count: usize, dim: usize, drows: &mut Grad<Self>) -> Result<()>;
    /// `out[g * s + i, :] = a[i, :] + b[g, :]` for `a (s, dim)`, `b (g, dim)` (separate position
    /// embeddings joined).
    fn outer_add(&self, a: &Self::Buf, b: &Self::Buf, dim: usize) -> Result<Self::Buf>;
    fn outer_add_backward(
        &self,
        dy: &Self::Buf,
        s: usize,
        dim: usize,
        da: Option<&mut Grad<Self>>,
        db: Option<&mut Grad<Self>>,
    ) -> Result<()>;

    /// `out[n, i, :] = x[n, ids[n * count + i], :]` for `x (batch, len, dim)`.
    fn gather_rows(&self, x: &Self::Buf, batch: usize, len: usize, dim: usize, ids: &[usize]) -> Result<Self::Buf>;
    /// `dx[n, ids[n, i], :] += dy[n, i, :]`.
    fn gather_rows_backward(
        &self,
        dy: &Self::Buf,
        batch: usize,
        len: usize,
        dim: usize,
        ids: &[usize],
        dx: &mut Grad<Self>,
    ) -> Result<()>;
    /// The decoder's unshuffle: `out[n, l, :] = x[n, r, :]` if `r = restore[n * len + l] < kept`, else
    /// the fill row; `x (batch, kept, dim)`, `fill` one row `(dim)` or, with `fill_table`, one per
    /// position `(len, dim)` (then token `l` of every sample takes row `l`). Callers decide
    /// `fill_table` with [`crate::exec::fwd::unshuffle`], for the backward as well.
    #[allow(clippy::too_many_arguments)]
    fn unshuffle(
        &self,
        x: &Self::Buf,
        fill: &Self::Buf,
        batch: usize,
        kept: usize,
        dim: usize,
        restore: &[usize],
        fill_table: bool,
    ) -> Result<Self::Buf>;
    fn unshuffle_backward(
        &self,
        dy: &Self::Buf,
        batch: usize,
        kept: usize,
        dim: usize,
        restore: &[usize],
        dx: Option<&mut Grad<Self>>,
        dfill: Option<&mut Grad<Self>>,
        fill_table: bool,
    ) -> Result<()>;

    /// Mean over the token axis of `(batch, len, dim)`, skipping token 0 when `skip_first`.
    fn mean_tokens(&self, x: &Self::Buf, batch: usize, len: usize, dim: usize, skip_first: bool) -> Result<Self::Buf>;
    fn mean_tokens_backward(
        &self,
        dy: &Self::Buf,
        batch: usize,
        len: usize,
        dim: usize,
        skip_first: bool,
        dx: &mut Grad<Self>,
    ) -> Result<()>;

    /// SpectralGPT's reconstruction loss (`loss1 + loss3`, see `MaeLossDims`).
    fn mae_loss(&self, pred: &Self::Buf, target: &Self::Buf, mask: &[f32], d: MaeLossDims) -> Result<MaeLoss>;
    /// `dpred (=|+=) scale * d loss / d pred`.
    fn mae_loss_backward(
        &self,
        pred: &Self::Buf,
        target: &Self::Buf,
        mask: &[f32],
        d: MaeLossDims,
        scale: f64,
        dpred: &mut Grad<Self>,
    ) -> Result<()>;

    /// `y = x * keep / (1 - p)`, where element `i` is kept unless [`dropout_drops`]`(seed, i / group, p)`:
    /// `group = 1` is dropout, `group` = one sample's size is drop path (stochastic depth).
    fn dropout(&self, x: &Self::Buf, p: f32, seed: u64, group: usize) -> Result<Self::Buf>;
    fn dropout_backward(&self, dy: &Self::Buf, p: f32, seed: u64, group: usize, dx: &mut Grad<Self>) -> Result<()>;

    /// PyTorch's `MultiLabelSoftMarginLoss`: the mean over samples of the mean over classes of
    /// `-(y log sigmoid(z) + (1 - y) log sigmoid(-z))`.
    fn multilabel_soft_margin(&self, logits: &Self::Buf, targets: &[f32], classes: usize) -> Result<f64>;
    fn multilabel_soft_margin_backward(
        &self,
        logits: &Self::Buf,
        targets: &[f32],
        classes: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()>;

    /// Cross-entropy against class indices with per-class `weights`, averaged as PyTorch does
    /// (divided by the summed weights of the counted rows); rows labelled `ignore` do not count.
    fn weighted_cross_entropy(
        &self,
        logits: &Self::Buf,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<f64>;
    fn weighted_cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()>;

    /// Mean cross-entropy of `logits (batch, classes)` against target distributions `targets`
    /// (one-hot, smoothed or mixed); returns the loss.
    fn cross_entropy(&self, logits: &Self::Buf, targets: &[f32], classes: usize) -> Result<f64>;
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        targets: &[f32],
        classes: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()>;
}

fn check_mae(pred: usize, target: usize, mask: usize, d: MaeLossDims) -> Result<()> {
    let op = "mae_loss";
    if let Some(sa) = d.spectral_angle {
        if sa.pixels == 0 || d.feat % sa.pixels != 0 || !sa.weight.is_finite() || sa.weight < 0.0 {
            return Err(crate::error::TensorError::Arg {
                op,
                msg: format!(
                    "spectral angle over {} pixels of {}-value tokens, weight {}",
                    sa.pixels, d.feat, sa.weight
                ),
            });
        }
    }
    let tokens = d.batch * d.groups * d.spatial;
    crate::error::check_len(op, "pred", pred, tokens * d.feat)?;
    crate::error::check_len(op, "target", target, tokens * d.feat)?;
    crate::error::check_len(op, "mask", mask, tokens)
}

/// SpectralGPT's loss in f64 from either precision. `loss1`: mean over features of the squared error,
/// averaged over masked tokens (0 when nothing is masked, where the original divides 0 by 0);
/// `loss3`: the spectral groups summed, then the mean squared error over everything.
pub(crate) fn mae_loss_generic<T: Copy + Into<f64>>(
    pred: &[T],
    target: &[T],
    mask: &[f32],
    d: MaeLossDims,
) -> Result<MaeLoss> {
    check_mae(pred.len(), target.len(), mask.len(), d)?;
    let (f, s, g) = (d.feat, d.spatial, d.groups);
    let mut l1 = 0f64;
    for (t, &m) in mask.iter().enumerate() {
        if m != 0.0 {
            let e: f64 = (0..f).map(|j| (pred[t * f + j].into() - target[t * f + j].into()).powi(2)).sum();
            l1 += m as f64 * e / f as f64;
        }
    }
    let msum: f64 = mask.iter().map(|&m| m as f64).sum();
    let loss1 = if msum > 0.0 { l1 / msum } else { 0.0 };
    let mut l3 = 0f64;
    for n in 0..d.batch {
        for si in 0..s {
            for j in 0..f {
                let diff: f64 = (0..g)
                    .map(|gi| {
                        let i = ((n * g + gi) * s + si) * f + j;
                        pred[i].into() - target[i].into()
                    })
                    .sum();
                l3 += diff * diff;
            }
        }
    }
    let loss3 = l3 / (d.batch * s * f).max(1) as f64;
    let (sam, w) = match d.spectral_angle {
        Some(sa) if sa.weight > 0.0 => {
            let mut total = 0.0;
            let count = for_each_spectrum(pred, target, d, sa.pixels, |_, c, _, _| total += c.acos());
            (total / count.max(1) as f64, sa.weight)
        }
        _ => (0.0, 0.0),
    };
    Ok(MaeLoss { loss: loss1 + loss3 + w * sam, loss1, loss3, sam })
}

/// Within this distance of +-1 the cosine gets no gradient: arccos has an infinite slope there
/// (identical or opposite spectra). The loss value itself uses the exact angle.
const SAM_CLAMP: f64 = 1e-7;

/// Visits every pixel's spectrum: `f(indices, cos, |p|^2, |t|^2)` with the element indices of its
/// bands in token layout. Spectra with a zero norm have no angle and are skipped; returns how many
/// pixels there are in all (the mean's denominator).
fn for_each_spectrum<T: Copy + Into<f64>>(
    pred: &[T],
    target: &[T],
    d: MaeLossDims,
    pixels: usize,
    mut f: impl FnMut(&[usize], f64, f64, f64),
) -> usize {
    let (g, s, feat) = (d.groups, d.spatial, d.feat);
    let u = feat / pixels;
    let mut idx = Vec::with_capacity(g * u);
    for n in 0..d.batch {
        for si in 0..s {
            for q in 0..pixels {
                idx.clear();
                for gi in 0..g {
                    for a in 0..u {
                        idx.push(((n * g + gi) * s + si) * feat + a * pixels + q);
                    }
                }
                let (mut dot, mut pp, mut tt) = (0.0, 0.0, 0.0);
                for &i in &idx {
                    let (p, t) = (pred[i].into(), target[i].into());
                    dot += p * t;
                    pp += p * p;
                    tt += t * t;
                }
                if pp > 0.0 && tt > 0.0 {
                    f(&idx, (dot / (pp * tt).sqrt()).clamp(-1.0, 1.0), pp, tt);
                }
            }
        }
    }
    d.batch * s * pixels
}

/// `put(i, scale * d loss / d pred[i])` for every element.
pub(crate) fn mae_loss_backward_generic<T: Copy + Into<f64>>(
    pred: &[T],
    target: &[T],
    mask: &[f32],
    d: MaeLossDims,
    scale: f64,
    mut put: impl FnMut(usize, f64),
) -> Result<()> {
    check_mae(pred.len(), target.len(), mask.len(), d)?;
    let (f, s, g) = (d.feat, d.spatial, d.groups);
    let msum: f64 = mask.iter().map(|&m| m as f64).sum();
    let c1 = if msum > 0.0 { 2.0 * scale / (f as f64 * msum) } else { 0.0 };
    let c3 = 2.0 * scale / (d.batch * s * f).max(1) as f64;
    // The spectral-angle term's gradient, element by element (zero when it is off).
    let mut sam_grad = vec![0.0; pred.len()];
    if let Some(sa) = d.spectral_angle.filter(|sa| sa.weight > 0.0) {
        let total = d.batch * s * sa.pixels;
        let k = scale * sa.weight / total.max(1) as f64;
        for_each_spectrum(pred, target, d, sa.pixels, |idx, c, pp, tt| {
            if c.abs() >= 1.0 - SAM_CLAMP {
                return;
            }
            // d acos(c) = -dc / sqrt(1 - c^2); dc/dp_i = t_i / (|p||t|) - c p_i / |p|^2.
            let da = -1.0 / (1.0 - c * c).sqrt();
            let nrm = (pp * tt).sqrt();
            for &i in idx {
                sam_grad[i] = k * da * (target[i].into() / nrm - c * pred[i].into() / pp);
            }
        });
    }
    for n in 0..d.batch {
        for si in 0..s {
            for j in 0..f {
                let idx = |gi: usize| ((n * g + gi) * s + si) * f + j;
                let diff: f64 = (0..g).map(|gi| pred[idx(gi)].into() - target[idx(gi)].into()).sum();
                for gi in 0..g {
                    let i = idx(gi);
                    let m = mask[i / f] as f64;
                    put(i, c1 * m * (pred[i].into() - target[i].into()) + c3 * diff + sam_grad[i]);
                }
            }
        }
    }
    Ok(())
}

fn check_ce(logits: usize, targets: usize, classes: usize) -> Result<usize> {
    if classes == 0 || logits % classes != 0 {
        return Err(crate::error::TensorError::Shape {
            op: "cross_entropy",
            msg: format!("{logits} logits are not rows of {classes} classes"),
        });
    }
    crate::error::check_len("cross_entropy", "targets", targets, logits)?;
    Ok(logits / classes)
}

fn log_softmax_row<T: Copy + Into<f64>>(row: &[T]) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.into()));
    let z: f64 = row.iter().map(|&v| (v.into() - m).exp()).sum();
    row.iter().map(|&v| v.into() - m - z.ln()).collect()
}

/// Mean over rows of `-sum_c t_c log softmax(z)_c`.
pub(crate) fn cross_entropy_generic<T: Copy + Into<f64>>(logits: &[T], targets: &[f32], classes: usize) -> Result<f64> {
    let rows = check_ce(logits.len(), targets.len(), classes)?;
    let mut total = 0.0;
    for (r, row) in logits.chunks_exact(classes).enumerate() {
        let ls = log_softmax_row(row);
        total -= ls.iter().zip(&targets[r * classes..(r + 1) * classes]).map(|(l, &t)| l * t as f64).sum::<f64>();
    }
    Ok(total / rows.max(1) as f64)
}

/// `put(i, scale * (softmax(z) * sum_c t_c - t) / rows)`.
pub(crate) fn cross_entropy_backward_generic<T: Copy + Into<f64>>(
    logits: &[T],
    targets: &[f32],
    classes: usize,
    scale: f64,
    mut put: impl FnMut(usize, f64),
) -> Result<()> {
    let rows = check_ce(logits.len(), targets.len(), classes)?;
    for (r, row) in logits.chunks_exact(classes).enumerate() {
        let ls = log_softmax_row(row);
        let t = &targets[r * classes..(r + 1) * classes];
        let tsum: f64 = t.iter().map(|&v| v as f64).sum();
        for c in 0..classes {
            put(r * classes + c, scale * (ls[c].exp() * tsum - t[c] as f64) / rows as f64);
        }
    }
    Ok(())
}

/// Whether dropout with probability `p` drops unit `unit` under `seed`: a counter-based hash
/// (SplitMix64), so every backend and every thread count draws the same mask, and the backward
/// recomputes it instead of saving it.
pub fn dropout_drops(seed: u64, unit: usize, p: f32) -> bool {
    let mut z = seed ^ (unit as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) < p
}

pub(crate) fn dropout_factor(seed: u64, i: usize, group: usize, p: f32) -> f64 {
    if dropout_drops(seed, i / group.max(1), p) {
        0.0
    } else {
        1.0 / (1.0 - p as f64)
    }
}

fn check_dropout(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(crate::error::TensorError::Arg {
            op: "dropout",
            msg: format!("probability {p} is outside [0, 1)"),
        });
    }
    Ok(())
}

pub(crate) fn dropout_generic<T: Copy + Into<f64>>(x: &[T], p: f32, seed: u64, group: usize) -> Result<Vec<f64>> {
    check_dropout(p)?;
    Ok(x.iter().enumerate().map(|(i, &v)| v.into() * dropout_factor(seed, i, group, p)).collect())
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// `log sigmoid(z)`, stable for large |z|.
fn log_sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        -(-z).exp().ln_1p()
    } else {
        z - z.exp().ln_1p()
    }
}

pub(crate) fn msm_generic<T: Copy + Into<f64>>(logits: &[T], targets: &[f32], classes: usize) -> Result<f64> {
    let rows = check_ce(logits.len(), targets.len(), classes)?;
    let total: f64 = logits
        .iter()
        .zip(targets)
        .map(|(&z, &y)| {
            let z = z.into();
            -(y as f64 * log_sigmoid(z) + (1.0 - y as f64) * log_sigmoid(-z))
        })
        .sum();
    Ok(total / (rows.max(1) * classes) as f64)
}

pub(crate) fn msm_backward_generic<T: Copy + Into<f64>>(
    logits: &[T],
    targets: &[f32],
    classes: usize,
    scale: f64,
    mut put: impl FnMut(usize, f64),
) -> Result<()> {
    let rows = check_ce(logits.len(), targets.len(), classes)?;
    let c = scale / (rows.max(1) * classes) as f64;
    for (i, (&z, &y)) in logits.iter().zip(targets).enumerate() {
        put(i, c * (sigmoid(z.into()) - y as f64));
    }
    Ok(())
}

fn check_wce(logits: usize, labels: &[usize], weights: &[f32], ignore: usize) -> Result<usize> {
    let op = "weighted_cross_entropy";
    let classes = weights.len();
    if classes == 0 || logits != labels.len() * classes {
        return Err(crate::error::TensorError::Shape {
            op,
            msg: format!("{logits} logits for {} labels of {classes} classes", labels.len()),
        });
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes && l != ignore) {
        return Err(crate::error::TensorError::Index { op, index: bad, len: classes });
    }
    Ok(classes)
}

/// `(sum of w[y] nll, sum of w[y])` over counted rows.
pub(crate) fn wce_generic<T: Copy + Into<f64>>(
    logits: &[T],
    labels: &[usize],
    weights: &[f32],
    ignore: usize,
) -> Result<f64> {
    let classes = check_wce(logits.len(), labels, weights, ignore)?;
    let (mut num, mut den) = (0.0, 0.0);
    for (row, &y) in logits.chunks_exact(classes).zip(labels) {
        if y == ignore {
            continue;
        }
        let w = weights[y] as f64;
        num -= w * log_softmax_row(row)[y];
        den += w;
    }
    // Every row ignored: no loss (PyTorch divides 0 by 0).
    Ok(if den > 0.0 { num / den } else { 0.0 })
}

pub(crate) fn wce_backward_generic<T: Copy + Into<f64>>(
    logits: &[T],
    labels: &[usize],
    weights: &[f32],
    ignore: usize,
    scale: f64,
    mut put: impl FnMut(usize, f64),
) -> Result<()> {
    let classes = check_wce(logits.len(), labels, weights, ignore)?;
    let den: f64 = labels.iter().filter(|&&y| y != ignore).map(|&y| weights[y] as f64).sum();
    for (r, (row, &y)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        if y == ignore || den == 0.0 {
            (0..classes).for_each(|c| put(r * classes + c, 0.0));
            continue;
        }
        let w = weights[y] as f64 * scale / den;
        let ls = log_softmax_row(row);
        for (c, l) in ls.iter().enumerate() {
            put(r * classes + c, w * (l.exp() - f64::from(u8::from(c == y))));
        }
    }
    Ok(())
}

/// Source index of every output element of a permutation, in output order.
pub(crate) fn permute_index(shape: &[usize], perm: &[usize]) -> Result<Vec<usize>> {
    let nd = shape.len();
    let mut seen = vec![false; nd];
    if perm.len() != nd || perm.iter().any(|&p| p >= nd || std::mem::replace(&mut seen[p], true)) {
        return Err(crate::error::TensorError::Shape {
            op: "permute",
            msg: format!("{perm:?} is not a permutation of the axes of {shape:?}"),
        });
    }
    let mut in_strides = vec![1usize; nd];
    for i in (0..nd.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let n: usize = shape.iter().product();
    let mut idx = Vec::with_capacity(n);
    let mut pos = vec![0usize; nd];
    for _ in 0..n {
        idx.push(pos.iter().zip(&strides).map(|(a, b)| a * b).sum());
        for ax in (0..nd).rev() {
            pos[ax] += 1;
            if pos[ax] < out_shape[ax] {
                break;
            }
            pos[ax] = 0;
        }
    }
    Ok(idx)
}
