//! `Tensor`: an f32 array view — shape, strides and offset over shared contiguous storage. Reshape
//! of a contiguous tensor, transpose, permute and narrow are O(1) views; `contiguous` copies only
//! when the layout requires it. Kernels work on slices; tensors are the convenient edge for users.

use std::sync::Arc;

use crate::error::{checked_numel, Result, TensorError};
use crate::kernels::gemm::{gemm, Trans};

#[derive(Clone, Debug)]
pub struct Tensor {
    data: Arc<Vec<f32>>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl PartialEq for Tensor {
    /// Equal shapes and equal elements (NaN never equals).
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && self.to_vec() == other.to_vec()
    }
}

impl Tensor {
    /// A tensor owning `data` in row-major order.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        let n = checked_numel("Tensor::from_vec", shape)?;
        if n != data.len() {
            return Err(TensorError::Shape {
                op: "Tensor::from_vec",
                msg: format!("{} elements cannot have shape {shape:?} ({n} elements)", data.len()),
            });
        }
        Ok(Tensor { data: Arc::new(data), strides: contiguous_strides(shape), shape: shape.to_vec(), offset: 0 })
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Result<Self> {
        let n = checked_numel("Tensor::full", shape)?;
        Self::from_vec(vec![value; n], shape)
    }

    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, 0.0)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements lie in row-major order without gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }

    /// The elements as one slice, when contiguous.
    pub fn as_slice(&self) -> Option<&[f32]> {
        self.is_contiguous().then(|| &self.data[self.offset..self.offset + self.numel()])
    }

    /// Mutable elements, copying first if the storage is shared or the layout is not contiguous.
    pub fn make_mut(&mut self) -> &mut [f32] {
        if !self.is_contiguous() || self.offset != 0 || self.data.len() != self.numel() {
            *self = self.contiguous_copy();
        }
        Arc::make_mut(&mut self.data).as_mut_slice()
    }

    /// The elements in row-major order.
    pub fn to_vec(&self) -> Vec<f32> {
        if let Some(s) = self.as_slice() {
            return s.to_vec();
        }
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_offset(|o| out.push(self.data[o]));
        out
    }

    fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        if self.numel() == 0 {
            return;
        }
        let nd = self.ndim();
        if nd == 0 {
            f(self.offset);
            return;
        }
        let mut idx = vec![0usize; nd];
        let (last, ls) = (self.shape[nd - 1], self.strides[nd - 1]);
        loop {
            let base = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>();
            for j in 0..last {
                f(base + j * ls);
            }
            // Odometer over all but the last axis.
            let mut ax = nd - 1;
            loop {
                if ax == 0 {
                    return;
                }
                ax -= 1;
                idx[ax] += 1;
                if idx[ax] < self.shape[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
    }

    fn contiguous_copy(&self) -> Tensor {
        Tensor {
            data: Arc::new(self.to_vec()),
            strides: contiguous_strides(&self.shape),
            shape: self.shape.clone(),
            offset: 0,
        }
    }

    /// This tensor with row-major layout: itself (shared) when already contiguous, else a copy.
    pub fn contiguous(&self) -> Tensor {
        if self.is_contiguous() {
            self.clone()
        } else {
            self.contiguous_copy()
        }
    }

    /// The same elements with another shape, as a view; an error if not contiguous.
    pub fn view(&self, shape: &[usize]) -> Result<Tensor> {
        let n = checked_numel("Tensor::view", shape)?;
        if n != self.numel() {
            return Err(TensorError::Shape {
                op: "Tensor::view",
                msg: format!("shape {:?} ({} elements) cannot become {shape:?} ({n})", self.shape, self.numel()),
            });
        }
        if !self.is_contiguous() {
            return Err(TensorError::Shape {
                op: "Tensor::view",
                msg: format!("a non-contiguous tensor of shape {:?} needs `reshape` (a copy)", self.shape),
            });
        }
        Ok(Tensor {
            data: self.data.clone(),
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: self.offset,
        })
    }

    /// Like [`Tensor::view`], copying first when the layout is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        self.contiguous().view(shape)
    }

    /// Axes reordered: output axis `i` is input axis `perm[i]` (a view).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let nd = self.ndim();
        let mut seen = vec![false; nd];
        if perm.len() != nd || perm.iter().any(|&p| p >= nd || std::mem::replace(&mut seen[p], true)) {
            return Err(TensorError::Shape {
                op: "Tensor::permute",
                msg: format!("{perm:?} is not a permutation of the {nd} axes of {:?}", self.shape),
            });
        }
        Ok(Tensor {
            data: self.data.clone(),
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// Axes `a` and `b` swapped (a view).
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let mut perm: Vec<usize> = (0..self.ndim()).collect();
        if a >= perm.len() || b >= perm.len() {
            return Err(TensorError::Shape {
                op: "Tensor::transpose",
                msg: format!("axes ({a}, {b}) of a {}-d tensor", self.ndim()),
            });
        }
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// `len` entries of axis `dim` from `start` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.ndim() || start.checked_add(len).is_none_or(|e| e > self.shape[dim]) {
            return Err(TensorError::Shape {
                op: "Tensor::narrow",
                msg: format!("{start}..{start}+{len} on axis {dim} of shape {:?}", self.shape),
            });
        }
        let mut t = self.clone();
        t.offset += start * self.strides[dim];
        t.shape[dim] = len;
        Ok(t)
    }

    /// One element.
    pub fn get(&self, index: &[usize]) -> Result<f32> {
        if index.len() != self.ndim() {
            return Err(TensorError::Shape {
                op: "Tensor::get",
                msg: format!("index {index:?} for shape {:?}", self.shape),
            });
        }
        let mut o = self.offset;
        for ((&i, &d), &s) in index.iter().zip(&self.shape).zip(&self.strides) {
            if i >= d {
                return Err(TensorError::Index { op: "Tensor::get", index: i, len: d });
            }
            o += i * s;
        }
        Ok(self.data[o])
    }

    /// How a 2-d view is handed to GEMM without a copy: (layout, leading dimension, data from offset).
    fn gemm_operand(&self) -> (Trans, usize, Tensor) {
        let (r, c) = (self.shape[0], self.shape[1]);
        let (rs, cs) = (self.strides[0], self.strides[1]);
        if cs == 1 || c == 1 {
            (Trans::N, rs.max(c), self.clone())
        } else if rs == 1 || r == 1 {
            (Trans::T, cs.max(r), self.clone())
        } else {
            let t = self.contiguous_copy();
            (Trans::N, c, t)
        }
    }

    /// Matrix product of two 2-d tensors, or a batched product of two 3-d tensors with equal batch.
    /// Transposed views go to GEMM as they are, without a copy.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let op = "Tensor::matmul";
        match (self.ndim(), other.ndim()) {
            (2, 2) => {
                let (m, k, n) = (self.shape[0], self.shape[1], other.shape[1]);
                if other.shape[0] != k {
                    return Err(TensorError::Shape { op, msg: format!("{:?} x {:?}", self.shape, other.shape) });
                }
                let mut out = vec![0f32; m * n];
                let (ta, lda, a) = self.gemm_operand();
                let (tb, ldb, b) = other.gemm_operand();
                gemm(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    1.0,
                    &a.data[a.offset..],
                    lda,
                    &b.data[b.offset..],
                    ldb,
                    0.0,
                    &mut out,
                    n.max(1),
                )?;
                Tensor::from_vec(out, &[m, n])
            }
            (3, 3) => {
                if self.shape[0] != other.shape[0] {
                    return Err(TensorError::Shape {
                        op,
                        msg: format!("batch of {:?} x {:?}", self.shape, other.shape),
                    });
                }
                let mut outs = Vec::new();
                for b in 0..self.shape[0] {
                    let a = self.narrow(0, b, 1)?.squeeze0();
                    let o = other.narrow(0, b, 1)?.squeeze0();
                    outs.extend(a.matmul(&o)?.to_vec());
                }
                Tensor::from_vec(outs, &[self.shape[0], self.shape[1], other.shape[2]])
            }
            _ => Err(TensorError::Shape {
                op,
                msg: format!("needs 2-d or 3-d operands, got {:?} x {:?}", self.shape, other.shape),
            }),
        }
    }

    /// Drops a leading axis of length 1.
    fn squeeze0(mut self) -> Tensor {
        self.shape.remove(0);
        self.strides.remove(0);
        self
    }

    /// Converts from an `ndarray` array (any layout).
    #[cfg(feature = "ndarray")]
    pub fn from_ndarray<S: ndarray::Data<Elem = f32>, D: ndarray::Dimension>(a: &ndarray::ArrayBase<S, D>) -> Tensor {
        let shape = a.shape().to_vec();
        let data: Vec<f32> = a.iter().copied().collect();
        Tensor::from_vec(data, &shape).expect("ndarray shapes match their element count")
    }

    /// Converts to an owned `ndarray` array of dynamic rank.
    #[cfg(feature = "ndarray")]
    pub fn to_ndarray(&self) -> ndarray::ArrayD<f32> {
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.shape), self.to_vec())
            .expect("element count matches shape")
    }
}
