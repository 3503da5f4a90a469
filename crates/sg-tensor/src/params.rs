//! Parameters in one flat buffer with named ranges, under their original PyTorch names.
//!
//! Gradients and optimiser moments live in buffers of the same length at the same offsets, so an
//! optimiser step is one pass over flat memory, and parameters registered next to each other (a
//! block's q, k and v weights) can be used as one fused matrix without a copy.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{checked_numel, Result, TensorError};

/// A parameter or a contiguous span of parameters: where it lies in the flat buffer and its shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamRef {
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl ParamRef {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// One named parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub param: ParamRef,
    /// Frozen parameters get no gradient and no update.
    pub trainable: bool,
}

/// Named parameters over one flat f32 buffer.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    /// Shared so that a CPU executor uses the weights in place; writers copy only if it is shared.
    data: Arc<Vec<f32>>,
    entries: Vec<ParamInfo>,
    by_name: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` more scalars: a model that knows its size registers its parameters without
    /// the buffer being copied as it grows (which would briefly hold it twice).
    pub fn reserve(&mut self, n: usize) {
        Arc::make_mut(&mut self.data).reserve_exact(n);
    }

    /// Registers `name` with `shape`, filled with `values` (which must hold the shape's element count).
    pub fn add(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<ParamRef> {
        let n = checked_numel("ParamStore::add", shape)?;
        if values.len() != n {
            return Err(TensorError::Shape {
                op: "ParamStore::add",
                msg: format!("`{name}` has shape {shape:?} ({n} elements) but {} values", values.len()),
            });
        }
        if self.by_name.contains_key(name) {
            return Err(TensorError::Arg { op: "ParamStore::add", msg: format!("`{name}` is registered twice") });
        }
        let p = ParamRef { offset: self.data.len(), shape: shape.to_vec() };
        Arc::make_mut(&mut self.data).extend_from_slice(&values);
        self.by_name.insert(name.to_string(), self.entries.len());
        self.entries.push(ParamInfo { name: name.to_string(), param: p.clone(), trainable: true });
        Ok(p)
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).as_mut_slice()
    }

    /// The values, the store given up (no copy unless an executor still shares them).
    pub fn into_data(self) -> Vec<f32> {
        Arc::try_unwrap(self.data).unwrap_or_else(|shared| shared.as_ref().clone())
    }

    /// The shared storage itself (what the CPU backend computes on, without a copy).
    pub fn shared(&self) -> &Arc<Vec<f32>> {
        &self.data
    }

    pub fn entries(&self) -> &[ParamInfo] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The parameter called `name`, or an error naming it.
    pub fn find(&self, name: &str) -> Result<ParamRef> {
        self.get(name)
            .map(|e| e.param.clone())
            .ok_or_else(|| TensorError::Arg { op: "ParamStore::find", msg: format!("no parameter named `{name}`") })
    }

    pub fn values(&self, p: &ParamRef) -> &[f32] {
        &self.data[p.range()]
    }

    pub fn values_mut(&mut self, p: &ParamRef) -> &mut [f32] {
        &mut Arc::make_mut(&mut self.data)[p.range()]
    }

    /// Freezes (or unfreezes) every parameter whose name starts with `prefix`; returns how many.
    pub fn set_trainable(&mut self, prefix: &str, trainable: bool) -> usize {
        let mut n = 0;
        for e in self.entries.iter_mut().filter(|e| e.name.starts_with(prefix)) {
            e.trainable = trainable;
            n += 1;
        }
        n
    }

    /// Adjacent parameters of equal trailing shape used as one, stacked along the first axis (q, k
    /// and v weights as one `(3D, D)` matrix); an error if they are not adjacent in the buffer.
    pub fn concat(&self, parts: &[&ParamRef]) -> Result<ParamRef> {
        let op = "ParamStore::concat";
        let first = parts.first().ok_or_else(|| TensorError::Arg { op, msg: "nothing to concatenate".into() })?;
        let tail = &first.shape[1.min(first.shape.len())..];
        let mut rows = 0;
        let mut next = first.offset;
        for p in parts {
            if p.offset != next || p.shape.is_empty() || &p.shape[1..] != tail {
                return Err(TensorError::Shape {
                    op,
                    msg: format!("parameters at {:?} are not adjacent with equal trailing shapes", parts),
                });
            }
            rows += p.shape[0];
            next = p.offset + p.len();
        }
        let mut shape = vec![rows];
        shape.extend_from_slice(tail);
        Ok(ParamRef { offset: first.offset, shape })
    }
}

/// A parameter store's values kept as f16 or bf16 (half the memory of the f32 store), laid out like
/// the store so the same [`ParamRef`]s address them. An inference executor widens each parameter
/// to f32 only while an op uses it ([`crate::exec::Eval::half`]).
#[derive(Clone, Debug)]
pub struct HalfParams {
    data: HalfData,
}

#[derive(Clone, Debug)]
enum HalfData {
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl HalfParams {
    /// `store`'s values rounded to `dtype` (F16 or BF16; round to nearest even).
    pub fn from_store(store: &ParamStore, dtype: crate::DType) -> Result<Self> {
        let src = store.data();
        let data = match dtype {
            crate::DType::F16 => {
                let mut v = vec![half::f16::ZERO; src.len()];
                crate::dtype::f32_to_f16(src, &mut v)?;
                HalfData::F16(v)
            }
            crate::DType::BF16 => {
                let mut v = vec![half::bf16::ZERO; src.len()];
                crate::dtype::f32_to_bf16(src, &mut v)?;
                HalfData::BF16(v)
            }
            crate::DType::F32 => {
                return Err(TensorError::Arg { op: "HalfParams::from_store", msg: "F32 is not a half type".into() })
            }
        };
        Ok(HalfParams { data })
    }

    pub fn dtype(&self) -> crate::DType {
        match self.data {
            HalfData::F16(_) => crate::DType::F16,
            HalfData::BF16(_) => crate::DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            HalfData::F16(v) => v.len(),
            HalfData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.len()
    }

    /// Parameter `p`'s values widened to f32, appended to `out`.
    pub fn widen_into(&self, p: &ParamRef, out: &mut Vec<f32>) -> Result<()> {
        let r = p.range();
        if r.end > self.len() {
            return Err(TensorError::Index { op: "HalfParams::widen_into", index: r.end, len: self.len() });
        }
        let start = out.len();
        out.resize(start + r.len(), 0.0);
        match &self.data {
            HalfData::F16(v) => crate::dtype::f16_to_f32(&v[r], &mut out[start..]),
            HalfData::BF16(v) => crate::dtype::bf16_to_f32(&v[r], &mut out[start..]),
        }
    }
}
