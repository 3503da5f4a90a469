//! safetensors in and out, under the original parameter names.
//!
//! Reading accepts f32, f16, bf16 and f64 tensors (widened or narrowed to f32) and i64 index
//! tensors; every failure names the file and the tensor. Writing is atomic: a temporary file beside
//! the target, flushed to disk, then renamed over it, so an interrupted save never leaves a torn file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Result, TensorError};
use crate::params::ParamStore;

fn io_err(path: &Path, e: impl std::fmt::Display) -> TensorError {
    TensorError::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), msg: msg.into() }
}

/// A safetensors file read into memory.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    /// Reads and validates the header (a truncated or corrupt file is an error here, not later).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        SafeTensors::deserialize(&bytes).map_err(|e| fmt_err(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafetensorsFile { path, bytes })
    }

    /// Parses bytes already in memory (`path` only names them in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        SafeTensors::deserialize(&bytes).map_err(|e| fmt_err(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafetensorsFile { path, bytes })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated when opened")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st().names().into_iter().map(|s| s.to_string()).collect();
        n.sort();
        n
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    /// The header's free-form metadata (`__metadata__`).
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default()
    }

    fn view(&self, name: &str) -> Result<(TensorView<'_>, Vec<usize>)> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| fmt_err(&self.path, e.to_string()))?;
        let v = st.tensor(name).map_err(|_| fmt_err(&self.path, format!("has no tensor `{name}`")))?;
        let shape = v.shape().to_vec();
        // Re-borrow from the bytes we own: `TensorView` borrows `self.bytes`, not `st`.
        let v = TensorView::new(v.dtype(), shape.clone(), v.data())
            .map_err(|e| fmt_err(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok((v, shape))
    }

    /// A floating-point tensor as f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (v, shape) = self.view(name)?;
        let d = v.data();
        let out: Vec<f32> = match v.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F64 => d.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => {
                let h: Vec<half::f16> = d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
                h.to_f32_vec()
            }
            Dtype::BF16 => {
                let h: Vec<half::bf16> = d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect();
                h.to_f32_vec()
            }
            other => return Err(fmt_err(&self.path, format!("tensor `{name}` is {other:?}, not a float type"))),
        };
        Ok((shape, out))
    }

    /// An integer tensor (i64 or i32) as i64, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (v, shape) = self.view(name)?;
        let d = v.data();
        let out = match v.dtype() {
            Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I32 => d.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect(),
            other => return Err(fmt_err(&self.path, format!("tensor `{name}` is {other:?}, not an integer type"))),
        };
        Ok((shape, out))
    }
}

/// What [`load_params`] matched.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Parameters of the store that the file lacks.
    pub missing: Vec<String>,
    /// Tensors of the file that the store lacks.
    pub unexpected: Vec<String>,
}

/// Loads every parameter of `store` whose name (after `prefix`, e.g. `"param."` in the parity
/// fixtures) is in the file. A tensor of the wrong shape is always an error; missing parameters
/// are an error when `strict`. The report lists what matched and what did not.
pub fn load_params(store: &mut ParamStore, file: &SafetensorsFile, prefix: &str, strict: bool) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let names: Vec<(String, crate::params::ParamRef)> =
        store.entries().iter().map(|e| (e.name.clone(), e.param.clone())).collect();
    for (name, p) in &names {
        let key = format!("{prefix}{name}");
        if !file.contains(&key) {
            report.missing.push(name.clone());
            continue;
        }
        let (shape, data) = file.f32(&key)?;
        if shape != p.shape {
            return Err(fmt_err(
                file.path(),
                format!("tensor `{key}` has shape {shape:?}, the model's `{name}` has {:?}", p.shape),
            ));
        }
        store.values_mut(p).copy_from_slice(&data);
        report.loaded.push(name.clone());
    }
    for n in file.names() {
        if let Some(stripped) = n.strip_prefix(prefix) {
            if store.get(stripped).is_none() {
                report.unexpected.push(n.clone());
            }
        }
    }
    if strict && !report.missing.is_empty() {
        return Err(fmt_err(file.path(), format!("lacks parameters the model needs: {}", report.missing.join(", "))));
    }
    Ok(report)
}

/// An f32 tensor to write.
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes f32 tensors and metadata to `path` atomically.
pub fn save(path: impl AsRef<Path>, tensors: &[NamedTensor], metadata: &HashMap<String, String>) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    for (t, b) in tensors.iter().zip(&bytes) {
        let v =
            TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| fmt_err(path, format!("`{}`: {e}", t.name)))?;
        views.push((t.name.clone(), v));
    }
    let meta = if metadata.is_empty() { None } else { Some(metadata.clone()) };
    let out = safetensors::serialize(views, meta).map_err(|e| fmt_err(path, e.to_string()))?;
    write_atomic(path, &out)
}

/// Every parameter of `store` under its name, with `metadata`.
pub fn save_params(path: impl AsRef<Path>, store: &ParamStore, metadata: &HashMap<String, String>) -> Result<()> {
    let tensors: Vec<NamedTensor> = store
        .entries()
        .iter()
        .map(|e| NamedTensor { name: e.name.clone(), shape: e.param.shape.clone(), data: store.values(&e.param) })
        .collect();
    save(path, &tensors, metadata)
}

/// Writes `bytes` to `path` through a temporary file beside it, synced before the rename: a crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = path.file_name().ok_or_else(|| io_err(path, "not a file path"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced (best effort where unsupported).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}
