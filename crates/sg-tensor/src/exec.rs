//! Executing model code. A model is written once, as a generic function over [`Exec`], in coarse
//! ops (Linear, LayerNorm, attention, ...). [`Eval`] carries them out at once and records nothing:
//! inference, with no tape and no saved activations. The training tape of `sg-autograd` implements
//! the same trait, runs the same forward functions ([`fwd`]) keeping what its backward needs, and
//! records each op.

use crate::backend::{Backend, Conv2dDims, GroupNormDims, MaeLoss, MaeLossDims, Slice, SpectralAngle};
use crate::error::{Result, TensorError};
use crate::kernels::attention::AttnShape;
use crate::kernels::linear::Activation;
use crate::params::{HalfParams, ParamRef, ParamStore};
use std::collections::HashSet;

/// A BatchNorm layer's parameters: the affine pair (trained) and the running statistics (kept in
/// the parameter store, never trained, updated by training steps).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    pub weight: ParamRef,
    pub bias: ParamRef,
    pub running_mean: ParamRef,
    pub running_var: ParamRef,
    pub eps: f32,
    /// Weight of the new batch in the running averages (PyTorch's `momentum`, 0.1).
    pub momentum: f32,
}

/// Index of a recorded op's output on a tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub usize);

/// A value flowing through a model: a buffer on the executor's backend, its shape, and (on a tape)
/// the node that produced it. Cloning shares the buffer.
#[derive(Debug)]
pub struct Value<B: Backend> {
    pub buf: B::Buf,
    pub shape: Vec<usize>,
    /// `None` for constants and for values of an executor that records nothing.
    pub node: Option<NodeId>,
}

impl<B: Backend> Clone for Value<B> {
    fn clone(&self) -> Self {
        Value { buf: self.buf.clone(), shape: self.shape.clone(), node: self.node }
    }
}

impl<B: Backend> Value<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The last axis' length (the feature width of a row).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// The ops models are written in. Shapes follow PyTorch: `(batch, tokens, features)` and so on.
pub trait Exec {
    type B: Backend;

    fn backend(&self) -> &Self::B;

    /// Input data (no gradient).
    fn constant(&mut self, data: &[f32], shape: &[usize]) -> Result<Value<Self::B>>;
    /// A parameter used as a value (position embeddings, the mask token).
    fn param(&mut self, p: &ParamRef) -> Result<Value<Self::B>>;
    /// `act(x W^T + b)` over the last axis, `W` of shape `(out, in)`.
    fn linear(
        &mut self,
        x: &Value<Self::B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        act: Activation,
    ) -> Result<Value<Self::B>>;
    /// LayerNorm over the last axis.
    fn layernorm(&mut self, x: &Value<Self::B>, w: &ParamRef, b: &ParamRef, eps: f32) -> Result<Value<Self::B>>;
    /// Multi-head attention from a packed `(batch, seq, 3 * width)` QKV value to `(batch, seq, width)`.
    fn attention(&mut self, qkv: &Value<Self::B>, heads: usize) -> Result<Value<Self::B>>;
    /// `a + b`, equal shapes (residual connections).
    /// `a - b` (same shapes).
    fn sub(&mut self, a: &Value<Self::B>, b: &Value<Self::B>) -> Result<Value<Self::B>>;
    fn add(&mut self, a: &Value<Self::B>, b: &Value<Self::B>) -> Result<Value<Self::B>>;
    /// `x + rows`, where `rows` matches the trailing axes of `x` and repeats over the leading ones.
    fn add_rows(&mut self, x: &Value<Self::B>, rows: &Value<Self::B>) -> Result<Value<Self::B>>;
    /// `out[g * s + i] = a[i] + b[g]` for `a (s, d)`, `b (g, d)`: separate spatial and spectral position
    /// embeddings joined into one `(g * s, d)` table.
    fn outer_add(&mut self, a: &Value<Self::B>, b: &Value<Self::B>) -> Result<Value<Self::B>>;
    /// Rows `ids` (`batch x count`, per batch) of `x (batch, len, d)`: `(batch, count, d)`.
    fn gather_rows(&mut self, x: &Value<Self::B>, ids: &[usize]) -> Result<Value<Self::B>>;
    /// The MAE decoder's unshuffle: `(batch, kept, d)` and a `d`-wide fill row to `(batch, len, d)` in
    /// the original token order, with `restore` (`batch x len`) naming each token's source row (`>= kept`:
    /// the fill row). `fill` may instead hold `len` rows, one per position, shared by all samples.
    fn unshuffle(&mut self, x: &Value<Self::B>, fill: &Value<Self::B>, restore: &[usize]) -> Result<Value<Self::B>>;
    /// Mean over the token axis of `(batch, len, d)`, without token 0 when `skip_first`.
    fn mean_tokens(&mut self, x: &Value<Self::B>, skip_first: bool) -> Result<Value<Self::B>>;
    /// Adaptive average pooling of the last two axes of `x (.., h, w)` to `size` (the pyramid
    /// pooling module of UPerNet); `size` must not exceed the input.
    fn adaptive_avg_pool(&mut self, x: &Value<Self::B>, size: (usize, usize)) -> Result<Value<Self::B>>;
    /// Adaptive max pooling of the last two axes (the original UPerNet's pyramid pooling).
    fn adaptive_max_pool(&mut self, x: &Value<Self::B>, size: (usize, usize)) -> Result<Value<Self::B>>;
    /// Bilinear resize of the last two axes of `x (.., h, w)` to `size` (PyTorch's
    /// `interpolate(mode="bilinear", align_corners=...)`).
    fn upsample_bilinear(
        &mut self,
        x: &Value<Self::B>,
        size: (usize, usize),
        align_corners: bool,
    ) -> Result<Value<Self::B>>;
    /// Exact-erf GELU elementwise.
    fn gelu(&mut self, x: &Value<Self::B>) -> Result<Value<Self::B>>;
    /// GroupNorm of `x (batch, channels, ..)` in `groups` groups, per-channel affine `w`, `b`.
    fn group_norm(
        &mut self,
        x: &Value<Self::B>,
        groups: usize,
        w: &ParamRef,
        b: &ParamRef,
        eps: f32,
    ) -> Result<Value<Self::B>>;
    /// BatchNorm of `x (batch, channels, ..)`. Inference uses the running statistics; a training
    /// tape normalises with the batch's own and updates the running ones (see the tape).
    fn batch_norm(&mut self, x: &Value<Self::B>, bn: &BatchNorm) -> Result<Value<Self::B>>;
    /// Concatenation along `axis` (all other axes equal).
    fn concat(&mut self, parts: &[&Value<Self::B>], axis: usize) -> Result<Value<Self::B>>;
    /// Transposed 2-d convolution of `x (batch, cin, h, w)` by `w (cin, cout, kh, kw)` (+ bias),
    /// PyTorch's `ConvTranspose2d`: the adjoint of the convolution with the same weight.
    fn conv_transpose2d(
        &mut self,
        x: &Value<Self::B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<Self::B>>;
    /// `max(x, 0)` elementwise (the conv-norm-ReLU blocks of the dense heads).
    fn relu(&mut self, x: &Value<Self::B>) -> Result<Value<Self::B>>;
    /// 2-d convolution of `x (batch, cin, h, w)` by `w (cout, cin, kh, kw)` (+ bias), with zero
    /// padding `pad` on every side: the segmentation and change-detection heads.
    fn conv2d(
        &mut self,
        x: &Value<Self::B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<Self::B>>;
    /// The axes reordered (a copy): output axis `i` is input axis `perm[i]`.
    fn permute(&mut self, x: &Value<Self::B>, perm: &[usize]) -> Result<Value<Self::B>>;
    /// The same data with another shape of equal size.
    fn reshape(&mut self, x: &Value<Self::B>, shape: &[usize]) -> Result<Value<Self::B>>;
    /// SpectralGPT's loss of `pred (batch, groups * s, f)` against `target` with `mask` (1 = masked),
    /// with the optional spectral-angle term.
    fn mae_loss(
        &mut self,
        pred: &Value<Self::B>,
        target: &Value<Self::B>,
        mask: &[f32],
        groups: usize,
        spectral_angle: Option<SpectralAngle>,
    ) -> Result<(Value<Self::B>, MaeLoss)>;
    /// Mean cross-entropy of `logits (batch, classes)` against target distributions (`batch x classes`):
    /// one-hot, label-smoothed or mixed targets.
    fn cross_entropy(&mut self, logits: &Value<Self::B>, targets: &[f32]) -> Result<(Value<Self::B>, f64)>;
    /// Multi-label soft margin of `logits (batch, classes)` against 0/1 (or soft) targets.
    fn multilabel_soft_margin(&mut self, logits: &Value<Self::B>, targets: &[f32]) -> Result<(Value<Self::B>, f64)>;
    /// Class-weighted cross-entropy of `logits (rows, classes)` against class indices; rows labelled
    /// `ignore` do not count (segmentation's 255, change detection's weighted NLL).
    fn weighted_cross_entropy(
        &mut self,
        logits: &Value<Self::B>,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<(Value<Self::B>, f64)>;
    /// Dropout with probability `p` in training; the identity in inference.
    fn dropout(&mut self, x: &Value<Self::B>, p: f32) -> Result<Value<Self::B>>;
    /// Drop path (stochastic depth): whole samples of `x (batch, ...)` dropped with probability `p`
    /// in training, survivors scaled by `1 / (1 - p)`; the identity in inference.
    fn drop_path(&mut self, x: &Value<Self::B>, p: f32) -> Result<Value<Self::B>>;

    /// The values, widened to f64.
    fn read(&self, v: &Value<Self::B>) -> Vec<f64> {
        self.backend().download(&v.buf)
    }
}

/// Forward halves of the ops, shared by every executor: shape checks, then the backend's kernel.
/// With `keep`, they also return what the backward needs.
pub mod fwd {
    use super::*;

    fn slice<'a, B: Backend>(params: &'a B::Buf, p: &ParamRef) -> Slice<'a, B> {
        Slice { buf: params, range: p.range() }
    }

    fn shape_err<T>(op: &'static str, msg: String) -> Result<T> {
        Err(TensorError::Shape { op, msg })
    }

    /// Rows and width of a value seen as a matrix over its last axis.
    pub fn rows_cols<B: Backend>(x: &Value<B>) -> (usize, usize) {
        let c = x.last_dim();
        (x.numel() / c.max(1), c)
    }

    pub fn value<B: Backend>(buf: B::Buf, shape: Vec<usize>) -> Value<B> {
        Value { buf, shape, node: None }
    }

    pub fn constant<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> Result<Value<B>> {
        crate::error::check_len("constant", "data", data.len(), shape.iter().product())?;
        Ok(value(be.upload(data), shape.to_vec()))
    }

    pub fn param<B: Backend>(be: &B, params: &B::Buf, p: &ParamRef) -> Value<B> {
        value(be.copy_range(params, p.range()), p.shape.clone())
    }

    pub fn relu<B: Backend>(be: &B, x: &Value<B>) -> Result<Value<B>> {
        Ok(value(be.relu(&x.buf)?, x.shape.clone()))
    }

    /// [`linear`] for inference with a weight the backend packed ([`Eval::packed`]).
    pub fn linear_packed<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        act: Activation,
    ) -> Result<Value<B>> {
        let (m, k, n) = linear_dims(x, w, b)?;
        let y = be.linear_packed(&x.buf, slice(params, w), b.map(|b| slice(params, b)), m, k, n, act)?;
        Ok(value(y, linear_shape(x, n)))
    }

    /// `x`'s shape with the last axis `n` wide: a Linear's output.
    fn linear_shape<B: Backend>(x: &Value<B>, n: usize) -> Vec<usize> {
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rows_cols checked") = n;
        shape
    }

    fn linear_dims<B: Backend>(x: &Value<B>, w: &ParamRef, b: Option<&ParamRef>) -> Result<(usize, usize, usize)> {
        let op = "linear";
        let (m, k) = rows_cols(x);
        if w.shape.len() != 2 || w.shape[1] != k {
            return shape_err(op, format!("input {:?} does not match a weight of shape {:?}", x.shape, w.shape));
        }
        let n = w.shape[0];
        if let Some(b) = b {
            if b.shape != [n] {
                return shape_err(op, format!("bias {:?} for {n} outputs", b.shape));
            }
        }
        Ok((m, k, n))
    }

    pub fn linear<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        act: Activation,
        keep: bool,
    ) -> Result<(Value<B>, Option<B::Buf>)> {
        let (m, k, n) = linear_dims(x, w, b)?;
        let (y, pre) = be.linear(&x.buf, slice(params, w), b.map(|b| slice(params, b)), m, k, n, act, keep)?;
        Ok((value(y, linear_shape(x, n)), pre))
    }

    #[allow(clippy::type_complexity)]
    pub fn layernorm<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: &ParamRef,
        eps: f32,
        keep: bool,
    ) -> Result<(Value<B>, Option<(B::Buf, B::Buf)>)> {
        let (rows, d) = rows_cols(x);
        if w.shape != [d] || b.shape != [d] {
            return shape_err(
                "layernorm",
                format!("input {:?} with weight {:?}, bias {:?}", x.shape, w.shape, b.shape),
            );
        }
        let (y, stats) = be.layernorm(&x.buf, slice(params, w), slice(params, b), rows, eps, keep)?;
        Ok((value(y, x.shape.clone()), stats))
    }

    /// The attention shape of a packed `(batch, seq, 3 * width)` QKV value.
    pub fn attn_shape<B: Backend>(qkv: &Value<B>, heads: usize) -> Result<AttnShape> {
        let s = &qkv.shape;
        if s.len() != 3 || heads == 0 || s[2] % (3 * heads) != 0 {
            return shape_err("attention", format!("QKV of shape {s:?} cannot split into 3 x {heads} heads"));
        }
        Ok(AttnShape { batch: s[0], seq: s[1], heads, head_dim: s[2] / 3 / heads })
    }

    pub fn attention<B: Backend>(
        be: &B,
        qkv: &Value<B>,
        heads: usize,
        keep: bool,
    ) -> Result<(Value<B>, Option<B::Buf>)> {
        let s = attn_shape(qkv, heads)?;
        let (o, lse) = be.attention(&qkv.buf, s, keep)?;
        Ok((value(o, vec![s.batch, s.seq, s.heads * s.head_dim]), lse))
    }

    pub fn add<B: Backend>(be: &B, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        if a.shape != b.shape {
            return shape_err("add", format!("{:?} + {:?}", a.shape, b.shape));
        }
        Ok(value(be.add(&a.buf, &b.buf)?, a.shape.clone()))
    }

    pub fn sub<B: Backend>(be: &B, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        if a.shape != b.shape {
            return shape_err("sub", format!("{:?} - {:?}", a.shape, b.shape));
        }
        Ok(value(be.sub(&a.buf, &b.buf)?, a.shape.clone()))
    }

    pub fn add_rows<B: Backend>(be: &B, x: &Value<B>, rows: &Value<B>) -> Result<Value<B>> {
        let r = &rows.shape;
        // Leading axes of size 1 on `rows` (PyTorch's (1, L, D) embeddings) broadcast too.
        let r: Vec<usize> = r.iter().copied().skip_while(|&d| d == 1).collect();
        if r.len() > x.shape.len() || x.shape[x.shape.len() - r.len()..] != r[..] || rows.numel() == 0 {
            return shape_err("add_rows", format!("{:?} + {:?}", x.shape, rows.shape));
        }
        Ok(value(be.add_rows(&x.buf, &rows.buf, x.last_dim())?, x.shape.clone()))
    }

    pub fn outer_add<B: Backend>(be: &B, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        let (s, d) = rows_cols(a);
        let (g, d2) = rows_cols(b);
        if d != d2 {
            return shape_err("outer_add", format!("{:?} and {:?}", a.shape, b.shape));
        }
        Ok(value(be.outer_add(&a.buf, &b.buf, d)?, vec![g * s, d]))
    }

    /// `(batch, len, d)` of a 3-d value, or an error naming the op.
    pub fn bld<B: Backend>(op: &'static str, x: &Value<B>) -> Result<(usize, usize, usize)> {
        match x.shape[..] {
            [b, l, d] => Ok((b, l, d)),
            _ => shape_err(op, format!("needs (batch, tokens, features), got {:?}", x.shape)),
        }
    }

    pub fn gather_rows<B: Backend>(be: &B, x: &Value<B>, ids: &[usize]) -> Result<Value<B>> {
        let (b, l, d) = bld("gather_rows", x)?;
        if b == 0 || ids.len() % b != 0 {
            return shape_err("gather_rows", format!("{} ids for a batch of {b}", ids.len()));
        }
        Ok(value(be.gather_rows(&x.buf, b, l, d, ids)?, vec![b, ids.len() / b, d]))
    }

    /// The unshuffle, and whether `fill` was one row per position (`(len, d)`) rather than one row
    /// for every masked token (`(d)`; with `len = 1` both read the same). The one place that
    /// decides it: the backend's forward is told, and a tape records it for the backward.
    pub fn unshuffle<B: Backend>(be: &B, x: &Value<B>, fill: &Value<B>, restore: &[usize]) -> Result<(Value<B>, bool)> {
        let (b, k, d) = bld("unshuffle", x)?;
        let len = restore.len().checked_div(b).unwrap_or(0);
        if (fill.numel() != d && fill.numel() != len * d) || b == 0 || restore.len() % b != 0 || len < k {
            return shape_err(
                "unshuffle",
                format!("{:?} with fill {:?} and {} restore ids", x.shape, fill.shape, restore.len()),
            );
        }
        let table = fill.numel() != d;
        Ok((value(be.unshuffle(&x.buf, &fill.buf, b, k, d, restore, table)?, vec![b, len, d]), table))
    }

    pub fn mean_tokens<B: Backend>(be: &B, x: &Value<B>, skip_first: bool) -> Result<Value<B>> {
        let (b, l, d) = bld("mean_tokens", x)?;
        Ok(value(be.mean_tokens(&x.buf, b, l, d, skip_first)?, vec![b, d]))
    }

    /// The checked sizes of a convolution of `x` by `w`.
    pub fn conv2d_dims<B: Backend>(x: &Value<B>, w: &ParamRef, stride: usize, pad: usize) -> Result<Conv2dDims> {
        let op = "conv2d";
        let (&[batch, cin, h, wd], &[cout, wcin, kh, kw]) = (x.shape.as_slice(), w.shape.as_slice()) else {
            return shape_err(op, format!("input {:?} and weight {:?} must both have 4 axes", x.shape, w.shape));
        };
        if wcin != cin {
            return shape_err(
                op,
                format!("input {:?} has {cin} channels, weight {:?} expects {wcin}", x.shape, w.shape),
            );
        }
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            return shape_err(
                op,
                format!("a {kh}x{kw} kernel (stride {stride}, pad {pad}) does not fit input {:?}", x.shape),
            );
        }
        Ok(Conv2dDims { batch, cin, h, w: wd, cout, kh, kw, stride, pad })
    }

    pub fn conv2d<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        d: Conv2dDims,
    ) -> Result<Value<B>> {
        if let Some(b) = b {
            if b.shape != [d.cout] {
                return shape_err("conv2d", format!("bias {:?} for {} output channels", b.shape, d.cout));
            }
        }
        let y = be.conv2d(&x.buf, slice(params, w), b.map(|b| slice(params, b)), d)?;
        let (ho, wo) = d.out_hw();
        Ok(value(y, vec![d.batch, d.cout, ho, wo]))
    }

    /// The checked `(planes, (h, w))` of a resize of the last two axes of `x` to `size`.
    pub fn plane_dims<B: Backend>(
        op: &'static str,
        x: &Value<B>,
        size: (usize, usize),
    ) -> Result<(usize, (usize, usize))> {
        let n = x.shape.len();
        if n < 2 || x.shape[n - 2] == 0 || x.shape[n - 1] == 0 || size.0 == 0 || size.1 == 0 {
            return shape_err(op, format!("cannot resize {:?} to {size:?}", x.shape));
        }
        Ok((x.shape[..n - 2].iter().product(), (x.shape[n - 2], x.shape[n - 1])))
    }

    /// The checked `(planes, (h, w))` of an adaptive pooling of `x` to `size`.
    pub fn pool_dims<B: Backend>(x: &Value<B>, size: (usize, usize)) -> Result<(usize, (usize, usize))> {
        let (planes, hw) = plane_dims("adaptive_avg_pool", x, size)?;
        if size.0 > hw.0 || size.1 > hw.1 {
            return shape_err("adaptive_avg_pool", format!("cannot pool {:?} up to {size:?}", x.shape));
        }
        Ok((planes, hw))
    }

    fn with_hw(shape: &[usize], size: (usize, usize)) -> Vec<usize> {
        let mut shape = shape.to_vec();
        let n = shape.len();
        (shape[n - 2], shape[n - 1]) = size;
        shape
    }

    pub fn adaptive_avg_pool<B: Backend>(be: &B, x: &Value<B>, size: (usize, usize)) -> Result<Value<B>> {
        let (planes, hw) = pool_dims(x, size)?;
        Ok(value(be.adaptive_avg_pool(&x.buf, planes, hw, size)?, with_hw(&x.shape, size)))
    }

    pub fn upsample_bilinear<B: Backend>(
        be: &B,
        x: &Value<B>,
        size: (usize, usize),
        align_corners: bool,
    ) -> Result<Value<B>> {
        let (planes, hw) = plane_dims("upsample_bilinear", x, size)?;
        Ok(value(be.upsample_bilinear(&x.buf, planes, hw, size, align_corners)?, with_hw(&x.shape, size)))
    }

    /// The pooled values and each maximum's index.
    pub fn adaptive_max_pool<B: Backend>(be: &B, x: &Value<B>, size: (usize, usize)) -> Result<(Value<B>, Vec<u32>)> {
        let (planes, hw) = pool_dims(x, size)?;
        let (y, idx) = be.adaptive_max_pool(&x.buf, planes, hw, size)?;
        Ok((value(y, with_hw(&x.shape, size)), idx))
    }

    pub fn gelu<B: Backend>(be: &B, x: &Value<B>) -> Result<Value<B>> {
        Ok(value(be.gelu(&x.buf)?, x.shape.clone()))
    }

    /// `(batch, channels, spatial)` of a map `x (batch, channels, ..)` for a per-channel op.
    pub fn channel_dims<B: Backend>(op: &'static str, x: &Value<B>) -> Result<(usize, usize, usize)> {
        if x.shape.len() < 2 || x.numel() == 0 {
            return shape_err(op, format!("input {:?} is not (batch, channels, ..)", x.shape));
        }
        Ok((x.shape[0], x.shape[1], x.shape[2..].iter().product()))
    }

    pub fn group_norm_dims<B: Backend>(
        x: &Value<B>,
        groups: usize,
        w: &ParamRef,
        b: &ParamRef,
        eps: f32,
    ) -> Result<GroupNormDims> {
        let (batch, channels, spatial) = channel_dims("group_norm", x)?;
        if groups == 0 || channels % groups != 0 || w.shape != [channels] || b.shape != [channels] {
            return shape_err(
                "group_norm",
                format!("{groups} groups, weight {:?}, bias {:?} for input {:?}", w.shape, b.shape, x.shape),
            );
        }
        Ok(GroupNormDims { batch, channels, spatial, groups, eps: eps as f64 })
    }

    /// GroupNorm's output and its per-(sample, group) mean and 1/std.
    pub fn group_norm<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: &ParamRef,
        d: GroupNormDims,
    ) -> Result<(Value<B>, Vec<f64>, Vec<f64>)> {
        let (y, mean, rstd) = be.group_norm(&x.buf, slice(params, w), slice(params, b), d)?;
        Ok((value(y, x.shape.clone()), mean, rstd))
    }

    /// BatchNorm with the running statistics (inference).
    pub fn batch_norm_eval<B: Backend>(be: &B, params: &B::Buf, x: &Value<B>, bn: &BatchNorm) -> Result<Value<B>> {
        let (_, c, plane) = channel_dims("batch_norm", x)?;
        let ps = [&bn.running_mean, &bn.running_var, &bn.weight, &bn.bias];
        if ps.iter().any(|p| p.shape != [c]) {
            return shape_err("batch_norm", format!("parameters of {:?} for {c} channels", bn.weight.shape));
        }
        let [m, v, w, b] = ps.map(|p| be.download_slice(slice(params, p)));
        let y = crate::backend::batch_norm_eval_generic(&be.download(&x.buf), [&m, &v, &w, &b], plane, bn.eps as f64)?;
        Ok(value(be.upload_f64(&y), x.shape.clone()))
    }

    /// `(outer, widths)` of a concatenation along `axis`.
    pub fn concat_dims<B: Backend>(parts: &[&Value<B>], axis: usize) -> Result<(usize, Vec<usize>, Vec<usize>)> {
        let Some(first) = parts.first() else { return shape_err("concat", "no parts".into()) };
        if axis >= first.shape.len() {
            return shape_err("concat", format!("axis {axis} of {:?}", first.shape));
        }
        let mut shape = first.shape.clone();
        shape[axis] = 0;
        for p in parts {
            let same = p.shape.len() == first.shape.len()
                && p.shape.iter().zip(&first.shape).enumerate().all(|(i, (a, b))| i == axis || a == b);
            if !same {
                return shape_err("concat", format!("{:?} and {:?} differ off axis {axis}", first.shape, p.shape));
            }
            shape[axis] += p.shape[axis];
        }
        let outer = first.shape[..axis].iter().product();
        let widths = parts.iter().map(|p| p.shape[axis..].iter().product()).collect();
        Ok((outer, widths, shape))
    }

    pub fn concat<B: Backend>(be: &B, parts: &[&Value<B>], axis: usize) -> Result<Value<B>> {
        let (outer, widths, shape) = concat_dims(parts, axis)?;
        let bufs: Vec<&B::Buf> = parts.iter().map(|p| &p.buf).collect();
        Ok(value(be.concat(&bufs, outer, &widths)?, shape))
    }

    /// The convolution whose adjoint is a transposed convolution of `x (batch, cin, h, w)` by
    /// `w (cin, cout, kh, kw)`: it maps the `(batch, cout, H, W)` output back to `x`.
    pub fn conv_transpose2d_dims<B: Backend>(
        x: &Value<B>,
        w: &ParamRef,
        stride: usize,
        pad: usize,
    ) -> Result<Conv2dDims> {
        let op = "conv_transpose2d";
        let (&[batch, cin, h, wd], &[wcin, cout, kh, kw]) = (x.shape.as_slice(), w.shape.as_slice()) else {
            return shape_err(op, format!("input {:?} and weight {:?} must both have 4 axes", x.shape, w.shape));
        };
        let (oh, ow) = ((h.max(1) - 1) * stride + kh, (wd.max(1) - 1) * stride + kw);
        if wcin != cin || stride == 0 || h == 0 || wd == 0 || oh <= 2 * pad || ow <= 2 * pad {
            return shape_err(
                op,
                format!("input {:?}, weight {:?} (in, out, kh, kw), stride {stride}, pad {pad}", x.shape, w.shape),
            );
        }
        Ok(Conv2dDims { batch, cin: cout, h: oh - 2 * pad, w: ow - 2 * pad, cout: cin, kh, kw, stride, pad })
    }

    pub fn conv_transpose2d<B: Backend>(
        be: &B,
        params: &B::Buf,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        d: Conv2dDims,
    ) -> Result<Value<B>> {
        let mut y = None;
        be.conv2d_backward(None, slice(params, w), &x.buf, d, Some(&mut y), None)?;
        let mut y = y.expect("conv2d_backward wrote dx");
        if let Some(b) = b {
            if b.shape != [d.cin] {
                return shape_err("conv_transpose2d", format!("bias {:?} for {} output channels", b.shape, d.cin));
            }
            y = be.channel_bias(&y, slice(params, b), d.h * d.w)?;
        }
        Ok(value(y, vec![d.batch, d.cin, d.h, d.w]))
    }

    pub fn permute<B: Backend>(be: &B, x: &Value<B>, perm: &[usize]) -> Result<Value<B>> {
        let y = be.permute(&x.buf, &x.shape, perm)?;
        Ok(value(y, perm.iter().map(|&p| x.shape[p]).collect()))
    }

    /// The permutation that undoes `perm`.
    pub fn inverse_perm(perm: &[usize]) -> Vec<usize> {
        let mut inv = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        inv
    }

    pub fn reshape<B: Backend>(x: &Value<B>, shape: &[usize]) -> Result<Value<B>> {
        let n: usize = shape.iter().product();
        if n != x.numel() {
            return shape_err("reshape", format!("{:?} to {shape:?}", x.shape));
        }
        Ok(Value { buf: x.buf.clone(), shape: shape.to_vec(), node: x.node })
    }

    pub fn mae_dims<B: Backend>(
        pred: &Value<B>,
        target: &Value<B>,
        mask: &[f32],
        groups: usize,
        spectral_angle: Option<SpectralAngle>,
    ) -> Result<MaeLossDims> {
        let (b, l, f) = bld("mae_loss", pred)?;
        if target.shape != pred.shape || groups == 0 || l % groups != 0 || mask.len() != b * l {
            return shape_err(
                "mae_loss",
                format!(
                    "pred {:?}, target {:?}, {} mask values, {groups} spectral groups",
                    pred.shape,
                    target.shape,
                    mask.len()
                ),
            );
        }
        Ok(MaeLossDims { batch: b, groups, spatial: l / groups, feat: f, spectral_angle })
    }

    /// The classes of `(rows, classes)` logits for `labels` (one per row).
    pub fn check_labels<B: Backend>(logits: &Value<B>, labels: &[usize], weights: &[f32]) -> Result<()> {
        let (rows, c) = rows_cols(logits);
        if rows != labels.len() || c != weights.len() {
            return shape_err(
                "weighted_cross_entropy",
                format!("logits {:?} with {} labels and {} class weights", logits.shape, labels.len(), weights.len()),
            );
        }
        Ok(())
    }

    pub fn check_targets<B: Backend>(logits: &Value<B>, targets: &[f32]) -> Result<usize> {
        match logits.shape[..] {
            [b, c] if targets.len() == b * c => Ok(c),
            _ => shape_err("cross_entropy", format!("logits {:?} with {} target values", logits.shape, targets.len())),
        }
    }

    /// The MAE loss as a scalar value, its parts, and the dimensions its backward needs.
    pub fn mae_loss<B: Backend>(
        be: &B,
        pred: &Value<B>,
        target: &Value<B>,
        mask: &[f32],
        groups: usize,
        spectral_angle: Option<SpectralAngle>,
    ) -> Result<(Value<B>, MaeLoss, MaeLossDims)> {
        let d = mae_dims(pred, target, mask, groups, spectral_angle)?;
        let l = be.mae_loss(&pred.buf, &target.buf, mask, d)?;
        Ok((value(be.scalar(l.loss), vec![]), l, d))
    }

    /// Cross-entropy against target distributions: the scalar value, the loss, the class count.
    pub fn cross_entropy<B: Backend>(be: &B, logits: &Value<B>, targets: &[f32]) -> Result<(Value<B>, f64, usize)> {
        let c = check_targets(logits, targets)?;
        let l = be.cross_entropy(&logits.buf, targets, c)?;
        Ok((value(be.scalar(l), vec![]), l, c))
    }

    /// Multi-label soft margin: the scalar value, the loss, the class count.
    pub fn multilabel_soft_margin<B: Backend>(
        be: &B,
        logits: &Value<B>,
        targets: &[f32],
    ) -> Result<(Value<B>, f64, usize)> {
        let c = check_targets(logits, targets)?;
        let l = be.multilabel_soft_margin(&logits.buf, targets, c)?;
        Ok((value(be.scalar(l), vec![]), l, c))
    }

    /// Class-weighted cross-entropy: the scalar value and the loss.
    pub fn weighted_cross_entropy<B: Backend>(
        be: &B,
        logits: &Value<B>,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<(Value<B>, f64)> {
        check_labels(logits, labels, weights)?;
        let l = be.weighted_cross_entropy(&logits.buf, labels, weights, ignore)?;
        Ok((value(be.scalar(l), vec![]), l))
    }
}

/// Runs ops at once on a backend, recording nothing: inference.
pub struct Eval<'a, B: Backend> {
    backend: B,
    params: Weights<'a, B>,
    /// `(offset, len)` of the Linear weights held in the backend's packed layout.
    packed: HashSet<(usize, usize)>,
}

/// Where an executor's parameters live.
enum Weights<'a, B: Backend> {
    /// f32 on the backend, used in place.
    Full(B::Buf),
    /// f16 / bf16 on the host, widened per op.
    Half(&'a HalfParams),
}

impl<'a, B: Backend> Eval<'a, B> {
    /// An executor over `store`'s parameters (on the CPU backend, used in place without a copy).
    pub fn new(backend: B, store: &'a ParamStore) -> Self {
        let params = backend.upload_params(store);
        Self::with_params(backend, store, params)
    }

    /// An executor over parameter values already on the backend, laid out like `store`.
    pub fn with_params(backend: B, _store: &'a ParamStore, params: B::Buf) -> Self {
        Eval { backend, params: Weights::Full(params), packed: HashSet::new() }
    }

    /// An executor that owns `store`'s parameters, with the Linear weights `linear` rearranged once
    /// into the layout the backend's inference products read in place
    /// ([`Backend::pack_linear_weight`]; on AVX2+FMA, the GEMM's panels). The rearranged weights
    /// replace the originals, so memory does not grow; they serve [`Exec::linear`] only. Weights the
    /// backend does not pack (no such layout, or a width that is not a multiple of 16) stay as stored.
    pub fn packed(backend: B, store: ParamStore, linear: &[&ParamRef]) -> Result<Eval<'static, B>> {
        let mut data = store.into_data();
        let mut packed = HashSet::new();
        for w in linear {
            let (n, k) = match w.shape[..] {
                [n, k] => (n, k),
                _ => {
                    return Err(TensorError::Arg {
                        op: "Eval::packed",
                        msg: format!("a Linear weight is 2-D, not {:?}", w.shape),
                    })
                }
            };
            let range = w.offset..w.offset + w.len();
            if range.end > data.len() {
                return Err(TensorError::Arg {
                    op: "Eval::packed",
                    msg: format!("weight {:?} at {} lies outside the {} parameters", w.shape, w.offset, data.len()),
                });
            }
            if packed.contains(&(w.offset, w.len())) {
                continue;
            }
            if let Some(p) = backend.pack_linear_weight(&data[range.clone()], n, k) {
                if p.len() == range.len() {
                    data[range].copy_from_slice(&p);
                    packed.insert((w.offset, w.len()));
                }
            }
        }
        let params = backend.upload_vec(data);
        Ok(Eval { backend, params: Weights::Full(params), packed })
    }

    /// How many Linear weights [`Eval::packed`] rearranged.
    pub fn packed_weights(&self) -> usize {
        self.packed.len()
    }

    fn is_packed(&self, p: &ParamRef) -> bool {
        !self.packed.is_empty() && self.packed.contains(&(p.offset, p.len()))
    }

    /// An executor over half-precision weights: each op widens the parameters it uses to f32 for
    /// the duration of the op, so only one layer's weights are ever held in f32.
    pub fn half(backend: B, params: &'a HalfParams) -> Self {
        Eval { backend, params: Weights::Half(params), packed: HashSet::new() }
    }

    /// Runs `f` on a parameter buffer holding `ps` and the references to them in it: the store's
    /// buffer itself, or the widened parameters packed into a fresh one.
    fn using<T>(
        &self,
        ps: &[Option<&ParamRef>],
        f: impl FnOnce(&B::Buf, &[Option<ParamRef>]) -> Result<T>,
    ) -> Result<T> {
        if let Some(p) = ps.iter().flatten().find(|p| self.is_packed(p)) {
            return Err(TensorError::Arg {
                op: "eval",
                msg: format!("the weight at offset {} {:?} is packed for Linear layers only", p.offset, p.shape),
            });
        }
        match &self.params {
            Weights::Full(buf) => f(buf, &ps.iter().map(|p| p.cloned()).collect::<Vec<_>>()),
            Weights::Half(h) => {
                let mut vals = Vec::with_capacity(ps.iter().flatten().map(|p| p.len()).sum());
                let mut refs = Vec::with_capacity(ps.len());
                for p in ps {
                    refs.push(match p {
                        Some(p) => {
                            let offset = vals.len();
                            h.widen_into(p, &mut vals)?;
                            Some(ParamRef { offset, shape: p.shape.clone() })
                        }
                        None => None,
                    });
                }
                f(&self.backend.upload_vec(vals), &refs)
            }
        }
    }
}

impl<B: Backend> Exec for Eval<'_, B> {
    type B = B;

    fn backend(&self) -> &B {
        &self.backend
    }

    fn constant(&mut self, data: &[f32], shape: &[usize]) -> Result<Value<B>> {
        fwd::constant(&self.backend, data, shape)
    }

    fn param(&mut self, p: &ParamRef) -> Result<Value<B>> {
        self.using(&[Some(p)], |buf, r| Ok(fwd::param(&self.backend, buf, r[0].as_ref().expect("given"))))
    }

    fn linear(&mut self, x: &Value<B>, w: &ParamRef, b: Option<&ParamRef>, act: Activation) -> Result<Value<B>> {
        // Only `Eval::packed` packs, and its weights are full precision.
        if let (true, Weights::Full(buf)) = (self.is_packed(w), &self.params) {
            return fwd::linear_packed(&self.backend, buf, x, w, b, act);
        }
        self.using(&[Some(w), b], |buf, r| {
            Ok(fwd::linear(&self.backend, buf, x, r[0].as_ref().expect("given"), r[1].as_ref(), act, false)?.0)
        })
    }

    fn layernorm(&mut self, x: &Value<B>, w: &ParamRef, b: &ParamRef, eps: f32) -> Result<Value<B>> {
        self.using(&[Some(w), Some(b)], |buf, r| {
            let (w, b) = (r[0].as_ref().expect("given"), r[1].as_ref().expect("given"));
            Ok(fwd::layernorm(&self.backend, buf, x, w, b, eps, false)?.0)
        })
    }

    fn attention(&mut self, qkv: &Value<B>, heads: usize) -> Result<Value<B>> {
        Ok(fwd::attention(&self.backend, qkv, heads, false)?.0)
    }

    fn sub(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        fwd::sub(&self.backend, a, b)
    }

    fn add(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        fwd::add(&self.backend, a, b)
    }

    fn add_rows(&mut self, x: &Value<B>, rows: &Value<B>) -> Result<Value<B>> {
        fwd::add_rows(&self.backend, x, rows)
    }

    fn outer_add(&mut self, a: &Value<B>, b: &Value<B>) -> Result<Value<B>> {
        fwd::outer_add(&self.backend, a, b)
    }

    fn gather_rows(&mut self, x: &Value<B>, ids: &[usize]) -> Result<Value<B>> {
        fwd::gather_rows(&self.backend, x, ids)
    }

    fn unshuffle(&mut self, x: &Value<B>, fill: &Value<B>, restore: &[usize]) -> Result<Value<B>> {
        Ok(fwd::unshuffle(&self.backend, x, fill, restore)?.0)
    }

    fn mean_tokens(&mut self, x: &Value<B>, skip_first: bool) -> Result<Value<B>> {
        fwd::mean_tokens(&self.backend, x, skip_first)
    }

    fn adaptive_avg_pool(&mut self, x: &Value<B>, size: (usize, usize)) -> Result<Value<B>> {
        fwd::adaptive_avg_pool(&self.backend, x, size)
    }

    fn adaptive_max_pool(&mut self, x: &Value<B>, size: (usize, usize)) -> Result<Value<B>> {
        Ok(fwd::adaptive_max_pool(&self.backend, x, size)?.0)
    }

    fn upsample_bilinear(&mut self, x: &Value<B>, size: (usize, usize), align_corners: bool) -> Result<Value<B>> {
        fwd::upsample_bilinear(&self.backend, x, size, align_corners)
    }

    fn gelu(&mut self, x: &Value<B>) -> Result<Value<B>> {
        fwd::gelu(&self.backend, x)
    }

    fn group_norm(&mut self, x: &Value<B>, groups: usize, w: &ParamRef, b: &ParamRef, eps: f32) -> Result<Value<B>> {
        let d = fwd::group_norm_dims(x, groups, w, b, eps)?;
        self.using(&[Some(w), Some(b)], |buf, r| {
            let (w, b) = (r[0].as_ref().expect("given"), r[1].as_ref().expect("given"));
            Ok(fwd::group_norm(&self.backend, buf, x, w, b, d)?.0)
        })
    }

    fn batch_norm(&mut self, x: &Value<B>, bn: &BatchNorm) -> Result<Value<B>> {
        let ps = [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var].map(Some);
        self.using(&ps, |buf, r| {
            let g = |i: usize| r[i].clone().expect("given");
            let bn = BatchNorm { weight: g(0), bias: g(1), running_mean: g(2), running_var: g(3), ..bn.clone() };
            fwd::batch_norm_eval(&self.backend, buf, x, &bn)
        })
    }

    fn concat(&mut self, parts: &[&Value<B>], axis: usize) -> Result<Value<B>> {
        fwd::concat(&self.backend, parts, axis)
    }

    fn conv_transpose2d(
        &mut self,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<B>> {
        let d = fwd::conv_transpose2d_dims(x, w, stride, pad)?;
        self.using(&[Some(w), b], |buf, r| {
            fwd::conv_transpose2d(&self.backend, buf, x, r[0].as_ref().expect("given"), r[1].as_ref(), d)
        })
    }

    fn relu(&mut self, x: &Value<B>) -> Result<Value<B>> {
        fwd::relu(&self.backend, x)
    }

    fn conv2d(
        &mut self,
        x: &Value<B>,
        w: &ParamRef,
        b: Option<&ParamRef>,
        stride: usize,
        pad: usize,
    ) -> Result<Value<B>> {
        let d = fwd::conv2d_dims(x, w, stride, pad)?;
        self.using(&[Some(w), b], |buf, r| {
            fwd::conv2d(&self.backend, buf, x, r[0].as_ref().expect("given"), r[1].as_ref(), d)
        })
    }

    fn permute(&mut self, x: &Value<B>, perm: &[usize]) -> Result<Value<B>> {
        fwd::permute(&self.backend, x, perm)
    }

    fn reshape(&mut self, x: &Value<B>, shape: &[usize]) -> Result<Value<B>> {
        fwd::reshape(x, shape)
    }

    fn mae_loss(
        &mut self,
        pred: &Value<B>,
        target: &Value<B>,
        mask: &[f32],
        groups: usize,
        spectral_angle: Option<SpectralAngle>,
    ) -> Result<(Value<B>, MaeLoss)> {
        let (v, l, _) = fwd::mae_loss(&self.backend, pred, target, mask, groups, spectral_angle)?;
        Ok((v, l))
    }

    fn cross_entropy(&mut self, logits: &Value<B>, targets: &[f32]) -> Result<(Value<B>, f64)> {
        let (v, l, _) = fwd::cross_entropy(&self.backend, logits, targets)?;
        Ok((v, l))
    }

    fn multilabel_soft_margin(&mut self, logits: &Value<B>, targets: &[f32]) -> Result<(Value<B>, f64)> {
        let (v, l, _) = fwd::multilabel_soft_margin(&self.backend, logits, targets)?;
        Ok((v, l))
    }

    fn weighted_cross_entropy(
        &mut self,
        logits: &Value<B>,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<(Value<B>, f64)> {
        fwd::weighted_cross_entropy(&self.backend, logits, labels, weights, ignore)
    }

    fn dropout(&mut self, x: &Value<B>, _p: f32) -> Result<Value<B>> {
        Ok(x.clone())
    }

    fn drop_path(&mut self, x: &Value<B>, _p: f32) -> Result<Value<B>> {
        Ok(x.clone())
    }
}
