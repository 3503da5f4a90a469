//! SpectralGPT's dense-prediction model: the spectral ViT encoder, a Linear(t -> 1) that merges the
//! spectral groups, four branches that make a feature pyramid, and the original's UPerNet head.
//! Segmentation runs it on one image; change detection runs the encoder on both dates (shared
//! weights) and decodes the difference of the merged maps. Parameter names follow the original:
//!
//! ```text
//! patch_embed.*, pos_embed_*, blocks.N.*          the encoder (its final `norm` is unused and frozen)
//! fc.0                                            Linear(t -> 1) over the spectral groups
//! conv{0,1,2,3}.{0,1,3}                           1x1 conv, GroupNorm(32), [GELU], transposed conv
//! decoder.PPMHead.psp_modules.{0..3}.1            1x1 convs after max pooling to 1, 2, 3, 6
//! decoder.PPMHead.final.{0,1}                     1x1 conv + GroupNorm(16) over the pooled + input
//! decoder.{Conv_fuse1,Conv_fuse1_,..,fuse_all}.{0,1}, decoder.conv_x1   the FPN fuse
//! cls_seg.0                                       3x3 conv to classes
//! ```
//!
//! With `C` the top channel count (2048 in the original) and `F` the FPN width (256), the branches
//! give `C/8, C/4, C/2, C` channels at 8x, 4x, 2x and 1x the token grid. Each norm is GroupNorm as
//! in the original, or BatchNorm (running statistics in evaluation) with `norm: "batch"`.

use serde_json::{json, Value as Json};
use sg_tensor::rng::Rng;
use sg_tensor::{BatchNorm, Exec, ParamRef, ParamStore, Result, TensorError, Value};
use sg_vit::{Linear, Vit, VitConfig};

/// Pyramid pooling sizes of the original.
pub const POOL_SIZES: [usize; 4] = [1, 2, 3, 6];
/// Transposed-convolution upsampling of branches 0, 1, 2 (branch 3 stays at the grid).
const BRANCH_SCALE: [usize; 3] = [8, 4, 2];
const GN_EPS: f32 = 1e-5;

/// Which normalisation the neck and head use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    Group,
    Batch,
}

/// The encoder and head sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseConfig {
    pub encoder: VitConfig,
    pub classes: usize,
    /// `C`: channels of the coarsest branch (2048 in the original).
    pub channels: usize,
    /// `F`: the FPN width (256 in the original).
    pub fpn: usize,
    pub norm: NormKind,
    /// Dropout after every head block (0.5 in the original), training only.
    pub dropout: f32,
}

fn err(msg: String) -> TensorError {
    TensorError::Arg { op: "DenseConfig", msg }
}

impl DenseConfig {
    /// The original's head (C = 2048, F = 256) for ViT-B and larger, a quarter-width one for tiny.
    pub fn new(encoder: VitConfig, classes: usize) -> Self {
        let (channels, fpn) = if encoder.embed_dim >= 768 { (2048, 256) } else { (256, 64) };
        DenseConfig { encoder, classes, channels, fpn, norm: NormKind::Group, dropout: 0.5 }
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder.validate()?;
        let (t, h, w) = self.encoder.grid();
        if self.classes < 2 {
            return Err(err(format!("{} classes: dense tasks need at least 2", self.classes)));
        }
        if self.channels == 0 || self.channels % 128 != 0 {
            return Err(err(format!("channels {} must be a multiple of 128 (GroupNorm 32 of C/4)", self.channels)));
        }
        if self.fpn == 0 || self.fpn % 16 != 0 {
            return Err(err(format!("fpn {} must be a multiple of 16 (GroupNorm 16)", self.fpn)));
        }
        if h < 6 || w < 6 || t == 0 {
            return Err(err(format!("a {h}x{w} token grid is smaller than the 6x6 pyramid pooling")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(err(format!("dropout {} outside [0, 1)", self.dropout)));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Json {
        json!({
            "encoder": self.encoder.to_json(),
            "classes": self.classes,
            "channels": self.channels,
            "fpn": self.fpn,
            "norm": match self.norm { NormKind::Group => "group", NormKind::Batch => "batch" },
            "dropout": self.dropout,
        })
    }

    /// The configuration saved by [`DenseConfig::to_json`].
    pub fn from_json(j: &Json) -> Result<Self> {
        let enc = j.get("encoder").ok_or_else(|| err("no `encoder` in the dense config".into()))?;
        let mut encoder = VitConfig::preset("tiny", 96)?;
        encoder.update_from_json(enc)?;
        let num = |k: &str| j.get(k).and_then(Json::as_u64).map(|v| v as usize);
        let mut c = DenseConfig::new(encoder, num("classes").ok_or_else(|| err("no `classes`".into()))?);
        c.channels = num("channels").unwrap_or(c.channels);
        c.fpn = num("fpn").unwrap_or(c.fpn);
        c.norm = match j.get("norm").and_then(Json::as_str) {
            None | Some("group") => NormKind::Group,
            Some("batch") => NormKind::Batch,
            Some(o) => return Err(err(format!("norm `{o}`: group or batch"))),
        };
        c.dropout = j.get("dropout").and_then(Json::as_f64).map_or(c.dropout, |v| v as f32);
        c.validate()?;
        Ok(c)
    }
}

/// A convolution's parameters (PyTorch's default init: uniform within 1/sqrt(fan_in)).
#[derive(Clone, Debug)]
struct Conv {
    weight: ParamRef,
    bias: ParamRef,
}

impl Conv {
    /// `transposed`: weight `(inp, out, k, k)` of a ConvTranspose2d, else `(out, inp, k, k)`.
    fn register(
        store: &mut ParamStore,
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        transposed: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        // PyTorch takes fan_in from weight.size(1): `out` for a transposed convolution.
        let fan_in = if transposed { out } else { inp } * k * k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut uni = |n: usize| (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect::<Vec<_>>();
        let shape = if transposed { [inp, out, k, k] } else { [out, inp, k, k] };
        let weight = store.add(&format!("{name}.weight"), &shape, uni(inp * out * k * k))?;
        let bias = store.add(&format!("{name}.bias"), &[out], uni(out))?;
        Ok(Conv { weight, bias })
    }
}

/// GroupNorm (the original) or BatchNorm over channels.
#[derive(Clone, Debug)]
enum Norm {
    Group { groups: usize, weight: ParamRef, bias: ParamRef },
    Batch(BatchNorm),
}

impl Norm {
    fn register(store: &mut ParamStore, name: &str, channels: usize, groups: usize, kind: NormKind) -> Result<Self> {
        let weight = store.add(&format!("{name}.weight"), &[channels], vec![1.0; channels])?;
        let bias = store.add(&format!("{name}.bias"), &[channels], vec![0.0; channels])?;
        Ok(match kind {
            NormKind::Group => Norm::Group { groups, weight, bias },
            NormKind::Batch => {
                let running_mean = store.add(&format!("{name}.running_mean"), &[channels], vec![0.0; channels])?;
                let running_var = store.add(&format!("{name}.running_var"), &[channels], vec![1.0; channels])?;
                for n in ["running_mean", "running_var"] {
                    store.set_trainable(&format!("{name}.{n}"), false);
                }
                Norm::Batch(BatchNorm { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
            }
        })
    }

    fn forward<E: Exec>(&self, e: &mut E, x: &Value<E::B>) -> Result<Value<E::B>> {
        match self {
            Norm::Group { groups, weight, bias } => e.group_norm(x, *groups, weight, bias, GN_EPS),
            Norm::Batch(bn) => e.batch_norm(x, bn),
        }
    }
}

/// conv 1x1 -> norm -> GELU -> dropout: every block of the original's head.
#[derive(Clone, Debug)]
struct ConvNorm {
    conv: Conv,
    norm: Norm,
}

impl ConvNorm {
    fn register(
        store: &mut ParamStore,
        name: &str,
        inp: usize,
        out: usize,
        groups: usize,
        c: &DenseConfig,
        rng: &mut Rng,
    ) -> Result<Self> {
        let conv = Conv::register(store, &format!("{name}.0"), inp, out, 1, false, rng)?;
        let norm = Norm::register(store, &format!("{name}.1"), out, groups, c.norm)?;
        Ok(ConvNorm { conv, norm })
    }

    fn forward<E: Exec>(&self, e: &mut E, x: &Value<E::B>, dropout: f32) -> Result<Value<E::B>> {
        let y = e.conv2d(x, &self.conv.weight, Some(&self.conv.bias), 1, 0)?;
        let y = self.norm.forward(e, &y)?;
        let y = e.gelu(&y)?;
        e.dropout(&y, dropout)
    }
}

/// The dense-prediction model (segmentation, or change detection on a pair of dates).
#[derive(Clone, Debug)]
pub struct UperNet {
    pub cfg: DenseConfig,
    pub encoder: Vit,
    fc: Linear,
    branches: Vec<(ConvNorm, Option<Conv>)>,
    ppm: Vec<Conv>,
    ppm_final: ConvNorm,
    /// Conv_fuse1, Conv_fuse1_, Conv_fuse2, Conv_fuse2_, Conv_fuse3, Conv_fuse3_.
    fuse: Vec<ConvNorm>,
    fuse_all: ConvNorm,
    conv_x1: Conv,
    cls_seg: Conv,
}

impl UperNet {
    pub fn new(cfg: DenseConfig, store: &mut ParamStore, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut enc_cfg = cfg.encoder.clone();
        enc_cfg.num_classes = 0;
        let encoder = Vit::new(enc_cfg, store, seed)?;
        // The encoder's final norm is not on the dense path (the original reads the last block).
        store.set_trainable("norm.", false);
        let mut rng = Rng::derive(seed, &[0xDE45E]);
        let (d, (t, _, _)) = (cfg.encoder.embed_dim, cfg.encoder.grid());
        let (c, f) = (cfg.channels, cfg.fpn);
        let bound = 1.0 / (t as f64).sqrt();
        let fc = Linear {
            weight: store.add(
                "fc.0.weight",
                &[1, t],
                (0..t).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect(),
            )?,
            bias: Some(store.add("fc.0.bias", &[1], vec![((rng.uniform() * 2.0 - 1.0) * bound) as f32])?),
        };
        let mid = [c / 4, c / 4, c / 2, c];
        let outs = [c / 8, c / 4, c / 2, c];
        let mut branches = Vec::new();
        for i in 0..4 {
            let cn = ConvNorm::register(store, &format!("conv{i}"), d, mid[i], 32, &cfg, &mut rng)?;
            let up = match BRANCH_SCALE.get(i) {
                Some(&k) => Some(Conv::register(store, &format!("conv{i}.3"), mid[i], outs[i], k, true, &mut rng)?),
                None => None,
            };
            branches.push((cn, up));
        }
        let p = "decoder.PPMHead";
        let ppm = (0..POOL_SIZES.len())
            .map(|j| Conv::register(store, &format!("{p}.psp_modules.{j}.1"), c, f, 1, false, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let ppm_final =
            ConvNorm::register(store, &format!("{p}.final"), c + POOL_SIZES.len() * f, f, 16, &cfg, &mut rng)?;
        let mut fuse = Vec::new();
        for (k, inp) in [(1, c / 2), (2, c / 4), (3, c / 8)] {
            fuse.push(ConvNorm::register(store, &format!("decoder.Conv_fuse{k}"), inp, f, 16, &cfg, &mut rng)?);
            fuse.push(ConvNorm::register(store, &format!("decoder.Conv_fuse{k}_"), f, f, 16, &cfg, &mut rng)?);
        }
        let fuse_all = ConvNorm::register(store, "decoder.fuse_all", 4 * f, f, 16, &cfg, &mut rng)?;
        let conv_x1 = Conv::register(store, "decoder.conv_x1", f, f, 1, false, &mut rng)?;
        let cls_seg = Conv::register(store, "cls_seg.0", f, cfg.classes, 3, false, &mut rng)?;
        Ok(UperNet { cfg, encoder, fc, branches, ppm, ppm_final, fuse, fuse_all, conv_x1, cls_seg })
    }

    /// Tokens of `(N, bands, H, W)` images (see [`Vit::tokens`]).
    pub fn tokens(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.encoder.tokens(images, batch)
    }

    /// The encoder's last-block features with the spectral groups merged: `(N, D, h, w)`.
    pub fn feature_map<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let x = self.encoder.features(e, tokens)?;
        self.merge(e, &x)
    }

    /// Encoder features `(N, t*h*w, D)` with the spectral groups merged by `fc`: `(N, D, h, w)`.
    pub fn merge<E: Exec>(&self, e: &mut E, x: &Value<E::B>) -> Result<Value<E::B>> {
        let (t, h, w) = self.cfg.encoder.grid();
        let d = self.cfg.encoder.embed_dim;
        if x.shape.len() != 3 || x.shape[1] != t * h * w || x.shape[2] != d {
            return Err(TensorError::Shape {
                op: "UperNet::merge",
                msg: format!("features {:?} are not (N, {}, {d})", x.shape, t * h * w),
            });
        }
        let n = x.shape[0];
        let x = e.reshape(x, &[n, t, h * w, d])?;
        let x = e.permute(&x, &[0, 2, 3, 1])?;
        let x =
            e.linear(&x, &self.fc.weight, self.fc.bias.as_ref(), sg_tensor::kernels::linear::Activation::Identity)?;
        let x = e.reshape(&x, &[n, h, w, d])?;
        e.permute(&x, &[0, 3, 1, 2])
    }

    fn up<E: Exec>(e: &mut E, x: &Value<E::B>, size: (usize, usize)) -> Result<Value<E::B>> {
        e.upsample_bilinear(x, size, true)
    }

    /// Class logits `(N, classes, H, W)` at the image size from a merged map `(N, D, h, w)`.
    pub fn decode<E: Exec>(&self, e: &mut E, map: &Value<E::B>) -> Result<Value<E::B>> {
        let p = self.cfg.dropout;
        let mut feats = Vec::new();
        for (cn, up) in &self.branches {
            let mut y = cn.forward(e, map, 0.0)?;
            if let Some(up) = up {
                let k = up.weight.shape[2];
                y = e.conv_transpose2d(&y, &up.weight, Some(&up.bias), k, 0)?;
            }
            feats.push(e.dropout(&y, p)?);
        }
        // Pyramid pooling over the coarsest branch.
        let top = &feats[3];
        let hw = (top.shape[2], top.shape[3]);
        let mut parts = Vec::new();
        for (conv, &s) in self.ppm.iter().zip(&POOL_SIZES) {
            let y = e.adaptive_max_pool(top, (s, s))?;
            let y = e.conv2d(&y, &conv.weight, Some(&conv.bias), 1, 0)?;
            parts.push(Self::up(e, &y, hw)?);
        }
        parts.push(top.clone());
        let x1 = e.concat(&parts.iter().collect::<Vec<_>>(), 1)?;
        let x1 = self.ppm_final.forward(e, &x1, p)?;
        // Top-down fuse: each level doubled and added to the next finer branch.
        let mut levels = vec![x1];
        for (k, lateral) in [&feats[2], &feats[1], &feats[0]].into_iter().enumerate() {
            let prev = levels.last().expect("x1");
            let size = (lateral.shape[2], lateral.shape[3]);
            let mut x = Self::up(e, prev, size)?;
            if k == 0 {
                x = e.conv2d(&x, &self.conv_x1.weight, Some(&self.conv_x1.bias), 1, 0)?;
            }
            let lat = self.fuse[2 * k].forward(e, lateral, p)?;
            let x = e.add(&x, &lat)?;
            levels.push(self.fuse[2 * k + 1].forward(e, &x, p)?);
        }
        let fine = levels[3].clone();
        let size = (fine.shape[2], fine.shape[3]);
        let mut all = Vec::new();
        for l in &levels[..3] {
            all.push(Self::up(e, l, size)?);
        }
        all.push(fine);
        let x = e.concat(&all.iter().collect::<Vec<_>>(), 1)?;
        let x = self.fuse_all.forward(e, &x, p)?;
        let y = e.conv2d(&x, &self.cls_seg.weight, Some(&self.cls_seg.bias), 1, 1)?;
        let img = self.cfg.encoder.img_size;
        if (y.shape[2], y.shape[3]) != img {
            return Self::up(e, &y, img);
        }
        Ok(y)
    }

    /// Segmentation logits `(N, classes, H, W)`.
    pub fn segment<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let m = self.feature_map(e, tokens)?;
        self.decode(e, &m)
    }

    /// Change logits `(N, classes, H, W)` of two dates: the encoder on both (shared weights), the
    /// merged maps subtracted, then the head.
    pub fn change<E: Exec>(&self, e: &mut E, before: &Value<E::B>, after: &Value<E::B>) -> Result<Value<E::B>> {
        let a = self.feature_map(e, before)?;
        let b = self.feature_map(e, after)?;
        let d = e.sub(&a, &b)?;
        self.decode(e, &d)
    }

    /// Per-pixel cross-entropy of `logits (N, C, H, W)` against `labels (N, H, W)`, with class
    /// `weights` (empty for none) and `ignore` labels left out: the segmentation loss, and the
    /// change-detection weighted NLL (NLL of log-softmax is this cross-entropy).
    pub fn pixel_loss<E: Exec>(
        e: &mut E,
        logits: &Value<E::B>,
        labels: &[usize],
        weights: &[f32],
        ignore: usize,
    ) -> Result<(Value<E::B>, f64)> {
        let &[n, c, h, w] = logits.shape.as_slice() else {
            return Err(TensorError::Shape {
                op: "pixel_loss",
                msg: format!("logits {:?} are not (N, C, H, W)", logits.shape),
            });
        };
        if labels.len() != n * h * w {
            return Err(TensorError::Shape {
                op: "pixel_loss",
                msg: format!("{} labels for {n} maps of {h}x{w}", labels.len()),
            });
        }
        let ones;
        let weights = if weights.is_empty() {
            ones = vec![1.0; c];
            &ones[..]
        } else {
            weights
        };
        let z = e.permute(logits, &[0, 2, 3, 1])?;
        let z = e.reshape(&z, &[n * h * w, c])?;
        e.weighted_cross_entropy(&z, labels, weights, ignore)
    }
}
