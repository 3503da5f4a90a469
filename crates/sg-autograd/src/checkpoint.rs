//! A training checkpoint is a directory: `checkpoint.safetensors` (parameters under their original
//! names), `optimizer.safetensors` (AdamW moments) and `config.json` (the model configuration).
//! Each file is written atomically and carries the step it belongs to, so that a crash between two
//! files is detected on load instead of mixing two checkpoints.

use std::collections::HashMap;
use std::path::Path;

use sg_tensor::io::{self, SafetensorsFile};
use sg_tensor::{ParamStore, Result, TensorError};

use crate::optim::AdamW;

pub const PARAMS: &str = "checkpoint.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const CONFIG: &str = "config.json";

/// Writes parameters, optimiser state (if any) and the configuration JSON for `step` into `dir`.
/// `extra` metadata (epoch, data position, ...) is stored with the parameters.
pub fn save(
    dir: impl AsRef<Path>,
    store: &ParamStore,
    optimizer: Option<&AdamW>,
    config_json: &str,
    step: u64,
    extra: &HashMap<String, String>,
) -> Result<()> {
    let dir = dir.as_ref();
    if let Some(o) = optimizer {
        o.save(dir.join(OPTIMIZER), store)?;
    }
    let mut meta = extra.clone();
    meta.insert("step".into(), step.to_string());
    meta.insert("config".into(), config_json.to_string());
    io::save_params(dir.join(PARAMS), store, &meta)?;
    // Written last: a directory with a config.json holds a complete checkpoint.
    io::write_atomic(dir.join(CONFIG), config_json.as_bytes())
}

/// What [`load`] found besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub step: u64,
    pub config_json: String,
    pub metadata: HashMap<String, String>,
}

/// Loads parameters (strictly: every parameter of `store` must be present with its shape) and, when
/// given, the optimiser state, checking that both belong to the same step.
pub fn load(dir: impl AsRef<Path>, store: &mut ParamStore, optimizer: Option<&mut AdamW>) -> Result<Loaded> {
    let dir = dir.as_ref();
    let f = SafetensorsFile::open(dir.join(PARAMS))?;
    io::load_params(store, &f, "", true)?;
    let metadata = f.metadata();
    let bad = |msg: String| TensorError::Format { path: dir.join(PARAMS).display().to_string(), msg };
    let step: u64 = metadata.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("has no step".into()))?;
    let config_json = metadata.get("config").cloned().unwrap_or_default();
    if let Some(o) = optimizer {
        o.load(dir.join(OPTIMIZER), store)?;
        if o.step != step {
            return Err(bad(format!("is from step {step} but {OPTIMIZER} from step {}: an interrupted save", o.step)));
        }
    }
    Ok(Loaded { step, config_json, metadata })
}
