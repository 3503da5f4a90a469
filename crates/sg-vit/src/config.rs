//! Model configurations: the named sizes and JSON files, checked before anything is built.

use serde_json::{json, Value as Json};
use sg_tensor::{Result, TensorError};

/// How the encoder's position embedding is parameterised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosEmbed {
    /// `pos_embed_spatial (1, h*w, D)` + `pos_embed_temporal (1, t, D)`: pretraining, and the better
    /// start for fine-tuning from a pretrained checkpoint.
    Separate,
    /// One `pos_embed (1, L, D)`: the original fine-tuning model (initialised to zero there).
    Joined,
}

/// A spectral ViT encoder (and, with `num_classes > 0`, its classification head).
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    /// Image height and width in pixels (multiples of `patch_size`).
    pub img_size: (usize, usize),
    /// Spectral bands (a multiple of `t_patch_size`).
    pub bands: usize,
    /// `p`: token height and width in pixels.
    pub patch_size: usize,
    /// `u`: consecutive bands per token.
    pub t_patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Classes of the head; 0 for an encoder without head.
    pub num_classes: usize,
    /// The original classifier pools `x[:, 1:]` although it has no class token.
    pub skip_first_token: bool,
    pub pos_embed: PosEmbed,
    /// Largest drop-path rate (linear from 0 over the blocks), training only.
    pub drop_path: f32,
    /// Dropout before the head, training only.
    pub head_dropout: f32,
}

/// The encoder sizes of SPEC.md (`tiny` is ours: small enough to pretrain on a laptop CPU).
pub fn size(name: &str) -> Option<(usize, usize, usize)> {
    match name {
        "tiny" => Some((192, 4, 3)),
        "base" => Some((768, 12, 12)),
        "large" => Some((1024, 24, 16)),
        "huge" => Some((1280, 32, 16)),
        _ => None,
    }
}

fn err(msg: String) -> TensorError {
    TensorError::Arg { op: "config", msg }
}

/// The most parameters a config may ask for: 2^33 (34 GB of f32 weights), 13 times `huge`. A
/// config file with a mistyped size is then an error naming it, not an allocation that aborts.
pub const MAX_PARAMS: f64 = 8_589_934_592.0;

/// The most tokens an image may have (`2^32`: token indices stay small and exact everywhere).
pub const MAX_TOKENS: f64 = 4_294_967_296.0;

/// Bounds a model's parameter count (as from `param_estimate`) and its token grid `(t, h, w)`.
pub fn check_size(params: f64, (t, h, w): (usize, usize, usize)) -> Result<()> {
    let tokens = t as f64 * h as f64 * w as f64;
    if tokens > MAX_TOKENS {
        return Err(err(format!(
            "{t} x {h} x {w} = {tokens:.3e} tokens per image, more than 2^32: check img_size and bands"
        )));
    }
    if params.is_nan() || params > MAX_PARAMS {
        return Err(err(format!(
            "the model would have {params:.3e} parameters ({:.3e} GB as f32), more than 2^33: check embed_dim, depth, mlp_ratio, img_size and the decoder sizes",
            params * 4e-9
        )));
    }
    Ok(())
}

impl VitConfig {
    /// A named size at `img` px with 12 bands, p = 8, u = 3, no head.
    pub fn preset(name: &str, img: usize) -> Result<Self> {
        let (embed_dim, depth, num_heads) =
            size(name).ok_or_else(|| err(format!("unknown size `{name}` (tiny, base, large, huge)")))?;
        let c = VitConfig {
            img_size: (img, img),
            bands: 12,
            patch_size: 8,
            t_patch_size: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            num_classes: 0,
            skip_first_token: false,
            pos_embed: PosEmbed::Separate,
            drop_path: 0.0,
            head_dropout: 0.0,
        };
        c.validate()?;
        Ok(c)
    }

    /// Every inconsistency named, so a bad config file fails before any allocation.
    pub fn validate(&self) -> Result<()> {
        let (h, w) = self.img_size;
        let (p, u) = (self.patch_size, self.t_patch_size);
        if p == 0 || u == 0 || h == 0 || w == 0 || self.bands == 0 {
            return Err(err(format!("sizes must be positive: img {h}x{w}, bands {}, p {p}, u {u}", self.bands)));
        }
        if h % p != 0 || w % p != 0 {
            return Err(err(format!("image {h}x{w} is not a multiple of the patch size {p}")));
        }
        if self.bands % u != 0 {
            return Err(err(format!("{} bands are not a multiple of the spectral patch {u}", self.bands)));
        }
        if self.embed_dim == 0 || self.num_heads == 0 || self.embed_dim % self.num_heads != 0 {
            return Err(err(format!("embed_dim {} does not split into {} heads", self.embed_dim, self.num_heads)));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden() == 0 {
            return Err(err(format!("mlp_ratio {} gives no hidden units", self.mlp_ratio)));
        }
        for (name, r) in [("drop_path", self.drop_path), ("head_dropout", self.head_dropout)] {
            if !(0.0..1.0).contains(&r) {
                return Err(err(format!("{name} {r} is outside [0, 1)")));
            }
        }
        check_size(crate::model::Vit::param_estimate(self), self.grid())?;
        if self.skip_first_token && self.tokens() < 2 {
            return Err(err("skip_first_token needs at least two tokens".into()));
        }
        Ok(())
    }

    /// `(t, h, w)`: spectral groups and the spatial token grid.
    pub fn grid(&self) -> (usize, usize, usize) {
        (self.bands / self.t_patch_size, self.img_size.0 / self.patch_size, self.img_size.1 / self.patch_size)
    }

    /// Tokens per image, `t * h * w`.
    pub fn tokens(&self) -> usize {
        let (t, h, w) = self.grid();
        t * h * w
    }

    /// Values per token, `u * p * p`.
    pub fn token_dim(&self) -> usize {
        self.t_patch_size * self.patch_size * self.patch_size
    }

    /// The MLP's hidden width, `int(D * mlp_ratio)` as PyTorch truncates it.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Reads the fields present in a JSON object over `self` (unknown fields are ignored, so the
    /// parity fixtures' configs and our own checkpoints' configs both read).
    pub fn update_from_json(&mut self, j: &Json) -> Result<()> {
        let get_usize = |k: &str| -> Result<Option<usize>> {
            match j.get(k) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => {
                    v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| err(format!("`{k}` must be a whole number")))
                }
            }
        };
        match j.get("img_size") {
            None => {}
            Some(Json::Array(a)) if a.len() == 2 => {
                let d: Vec<usize> = a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect();
                if d.len() != 2 {
                    return Err(err("`img_size` must be a number or [height, width]".into()));
                }
                self.img_size = (d[0], d[1]);
            }
            Some(v) => {
                let s =
                    v.as_u64().ok_or_else(|| err("`img_size` must be a number or [height, width]".into()))? as usize;
                self.img_size = (s, s);
            }
        }
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = get_usize(stringify!($f))? { self.$f = v; } )*};
        }
        set!(bands, patch_size, t_patch_size, embed_dim, depth, num_heads, num_classes);
        if let Some(v) = j.get("mlp_ratio") {
            self.mlp_ratio = v.as_f64().ok_or_else(|| err("`mlp_ratio` must be a number".into()))?;
        }
        for (k, slot) in [("drop_path", &mut self.drop_path), ("head_dropout", &mut self.head_dropout)] {
            if let Some(v) = j.get(k) {
                *slot = v.as_f64().ok_or_else(|| err(format!("`{k}` must be a number")))? as f32;
            }
        }
        if let Some(v) = j.get("skip_first_token") {
            self.skip_first_token =
                v.as_bool().ok_or_else(|| err("`skip_first_token` must be true or false".into()))?;
        }
        if let Some(v) = j.get("pos_embed") {
            self.pos_embed = match v.as_str() {
                Some("separate") => PosEmbed::Separate,
                Some("joined") => PosEmbed::Joined,
                _ => return Err(err("`pos_embed` must be \"separate\" or \"joined\"".into())),
            };
        }
        self.validate()
    }

    pub fn to_json(&self) -> Json {
        json!({
            "img_size": [self.img_size.0, self.img_size.1],
            "bands": self.bands,
            "patch_size": self.patch_size,
            "t_patch_size": self.t_patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": self.num_classes,
            "skip_first_token": self.skip_first_token,
            "pos_embed": match self.pos_embed { PosEmbed::Separate => "separate", PosEmbed::Joined => "joined" },
            "drop_path": self.drop_path,
            "head_dropout": self.head_dropout,
        })
    }
}

/// Parses JSON text into a `serde_json::Value`, naming the problem on failure.
pub fn parse_json(text: &str, what: &str) -> Result<Json> {
    serde_json::from_str(text)
        .map_err(|e| TensorError::Format { path: what.to_string(), msg: format!("invalid JSON: {e}") })
}
