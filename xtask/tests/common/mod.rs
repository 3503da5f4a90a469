//! Helpers shared by the xtask test files (each file is its own crate and uses a part of them).
#![allow(dead_code)]

use std::path::PathBuf;

/// Command-line arguments as the commands take them.
pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A path for a run's output, not yet created, inside a temporary directory that is removed when
/// the guard drops (also when the test fails).
pub fn tmp(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::Builder::new().prefix(&format!("sg-{tag}-")).tempdir().unwrap();
    let p = d.path().join("out");
    (d, p)
}
