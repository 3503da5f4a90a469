//! Gathers and scatters of rows along the token axis: keeping the visible tokens (masking),
//! restoring the original order (unshuffle), and their backwards (scatter-add).
//!
//! Buffers are `(batch, len, dim)` row-major; `ids` is `(batch, count)` and indexes the `len` axis.

use crate::error::{check_len, Result, TensorError};
use crate::par;

fn check_ids(op: &'static str, ids: &[usize], len: usize) -> Result<()> {
    match ids.iter().find(|&&i| i >= len) {
        Some(&index) => Err(TensorError::Index { op, index, len }),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    op: &'static str,
    src: usize,
    dst: usize,
    ids: usize,
    batch: usize,
    len: usize,
    count: usize,
    dim: usize,
) -> Result<()> {
    check_len(op, "ids", ids, batch * count)?;
    check_len(op, "src", src, batch * len * dim)?;
    check_len(op, "dst", dst, batch * count * dim)
}

/// `dst[b, i, :] = src[b, ids[b, i], :]`; `src` is `(batch, len, dim)`, `dst` `(batch, count, dim)`.
pub fn gather_rows(src: &[f32], batch: usize, len: usize, dim: usize, ids: &[usize], dst: &mut [f32]) -> Result<()> {
    let count = ids.len().checked_div(batch).unwrap_or(0);
    check("gather_rows", src.len(), dst.len(), ids.len(), batch, len, count, dim)?;
    check_ids("gather_rows", ids, len)?;
    if dim == 0 || count == 0 {
        return Ok(());
    }
    let parallel = dst.len() > 2 * super::STREAM_CHUNK && par::can_split();
    par::chunks_mut(dst, count * dim, parallel, |b, d| {
        let s = &src[b * len * dim..(b + 1) * len * dim];
        for (row, &id) in d.chunks_exact_mut(dim).zip(&ids[b * count..(b + 1) * count]) {
            row.copy_from_slice(&s[id * dim..(id + 1) * dim]);
        }
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn scatter(
    op: &'static str,
    src: &[f32],
    batch: usize,
    len: usize,
    dim: usize,
    ids: &[usize],
    dst: &mut [f32],
    add: bool,
) -> Result<()> {
    let count = ids.len().checked_div(batch).unwrap_or(0);
    // Here `src` is the short `(batch, count, dim)` side and `dst` the long one.
    check(op, dst.len(), src.len(), ids.len(), batch, len, count, dim)?;
    check_ids(op, ids, len)?;
    if dim == 0 || count == 0 {
        return Ok(());
    }
    let parallel = dst.len() > 2 * super::STREAM_CHUNK && par::can_split();
    par::chunks_mut(dst, len * dim, parallel, |b, d| {
        let s = &src[b * count * dim..(b + 1) * count * dim];
        for (row, &id) in s.chunks_exact(dim).zip(&ids[b * count..(b + 1) * count]) {
            let out = &mut d[id * dim..(id + 1) * dim];
            if add {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            } else {
                out.copy_from_slice(row);
            }
        }
    });
    Ok(())
}

/// `dst[b, ids[b, i], :] = src[b, i, :]`; rows of `dst` not named by `ids` are left as they are.
pub fn scatter_rows(src: &[f32], batch: usize, len: usize, dim: usize, ids: &[usize], dst: &mut [f32]) -> Result<()> {
    scatter("scatter_rows", src, batch, len, dim, ids, dst, false)
}

/// `dst[b, ids[b, i], :] += src[b, i, :]`: the backward of [`gather_rows`] (repeated ids add up).
pub fn scatter_add_rows(
    src: &[f32],
    batch: usize,
    len: usize,
    dim: usize,
    ids: &[usize],
    dst: &mut [f32],
) -> Result<()> {
    scatter("scatter_add_rows", src, batch, len, dim, ids, dst, true)
}
