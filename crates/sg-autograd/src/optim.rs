//! Optimisers, learning-rate schedules and gradient clipping over the flat parameter buffer.
//!
//! Each parameter has a [`Group`]: a learning-rate scale (layer-wise decay) and a weight decay
//! (0 for biases and 1-D parameters, as timm's `param_groups_weight_decay` and the original's
//! training scripts do). Updates follow PyTorch's `AdamW` and `SGD` operation for operation.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use sg_tensor::io::{self, NamedTensor, SafetensorsFile};
use sg_tensor::kernels::adamw;
use sg_tensor::{ParamStore, Result, TensorError};

/// Per-parameter optimisation settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr_scale: f32,
    pub weight_decay: f32,
}

/// Weight decay `wd` for every parameter except biases, 1-D parameters (norms) and names in `skip`.
pub fn weight_decay_groups(store: &ParamStore, wd: f32, skip: &[&str]) -> Vec<Group> {
    store
        .entries()
        .iter()
        .map(|e| {
            let no_decay = e.param.shape.len() <= 1 || e.name.ends_with(".bias") || skip.contains(&e.name.as_str());
            Group { lr_scale: 1.0, weight_decay: if no_decay { 0.0 } else { wd } }
        })
        .collect()
}

/// The layer a parameter belongs to for layer-wise lr decay (BEiT's rule): embeddings 0, encoder
/// block `i` is `i + 1`, everything after the blocks (final norm, head) `depth + 1`.
pub fn layer_id(name: &str, depth: usize) -> usize {
    let embeddings = ["pos_embed", "cls_token", "patch_embed", "mask_token"];
    if embeddings.iter().any(|p| name.starts_with(p)) {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// Multiplies each group's lr scale by `decay^(depth + 1 - layer_id)`.
pub fn apply_layer_decay(store: &ParamStore, groups: &mut [Group], depth: usize, decay: f32) {
    for (g, e) in groups.iter_mut().zip(store.entries()) {
        g.lr_scale *= decay.powi((depth + 1 - layer_id(&e.name, depth).min(depth + 1)) as i32);
    }
}

/// Linear warm-up from 0, then half-cosine from `base_lr` to `min_lr`, per step (the original's
/// per-iteration schedule at fractional epochs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Scales the gradients of trainable parameters so that their global L2 norm is at most
/// `max_norm` (PyTorch's `clip_grad_norm_`, with its 1e-6 guard); returns the norm before clipping.
pub fn clip_grad_norm(store: &ParamStore, grads: &mut [f32], max_norm: f64) -> Result<f64> {
    if grads.len() != store.len() {
        return Err(TensorError::Length {
            op: "clip_grad_norm",
            arg: "grads",
            expected: store.len(),
            got: grads.len(),
        });
    }
    let sq: f64 = store
        .entries()
        .iter()
        .filter(|e| e.trainable)
        .map(|e| sg_tensor::kernels::reduce::sum_sq(&grads[e.param.range()]))
        .sum();
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for e in store.entries().iter().filter(|e| e.trainable) {
            sg_tensor::kernels::elementwise::scale(&mut grads[e.param.range()], coef as f32);
        }
    }
    Ok(norm)
}

fn check_layout(op: &'static str, store: &ParamStore, groups: usize, grads: usize) -> Result<()> {
    if groups != store.entries().len() {
        return Err(TensorError::Arg { op, msg: format!("{groups} groups for {} parameters", store.entries().len()) });
    }
    if grads != store.len() {
        return Err(TensorError::Length { op, arg: "grads", expected: store.len(), got: grads });
    }
    Ok(())
}

/// AdamW with decoupled weight decay.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub groups: Vec<Group>,
    /// First and second moments, laid out like the parameters.
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// Steps taken.
    pub step: u64,
    /// Per store entry: whether [`AdamW::fold`] has taken its gradient for the coming [`AdamW::apply`].
    folded: Vec<bool>,
}

impl AdamW {
    /// Betas (0.9, 0.95) and eps 1e-8 are the original's pretraining settings.
    pub fn new(store: &ParamStore, groups: Vec<Group>, beta1: f32, beta2: f32, eps: f32) -> Result<Self> {
        check_layout("AdamW::new", store, groups.len(), store.len())?;
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            groups,
            exp_avg: vec![0.0; store.len()],
            exp_avg_sq: vec![0.0; store.len()],
            step: 0,
            folded: vec![false; store.entries().len()],
        })
    }

    /// One update of every trainable parameter at learning rate `lr` (times its group's scale).
    pub fn step(&mut self, store: &mut ParamStore, grads: &[f32], lr: f64) -> Result<()> {
        check_layout("AdamW::step", store, self.groups.len(), grads.len())?;
        if self.exp_avg.len() != store.len() {
            return Err(TensorError::Arg { op: "AdamW::step", msg: "state laid out for another model".into() });
        }
        if self.folded.iter().any(|&f| f) {
            return Err(TensorError::Arg {
                op: "AdamW::step",
                msg: "gradients were folded: finish with `apply`".into(),
            });
        }
        self.step += 1;
        let entries: Vec<_> = store.entries().iter().map(|e| (e.param.range(), e.trainable)).collect();
        let data = store.data_mut();
        for ((r, trainable), g) in entries.into_iter().zip(&self.groups) {
            if !trainable {
                continue;
            }
            let h = self.hyper(lr * g.lr_scale as f64, g.weight_decay);
            adamw::step(
                &h,
                &mut data[r.clone()],
                &grads[r.clone()],
                &mut self.exp_avg[r.clone()],
                &mut self.exp_avg_sq[r],
            )?;
        }
        Ok(())
    }

    /// Folds the final gradient `grad` of the parameters at `range` of the flat layout (whole store
    /// entries, as [`crate::Tape::backward_fold`] hands them over) into the moments: the first half
    /// of [`AdamW::step`], which [`AdamW::apply`] completes with the same bits. Frozen entries in
    /// the range are left alone.
    pub fn fold(&mut self, store: &ParamStore, range: Range<usize>, grad: &[f32]) -> Result<()> {
        let op = "AdamW::fold";
        if self.exp_avg.len() != store.len() || self.folded.len() != store.entries().len() {
            return Err(TensorError::Arg { op, msg: "state laid out for another model".into() });
        }
        if grad.len() != range.len() || range.end > store.len() {
            return Err(TensorError::Arg {
                op,
                msg: format!("a gradient of {} values for range {range:?} of {}", grad.len(), store.len()),
            });
        }
        let h = self.hyper(0.0, 0.0);
        for (i, e) in store.entries().iter().enumerate() {
            let r = e.param.range();
            if r.end <= range.start || r.start >= range.end || !e.trainable {
                continue;
            }
            if r.start < range.start || r.end > range.end {
                return Err(TensorError::Arg { op, msg: format!("range {range:?} cuts parameter `{}`", e.name) });
            }
            if self.folded[i] {
                return Err(TensorError::Arg { op, msg: format!("`{}` was folded twice in one step", e.name) });
            }
            let g = &grad[r.start - range.start..r.end - range.start];
            adamw::moments(&h, g, &mut self.exp_avg[r.clone()], &mut self.exp_avg_sq[r])?;
            self.folded[i] = true;
        }
        Ok(())
    }

    /// Completes a step whose gradients went through [`AdamW::fold`]: a trainable entry that
    /// received none folds a zero gradient (as [`AdamW::step`] sees a zeroed one), then every
    /// trainable parameter takes its update at learning rate `lr` (times its group's scale).
    pub fn apply(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        check_layout("AdamW::apply", store, self.groups.len(), store.len())?;
        if self.exp_avg.len() != store.len() || self.folded.len() != store.entries().len() {
            return Err(TensorError::Arg { op: "AdamW::apply", msg: "state laid out for another model".into() });
        }
        self.step += 1;
        let entries: Vec<_> = store.entries().iter().map(|e| (e.param.range(), e.trainable)).collect();
        let data = store.data_mut();
        for (i, ((r, trainable), g)) in entries.into_iter().zip(&self.groups).enumerate() {
            if !trainable {
                continue;
            }
            let h = self.hyper(lr * g.lr_scale as f64, g.weight_decay);
            if !std::mem::take(&mut self.folded[i]) {
                let zeros = vec![0.0; r.len()];
                adamw::moments(&h, &zeros, &mut self.exp_avg[r.clone()], &mut self.exp_avg_sq[r.clone()])?;
            }
            adamw::apply(&h, &mut data[r.clone()], &self.exp_avg[r.clone()], &self.exp_avg_sq[r])?;
        }
        Ok(())
    }

    /// The kernel's settings for the step about to be taken (`step` counts from 1; a fold before
    /// the first step sees 1, which its moments do not use).
    fn hyper(&self, lr: f64, weight_decay: f32) -> adamw::AdamW {
        adamw::AdamW {
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay,
            step: self.step.max(1),
        }
    }

    /// Saves the moments (`exp_avg.<name>`, `exp_avg_sq.<name>`) and the step count, atomically.
    pub fn save(&self, path: impl AsRef<Path>, store: &ParamStore) -> Result<()> {
        let mut tensors = Vec::new();
        for e in store.entries() {
            let r = e.param.range();
            tensors.push(NamedTensor {
                name: format!("exp_avg.{}", e.name),
                shape: e.param.shape.clone(),
                data: &self.exp_avg[r.clone()],
            });
            tensors.push(NamedTensor {
                name: format!("exp_avg_sq.{}", e.name),
                shape: e.param.shape.clone(),
                data: &self.exp_avg_sq[r],
            });
        }
        let meta = HashMap::from([
            ("optimizer".to_string(), "adamw".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("betas".to_string(), format!("{},{}", self.beta1, self.beta2)),
            ("eps".to_string(), self.eps.to_string()),
        ]);
        io::save(path, &tensors, &meta)
    }

    /// Restores moments and step count saved by [`AdamW::save`] for the same parameters.
    pub fn load(&mut self, path: impl AsRef<Path>, store: &ParamStore) -> Result<()> {
        let f = SafetensorsFile::open(path.as_ref())?;
        let bad = |msg: String| TensorError::Format { path: path.as_ref().display().to_string(), msg };
        let meta = f.metadata();
        if meta.get("optimizer").map(String::as_str) != Some("adamw") {
            return Err(bad("is not an AdamW state".into()));
        }
        let step = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("has no step count".into()))?;
        for e in store.entries() {
            for (prefix, buf) in [("exp_avg", &mut self.exp_avg), ("exp_avg_sq", &mut self.exp_avg_sq)] {
                let (shape, data) = f.f32(&format!("{prefix}.{}", e.name))?;
                if shape != e.param.shape {
                    return Err(bad(format!(
                        "`{prefix}.{}` has shape {shape:?}, expected {:?}",
                        e.name, e.param.shape
                    )));
                }
                buf[e.param.range()].copy_from_slice(&data);
            }
        }
        self.step = step;
        // Loaded state starts a fresh step: nothing folded into it yet.
        self.folded.iter_mut().for_each(|f| *f = false);
        Ok(())
    }
}

/// SGD with momentum and coupled (L2) weight decay, as `torch.optim.SGD` (dampening 0).
#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f32,
    pub nesterov: bool,
    pub groups: Vec<Group>,
    pub momentum_buf: Vec<f32>,
    pub step: u64,
}

impl Sgd {
    pub fn new(store: &ParamStore, groups: Vec<Group>, momentum: f32, nesterov: bool) -> Result<Self> {
        check_layout("Sgd::new", store, groups.len(), store.len())?;
        Ok(Sgd { momentum, nesterov, groups, momentum_buf: vec![0.0; store.len()], step: 0 })
    }

    pub fn step(&mut self, store: &mut ParamStore, grads: &[f32], lr: f64) -> Result<()> {
        check_layout("Sgd::step", store, self.groups.len(), grads.len())?;
        let first = self.step == 0;
        self.step += 1;
        let entries: Vec<_> = store.entries().iter().map(|e| (e.param.range(), e.trainable)).collect();
        let data = store.data_mut();
        for ((r, trainable), g) in entries.into_iter().zip(&self.groups) {
            if !trainable {
                continue;
            }
            let lr = (lr * g.lr_scale as f64) as f32;
            for i in r {
                let mut d = grads[i] + g.weight_decay * data[i];
                if self.momentum != 0.0 {
                    let b = &mut self.momentum_buf[i];
                    // PyTorch starts the buffer at the first gradient rather than at zero.
                    *b = if first { d } else { self.momentum * *b + d };
                    d = if self.nesterov { d + self.momentum * *b } else { *b };
                }
                data[i] -= lr * d;
            }
        }
        Ok(())
    }
}
