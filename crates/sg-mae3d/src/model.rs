//! SpectralGPT's pretraining model (`MaskedAutoencoderViT` in the original), on any executor:
//!
//! ```text
//! tokens -> patch_embed + pos (spatial + spectral) -> keep visible -> blocks -> norm     (encoder_out)
//!        -> decoder_embed -> + mask_token, unshuffle -> + decoder pos -> decoder_blocks
//!        -> decoder_norm -> decoder_pred                                                   (pred)
//! loss = loss1 (masked tokens, token to token) + loss3 (spectral groups summed, all tokens)
//!        [+ w * mean spectral angle of every pixel, off by default]
//! ```
//! Parameter names are the original's: the encoder's (see `sg_vit::model`), then `decoder_embed`,
//! `mask_token`, `decoder_pos_embed_spatial`, `decoder_pos_embed_temporal`, `decoder_blocks.N.*`,
//! `decoder_norm`, `decoder_pred`.

use serde_json::Value as Json;
use sg_tensor::backend::{MaeLoss, SpectralAngle};
use sg_tensor::kernels::linear::Activation;
use sg_tensor::{Exec, ParamRef, ParamStore, Result, TensorError, Value};
use sg_vit::config::{PosEmbed, VitConfig};
use sg_vit::init::Rng;
use sg_vit::model::{table_rows, Block, LayerNorm, Linear, Pos, Vit};
use sg_vit::tokens::{unpatchify, TokenGeometry};

use crate::masking::Masking;

/// The encoder's configuration plus the decoder's and the mask ratio.
#[derive(Clone, Debug, PartialEq)]
pub struct MaeConfig {
    pub encoder: VitConfig,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mask_ratio: f64,
    /// Weight of the optional spectral-angle term (0: off, the original's loss).
    pub spectral_angle_weight: f64,
}

impl MaeConfig {
    /// A named encoder size at `img` px with SpectralGPT's decoder (512 wide, 4 blocks, 16 heads;
    /// at tiny scale 128 wide, 2 blocks, 4 heads), mask ratio 0.9.
    pub fn preset(name: &str, img: usize) -> Result<Self> {
        let encoder = VitConfig::preset(name, img)?;
        let (decoder_embed_dim, decoder_depth, decoder_num_heads) =
            if name == "tiny" { (128, 2, 4) } else { (512, 4, 16) };
        let c = MaeConfig {
            encoder,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mask_ratio: 0.9,
            spectral_angle_weight: 0.0,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder.validate()?;
        let bad = |msg: String| Err(TensorError::Arg { op: "config", msg });
        if self.encoder.pos_embed != PosEmbed::Separate {
            return bad("pretraining uses separate spatial and spectral position embeddings".into());
        }
        if self.decoder_num_heads == 0 || self.decoder_embed_dim % self.decoder_num_heads != 0 {
            return bad(format!(
                "decoder_embed_dim {} does not split into {} heads",
                self.decoder_embed_dim, self.decoder_num_heads
            ));
        }
        if !(0.0..1.0).contains(&self.mask_ratio) {
            return bad(format!("mask_ratio {} is outside [0, 1)", self.mask_ratio));
        }
        if !self.spectral_angle_weight.is_finite() || self.spectral_angle_weight < 0.0 {
            return bad(format!("spectral_angle_weight {} must be a non-negative number", self.spectral_angle_weight));
        }
        sg_vit::config::check_size(Mae3d::param_estimate(self), self.encoder.grid())?;
        if super::masking::kept(self.encoder.tokens(), self.mask_ratio) == 0 {
            return bad(format!("mask_ratio {} keeps no token of {}", self.mask_ratio, self.encoder.tokens()));
        }
        Ok(())
    }

    /// Reads the fields present in a JSON object (the parity fixtures' `config`, or ours).
    pub fn update_from_json(&mut self, j: &Json) -> Result<()> {
        self.encoder.update_from_json(j)?;
        for (k, slot) in [
            ("decoder_embed_dim", &mut self.decoder_embed_dim),
            ("decoder_depth", &mut self.decoder_depth),
            ("decoder_num_heads", &mut self.decoder_num_heads),
        ] {
            if let Some(v) = j.get(k) {
                *slot = v
                    .as_u64()
                    .ok_or_else(|| TensorError::Arg { op: "config", msg: format!("`{k}` must be a whole number") })?
                    as usize;
            }
        }
        if let Some(v) = j.get("spectral_angle_weight") {
            self.spectral_angle_weight = v.as_f64().ok_or_else(|| TensorError::Arg {
                op: "config",
                msg: "`spectral_angle_weight` must be a number".into(),
            })?;
        }
        if let Some(v) = j.get("mask_ratio") {
            self.mask_ratio = v
                .as_f64()
                .ok_or_else(|| TensorError::Arg { op: "config", msg: "`mask_ratio` must be a number".into() })?;
        }
        self.validate()
    }

    pub fn to_json(&self) -> Json {
        let mut j = self.encoder.to_json();
        j["decoder_embed_dim"] = self.decoder_embed_dim.into();
        j["decoder_depth"] = self.decoder_depth.into();
        j["decoder_num_heads"] = self.decoder_num_heads.into();
        j["mask_ratio"] = self.mask_ratio.into();
        j["spectral_angle_weight"] = self.spectral_angle_weight.into();
        j
    }
}

/// The pretraining model's parameters.
#[derive(Clone, Debug)]
pub struct Mae3d {
    pub cfg: MaeConfig,
    pub encoder: Vit,
    pub decoder_embed: Linear,
    pub mask_token: ParamRef,
    pub decoder_pos: Pos,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: LayerNorm,
    pub decoder_pred: Linear,
}

/// What a forward pass gives.
pub struct MaeOutput<V> {
    /// `loss1 + loss3`, the value to differentiate.
    pub loss: V,
    pub parts: MaeLoss,
    /// `(N, kept, D)`: the encoder's output (after its final norm).
    pub encoder_out: V,
    /// `(N, L, u*p*p)`: every token's reconstruction.
    pub pred: V,
}

impl Mae3d {
    /// Registers every parameter, initialised from `seed`.
    pub fn new(cfg: MaeConfig, store: &mut ParamStore, seed: u64) -> Result<Self> {
        cfg.validate()?;
        store.reserve(Self::param_count(&cfg));
        let encoder = Vit::new(cfg.encoder.clone(), store, seed)?;
        let mut rng = Rng::new(seed ^ 0x00DE_C0DE);
        let (d, dd) = (cfg.encoder.embed_dim, cfg.decoder_embed_dim);
        let (t, h, w) = cfg.encoder.grid();
        let decoder_embed = Linear::register(store, "decoder_embed", dd, d, &mut rng)?;
        let mask_token = store.add("mask_token", &[1, 1, dd], rng.normals(dd, 0.02))?;
        let decoder_pos = Pos::Separate {
            spatial: store.add("decoder_pos_embed_spatial", &[1, h * w, dd], rng.normals(h * w * dd, 0.02))?,
            temporal: store.add("decoder_pos_embed_temporal", &[1, t, dd], rng.normals(t * dd, 0.02))?,
        };
        let hidden = (dd as f64 * cfg.encoder.mlp_ratio) as usize;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| {
                Block::register(store, &format!("decoder_blocks.{i}"), dd, cfg.decoder_num_heads, hidden, &mut rng)
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_norm = LayerNorm::register(store, "decoder_norm", dd)?;
        let decoder_pred = Linear::register(store, "decoder_pred", cfg.encoder.token_dim(), dd, &mut rng)?;
        Ok(Mae3d { cfg, encoder, decoder_embed, mask_token, decoder_pos, decoder_blocks, decoder_norm, decoder_pred })
    }

    /// Images `(N, bands, H, W)` from tokens `(N, L, u*p*p)` (a reconstruction, or any token map).
    pub fn images(&self, tokens: &[f32], batch: usize) -> Result<Vec<f32>> {
        let c = &self.cfg.encoder;
        let g = TokenGeometry::new(batch, c.bands, c.img_size.0, c.img_size.1, c.patch_size, c.t_patch_size)?;
        unpatchify(tokens, &g)
    }

    /// Tokens for showing a reconstruction: visible tokens from `input`, masked ones from `pred`
    /// (`paste_visible`), or the input with masked tokens set to `fill` (`pred = None`).
    pub fn compose(&self, input: &[f32], pred: Option<&[f32]>, m: &Masking, fill: f32) -> Result<Vec<f32>> {
        let td = self.cfg.encoder.token_dim();
        let n = m.batch * m.len * td;
        if input.len() != n || pred.is_some_and(|p| p.len() != n) {
            return Err(TensorError::Shape {
                op: "Mae3d::compose",
                msg: format!(
                    "tokens of {} values for a masking of {} x {} tokens of {td}",
                    input.len(),
                    m.batch,
                    m.len
                ),
            });
        }
        let mut out = input.to_vec();
        for (t, &masked) in m.mask.iter().enumerate() {
            if masked != 0.0 {
                let r = t * td..(t + 1) * td;
                match pred {
                    Some(p) => out[r.clone()].copy_from_slice(&p[r]),
                    None => out[r].fill(fill),
                }
            }
        }
        Ok(out)
    }

    /// The spectral-angle term of the loss, when its weight is not 0.
    pub fn spectral_angle(&self) -> Option<SpectralAngle> {
        let w = self.cfg.spectral_angle_weight;
        (w > 0.0)
            .then_some(SpectralAngle { weight: w, pixels: self.cfg.encoder.patch_size * self.cfg.encoder.patch_size })
    }

    /// Parameters of a model with a validated `cfg`, counted without building it (matches
    /// [`Mae3d::new`]).
    pub fn param_count(cfg: &MaeConfig) -> usize {
        Self::param_estimate(cfg) as usize
    }

    /// [`Mae3d::param_count`] as f64, for any config (no overflow): what [`MaeConfig::validate`]
    /// bounds.
    pub fn param_estimate(cfg: &MaeConfig) -> f64 {
        let f = |v: usize| v as f64;
        let e = &cfg.encoder;
        let (d, dd) = (f(e.embed_dim), f(cfg.decoder_embed_dim));
        let td = f(e.t_patch_size) * f(e.patch_size) * f(e.patch_size);
        let (t, h, w) = e.grid();
        // `int(Dd * mlp_ratio)` as PyTorch truncates it (saturating for absurd ratios).
        let hidden = f((dd * e.mlp_ratio) as usize);
        Vit::param_estimate(e)
            + (d * dd + dd)
            + dd
            + (f(h) * f(w) + f(t)) * dd
            + f(cfg.decoder_depth) * sg_vit::model::block_params(dd, hidden)
            + 2.0 * dd
            + (dd * td + td)
    }

    /// The forward pass on patchified `tokens (N, L, u*p*p)` (also the reconstruction target)
    /// with the given masking.
    pub fn forward<E: Exec>(&self, e: &mut E, tokens: &Value<E::B>, m: &Masking) -> Result<MaeOutput<Value<E::B>>> {
        let enc = &self.encoder;
        let (n, l) = (m.batch, m.len);
        if tokens.shape != [n, l, enc.cfg.token_dim()] {
            return Err(TensorError::Shape {
                op: "Mae3d::forward",
                msg: format!("tokens {:?} with a masking of {n} x {l}", tokens.shape),
            });
        }
        // Encoder on the visible tokens only. Intermediates are reassigned, not shadowed, so that
        // each is freed once consumed (the embedding of all tokens, the unshuffled decoder input).
        let mut x = enc.embed_kept(e, tokens, &m.ids_keep)?;
        x = enc.blocks(e, &x)?;
        let encoder_out = enc.norm.forward(e, &x)?;
        drop(x);
        // Decoder on every token: the visible ones' embeddings, the mask token elsewhere, each plus
        // its position's embedding.
        let own = self.decoder_embed.forward(e, &encoder_out, Activation::Identity)?;
        let fill = e.param(&self.mask_token)?;
        let pos = self.decoder_pos.table(e)?;
        let mut z;
        let mut blocks = self.decoder_blocks.iter();
        if n * m.keep + l < n * l {
            // A masked token's input is the same in every sample (mask token + position), so the
            // first block's norm1 and q, k, v run once per position on those rows.
            let own_pos = table_rows(e, &pos, &m.ids_keep, &own.shape)?;
            let own = e.add(&own, &own_pos)?;
            let shared = e.add_rows(&pos, &fill)?;
            z = e.unshuffle(&own, &shared, &m.ids_restore)?;
            if let Some(b) = blocks.next() {
                z = b.forward_shared(e, &z, &own, &shared, &m.ids_restore, 0.0)?;
            }
        } else {
            z = e.unshuffle(&own, &fill, &m.ids_restore)?;
            drop(own);
            z = e.add_rows(&z, &pos)?;
        }
        for b in blocks {
            z = b.forward(e, &z, 0.0)?;
        }
        z = self.decoder_norm.forward(e, &z)?;
        let pred = self.decoder_pred.forward(e, &z, Activation::Identity)?;
        drop(z);
        let (t, _, _) = enc.cfg.grid();
        let (loss, parts) = e.mae_loss(&pred, tokens, &m.mask, t, self.spectral_angle())?;
        Ok(MaeOutput { loss, parts, encoder_out, pred })
    }
}
