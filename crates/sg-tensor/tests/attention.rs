//! Blocked attention against the textbook f64 computation, short and long sequences, separate and
//! packed QKV layouts.
mod common;
use common::*;
use proptest::prelude::*;
use sg_tensor::kernels::attention::{self, AttnShape, QkvGrad, Rows, RowsMut};

fn run(s: AttnShape, seed: u64, packed: bool) {
    let w = s.heads * s.head_dim;
    let n = s.batch * s.seq * w;
    let (q, k, v) = (data(seed, n, 1.5), data(seed ^ 1, n, 1.5), data(seed ^ 2, n, 1.0));
    let dout = data(seed ^ 3, n, 1.0);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let (want_o, _) = attention::reference::forward(&s, &q, &k, &v, scale as f64);
    let (wdq, wdk, wdv) = attention::reference::backward(&s, &q, &k, &v, &dout, scale as f64);
    // The packed layout: one buffer with rows [q | k | v].
    let mut qkv = vec![0.0; 3 * n];
    for r in 0..s.batch * s.seq {
        qkv[r * 3 * w..r * 3 * w + w].copy_from_slice(&q[r * w..(r + 1) * w]);
        qkv[r * 3 * w + w..r * 3 * w + 2 * w].copy_from_slice(&k[r * w..(r + 1) * w]);
        qkv[r * 3 * w + 2 * w..(r + 1) * 3 * w].copy_from_slice(&v[r * w..(r + 1) * w]);
    }
    on_every_isa(|isa| {
        let (qr, kr, vr) = if packed {
            (
                Rows { data: &qkv, ld: 3 * w },
                Rows { data: &qkv[w..], ld: 3 * w },
                Rows { data: &qkv[2 * w..], ld: 3 * w },
            )
        } else {
            (Rows { data: &q, ld: w }, Rows { data: &k, ld: w }, Rows { data: &v, ld: w })
        };
        // NaN-filled outputs: every value must be written (the `_new` forms rely on it).
        let mut o = vec![f32::NAN; n];
        let mut lse = vec![f32::NAN; s.batch * s.heads * s.seq];
        attention::forward(s, qr, kr, vr, scale, RowsMut { data: &mut o, ld: w }, Some(&mut lse)).unwrap();
        let e = max_err(&o, &want_o);
        assert!(e <= 2e-6, "{isa:?} {s:?} forward {e}");
        let mut o2 = vec![f32::NAN; n];
        attention::forward(s, qr, kr, vr, scale, RowsMut { data: &mut o2, ld: w }, None).unwrap();
        assert_eq!(o, o2, "inference form differs");
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let mut dqkv = vec![f32::NAN; 3 * n];
        let grads = if packed {
            QkvGrad::Packed(&mut dqkv)
        } else {
            QkvGrad::Separate {
                dq: RowsMut { data: &mut dq, ld: w },
                dk: RowsMut { data: &mut dk, ld: w },
                dv: RowsMut { data: &mut dv, ld: w },
            }
        };
        let orow = Rows { data: &o, ld: w };
        attention::backward(s, qr, kr, vr, orow, Rows { data: &dout, ld: w }, &lse, scale, grads).unwrap();
        if packed {
            for r in 0..s.batch * s.seq {
                dq[r * w..(r + 1) * w].copy_from_slice(&dqkv[r * 3 * w..r * 3 * w + w]);
                dk[r * w..(r + 1) * w].copy_from_slice(&dqkv[r * 3 * w + w..r * 3 * w + 2 * w]);
                dv[r * w..(r + 1) * w].copy_from_slice(&dqkv[r * 3 * w + 2 * w..(r + 1) * 3 * w]);
            }
        }
        for (name, got, want) in [("dq", &dq, &wdq), ("dk", &dk, &wdk), ("dv", &dv, &wdv)] {
            // Inputs are O(1): errors are measured against max(|want|, 1).
            let e = rel_to_max_floor(got, want, 1.0);
            assert!(e <= 2e-5, "{isa:?} {s:?} {name} {e}");
        }
        // Into new (unzeroed) buffers: the same bits.
        let (o_new, lse_new) = attention::forward_new(s, qr, kr, vr, scale, true).unwrap();
        assert!(same_bits(&o_new, &o) && same_bits(&lse_new.unwrap(), &lse), "{isa:?} {s:?} forward_new");
        let (o_new, none) = attention::forward_new(s, qr, kr, vr, scale, false).unwrap();
        assert!(same_bits(&o_new, &o) && none.is_none());
        let g = attention::backward_new(s, qr, kr, vr, orow, Rows { data: &dout, ld: w }, &lse, scale).unwrap();
        assert_eq!(g.len(), 3 * n);
        for r in 0..s.batch * s.seq {
            let row = &g[r * 3 * w..(r + 1) * 3 * w];
            let rows = r * w..(r + 1) * w;
            assert!(
                same_bits(&row[..w], &dq[rows.clone()])
                    && same_bits(&row[w..2 * w], &dk[rows.clone()])
                    && same_bits(&row[2 * w..], &dv[rows]),
                "{isa:?} {s:?} backward_new row {r}"
            );
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn attention_matches_f64(seed in seed(), batch in 1usize..3, seq in 1usize..80, heads in 1usize..4,
                             head_dim in prop::sample::select(vec![1usize, 7, 16, 64]), packed in any::<bool>()) {
        run(AttnShape { batch, seq, heads, head_dim }, seed, packed);
    }
}

#[test]
fn long_sequences_use_several_tiles() {
    // More than one query tile and more than one key tile (online softmax across key tiles).
    run(AttnShape { batch: 1, seq: 300, heads: 2, head_dim: 16 }, 42, false);
    run(AttnShape { batch: 2, seq: 577, heads: 1, head_dim: 8 }, 7, true);
}

#[test]
fn bad_attention_shapes_are_errors() {
    let s = AttnShape { batch: 1, seq: 4, heads: 2, head_dim: 4 };
    let x = vec![0.0; 32];
    let mut o = vec![0.0; 31];
    let e = attention::forward(
        s,
        Rows { data: &x, ld: 8 },
        Rows { data: &x, ld: 8 },
        Rows { data: &x, ld: 8 },
        1.0,
        RowsMut { data: &mut o, ld: 8 },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`out` has 31 elements"), "{e}");
    let mut o = vec![0.0; 32];
    let e = attention::forward(
        s,
        Rows { data: &x, ld: 6 },
        Rows { data: &x, ld: 8 },
        Rows { data: &x, ld: 8 },
        1.0,
        RowsMut { data: &mut o, ld: 8 },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("row stride 6"), "{e}");
}
