//! The CPU backend: f32 buffers and the SIMD kernels of [`crate::kernels`].

use std::ops::Range;
use std::sync::Arc;

use super::{
    conv_src, split_two, Backend, Conv2dDims, Grad, GroupNormDims, MaeLoss, MaeLossDims, ParamGrads, Slice, SliceMut,
};
use crate::error::{check_len, Result, TensorError};
use crate::kernels::attention::{self, AttnShape, Rows};
use crate::kernels::gemm::{self, gemm, Trans};
use crate::kernels::linear::{self, Activation};
use crate::kernels::{elementwise, gather, gelu, layernorm, reduce, zeros, Dst, STREAM_CHUNK};
use crate::par;

/// f32 on the CPU, through the run-time dispatched SIMD kernels.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

type Buf = Arc<Vec<f32>>;

fn sl<'a>(s: &'a Slice<Cpu>) -> &'a [f32] {
    &s.buf[s.range.clone()]
}

fn sl_mut<'a>(s: &'a mut SliceMut<Cpu>) -> &'a mut [f32] {
    &mut Arc::make_mut(s.buf)[s.range.clone()]
}

/// The slot's buffer to write `n` values into, and whether to overwrite (fresh) or add.
fn slot<'a>(op: &'static str, g: &'a mut Grad<Cpu>, n: usize) -> Result<(&'a mut [f32], Dst)> {
    match g {
        Some(b) => {
            check_len(op, "gradient", b.len(), n)?;
            Ok((Arc::make_mut(b).as_mut_slice(), Dst::Accumulate))
        }
        None => {
            let b = g.insert(Arc::new(zeros(n)));
            Ok((Arc::get_mut(b).expect("fresh buffer is unique").as_mut_slice(), Dst::Overwrite))
        }
    }
}

/// Like [`slot`], but a first write takes `spare`'s storage instead of a fresh buffer where `spare`
/// has the length and no other holder (its values are overwritten, never read).
fn slot_reusing<'a>(
    op: &'static str,
    g: &'a mut Grad<Cpu>,
    n: usize,
    spare: Option<Buf>,
) -> Result<(&'a mut [f32], Dst)> {
    if let (None, Some(mut b)) = (g.as_ref(), spare) {
        if b.len() == n && Arc::get_mut(&mut b).is_some() {
            let b = g.insert(b);
            return Ok((Arc::get_mut(b).expect("checked unique").as_mut_slice(), Dst::Overwrite));
        }
    }
    slot(op, g, n)
}

/// A parameter-gradient range about to be accumulated into by a kernel: zeroed on its first write.
fn zero_if_first(s: Option<&mut [f32]>, mode: Option<Dst>) -> Option<&mut [f32]> {
    let s = s?;
    if mode == Some(Dst::Overwrite) {
        s.fill(0.0);
    }
    Some(s)
}

/// A result of a shared f64 loop (`super::*_generic`) as an f32 buffer.
fn narrow(v: Vec<f64>) -> Buf {
    Arc::new(v.into_iter().map(|v| v as f32).collect())
}

/// An input gradient from a shared f64 loop written (or added) into its slot.
fn write_grad(op: &'static str, dx: &mut Grad<Cpu>, g: Vec<f64>) -> Result<()> {
    let (d, mode) = slot(op, dx, g.len())?;
    for (i, v) in g.into_iter().enumerate() {
        put(d, i, v as f32, mode);
    }
    Ok(())
}

fn pointwise(d: &Conv2dDims) -> bool {
    d.kh == 1 && d.kw == 1 && d.stride == 1 && d.pad == 0
}

/// The unfolded image: the image itself for a 1x1 kernel at stride 1 without padding (the dense
/// heads' many pointwise convolutions), else [`im2col`] into `cols`.
fn unfold<'a>(d: &Conv2dDims, img: &'a [f32], cols: &'a mut [f32]) -> &'a [f32] {
    if pointwise(d) {
        img
    } else {
        im2col(d, img, cols);
        cols
    }
}

/// Unfolds one image for a convolution: row `r` = (channel, ki, kj), column = output position.
fn im2col(d: &Conv2dDims, img: &[f32], cols: &mut [f32]) {
    let (ho, wo) = d.out_hw();
    for r in 0..d.k() {
        for i in 0..ho {
            for j in 0..wo {
                cols[(r * ho + i) * wo + j] = conv_src(d, r, i, j).map_or(0.0, |s| img[s]);
            }
        }
    }
}

fn put(dst: &mut [f32], i: usize, v: f32, mode: Dst) {
    match mode {
        Dst::Overwrite => dst[i] = v,
        Dst::Accumulate => dst[i] += v,
    }
}

fn qkv_rows(qkv: &[f32], w: usize) -> (Rows<'_>, Rows<'_>, Rows<'_>) {
    let ld = 3 * w;
    let (q, k, v) = if qkv.is_empty() { (qkv, qkv, qkv) } else { (qkv, &qkv[w..], &qkv[2 * w..]) };
    (Rows { data: q, ld }, Rows { data: k, ld }, Rows { data: v, ld })
}

impl Backend for Cpu {
    type Buf = Buf;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, x: &[f32]) -> Buf {
        Arc::new(x.to_vec())
    }

    fn upload_vec(&self, x: Vec<f32>) -> Buf {
        Arc::new(x)
    }

    fn upload_params(&self, store: &crate::params::ParamStore) -> Buf {
        store.shared().clone()
    }

    fn download(&self, b: &Buf) -> Vec<f64> {
        b.iter().map(|&v| v as f64).collect()
    }

    fn upload_f64(&self, v: &[f64]) -> Buf {
        Arc::new(v.iter().map(|&v| v as f32).collect())
    }

    fn zeros(&self, n: usize) -> Buf {
        Arc::new(zeros(n))
    }

    fn scalar(&self, v: f64) -> Buf {
        Arc::new(vec![v as f32])
    }

    fn buf_len(&self, b: &Buf) -> usize {
        b.len()
    }

    fn copy_range(&self, b: &Buf, r: Range<usize>) -> Buf {
        Arc::new(b[r].to_vec())
    }

    fn accumulate(&self, mut dst: SliceMut<Self>, src: &Buf) -> Result<()> {
        let mode = dst.dst;
        let d = sl_mut(&mut dst);
        check_len("accumulate", "src", src.len(), d.len())?;
        match mode {
            Dst::Overwrite => d.copy_from_slice(src),
            Dst::Accumulate => elementwise::add_assign(d, src)?,
        }
        Ok(())
    }

    fn accumulate_grad(&self, g: &mut Grad<Self>, src: &Buf) -> Result<()> {
        match g {
            None => *g = Some(src.clone()),
            Some(b) => {
                check_len("accumulate_grad", "src", src.len(), b.len())?;
                elementwise::add_assign(Arc::make_mut(b).as_mut_slice(), src)?;
            }
        }
        Ok(())
    }

    fn all_finite(&self, b: &Buf) -> bool {
        reduce::all_finite(b)
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
        let keep_pre = keep && act == Activation::Gelu;
        let (y, pre) = linear::forward_new(x, sl(&w), b.as_ref().map(sl), m, k, n, act, keep_pre)?;
        Ok((Arc::new(y), pre.map(Arc::new)))
    }

    fn pack_linear_weight(&self, w: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
        // Only where the kernel reads panels, and only when no padding is needed (n a multiple
        // of 16: every ViT projection), so the packed weight fits the weight's place.
        if !gemm::reads_panels() || gemm::panels_len(k, n) != n * k || w.len() != n * k {
            return None;
        }
        gemm::pack_panels(w, n, k).ok()
    }

    fn linear_packed(
        &self,
        x: &Buf,
        w: Slice<Self>,
        b: Option<Slice<Self>>,
        m: usize,
        k: usize,
        n: usize,
        act: Activation,
    ) -> Result<Buf> {
        Ok(Arc::new(linear::forward_panels_new(x, sl(&w), b.as_ref().map(sl), m, k, n, act)?))
    }

    fn linear_backward(
        &self,
        x: Option<Buf>,
        w: Slice<Self>,
        pre: Option<&Buf>,
        mut dy: Buf,
        m: usize,
        k: usize,
        n: usize,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let op = "linear_backward";
        check_len(op, "dy", dy.len(), m * n)?;
        if let Some(p) = pre {
            check_len(op, "pre", p.len(), m * n)?;
            // dpre = dy * gelu'(pre): in dy's storage when this op holds the only reference.
            match Arc::get_mut(&mut dy) {
                Some(g) => gelu::backward_inplace(p, g)?,
                None => {
                    let mut t = zeros(m * n);
                    gelu::backward(p, &dy, &mut t, Dst::Overwrite)?;
                    dy = Arc::new(t);
                }
            }
        }
        let dpre: &[f32] = &dy;
        // The parameter gradients before dx: then x is no longer needed, and dx may take its storage.
        if let Some(pg) = pg {
            let (wm, bm) = (pg.w.as_ref().map(|w| w.1), pg.b.as_ref().map(|b| b.1));
            let buf = Arc::make_mut(pg.buf).as_mut_slice();
            let (dw, db) = split_two(buf, pg.w.map(|w| w.0), pg.b.map(|b| b.0));
            if let (Some(dw), Some(mode)) = (dw, wm) {
                let x = x
                    .as_deref()
                    .ok_or_else(|| TensorError::Arg { op, msg: "the weight gradient needs the input".into() })?;
                check_len(op, "x", x.len(), m * k)?;
                let beta = if mode == Dst::Accumulate { 1.0 } else { 0.0 };
                gemm(Trans::T, Trans::N, n, k, m, 1.0, dpre, n, x, k, beta, dw, k)?;
            }
            if let (Some(db), Some(mode)) = (db, bm) {
                reduce::col_sum(dpre, m, n, db, mode)?;
            }
        }
        if let Some(g) = dx {
            let (d, mode) = slot_reusing(op, g, m * k, x)?;
            let beta = if mode == Dst::Accumulate { 1.0 } else { 0.0 };
            gemm(Trans::N, Trans::N, m, k, n, 1.0, dpre, n, sl(&w), k, beta, d, k)?;
        }
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
        let mut y = zeros(x.len());
        if keep {
            let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm::forward(x, sl(&w), sl(&b), rows, eps, &mut y, Some((&mut mean, &mut rstd)))?;
            Ok((Arc::new(y), Some((Arc::new(mean), Arc::new(rstd)))))
        } else {
            layernorm::forward(x, sl(&w), sl(&b), rows, eps, &mut y, None)?;
            Ok((Arc::new(y), None))
        }
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
        let dim = w.range.len();
        // The kernel accumulates dgamma and dbeta; frozen ones go to scratch, and a first write of
        // the step starts from zero (two vectors of `dim`: no real cost).
        let (mut sg, mut sb) = (vec![0.0; dim], vec![0.0; dim]);
        let (pbuf, wr, br) = match pg {
            Some(pg) => (Some(Arc::make_mut(pg.buf).as_mut_slice()), pg.w, pg.b),
            None => (None, None, None),
        };
        let (dw, db) = match pbuf {
            Some(buf) => split_two(buf, wr.clone().map(|w| w.0), br.clone().map(|b| b.0)),
            None => (None, None),
        };
        let dg = zero_if_first(dw, wr.map(|w| w.1)).unwrap_or(&mut sg);
        let dbs = zero_if_first(db, br.map(|b| b.1)).unwrap_or(&mut sb);
        // Without an input gradient (a LayerNorm straight on a constant), dx goes to scratch.
        let mut tmp;
        let (dxs, mode) = match dx {
            Some(g) => slot("layernorm_backward", g, x.len())?,
            None => {
                tmp = zeros(x.len());
                (&mut tmp[..], Dst::Overwrite)
            }
        };
        layernorm::backward(x, sl(&w), mean, rstd, dy, dxs, mode, dg, dbs)
    }

    fn attention(&self, qkv: &Buf, s: AttnShape, keep: bool) -> Result<(Buf, Option<Buf>)> {
        let w = s.heads * s.head_dim;
        check_len("attention", "qkv", qkv.len(), s.batch * s.seq * 3 * w)?;
        let (q, k, v) = qkv_rows(qkv, w);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (o, lse) = attention::forward_new(s, q, k, v, scale, keep)?;
        Ok((Arc::new(o), lse.map(Arc::new)))
    }

    fn attention_backward(
        &self,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        dout: &Buf,
        s: AttnShape,
        dqkv: &mut Grad<Self>,
    ) -> Result<()> {
        let w = s.heads * s.head_dim;
        let (q, k, v) = qkv_rows(qkv, w);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let o = Rows { data: out, ld: w };
        let d = Rows { data: dout, ld: w };
        match dqkv {
            None => *dqkv = Some(Arc::new(attention::backward_new(s, q, k, v, o, d, lse, scale)?)),
            Some(existing) => {
                // The kernel overwrites; a second contributor is rare (qkv feeds only attention).
                let g = attention::backward_new(s, q, k, v, o, d, lse, scale)?;
                elementwise::add_assign(Arc::make_mut(existing).as_mut_slice(), &g)?;
            }
        }
        Ok(())
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
        let (d, mode) = slot("relu_backward", dx, y.len())?;
        for (i, (&y, &g)) in y.iter().zip(dy.iter()).enumerate() {
            put(d, i, if y > 0.0 { g } else { 0.0 }, mode);
        }
        Ok(())
    }

    // Bilinear resizing straight on f32 (the shared loop converts whole maps to f64 and back).
    fn upsample_bilinear(
        &self,
        x: &Buf,
        planes: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        align_corners: bool,
    ) -> Result<Buf> {
        check_len("upsample_bilinear", "x", x.len(), planes * h * w)?;
        let (ty, tx) = (super::bilinear_taps(h, oh, align_corners), super::bilinear_taps(w, ow, align_corners));
        let mut out = Vec::with_capacity(planes * oh * ow);
        for p in x.chunks_exact(h * w) {
            for &(y0, y1, ly) in &ty {
                let (r0, r1, ly) = (&p[y0 * w..(y0 + 1) * w], &p[y1 * w..(y1 + 1) * w], ly as f32);
                for &(x0, x1, lx) in &tx {
                    let lx = lx as f32;
                    let top = r0[x0] * (1.0 - lx) + r0[x1] * lx;
                    let bot = r1[x0] * (1.0 - lx) + r1[x1] * lx;
                    out.push(top * (1.0 - ly) + bot * ly);
                }
            }
        }
        Ok(Arc::new(out))
    }

    // GroupNorm in f32 with f64 sums, in place of the shared f64 loop: it runs on the dense
    // heads' largest maps (the finest pyramid level at image resolution).
    fn group_norm(
        &self,
        x: &Buf,
        w: Slice<Self>,
        b: Slice<Self>,
        d: GroupNormDims,
    ) -> Result<(Buf, Vec<f64>, Vec<f64>)> {
        let (w, b) = (sl(&w), sl(&b));
        d.check("group_norm", x.len(), w.len(), b.len())?;
        let (m, cg) = (d.group_len(), d.channels / d.groups);
        let mut y = zeros(x.len());
        let (mut mean, mut rstd) = (Vec::with_capacity(d.batch * d.groups), Vec::with_capacity(d.batch * d.groups));
        for (gi, (xs, ys)) in x.chunks_exact(m).zip(y.chunks_exact_mut(m)).enumerate() {
            let mu = xs.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
            let var = xs.iter().map(|&v| (v as f64 - mu) * (v as f64 - mu)).sum::<f64>() / m as f64;
            let r = 1.0 / (var + d.eps).sqrt();
            let c0 = gi % d.groups * cg;
            for (c, (xc, yc)) in xs.chunks_exact(d.spatial).zip(ys.chunks_exact_mut(d.spatial)).enumerate() {
                // Centred before scaling, in f64: a group with a large mean and a small spread
                // would lose its digits in `x * (r w) + (b - mu r w)`.
                let (scale, bc) = (r * w[c0 + c] as f64, b[c0 + c] as f64);
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = ((v as f64 - mu) * scale + bc) as f32;
                }
            }
            mean.push(mu);
            rstd.push(r);
        }
        Ok((Arc::new(y), mean, rstd))
    }

    fn group_norm_backward(
        &self,
        x: &Buf,
        w: Slice<Self>,
        (mean, rstd): (&[f64], &[f64]),
        dy: &Buf,
        d: GroupNormDims,
        dx: Option<&mut Grad<Self>>,
        pg: Option<ParamGrads<Self>>,
    ) -> Result<()> {
        let op = "group_norm_backward";
        let w = sl(&w);
        d.check(op, x.len(), w.len(), w.len())?;
        check_len(op, "dy", dy.len(), x.len())?;
        check_len(op, "mean", mean.len(), d.batch * d.groups)?;
        check_len(op, "rstd", rstd.len(), d.batch * d.groups)?;
        let (m, cg) = (d.group_len(), d.channels / d.groups);
        let (mut dw, mut db) = (vec![0f64; d.channels], vec![0f64; d.channels]);
        let mut gx = dx.is_some().then(|| zeros(x.len()));
        for gi in 0..d.batch * d.groups {
            let (mu, r, c0) = (mean[gi], rstd[gi], gi % d.groups * cg);
            let (xs, gs) = (&x[gi * m..(gi + 1) * m], &dy[gi * m..(gi + 1) * m]);
            // dxhat = dy w; dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
            let (mut s1, mut s2) = (0f64, 0f64);
            for c in 0..cg {
                let (mut sg, mut sgx) = (0f64, 0f64);
                for k in c * d.spatial..(c + 1) * d.spatial {
                    let g = gs[k] as f64;
                    sg += g;
                    sgx += g * (xs[k] as f64 - mu) * r;
                }
                let wc = w[c0 + c] as f64;
                (s1, s2) = (s1 + sg * wc, s2 + sgx * wc);
                dw[c0 + c] += sgx;
                db[c0 + c] += sg;
            }
            if let Some(gx) = &mut gx {
                let (s1, s2) = (s1 / m as f64, s2 / m as f64);
                for c in 0..cg {
                    let wc = w[c0 + c] as f64;
                    for k in c * d.spatial..(c + 1) * d.spatial {
                        let xh = (xs[k] as f64 - mu) * r;
                        gx[gi * m + k] = (r * (gs[k] as f64 * wc - s1 - xh * s2)) as f32;
                    }
                }
            }
        }
        if let (Some(slot), Some(gx)) = (dx, gx) {
            self.accumulate_grad(slot, &Arc::new(gx))?;
        }
        if let Some(pg) = pg {
            self.write_param_grads(pg, &dw, &db)?;
        }
        Ok(())
    }

    fn gelu(&self, x: &Buf) -> Result<Buf> {
        let mut y = zeros(x.len());
        gelu::forward(x, &mut y)?;
        Ok(Arc::new(y))
    }

    fn gelu_backward(&self, x: &Buf, dy: &Buf, dx: &mut Grad<Self>) -> Result<()> {
        check_len("gelu_backward", "dy", dy.len(), x.len())?;
        let (d, mode) = slot("gelu_backward", dx, x.len())?;
        gelu::backward(x, dy, d, mode)
    }

    fn conv2d(&self, x: &Buf, w: Slice<Self>, b: Option<Slice<Self>>, d: Conv2dDims) -> Result<Buf> {
        let op = "conv2d";
        check_len(op, "x", x.len(), d.batch * d.cin * d.h * d.w)?;
        check_len(op, "weight", w.range.len(), d.cout * d.k())?;
        let (ho, wo) = d.out_hw();
        let (k, p) = (d.k(), ho * wo);
        let mut out = vec![0f32; d.batch * d.cout * p];
        let mut cols = if pointwise(&d) { Vec::new() } else { vec![0f32; k * p] };
        for n in 0..d.batch {
            let img = &x[n * d.cin * d.h * d.w..(n + 1) * d.cin * d.h * d.w];
            let cols = unfold(&d, img, &mut cols);
            let o = &mut out[n * d.cout * p..(n + 1) * d.cout * p];
            gemm(Trans::N, Trans::N, d.cout, p, k, 1.0, sl(&w), k, cols, p, 0.0, o, p)?;
            if let Some(b) = &b {
                for (row, &bias) in o.chunks_exact_mut(p).zip(sl(b)) {
                    row.iter_mut().for_each(|v| *v += bias);
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
        let op = "conv2d_backward";
        let (ho, wo) = d.out_hw();
        let (k, p, chw) = (d.k(), ho * wo, d.cin * d.h * d.w);
        check_len(op, "dy", dy.len(), d.batch * d.cout * p)?;
        let mut cols = if pointwise(&d) { Vec::new() } else { vec![0f32; k * p] };
        if let Some(g) = dx {
            // A fresh slot is zeroed, so col2im adds into it in either mode.
            let (dxs, _) = slot(op, g, d.batch * chw)?;
            for n in 0..d.batch {
                let dimg = &mut dxs[n * chw..(n + 1) * chw];
                // dcols = W^T dy_n: added straight into dx for a pointwise kernel (nothing to
                // fold), else into cols and folded back (col2im) below.
                let (dst, beta) = if pointwise(&d) { (&mut *dimg, 1.0) } else { (&mut cols[..], 0.0) };
                gemm(
                    Trans::T,
                    Trans::N,
                    k,
                    p,
                    d.cout,
                    1.0,
                    sl(&w),
                    k,
                    &dy[n * d.cout * p..(n + 1) * d.cout * p],
                    p,
                    beta,
                    dst,
                    p,
                )?;
                if pointwise(&d) {
                    continue;
                }
                for r in 0..k {
                    for i in 0..ho {
                        for j in 0..wo {
                            if let Some(s) = conv_src(&d, r, i, j) {
                                dimg[s] += cols[r * p + i * wo + j];
                            }
                        }
                    }
                }
            }
        }
        if let Some(pg) = pg {
            let (wm, bm) = (pg.w.as_ref().map(|w| w.1), pg.b.as_ref().map(|b| b.1));
            let buf = Arc::make_mut(pg.buf).as_mut_slice();
            let (dw, db) = split_two(buf, pg.w.map(|w| w.0), pg.b.map(|b| b.0));
            if let (Some(dw), Some(mode)) = (dw, wm) {
                let x = x.ok_or_else(|| TensorError::Arg { op, msg: "the weight gradient needs the input".into() })?;
                for n in 0..d.batch {
                    let cols = unfold(&d, &x[n * chw..(n + 1) * chw], &mut cols);
                    // dW (=|+=) dy_n cols^T.
                    let beta = if n == 0 && mode == Dst::Overwrite { 0.0 } else { 1.0 };
                    gemm(
                        Trans::N,
                        Trans::T,
                        d.cout,
                        k,
                        p,
                        1.0,
                        &dy[n * d.cout * p..(n + 1) * d.cout * p],
                        p,
                        cols,
                        p,
                        beta,
                        dw,
                        k,
                    )?;
                }
            }
            if let (Some(db), Some(mode)) = (db, bm) {
                if mode == Dst::Overwrite {
                    db.fill(0.0);
                }
                for n in 0..d.batch {
                    for (o, row) in dy[n * d.cout * p..(n + 1) * d.cout * p].chunks_exact(p).enumerate() {
                        db[o] += row.iter().sum::<f32>();
                    }
                }
            }
        }
        Ok(())
    }

    fn sub(&self, a: &Buf, b: &Buf) -> Result<Buf> {
        let mut y = zeros(a.len());
        elementwise::sub(a, b, &mut y, Dst::Overwrite)?;
        Ok(Arc::new(y))
    }

    fn add(&self, a: &Buf, b: &Buf) -> Result<Buf> {
        let mut y = zeros(a.len());
        elementwise::add(a, b, &mut y, Dst::Overwrite)?;
        Ok(Arc::new(y))
    }

    fn add_rows(&self, x: &Buf, rows: &Buf, dim: usize) -> Result<Buf> {
        let op = "add_rows";
        if dim == 0 || rows.len() % dim != 0 || rows.is_empty() || x.len() % rows.len() != 0 {
            return Err(TensorError::Shape {
                op,
                msg: format!("{} values cannot repeat {} rows of {dim}", x.len(), rows.len() / dim.max(1)),
            });
        }
        let mut y = x.to_vec();
        for chunk in y.chunks_exact_mut(rows.len()) {
            elementwise::add_assign(chunk, rows)?;
        }
        Ok(Arc::new(y))
    }

    fn add_rows_backward(&self, dy: &Buf, rows_count: usize, dim: usize, drows: &mut Grad<Self>) -> Result<()> {
        let n = rows_count * dim;
        if n == 0 || dy.len() % n != 0 {
            return Err(TensorError::Shape {
                op: "add_rows_backward",
                msg: format!("{} values, rows of {n}", dy.len()),
            });
        }
        let (d, mode) = slot("add_rows_backward", drows, n)?;
        reduce::col_sum(dy, dy.len() / n, n, d, mode)
    }

    fn outer_add(&self, a: &Buf, b: &Buf, dim: usize) -> Result<Buf> {
        if dim == 0 || a.len() % dim != 0 || b.len() % dim != 0 {
            return Err(TensorError::Shape {
                op: "outer_add",
                msg: format!("rows of {dim}: {} and {}", a.len(), b.len()),
            });
        }
        let mut y = Vec::with_capacity(a.len() * (b.len() / dim));
        for brow in b.chunks_exact(dim) {
            y.extend_from_slice(a);
            let start = y.len() - a.len();
            elementwise::add_row_broadcast(&mut y[start..], brow)?;
        }
        Ok(Arc::new(y))
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
        if s * dim == 0 || dy.len() != g * s * dim {
            return Err(TensorError::Shape { op: "outer_add_backward", msg: format!("{} values", dy.len()) });
        }
        if let Some(da) = da {
            let (d, mode) = slot("outer_add_backward", da, s * dim)?;
            reduce::col_sum(dy, g, s * dim, d, mode)?;
        }
        if let Some(db) = db {
            let (d, mode) = slot("outer_add_backward", db, g * dim)?;
            for gi in 0..g {
                let mut acc = vec![0.0; dim];
                reduce::col_sum(&dy[gi * s * dim..(gi + 1) * s * dim], s, dim, &mut acc, Dst::Overwrite)?;
                for (j, &a) in acc.iter().enumerate() {
                    put(d, gi * dim + j, a, mode);
                }
            }
        }
        Ok(())
    }

    fn gather_rows(&self, x: &Buf, batch: usize, len: usize, dim: usize, ids: &[usize]) -> Result<Buf> {
        let mut y = zeros(ids.len() * dim);
        gather::gather_rows(x, batch, len, dim, ids, &mut y)?;
        Ok(Arc::new(y))
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
        // Scatter-add needs a zeroed target when fresh: rows not gathered get no gradient.
        let (d, _) = slot("gather_rows_backward", dx, batch * len * dim)?;
        gather::scatter_add_rows(dy, batch, len, dim, ids, d)
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
        let op = "unshuffle";
        let len = restore.len() / batch.max(1);
        check_len(op, "x", x.len(), batch * kept * dim)?;
        check_len(op, "restore", restore.len(), batch * len)?;
        check_len(op, "fill", fill.len(), if table { len * dim } else { dim })?;
        if let Some(&index) = restore.iter().find(|&&r| r >= len) {
            return Err(TensorError::Index { op, index, len });
        }
        let mut y = zeros(batch * len * dim);
        let parallel = y.len() > 2 * STREAM_CHUNK && par::can_split();
        par::chunks_mut(&mut y, len * dim, parallel, |n, out| {
            for (l, row) in out.chunks_exact_mut(dim).enumerate() {
                let r = restore[n * len + l];
                row.copy_from_slice(if r < kept {
                    &x[(n * kept + r) * dim..(n * kept + r + 1) * dim]
                } else if table {
                    &fill[l * dim..(l + 1) * dim]
                } else {
                    &fill[..]
                });
            }
        });
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
        if let Some(dx) = dx {
            let (d, mode) = slot("unshuffle_backward", dx, batch * kept * dim)?;
            // A sample's kept rows take gradient from that sample's rows only: samples split
            // across threads.
            let parallel = d.len() > 2 * STREAM_CHUNK && par::can_split();
            par::chunks_mut(d, (kept * dim).max(1), parallel, |n, out| {
                for l in 0..len {
                    let r = restore[n * len + l];
                    if r < kept {
                        let g = &dy[(n * len + l) * dim..(n * len + l + 1) * dim];
                        for (j, &v) in g.iter().enumerate() {
                            put(out, r * dim + j, v, mode);
                        }
                    }
                }
            });
        }
        let Some(df) = dfill else { return Ok(()) };
        if fill_table {
            // Row `l` of the table collects token `l` of every sample that took it, in sample
            // order; positions are independent, so they split across threads.
            let (d, _) = slot("unshuffle_backward", df, len * dim)?;
            if dim == 0 {
                return Ok(());
            }
            let rows = STREAM_CHUNK.div_ceil(dim);
            let parallel = d.len() > 2 * STREAM_CHUNK && par::can_split();
            par::chunks_mut(d, rows * dim, parallel, |ci, part| {
                for (i, out) in part.chunks_exact_mut(dim).enumerate() {
                    let l = ci * rows + i;
                    for n in 0..batch {
                        if restore[n * len + l] >= kept {
                            let g = &dy[(n * len + l) * dim..(n * len + l + 1) * dim];
                            out.iter_mut().zip(g).for_each(|(o, &v)| *o += v);
                        }
                    }
                }
            });
        } else {
            let (d, mode) = slot("unshuffle_backward", df, dim)?;
            let mut acc = vec![0f64; dim];
            for n in 0..batch {
                for l in 0..len {
                    if restore[n * len + l] >= kept {
                        for (a, &v) in acc.iter_mut().zip(&dy[(n * len + l) * dim..(n * len + l + 1) * dim]) {
                            *a += v as f64;
                        }
                    }
                }
            }
            for (j, &a) in acc.iter().enumerate() {
                put(d, j, a as f32, mode);
            }
        }
        Ok(())
    }

    fn mean_tokens(&self, x: &Buf, batch: usize, len: usize, dim: usize, skip_first: bool) -> Result<Buf> {
        check_len("mean_tokens", "x", x.len(), batch * len * dim)?;
        let first = usize::from(skip_first);
        if len <= first {
            return Err(TensorError::Shape { op: "mean_tokens", msg: format!("no tokens to pool among {len}") });
        }
        let mut y = zeros(batch * dim);
        for n in 0..batch {
            let rows = &x[(n * len + first) * dim..(n + 1) * len * dim];
            reduce::col_sum(rows, len - first, dim, &mut y[n * dim..(n + 1) * dim], Dst::Overwrite)?;
        }
        elementwise::scale(&mut y, 1.0 / (len - first) as f32);
        Ok(Arc::new(y))
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
        let inv = 1.0 / (len - first) as f32;
        let (d, mode) = slot("mean_tokens_backward", dx, batch * len * dim)?;
        for n in 0..batch {
            for l in first..len {
                for j in 0..dim {
                    put(d, (n * len + l) * dim + j, dy[n * dim + j] * inv, mode);
                }
            }
        }
        Ok(())
    }

    fn dropout(&self, x: &Buf, p: f32, seed: u64, group: usize) -> Result<Buf> {
        Ok(narrow(super::dropout_generic(x, p, seed, group)?))
    }

    fn dropout_backward(&self, dy: &Buf, p: f32, seed: u64, group: usize, dx: &mut Grad<Self>) -> Result<()> {
        write_grad("dropout_backward", dx, super::dropout_generic(dy, p, seed, group)?)
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
        let (g, mode) = slot("multilabel_soft_margin_backward", dlogits, logits.len())?;
        super::msm_backward_generic(logits, targets, classes, scale, |i, v| put(g, i, v as f32, mode))
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
        let (g, mode) = slot("weighted_cross_entropy_backward", dlogits, logits.len())?;
        super::wce_backward_generic(logits, labels, weights, ignore, scale, |i, v| put(g, i, v as f32, mode))
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
        let (g, mode) = slot("mae_loss_backward", dpred, pred.len())?;
        super::mae_loss_backward_generic(pred, target, mask, d, scale, |i, v| put(g, i, v as f32, mode))
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
        let (g, mode) = slot("cross_entropy_backward", dlogits, logits.len())?;
        super::cross_entropy_backward_generic(logits, targets, classes, scale, |i, v| put(g, i, v as f32, mode))
    }
}
