//! The one error type of `sg-tensor`: every public function that takes user data checks it and
//! names the operation and the offending shapes instead of panicking.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum TensorError {
    /// A buffer's length disagrees with the dimensions given for it.
    Length { op: &'static str, arg: &'static str, expected: usize, got: usize },
    /// Shapes or dimensions that cannot be combined.
    Shape { op: &'static str, msg: String },
    /// An index outside the axis it indexes.
    Index { op: &'static str, index: usize, len: usize },
    /// A scalar argument outside its domain.
    Arg { op: &'static str, msg: String },
    /// A file that could not be read or written.
    Io { path: String, msg: String },
    /// A file whose contents are not what they should be (corrupt, wrong names or shapes).
    Format { path: String, msg: String },
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorError::Length { op, arg, expected, got } => {
                write!(f, "{op}: `{arg}` has {got} elements, expected {expected}")
            }
            TensorError::Shape { op, msg } => write!(f, "{op}: {msg}"),
            TensorError::Index { op, index, len } => {
                write!(f, "{op}: index {index} is out of range for an axis of length {len}")
            }
            TensorError::Arg { op, msg } => write!(f, "{op}: {msg}"),
            TensorError::Io { path, msg } => write!(f, "{path}: {msg}"),
            TensorError::Format { path, msg } => write!(f, "{path}: {msg}"),
        }
    }
}

impl std::error::Error for TensorError {}

pub type Result<T> = std::result::Result<T, TensorError>;

/// `Err` unless `buf` holds exactly `expected` elements.
pub(crate) fn check_len(op: &'static str, arg: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(TensorError::Length { op, arg, expected, got })
    }
}

/// `Err` unless `buf` holds at least `expected` elements (strided operands may be longer).
pub(crate) fn check_min_len(op: &'static str, arg: &'static str, got: usize, expected: usize) -> Result<()> {
    if got >= expected {
        Ok(())
    } else {
        Err(TensorError::Length { op, arg, expected, got })
    }
}

/// The product of dimensions, or an error if it overflows `usize`.
pub(crate) fn checked_numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TensorError::Shape { op, msg: format!("dimensions {dims:?} overflow the address space") })
}
