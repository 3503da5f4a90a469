//! Kernel benchmarks on ViT-B shapes (SpectralGPT base: D 768, 12 heads x 64, MLP 3072; batch 8 of
//! 57 visible tokens at 96 px and mask 0.9, or 576 tokens unmasked). Throughput is counted in
//! floating-point operations, so criterion's "elem/s" reads as FLOP/s.
//!
//!     cargo xtask bench kernels [FILTER]

use criterion::{criterion_group, criterion_main, Bencher, BenchmarkId, Criterion, Throughput};
use sg_tensor::kernels::attention::{self, AttnShape, QkvGrad, Rows, RowsMut};
use sg_tensor::kernels::gemm::{gemm, Trans};
use sg_tensor::kernels::{gelu, layernorm, softmax};
use sg_tensor::Dst;
use std::time::Duration;

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
}

/// Times `f` with criterion's whole loop on one of `p`'s threads, as inference calls its kernels
/// (`par::install`). Called from outside the pool, each call would also pay for waking a worker and
/// for the caller's sleep on a latch until the work is done.
fn in_pool<R: Send>(b: &mut Bencher, p: &rayon::ThreadPool, mut f: impl FnMut() -> R + Send) {
    p.install(|| b.iter(&mut f))
}

fn threads() -> Vec<usize> {
    let max = std::thread::available_parallelism().map_or(1, |n| n.get());
    if max > 1 {
        vec![1, max]
    } else {
        vec![1]
    }
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    // (name, in, out) of the encoder's Linear layers: fused qkv, fc1, fc2.
    let layers = [("qkv", 768, 2304), ("fc1", 768, 3072), ("fc2", 3072, 768)];
    for m in [8 * 57, 8 * 576] {
        for (name, k, n) in layers {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let dy = data(m * n, 3);
            let mut y = vec![0.0; m * n];
            let mut dx = vec![0.0; m * k];
            let mut dw = vec![0.0; n * k];
            g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
            for t in threads() {
                let p = pool(t);
                let id = |pass: &str| BenchmarkId::new(format!("{pass}/{name}/t{t}"), format!("m{m}k{k}n{n}"));
                g.bench_function(id("fwd_NT"), |b| {
                    in_pool(b, &p, || gemm(Trans::N, Trans::T, m, n, k, 1.0, &x, k, &w, k, 0.0, &mut y, n).unwrap())
                });
                g.bench_function(id("dx_NN"), |b| {
                    in_pool(b, &p, || gemm(Trans::N, Trans::N, m, k, n, 1.0, &dy, n, &w, k, 0.0, &mut dx, k).unwrap())
                });
                g.bench_function(id("dw_TN"), |b| {
                    in_pool(b, &p, || gemm(Trans::T, Trans::N, n, k, m, 1.0, &dy, n, &x, k, 1.0, &mut dw, k).unwrap())
                });
            }
        }
    }
    g.finish();
}

fn bench_rows(c: &mut Criterion) {
    let mut g = c.benchmark_group("rows");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let t = *threads().last().unwrap();
    let p = pool(t);
    let n = 8 * 57 * 3072;
    let x = data(n, 4);
    let dy = data(n, 5);
    let mut y = vec![0.0; n];
    // GELU costs far more than one flop per element; count elements, the figure reads as elem/s.
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("gelu_fwd/t{t}/n{n}"), |b| in_pool(b, &p, || gelu::forward(&x, &mut y).unwrap()));
    g.bench_function(format!("gelu_bwd/t{t}/n{n}"), |b| {
        in_pool(b, &p, || gelu::backward(&x, &dy, &mut y, Dst::Overwrite).unwrap())
    });
    for rows in [8 * 57, 8 * 576] {
        let d = 768;
        let (x, dy) = (data(rows * d, 6), data(rows * d, 7));
        let (gamma, beta) = (data(d, 8), data(d, 9));
        let (mut y, mut dx) = (vec![0.0; rows * d], vec![0.0; rows * d]);
        let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
        let (mut dg, mut db) = (vec![0.0; d], vec![0.0; d]);
        g.throughput(Throughput::Elements((rows * d) as u64));
        g.bench_function(format!("layernorm_fwd/t{t}/{rows}x{d}"), |b| {
            in_pool(b, &p, || {
                layernorm::forward(&x, &gamma, &beta, rows, 1e-6, &mut y, Some((&mut mean, &mut rstd))).unwrap()
            })
        });
        g.bench_function(format!("layernorm_bwd/t{t}/{rows}x{d}"), |b| {
            in_pool(b, &p, || {
                layernorm::backward(&x, &gamma, &mean, &rstd, &dy, &mut dx, Dst::Overwrite, &mut dg, &mut db).unwrap()
            })
        });
    }
    for seq in [57, 576] {
        let rows = 8 * 12 * seq;
        let mut s = data(rows * seq, 10);
        g.throughput(Throughput::Elements((rows * seq) as u64));
        g.bench_function(format!("softmax/t{t}/{rows}x{seq}"), |b| {
            in_pool(b, &p, || softmax::forward_inplace(&mut s, rows, seq).unwrap())
        });
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    // Encoder (57 visible tokens, 12 x 64) and decoder (576 tokens, 16 x 32) of the base model, and
    // the encoder at 576 tokens (fine-tuning, no masking).
    for (seq, heads, hd) in [(57, 12, 64), (576, 12, 64), (576, 16, 32)] {
        let s = AttnShape { batch: 8, seq, heads, head_dim: hd };
        let w = heads * hd;
        let qkv = data(8 * seq * 3 * w, 11);
        let dout = data(8 * seq * w, 12);
        let mut o = vec![0.0; 8 * seq * w];
        let mut lse = vec![0.0; 8 * heads * seq];
        let mut dqkv = vec![0.0; qkv.len()];
        let scale = 1.0 / (hd as f32).sqrt();
        for t in threads() {
            let p = pool(t);
            let (q, k, v) = (
                Rows { data: &qkv, ld: 3 * w },
                Rows { data: &qkv[w..], ld: 3 * w },
                Rows { data: &qkv[2 * w..], ld: 3 * w },
            );
            g.throughput(Throughput::Elements(s.forward_flops() as u64));
            g.bench_function(format!("fwd/t{t}/b8h{heads}s{seq}d{hd}"), |b| {
                in_pool(b, &p, || {
                    attention::forward(s, q, k, v, scale, RowsMut { data: &mut o, ld: w }, Some(&mut lse)).unwrap()
                })
            });
            // Backward: five tile products (scores recomputed, dV, dP, dQ, dK) = 2.5x the forward.
            g.throughput(Throughput::Elements((2.5 * s.forward_flops()) as u64));
            g.bench_function(format!("bwd/t{t}/b8h{heads}s{seq}d{hd}"), |b| {
                in_pool(b, &p, || {
                    attention::backward(
                        s,
                        q,
                        k,
                        v,
                        Rows { data: &o, ld: w },
                        Rows { data: &dout, ld: w },
                        &lse,
                        scale,
                        QkvGrad::Packed(&mut dqkv),
                    )
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

/// The machine's FMA peak at the moment (`simd::fma_probe`: register-only FMA chains). This
/// machine's peak is not a constant (a shared host: on one core, stretches of milliseconds to
/// seconds at 2/3 of the usual 103 GFLOP/s were seen), so kernel rates are best read against this
/// figure from the same run, or with `cargo xtask bench attention`, which alternates the two.
fn bench_peak(c: &mut Criterion) {
    let mut g = c.benchmark_group("peak");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    // About a millisecond per call, so that waking the second thread is noise; timed on a pool
    // thread (with one thread, no wake-up at all: from outside the pool, waking the worker for
    // each 0.2 ms call read as a peak of 68).
    let n = 500_000;
    let flops = sg_tensor::simd::fma_probe(1).0 * n as f64;
    for t in threads() {
        let p = pool(t);
        g.throughput(Throughput::Elements((t as f64 * flops) as u64));
        g.bench_function(format!("fma/t{t}"), |b| {
            in_pool(b, &p, || sg_tensor::par::on_every_thread(|| sg_tensor::simd::fma_probe(n).1))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_peak, bench_gemm, bench_rows, bench_attention);
criterion_main!(benches);
