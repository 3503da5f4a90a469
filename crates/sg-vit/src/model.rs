//! The spectral ViT of SpectralGPT, written once for inference ([`sg_tensor::Eval`]) and training
//! (`sg_autograd::Tape`) and keeping the original parameter names:
//!
//! ```text
//! patch_embed.proj.{weight (D, 1, u, p, p), bias}     Conv3d = Linear over patchified tokens
//! pos_embed_spatial (1, h*w, D), pos_embed_temporal (1, t, D)   or   pos_embed (1, L, D)
//! blocks.N.norm1, blocks.N.attn.{q,k,v,proj}, blocks.N.norm2, blocks.N.mlp.{fc1,fc2}
//! norm.{weight, bias}, head.{weight, bias}
//! ```
//!
//! Block: `x = x + proj(attn(norm1(x)))`, `x = x + fc2(gelu(fc1(norm2(x))))`, LayerNorm eps 1e-6,
//! exact-erf GELU. q, k and v are registered next to each other so that they run as one GEMM.

use sg_tensor::kernels::linear::Activation;
use sg_tensor::{Exec, ParamRef, ParamStore, Result, TensorError, Value};

use crate::config::{PosEmbed, VitConfig};
use crate::init::Rng;
use crate::tokens::{patchify, TokenGeometry};

/// LayerNorm's epsilon everywhere in SpectralGPT.
pub const LN_EPS: f32 = 1e-6;

/// A Linear layer's parameters, weight `(out, in)`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamRef,
    pub bias: Option<ParamRef>,
}

impl Linear {
    /// Registers `{name}.weight` (xavier uniform) and `{name}.bias` (zeros).
    pub fn register(store: &mut ParamStore, name: &str, out: usize, inp: usize, rng: &mut Rng) -> Result<Self> {
        let weight = store.add(&format!("{name}.weight"), &[out, inp], rng.xavier(out, inp))?;
        let bias = Some(store.add(&format!("{name}.bias"), &[out], vec![0.0; out])?);
        Ok(Linear { weight, bias })
    }

    pub fn forward<E: Exec>(&self, e: &mut E, x: &Value<E::B>, act: Activation) -> Result<Value<E::B>> {
        e.linear(x, &self.weight, self.bias.as_ref(), act)
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamRef,
    pub bias: ParamRef,
}

impl LayerNorm {
    pub fn register(store: &mut ParamStore, name: &str, dim: usize) -> Result<Self> {
        let weight = store.add(&format!("{name}.weight"), &[dim], vec![1.0; dim])?;
        let bias = store.add(&format!("{name}.bias"), &[dim], vec![0.0; dim])?;
        Ok(LayerNorm { weight, bias })
    }

    pub fn forward<E: Exec>(&self, e: &mut E, x: &Value<E::B>) -> Result<Value<E::B>> {
        e.layernorm(x, &self.weight, &self.bias, LN_EPS)
    }
}

/// A pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    /// `attn.q`, `attn.k`, `attn.v` as one `(3D, D)` Linear over adjacent parameters.
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub heads: usize,
}

impl Block {
    /// Registers `{prefix}.norm1`, `{prefix}.attn.{q,k,v,proj}`, `{prefix}.norm2`, `{prefix}.mlp.{fc1,fc2}`.
    pub fn register(
        store: &mut ParamStore,
        prefix: &str,
        dim: usize,
        heads: usize,
        hidden: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let norm1 = LayerNorm::register(store, &format!("{prefix}.norm1"), dim)?;
        // q, k and v are initialised separately, as in the original, and stored side by side.
        let mut w = Vec::new();
        for n in ["q", "k", "v"] {
            w.push(store.add(&format!("{prefix}.attn.{n}.weight"), &[dim, dim], rng.xavier(dim, dim))?);
        }
        let mut b = Vec::new();
        for n in ["q", "k", "v"] {
            b.push(store.add(&format!("{prefix}.attn.{n}.bias"), &[dim], vec![0.0; dim])?);
        }
        let qkv =
            Linear { weight: store.concat(&[&w[0], &w[1], &w[2]])?, bias: Some(store.concat(&[&b[0], &b[1], &b[2]])?) };
        let proj = Linear::register(store, &format!("{prefix}.attn.proj"), dim, dim, rng)?;
        let norm2 = LayerNorm::register(store, &format!("{prefix}.norm2"), dim)?;
        let fc1 = Linear::register(store, &format!("{prefix}.mlp.fc1"), hidden, dim, rng)?;
        let fc2 = Linear::register(store, &format!("{prefix}.mlp.fc2"), dim, hidden, rng)?;
        Ok(Block { norm1, qkv, proj, norm2, fc1, fc2, heads })
    }

    /// `x (N, T, D)` through the block; `drop_path` is this block's stochastic-depth rate.
    pub fn forward<E: Exec>(&self, e: &mut E, x: &Value<E::B>, drop_path: f32) -> Result<Value<E::B>> {
        // `h` is reassigned, not shadowed: a shadowed binding lives to the end of the function, so
        // every intermediate (the MLP's 4x-wide activation among them) would stay allocated until
        // the block returns. What a backward needs, the tape keeps itself.
        let mut h = self.norm1.forward(e, x)?;
        h = self.qkv.forward(e, &h, Activation::Identity)?;
        self.forward_from_qkv(e, x, h, drop_path)
    }

    /// [`Self::forward`] of an input `x (N, L, D)` each of whose rows is either the sample's own
    /// (`own (N, kept, D)`) or the row of its position in a table that every sample shares
    /// (`shared (L, D)`), placed as `restore` says ([`Exec::unshuffle`]). norm1 and q, k, v act on
    /// each row alone, so they run on the `N * kept + L` distinct rows instead of all `N * L`: the
    /// MAE decoder's first block, where every masked token enters as the mask token plus its
    /// position's embedding. The same forward values; in the backward the gradients of a shared
    /// row are summed over the samples before they pass through q, k, v and norm1 (the same sum
    /// in another order).
    pub fn forward_shared<E: Exec>(
        &self,
        e: &mut E,
        x: &Value<E::B>,
        own: &Value<E::B>,
        shared: &Value<E::B>,
        restore: &[usize],
        drop_path: f32,
    ) -> Result<Value<E::B>> {
        let mut h = self.norm1.forward(e, own)?;
        h = self.qkv.forward(e, &h, Activation::Identity)?;
        let mut t = self.norm1.forward(e, shared)?;
        t = self.qkv.forward(e, &t, Activation::Identity)?;
        h = e.unshuffle(&h, &t, restore)?;
        drop(t);
        self.forward_from_qkv(e, x, h, drop_path)
    }

    /// The rest of the block from q, k, v side by side (`(N, L, 3D)`).
    fn forward_from_qkv<E: Exec>(
        &self,
        e: &mut E,
        x: &Value<E::B>,
        mut h: Value<E::B>,
        drop_path: f32,
    ) -> Result<Value<E::B>> {
        h = e.attention(&h, self.heads)?;
        h = self.proj.forward(e, &h, Activation::Identity)?;
        h = e.drop_path(&h, drop_path)?;
        let x = e.add(x, &h)?;
        h = self.norm2.forward(e, &x)?;
        h = self.fc1.forward(e, &h, Activation::Gelu)?;
        h = self.fc2.forward(e, &h, Activation::Identity)?;
        h = e.drop_path(&h, drop_path)?;
        e.add(&x, &h)
    }
}

/// Parameters of one block of width `d` and MLP width `hidden`. Counted in f64, which is exact
/// below 2^53 and cannot overflow on the absurd sizes that [`VitConfig::validate`] must reject.
pub fn block_params(d: f64, hidden: f64) -> f64 {
    2.0 * d + 4.0 * (d * d + d) + 2.0 * d + (hidden * d + hidden) + (d * hidden + d)
}

/// Rows `ids` (`N x count`, per sample) of a `(L, D)` table that all samples share, as `shape`
/// `(N, count, D)`: the table is one batch of `L` rows, and all `N * count` ids index it.
pub fn table_rows<E: Exec>(e: &mut E, table: &Value<E::B>, ids: &[usize], shape: &[usize]) -> Result<Value<E::B>> {
    let d = table.last_dim();
    let t = e.reshape(table, &[1, table.numel() / d.max(1), d])?;
    let rows = e.gather_rows(&t, ids)?;
    e.reshape(&rows, shape)
}

/// The encoder's position embedding.
#[derive(Clone, Debug)]
pub enum Pos {
    Separate { spatial: ParamRef, temporal: ParamRef },
    Joined(ParamRef),
}

impl Pos {
    /// The `(L, D)` table: `spatial[s] + temporal[g]` at token `g*h*w + s`, or the joined table.
    pub fn table<E: Exec>(&self, e: &mut E) -> Result<Value<E::B>> {
        match self {
            Pos::Separate { spatial, temporal } => {
                let (s, t) = (e.param(spatial)?, e.param(temporal)?);
                let d = s.last_dim();
                let s = e.reshape(&s, &[s.numel() / d, d])?;
                let t = e.reshape(&t, &[t.numel() / d, d])?;
                e.outer_add(&s, &t)
            }
            Pos::Joined(p) => {
                let v = e.param(p)?;
                let d = v.last_dim();
                e.reshape(&v, &[v.numel() / d, d])
            }
        }
    }
}

/// The spectral ViT encoder, with a classification head when `cfg.num_classes > 0`.
#[derive(Clone, Debug)]
pub struct Vit {
    pub cfg: VitConfig,
    /// `patch_embed.proj`: the Conv3d weight `(D, 1, u, p, p)` used as a `(D, u*p*p)` Linear.
    pub patch_embed: Linear,
    pub pos: Pos,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Option<Linear>,
}

impl Vit {
    /// Registers every parameter in `store` under its original name, initialised from `seed`.
    pub fn new(cfg: VitConfig, store: &mut ParamStore, seed: u64) -> Result<Self> {
        cfg.validate()?;
        store.reserve(Self::param_count(&cfg));
        let mut rng = Rng::new(seed);
        let (d, td) = (cfg.embed_dim, cfg.token_dim());
        let (u, p) = (cfg.t_patch_size, cfg.patch_size);
        let w = store.add("patch_embed.proj.weight", &[d, 1, u, p, p], rng.xavier(d, td))?;
        let patch_embed = Linear {
            weight: ParamRef { offset: w.offset, shape: vec![d, td] },
            bias: Some(store.add("patch_embed.proj.bias", &[d], vec![0.0; d])?),
        };
        let (t, h, ww) = cfg.grid();
        let pos = match cfg.pos_embed {
            PosEmbed::Separate => Pos::Separate {
                spatial: store.add("pos_embed_spatial", &[1, h * ww, d], rng.normals(h * ww * d, 0.02))?,
                temporal: store.add("pos_embed_temporal", &[1, t, d], rng.normals(t * d, 0.02))?,
            },
            PosEmbed::Joined => {
                Pos::Joined(store.add("pos_embed", &[1, cfg.tokens(), d], vec![0.0; cfg.tokens() * d])?)
            }
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::register(store, &format!("blocks.{i}"), d, cfg.num_heads, cfg.mlp_hidden(), &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::register(store, "norm", d)?;
        let head = if cfg.num_classes > 0 {
            let c = cfg.num_classes;
            Some(Linear {
                weight: store.add("head.weight", &[c, d], rng.normals(c * d, 2e-5))?,
                bias: Some(store.add("head.bias", &[c], vec![0.0; c])?),
            })
        } else {
            None
        };
        Ok(Vit { cfg, patch_embed, pos, blocks, norm, head })
    }

    /// Parameters of a model with a validated `cfg`, counted without building it (matches
    /// [`Vit::new`]).
    pub fn param_count(cfg: &VitConfig) -> usize {
        Self::param_estimate(cfg) as usize
    }

    /// [`Vit::param_count`] as f64, for any config: what [`VitConfig::validate`] bounds.
    pub fn param_estimate(cfg: &VitConfig) -> f64 {
        let f = |v: usize| v as f64;
        let (d, td) = (f(cfg.embed_dim), f(cfg.t_patch_size) * f(cfg.patch_size) * f(cfg.patch_size));
        let (t, h, w) = cfg.grid();
        let pos = match cfg.pos_embed {
            PosEmbed::Separate => (f(h) * f(w) + f(t)) * d,
            PosEmbed::Joined => f(t) * f(h) * f(w) * d,
        };
        let head = if cfg.num_classes > 0 { f(cfg.num_classes) * (d + 1.0) } else { 0.0 };
        d * td + d + pos + f(cfg.depth) * block_params(d, f(cfg.mlp_hidden())) + 2.0 * d + head
    }

    /// Tokens of a batch of images `(N, bands, H, W)` in the model's band order; non-finite pixels
    /// and wrong sizes are errors.
    pub fn tokens(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let g = TokenGeometry::new(batch, c.bands, c.img_size.0, c.img_size.1, c.patch_size, c.t_patch_size)?;
        if images.len() != g.image_len() {
            return Err(TensorError::Shape {
                op: "Vit::tokens",
                msg: format!(
                    "{} values are not {batch} images of {} bands x {}x{} pixels",
                    images.len(),
                    c.bands,
                    c.img_size.0,
                    c.img_size.1
                ),
            });
        }
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            let per = c.bands * c.img_size.0 * c.img_size.1;
            return Err(TensorError::Arg {
                op: "Vit::tokens",
                msg: format!(
                    "image {} band {} has a non-finite pixel",
                    i / per,
                    i % per / (c.img_size.0 * c.img_size.1)
                ),
            });
        }
        patchify(images, &g)
    }

    /// Every Linear weight the forward uses (patch embedding, each block's qkv, proj, fc1, fc2,
    /// the head): what [`sg_tensor::Eval::packed`] may rearrange for faster inference.
    pub fn linear_weights(&self) -> Vec<&ParamRef> {
        let mut w = vec![&self.patch_embed.weight];
        for b in &self.blocks {
            w.extend([&b.qkv.weight, &b.proj.weight, &b.fc1.weight, &b.fc2.weight]);
        }
        w.extend(self.head.as_ref().map(|h| &h.weight));
        w
    }

    /// Drop-path rate of block `i`: linear from 0 to `cfg.drop_path`.
    pub fn drop_path_rate(&self, i: usize) -> f32 {
        if self.cfg.depth <= 1 {
            0.0
        } else {
            self.cfg.drop_path * i as f32 / (self.cfg.depth - 1) as f32
        }
    }

    /// Patch embedding of `(N, L, u*p*p)` tokens, plus the position embedding: `(N, L, D)`.
    pub fn embed<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let x = self.patch_embed.forward(e, tokens, Activation::Identity)?;
        let pos = self.pos.table(e)?;
        e.add_rows(&x, &pos)
    }

    /// [`Self::embed`] of the tokens `keep` only (`N x count` ids, each sample's own, as
    /// [`Exec::gather_rows`]): `(N, count, D)`, the rows that embedding every token and then
    /// gathering gives, without embedding the tokens left out (nine in ten in MAE pretraining).
    pub fn embed_kept<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>, keep: &[usize]) -> Result<Value<E::B>> {
        let t = e.gather_rows(tokens, keep)?;
        let x = self.patch_embed.forward(e, &t, Activation::Identity)?;
        let pos = self.pos.table(e)?;
        let pos = table_rows(e, &pos, keep, &x.shape)?;
        e.add(&x, &pos)
    }

    /// All blocks over `(N, T, D)` tokens (no final norm).
    pub fn blocks<E: Exec>(&self, e: &mut E, x: &Value<E::B>) -> Result<Value<E::B>> {
        let mut x = x.clone();
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(e, &x, self.drop_path_rate(i))?;
        }
        Ok(x)
    }

    /// Every token's features after the blocks, `(N, L, D)` (the segmentation head's input).
    pub fn features<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let x = self.embed(e, tokens)?;
        self.blocks(e, &x)
    }

    /// The pooled, normalised embedding of each image, `(N, D)`.
    pub fn embedding<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let x = self.features(e, tokens)?;
        let pooled = e.mean_tokens(&x, self.cfg.skip_first_token)?;
        self.norm.forward(e, &pooled)
    }

    /// Class logits `(N, classes)`.
    pub fn logits<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>) -> Result<Value<E::B>> {
        let head = self.head.as_ref().ok_or_else(|| TensorError::Arg {
            op: "Vit::logits",
            msg: "this model has no classification head".into(),
        })?;
        let z = self.embedding(e, tokens)?;
        let z = e.dropout(&z, self.cfg.head_dropout)?;
        head.forward(e, &z, Activation::Identity)
    }
}
