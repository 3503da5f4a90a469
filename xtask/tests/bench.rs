//! `cargo xtask bench attention`: a small problem runs and reports its rates; bad options are named.
mod common;
use common::args;

#[test]
fn attention_bench_reports_rates_against_the_peak() {
    let a = args(&["--seq", "9", "--heads", "2", "--head-dim", "8", "--batch", "1", "--calls", "3"]);
    let j = xtask::bench::run("attention", &a).unwrap();
    for f in ["fwd_gflops", "bwd_gflops", "peak_gflops", "fwd_of_peak", "bwd_of_peak"] {
        let x = j[f].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{f} = {x}");
    }
    assert_eq!((j["seq"].as_u64(), j["heads"].as_u64(), j["calls"].as_u64()), (Some(9), Some(2), Some(3)));
    let e = xtask::bench::run("attention", &args(&["--seq", "0"])).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    let e = xtask::bench::run("attention", &args(&["--heads", "twelve"])).unwrap_err().to_string();
    assert!(e.contains("--heads") && e.contains("twelve"), "{e}");
    let e = xtask::bench::run("attention", &args(&["--calls"])).unwrap_err().to_string();
    assert!(e.contains("needs a value"), "{e}");
}
