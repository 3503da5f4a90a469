//! The decoder's unshuffle through an executor: kept rows go back to their positions, masked
//! positions take the fill row or, from a `(len, d)` table, their own position's row; wrong fills
//! are shape errors. The CPU backend and the f64 reference agree.

use sg_tensor::backend::{Backend, Cpu, CpuF64};
use sg_tensor::{Eval, Exec, ParamStore, TensorError};

/// Two samples of four tokens, two kept each; `restore[n * 4 + l]` is the kept row of token `l`
/// or (>= 2) a masked one.
const RESTORE: [usize; 8] = [2, 0, 3, 1, 1, 3, 0, 2];

fn run<B: Backend>(be: B, fill: &[f32], fill_shape: &[usize]) -> sg_tensor::Result<Vec<f64>> {
    let store = ParamStore::new();
    let mut e = Eval::new(be.clone(), &store);
    // x (2, 2, 3): sample n, kept row r holds 100n + 10r + j.
    let x: Vec<f32> =
        (0..2).flat_map(|n| (0..2).flat_map(move |r| (0..3).map(move |j| (100 * n + 10 * r + j) as f32))).collect();
    let x = e.constant(&x, &[2, 2, 3])?;
    let fill = e.constant(fill, fill_shape)?;
    let y = e.unshuffle(&x, &fill, &RESTORE)?;
    assert_eq!(y.shape, [2, 4, 3]);
    Ok(be.download(&y.buf))
}

fn expected(table: bool) -> Vec<f64> {
    let mut y = Vec::new();
    for n in 0..2 {
        for l in 0..4 {
            let r = RESTORE[n * 4 + l];
            for j in 0..3 {
                y.push(if r < 2 {
                    (100 * n + 10 * r + j) as f64
                } else if table {
                    (-10 * l as i64 - j as i64) as f64
                } else {
                    -(j as f64) - 0.5
                });
            }
        }
    }
    y
}

#[test]
fn one_fill_row_or_a_row_per_position() {
    let row = [-0.5, -1.5, -2.5];
    let table: Vec<f32> = (0..4).flat_map(|l| (0..3).map(move |j| (-10 * l - j) as f32)).collect();
    assert_eq!(run(Cpu, &row, &[3]).unwrap(), expected(false));
    assert_eq!(run(CpuF64, &row, &[3]).unwrap(), expected(false));
    assert_eq!(run(Cpu, &table, &[4, 3]).unwrap(), expected(true));
    assert_eq!(run(CpuF64, &table, &[4, 3]).unwrap(), expected(true));
}

#[test]
fn a_fill_of_another_length_is_a_shape_error() {
    for (fill, shape) in [(vec![0.0; 2], vec![2]), (vec![0.0; 9], vec![3, 3]), (vec![0.0; 15], vec![5, 3])] {
        match run(Cpu, &fill, &shape) {
            Err(TensorError::Shape { op, .. }) => assert_eq!(op, "unshuffle"),
            other => panic!("fill {shape:?}: expected a shape error, got {other:?}"),
        }
    }
}
