//! The f64 reference backend: plain loops in double precision. Slow; it exists so that gradient
//! checks by finite differences exercise the real tape code with errors far below their tolerance.

use std::ops::Range;
use std::sync::Arc;

use super::{conv_src, split_two, Backend, Conv2dDims, Grad, MaeLoss, MaeLossDims, ParamGrads, Slice, SliceMut};
use crate::error::{check_len, Result, TensorError};
use crate::kernels::attention::AttnShape;
use crate::kernels::gelu::reference::{gelu, gelu_grad};
use crate::kernels::linear::Activation;
use crate::kernels::Dst;

/// Double precision on the CPU, by plain loops.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuF64;

type Buf = Arc<Vec<f64>>;

fn sl<'a>(s: &'a Slice<CpuF64>) -> &'a [f64] {
    &s.buf[s.range.clone()]
}

/// Writes `f(i)` for `i < n` into a gradient slot: a fresh buffer, or added to the existing one.
fn write_slot(op: &'static str, g: &mut Grad<CpuF64>, n: usize, f: impl Fn(usize) -> f64) -> Result<()> {
    match g {
        Some(b) => {
            check_len(op, "gradient", b.len(), n)?;
            for (i, v) in Arc::make_mut(b).iter_mut().enumerate() {
                *v += f(i);
            }
        }
        None => *g = Some(Arc::new((0..n).map(f).collect())),
    }
    Ok(())
}

fn write_range(s: SliceMut<CpuF64>, f: impl Fn(usize) -> f64) {
    write_slice(&mut Arc::make_mut(s.buf)[s.range], s.dst, f)
}

fn write_slice(s: &mut [f64], mode: Dst, f: impl Fn(usize) -> f64) {
    for (i, v) in s.iter_mut().enumerate() {
        match mode {
            Dst::Overwrite => *v = f(i),
            Dst::Accumulate => *v += f(i),
        }
    }
}

/// Writes a layer's weight and bias gradients (`fw(i)`, `fb(i)`) into their ranges.
fn write_params(pg: Option<ParamGrads<CpuF64>>, fw: impl Fn(usize) -> f64, fb: impl Fn(usize) -> f64) {
    if let Some(pg) = pg {
        let (wm, bm) = (pg.w.as_ref().map(|w| w.1), pg.b.as_ref().map(|b| b.1));
        let (dw, db) = split_two(Arc::make_mut(pg.buf).as_mut_slice(), pg.w.map(|w| w.0), pg.b.map(|b| b.0));
        if let (Some(s), Some(m)) = (dw, wm) {
            write_slice(s, m, fw);
        }
        if let (Some(s), Some(m)) = (db, bm) {
            write_slice(s, m, fb);
        }
    }
}

/// Attention probabilities of one (batch, head): `p[i * seq + j]`.
fn probs(qkv: &[f64], s: &AttnShape, b: usize, h: usize) -> Vec<f64> {
    let w = s.heads * s.head_dim;
    let at = |t: usize, part: usize, d: usize| qkv[(b * s.seq + t) * 3 * w + part * w + h * s.head_dim + d];
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let mut p = vec![0.0; s.seq * s.seq];
    for i in 0..s.seq {
        let sc: Vec<f64> =
            (0..s.seq).map(|j| (0..s.head_dim).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() * scale).collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
        for j in 0..s.seq {
            p[i * s.seq + j] = (sc[j] - m).exp() / z;
        }
    }
    p
}

impl Backend for CpuF64 {
    type Buf = Buf;

    fn name(&self) -> &'static str {
        "cpu-f64"
    }

    fn upload(&self, x: &[f32]) -> Buf {
        Arc::new(x.iter().map(|&v| v as f64).collect())
    }

    fn download(&self, b: &Buf) -> Vec<f64> {
        b.to_vec()
    }

    fn upload_f64(&self, v: &[f64]) -> Buf {
        Arc::new(v.to_vec())
    }

    fn zeros(&self, n: usize) -> Buf {
        Arc::new(vec![0.0; n])
    }

    fn scalar(&self, v: f64) -> Buf {
        Arc::new(vec![v])
    }

    fn buf_len(&self, b: &Buf) -> usize {
        b.len()
    }

    fn copy_range(&self, b: &Buf, r: Range<usize>) -> Buf {
        Arc::new(b[r].to_vec())
    }

    fn accumulate(&self, dst: SliceMut<Self>, src: &Buf) -> Result<()> {
        check_len("accumulate", "src", src.len(), dst.range.len())?;
        write_range(dst, |i| src[i]);
        Ok(())
    }

    fn accumulate_grad(&self, g: &mut Grad<Self>, src: &Buf) -> Result<()> {
        match g {
            None => *g = Some(src.clone()),
            Some(_) => write_slot("accumulate_grad", g, src.len(), |i| src[i])?,
        }
        Ok(())
    }

    fn all_finite(&self, b: &Buf) -> bool {
        b.iter().all(|v| v.is_finite())
    }

    fn linear(
        &self,
        x: &Buf,
        w: Slice<Self>,
        b: Option<Slice<Self>>,
        m: usize,
        k: usize,
        n: usize,
        act: Activation,
        keep: bool,
    ) -> Result<(Buf, Option<Buf>)> {
        check_len("linear", "x", x.len(), m * k)?;
        check_len("linear", "weight", w.range.len(), n * k)?;
        let (wv, bv) = (sl(&w), b.as_ref().map(sl));
        let pre: Vec<f64> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k).map(|p| x[r * k + p] * wv[c * k + p]).sum::<f64>() + bv.map_or(0.0, |b| b[c])
            })
            .collect();
        match act {
            Activation::Identity => Ok((Arc::new(pre), None)),
            Activation::Gelu => {
                let y = pre.iter().map(|&v| gelu(v)).collect();
                Ok((Arc::new(y), keep.then(|| Arc::new(pre))))
            }
        }
    }

    fn linear_backward(
        &self,
        x: Option<Buf>,
        w: Slice<Self>,
        pre: Option<&Buf>,
        dy: Buf,
        m: usize,
        k: usize,
        n: usize,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let dpre: Vec<f64> = match pre {
            Some(p) => dy.iter().zip(p.iter()).map(|(&d, &p)| d * gelu_grad(p)).collect(),
            None => dy.to_vec(),
        };
        let wv = sl(&w);
        if let Some(g) = dx {
            write_slot("linear_backward", g, m * k, |i| (0..n).map(|c| dpre[i / k * n + c] * wv[c * k + i % k]).sum())?;
        }
        let empty = Vec::new();
        let xv: &[f64] = x.as_deref().map_or(&empty, |x| x);
        if pg.as_ref().is_some_and(|p| p.w.is_some()) && xv.len() != m * k {
            return Err(TensorError::Arg { op: "linear_backward", msg: "the weight gradient needs the input".into() });
        }
        write_params(
            pg,
            |i| (0..m).map(|r| dpre[r * n + i / k] * xv[r * k + i % k]).sum(),
            |c| (0..m).map(|r| dpre[r * n + c]).sum(),
        );
        Ok(())
    }

    fn layernorm(
        &self,
        x: &Buf,
        w: Slice<Self>,
        b: Slice<Self>,
        rows: usize,
        eps: f32,
        keep: bool,
    ) -> Result<(Buf, Option<(Buf, Buf)>)> {
        let d = w.range.len();
        check_len("layernorm", "x", x.len(), rows * d)?;
        let (wv, bv) = (sl(&w), sl(&b));
        let (mut y, mut ms, mut rs) = (Vec::with_capacity(x.len()), vec![], vec![]);
        for r in x.chunks_exact(d) {
            let m = r.iter().sum::<f64>() / d as f64;
            let var = r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            y.extend(r.iter().enumerate().map(|(j, v)| (v - m) * rstd * wv[j] + bv[j]));
            ms.push(m);
            rs.push(rstd);
        }
        Ok((Arc::new(y), keep.then(|| (Arc::new(ms), Arc::new(rs)))))
    }

    fn layernorm_backward(
        &self,
        x: &Buf,
        w: Slice<Self>,
        mean: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let d = w.range.len();
        let wv = sl(&w);
        let xh = |i: usize| (x[i] - mean[i / d]) * rstd[i / d];
        if let Some(g) = dx {
            let rows = mean.len();
            let mut out = vec![0.0; rows * d];
            for r in 0..rows {
                let gv: Vec<f64> = (0..d).map(|j| dy[r * d + j] * wv[j]).collect();
                let mg = gv.iter().sum::<f64>() / d as f64;
                let mgx = (0..d).map(|j| gv[j] * xh(r * d + j)).sum::<f64>() / d as f64;
                for j in 0..d {
                    out[r * d + j] = rstd[r] * (gv[j] - mg - xh(r * d + j) * mgx);
                }
            }
            write_slot("layernorm_backward", g, rows * d, |i| out[i])?;
        }
        let rows = mean.len();
        write_params(
            pg,
            |j| (0..rows).map(|r| dy[r * d + j] * xh(r * d + j)).sum(),
            |j| (0..rows).map(|r| dy[r * d + j]).sum(),
        );
        Ok(())
    }

    fn attention(&self, qkv: &Buf, s: AttnShape, keep: bool) -> Result<(Buf, Option<Buf>)> {
        let w = s.heads * s.head_dim;
        check_len("attention", "qkv", qkv.len(), s.batch * s.seq * 3 * w)?;
        let mut o = vec![0.0; s.batch * s.seq * w];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let p = probs(qkv, &s, b, h);
                for i in 0..s.seq {
                    for d in 0..s.head_dim {
                        o[(b * s.seq + i) * w + h * s.head_dim + d] = (0..s.seq)
                            .map(|j| p[i * s.seq + j] * qkv[(b * s.seq + j) * 3 * w + 2 * w + h * s.head_dim + d])
                            .sum();
                    }
                }
            }
        }
        // The reference recomputes probabilities in the backward; it keeps an empty marker.
        Ok((Arc::new(o), keep.then(|| Arc::new(Vec::new()))))
    }

    fn attention_backward(
        &self,
        qkv: &Buf,
        _out: &Buf,
        _lse: &Buf,
        dout: &Buf,
        s: AttnShape,
        dqkv: &mut Grad<Self>,
    ) -> Result<()> {
        let w = s.heads * s.head_dim;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let mut g = vec![0.0; qkv.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let p = probs(qkv, &s, b, h);
                let idx = |t: usize, part: usize, d: usize| (b * s.seq + t) * 3 * w + part * w + h * s.head_dim + d;
                let od = |t: usize, d: usize| dout[(b * s.seq + t) * w + h * s.head_dim + d];
                for i in 0..s.seq {
                    let dp: Vec<f64> =
                        (0..s.seq).map(|j| (0..s.head_dim).map(|d| od(i, d) * qkv[idx(j, 2, d)]).sum()).collect();
                    let dot: f64 = (0..s.seq).map(|j| p[i * s.seq + j] * dp[j]).sum();
                    for j in 0..s.seq {
                        let pij = p[i * s.seq + j];
                        let ds = pij * (dp[j] - dot) * scale;
                        for d in 0..s.head_dim {
                            g[idx(i, 0, d)] += ds * qkv[idx(j, 1, d)];
                            g[idx(j, 1, d)] += ds * qkv[idx(i, 0, d)];
                            g[idx(j, 2, d)] += pij * od(i, d);
                        }
                    }
                }
            }
        }
        write_slot("attention_backward", dqkv, g.len(), |i| g[i])
    }

    fn permute(&self, x: &Buf, shape: &[usize], perm: &[usize]) -> Result<Buf> {
        check_len("permute", "x", x.len(), shape.iter().product())?;
        Ok(Arc::new(super::permute_index(shape, perm)?.into_iter().map(|i| x[i]).collect()))
    }

    fn relu(&self, x: &Buf) -> Result<Buf> {
        Ok(Arc::new(x.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect()))
    }

    fn relu_backward(&self, y: &Buf, dy: &Buf, dx: &mut Grad<Self>) -> Result<()> {
        check_len("relu_backward", "dy", dy.len(), y.len())?;
        write_slot("relu_backward", dx, y.len(), |i| if y[i] > 0.0 { dy[i] } else { 0.0 })
    }

    fn gelu(&self, x: &Buf) -> Result<Buf> {
        Ok(Arc::new(x.iter().map(|&v| gelu(v)).collect()))
    }

    fn gelu_backward(&self, x: &Buf, dy: &Buf, dx: &mut Grad<Self>) -> Result<()> {
        check_len("gelu_backward", "dy", dy.len(), x.len())?;
        write_slot("gelu_backward", dx, x.len(), |i| dy[i] * gelu_grad(x[i]))
    }

    fn conv2d(&self, x: &Buf, w: Slice<Self>, b: Option<Slice<Self>>, d: Conv2dDims) -> Result<Buf> {
        check_len("conv2d", "x", x.len(), d.batch * d.cin * d.h * d.w)?;
        let (ho, wo) = d.out_hw();
        let (k, chw) = (d.k(), d.cin * d.h * d.w);
        let (wv, bv) = (sl(&w), b.as_ref().map(sl));
        let mut out = vec![0.0; d.batch * d.cout * ho * wo];
        for n in 0..d.batch {
            for o in 0..d.cout {
                for i in 0..ho {
                    for j in 0..wo {
                        let s: f64 =
                            (0..k).filter_map(|r| conv_src(&d, r, i, j).map(|s| x[n * chw + s] * wv[o * k + r])).sum();
                        out[((n * d.cout + o) * ho + i) * wo + j] = s + bv.map_or(0.0, |b| b[o]);
                    }
                }
            }
        }
        Ok(Arc::new(out))
    }

    fn conv2d_backward(
        &self,
        x: Option<&Buf>,
        w: Slice<Self>,
        dy: &Buf,
        d: Conv2dDims,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let (ho, wo) = d.out_hw();
        let (k, chw, p) = (d.k(), d.cin * d.h * d.w, ho * wo);
        let wv = sl(&w);
        if let Some(g) = dx {
            let mut gx = vec![0.0; d.batch * chw];
            for n in 0..d.batch {
                for o in 0..d.cout {
                    for i in 0..ho {
                        for j in 0..wo {
                            let g = dy[(n * d.cout + o) * p + i * wo + j];
                            for r in 0..k {
                                if let Some(s) = conv_src(&d, r, i, j) {
                                    gx[n * chw + s] += g * wv[o * k + r];
                                }
                            }
                        }
                    }
                }
            }
            write_slot("conv2d_backward", g, gx.len(), |i| gx[i])?;
        }
        let empty = Vec::new();
        let xv: &[f64] = x.map_or(&empty, |x| x);
        if pg.as_ref().is_some_and(|p| p.w.is_some()) && xv.len() != d.batch * chw {
            return Err(TensorError::Arg { op: "conv2d_backward", msg: "the weight gradient needs the input".into() });
        }
        write_params(
            pg,
            |i| {
                let (o, r) = (i / k, i % k);
                (0..d.batch)
                    .flat_map(|n| (0..ho).flat_map(move |ii| (0..wo).map(move |jj| (n, ii, jj))))
                    .filter_map(|(n, ii, jj)| {
                        conv_src(&d, r, ii, jj).map(|s| dy[(n * d.cout + o) * p + ii * wo + jj] * xv[n * chw + s])
                    })
                    .sum()
            },
            |o| (0..d.batch).map(|n| dy[(n * d.cout + o) * p..(n * d.cout + o + 1) * p].iter().sum::<f64>()).sum(),
        );
        Ok(())
    }

    fn sub(&self, a: &Buf, b: &Buf) -> Result<Buf> {
        check_len("sub", "b", b.len(), a.len())?;
        Ok(Arc::new(a.iter().zip(b.iter()).map(|(x, y)| x - y).collect()))
    }

    fn add(&self, a: &Buf, b: &Buf) -> Result<Buf> {
        check_len("add", "b", b.len(), a.len())?;
        Ok(Arc::new(a.iter().zip(b.iter()).map(|(x, y)| x + y).collect()))
    }

    fn add_rows(&self, x: &Buf, rows: &Buf, dim: usize) -> Result<Buf> {
        if dim == 0 || rows.is_empty() || x.len() % rows.len() != 0 {
            return Err(TensorError::Shape { op: "add_rows", msg: format!("{} values, rows {}", x.len(), rows.len()) });
        }
        Ok(Arc::new(x.iter().enumerate().map(|(i, v)| v + rows[i % rows.len()]).collect()))
    }

    fn add_rows_backward(&self, dy: &Buf, rows_count: usize, dim: usize, drows: &mut Grad<Self>) -> Result<()> {
        let n = rows_count * dim;
        write_slot("add_rows_backward", drows, n, |i| dy.iter().skip(i).step_by(n).sum())
    }

    fn outer_add(&self, a: &Buf, b: &Buf, dim: usize) -> Result<Buf> {
        let s = a.len() / dim.max(1);
        let g = b.len() / dim.max(1);
        Ok(Arc::new((0..g * s * dim).map(|i| a[i % (s * dim)] + b[i / (s * dim) * dim + i % dim]).collect()))
    }

    fn outer_add_backward(
        &self,
        dy: &Buf,
        s: usize,
        dim: usize,
        da: Option<&mut Grad<Self>>,
        db: Option<&mut Grad<Self>>,
    ) -> Result<()> {
        let g = dy.len() / (s * dim).max(1);
        if let Some(da) = da {
            write_slot("outer_add_backward", da, s * dim, |i| (0..g).map(|gi| dy[gi * s * dim + i]).sum())?;
        }
        if let Some(db) = db {
            write_slot("outer_add_backward", db, g * dim, |i| {
                (0..s).map(|si| dy[(i / dim * s + si) * dim + i % dim]).sum()
            })?;
        }
        Ok(())
    }

    fn gather_rows(&self, x: &Buf, batch: usize, len: usize, dim: usize, ids: &[usize]) -> Result<Buf> {
        let count = ids.len() / batch.max(1);
        if let Some(&bad) = ids.iter().find(|&&i| i >= len) {
            return Err(TensorError::Index { op: "gather_rows", index: bad, len });
        }
        Ok(Arc::new(
            (0..ids.len() * dim).map(|i| x[((i / dim / count.max(1)) * len + ids[i / dim]) * dim + i % dim]).collect(),
        ))
    }

    fn gather_rows_backward(
        &self,
        dy: &Buf,
        batch: usize,
        len: usize,
        dim: usize,
        ids: &[usize],
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let count = ids.len() / batch.max(1);
        let mut g = vec![0.0; batch * len * dim];
        for (r, &id) in ids.iter().enumerate() {
            for j in 0..dim {
                g[((r / count) * len + id) * dim + j] += dy[r * dim + j];
            }
        }
        write_slot("gather_rows_backward", dx, g.len(), |i| g[i])
    }

    fn unshuffle(
        &self,
        x: &Buf,
        fill: &Buf,
        batch: usize,
        kept: usize,
        dim: usize,
        restore: &[usize],
        table: bool,
    ) -> Result<Buf> {
        let len = restore.len() / batch.max(1);
        let mut y = vec![0.0; batch * len * dim];
        for n in 0..batch {
            for l in 0..len {
                let r = restore[n * len + l];
                let f = if table { l * dim } else { 0 };
                for j in 0..dim {
                    y[(n * len + l) * dim + j] = if r < kept { x[(n * kept + r) * dim + j] } else { fill[f + j] };
                }
            }
        }
        Ok(Arc::new(y))
    }

    fn unshuffle_backward(
        &self,
        dy: &Buf,
        batch: usize,
        kept: usize,
        dim: usize,
        restore: &[usize],
        dx: Option<&mut Grad<Self>>,
        dfill: Option<&mut Grad<Self>>,
        fill_table: bool,
    ) -> Result<()> {
        let len = restore.len() / batch.max(1);
        let rows = if fill_table { len } else { 1 };
        let (mut gx, mut gf) = (vec![0.0; batch * kept * dim], vec![0.0; rows * dim]);
        for n in 0..batch {
            for l in 0..len {
                let r = restore[n * len + l];
                for j in 0..dim {
                    let v = dy[(n * len + l) * dim + j];
                    if r < kept {
                        gx[(n * kept + r) * dim + j] += v;
                    } else {
                        gf[if fill_table { l * dim + j } else { j }] += v;
                    }
                }
            }
        }
        if let Some(dx) = dx {
            write_slot("unshuffle_backward", dx, gx.len(), |i| gx[i])?;
        }
        if let Some(df) = dfill {
            write_slot("unshuffle_backward", df, gf.len(), |i| gf[i])?;
        }
        Ok(())
    }

    fn mean_tokens(&self, x: &Buf, batch: usize, len: usize, dim: usize, skip_first: bool) -> Result<Buf> {
        let first = usize::from(skip_first);
        if len <= first {
            return Err(TensorError::Shape { op: "mean_tokens", msg: format!("no tokens to pool among {len}") });
        }
        Ok(Arc::new(
            (0..batch * dim)
                .map(|i| {
                    (first..len).map(|l| x[(i / dim * len + l) * dim + i % dim]).sum::<f64>() / (len - first) as f64
                })
                .collect(),
        ))
    }

    fn mean_tokens_backward(
        &self,
        dy: &Buf,
        batch: usize,
        len: usize,
        dim: usize,
        skip_first: bool,
        dx: &mut Grad<Self>,
    ) -> Result<()> {
        let first = usize::from(skip_first);
        write_slot("mean_tokens_backward", dx, batch * len * dim, |i| {
            let l = i / dim % len;
            if l < first {
                0.0
            } else {
                dy[i / (len * dim) * dim + i % dim] / (len - first) as f64
            }
        })
    }

    fn dropout(&self, x: &Buf, p: f32, seed: u64, group: usize) -> Result<Buf> {
        Ok(Arc::new(super::dropout_generic(x, p, seed, group)?))
    }

    fn dropout_backward(&self, dy: &Buf, p: f32, seed: u64, group: usize, dx: &mut Grad<Self>) -> Result<()> {
        let g = super::dropout_generic(dy, p, seed, group)?;
        write_slot("dropout_backward", dx, g.len(), |i| g[i])
    }

    fn multilabel_soft_margin(&self, logits: &Buf, targets: &[f32], classes: usize) -> Result<f64> {
        super::msm_generic(logits, targets, classes)
    }

    fn multilabel_soft_margin_backward(
        &self,
        logits: &Buf,
        targets: &[f32],
        classes: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()> {
        let mut g = vec![0.0; logits.len()];
        super::msm_backward_generic(logits, targets, classes, scale, |i, v| g[i] = v)?;
        write_slot("multilabel_soft_margin_backward", dlogits, g.len(), |i| g[i])
    }

    fn weighted_cross_entropy(&self, logits: &Buf, labels: &[usize], weights: &[f32], ignore: usize) -> Result<f64> {
        super::wce_generic(logits, labels, weights, ignore)
    }

    fn weighted_cross_entropy_backward(
        &self,
        logits: &Buf,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()> {
        let mut g = vec![0.0; logits.len()];
        super::wce_backward_generic(logits, labels, weights, ignore, scale, |i, v| g[i] = v)?;
        write_slot("weighted_cross_entropy_backward", dlogits, g.len(), |i| g[i])
    }

    fn mae_loss(&self, pred: &Buf, target: &Buf, mask: &[f32], d: MaeLossDims) -> Result<MaeLoss> {
        super::mae_loss_generic(pred, target, mask, d)
    }

    fn mae_loss_backward(
        &self,
        pred: &Buf,
        target: &Buf,
        mask: &[f32],
        d: MaeLossDims,
        scale: f64,
        dpred: &mut Grad<Self>,
    ) -> Result<()> {
        let mut g = vec![0.0; pred.len()];
        super::mae_loss_backward_generic(pred, target, mask, d, scale, |i, v| g[i] = v)?;
        write_slot("mae_loss_backward", dpred, g.len(), |i| g[i])
    }

    fn cross_entropy(&self, logits: &Buf, targets: &[f32], classes: usize) -> Result<f64> {
        super::cross_entropy_generic(logits, targets, classes)
    }

    fn cross_entropy_backward(
        &self,
        logits: &Buf,
        targets: &[f32],
        classes: usize,
        scale: f64,
        dlogits: &mut Grad<Self>,
    ) -> Result<()> {
        let mut g = vec![0.0; logits.len()];
        super::cross_entropy_backward_generic(logits, targets, classes, scale, |i, v| g[i] = v)?;
        write_slot("cross_entropy_backward", dlogits, g.len(), |i| g[i])
    }
}
