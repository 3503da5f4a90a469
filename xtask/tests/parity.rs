//! Every parity fixture in `fixtures/parity` reproduces, forward and backward.

#[test]
fn every_fixture_reproduces_the_pytorch_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let report = xtask::parity::run(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(c) = report.checks.iter().find(|c| !c.passed()) {
                panic!("{}: {} off by {:.3e} ({:.1} x tolerance)", path.display(), c.name, c.max_abs_err, c.ratio);
            }
            assert!(report.checks.len() > 20, "{} compared only {} tensors", path.display(), report.checks.len());
            n += 1;
        }
    }
    assert_eq!(n, 4, "expected the four parity fixtures");
}

#[test]
fn broken_fixtures_are_clear_errors() {
    let tmp = tempfile::Builder::new().prefix("sg-parity-").tempdir().unwrap();
    let dir = tmp.path();
    let p = dir.join("empty.safetensors");
    sg_tensor::io::save(&p, &[], &Default::default()).unwrap();
    let e = xtask::parity::run(&p).unwrap_err().to_string();
    assert!(e.contains("config"), "{e}");
}
