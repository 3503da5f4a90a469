//! Half-precision storage (`half`'s f16 and bf16): weights can be kept at half the size and widened
//! to f32 where they are used. Conversions use F16C instructions where the CPU has them.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{check_len, Result};
use crate::tensor::Tensor;

/// Element types that tensors can be stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// `dst = f16(src)` (round to nearest even).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> Result<()> {
    check_len("f32_to_f16", "dst", dst.len(), src.len())?;
    dst.convert_from_f32_slice(src);
    Ok(())
}

/// `dst = f32(src)` (exact).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) -> Result<()> {
    check_len("f16_to_f32", "dst", dst.len(), src.len())?;
    src.convert_to_f32_slice(dst);
    Ok(())
}

/// `dst = bf16(src)` (round to nearest even).
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) -> Result<()> {
    check_len("f32_to_bf16", "dst", dst.len(), src.len())?;
    dst.convert_from_f32_slice(src);
    Ok(())
}

/// `dst = f32(src)` (exact).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) -> Result<()> {
    check_len("bf16_to_f32", "dst", dst.len(), src.len())?;
    src.convert_to_f32_slice(dst);
    Ok(())
}

impl Tensor {
    /// The elements rounded to f16, in row-major order.
    pub fn to_f16(&self) -> Vec<f16> {
        let v = self.to_vec();
        let mut out = vec![f16::ZERO; v.len()];
        out.convert_from_f32_slice(&v);
        out
    }

    /// The elements rounded to bf16, in row-major order.
    pub fn to_bf16(&self) -> Vec<bf16> {
        let v = self.to_vec();
        let mut out = vec![bf16::ZERO; v.len()];
        out.convert_from_f32_slice(&v);
        out
    }

    /// An f32 tensor widened from f16 storage.
    pub fn from_f16(data: &[f16], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data.to_f32_vec(), shape)
    }

    /// An f32 tensor widened from bf16 storage.
    pub fn from_bf16(data: &[bf16], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data.to_f32_vec(), shape)
    }
}
