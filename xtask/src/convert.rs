//! `cargo xtask convert IN.pth OUT.safetensors`: the `model` entry of an original SpectralGPT
//! checkpoint as safetensors, under this project's names (a `module.` prefix dropped, a fused
//! `attn.qkv` split into q, k, v). Entries that are not tensors are skipped and listed.

use std::collections::HashMap;
use std::path::Path;

use sg_tensor::io::{save, NamedTensor};
use sg_tensor::pth::{normalise_names, Checkpoint};
use sg_tensor::Result;

/// What a conversion wrote and skipped.
pub struct Converted {
    pub tensors: usize,
    pub scalars: usize,
    pub skipped: Vec<String>,
}

pub fn run(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<Converted> {
    let input = input.as_ref();
    let mut ck = Checkpoint::open(input)?;
    let (tensors, skipped) = ck.state_dict()?;
    let tensors = normalise_names(tensors);
    let named: Vec<NamedTensor> =
        tensors.iter().map(|t| NamedTensor { name: t.name.clone(), shape: t.shape.clone(), data: &t.data }).collect();
    let mut meta = HashMap::from([("source".to_string(), input.display().to_string())]);
    if let Some(sg_tensor::pth::PyValue::Int(e)) = ck.root.get("epoch") {
        meta.insert("epoch".into(), e.to_string());
    }
    save(output, &named, &meta)?;
    Ok(Converted { tensors: tensors.len(), scalars: tensors.iter().map(|t| t.data.len()).sum(), skipped })
}
