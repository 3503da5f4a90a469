//! safetensors round trips, the real parity fixtures, and bad files.
use std::collections::HashMap;

use sg_tensor::io::{load_params, save_params, write_atomic, SafetensorsFile};
use sg_tensor::ParamStore;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity").join(name)
}

/// A new empty directory, removed when dropped (also when the test fails).
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sg-io-{tag}-")).tempdir().unwrap()
}

#[test]
fn reads_the_parity_fixture() {
    let f = SafetensorsFile::open(fixture("mae3d_tiny.safetensors")).unwrap();
    let meta = f.metadata();
    assert!(meta["config"].contains("\"embed_dim\": 64"), "{meta:?}");
    let (shape, w) = f.f32("param.patch_embed.proj.weight").unwrap();
    assert_eq!(shape, vec![64, 1, 3, 8, 8]);
    assert_eq!(w.len(), 64 * 192);
    let (shape, ids) = f.i64("output.ids_restore").unwrap();
    assert_eq!(shape, vec![2, 16]);
    let mut sorted = ids[..16].to_vec();
    sorted.sort();
    assert_eq!(sorted, (0..16).collect::<Vec<i64>>(), "ids_restore is a permutation");
    assert!(f.f32("output.ids_restore").is_err(), "an integer tensor is not a float tensor");
    let e = f.f32("param.nope").unwrap_err().to_string();
    assert!(e.contains("mae3d_tiny.safetensors") && e.contains("param.nope"), "{e}");
}

#[test]
fn params_round_trip_and_report_mismatches() {
    let tmp = tmpdir("rt");
    let d = tmp.path();
    let mut s = ParamStore::new();
    s.add("a.weight", &[2, 3], (0..6).map(|v| v as f32).collect()).unwrap();
    s.add("a.bias", &[2], vec![7.0, 8.0]).unwrap();
    let meta = HashMap::from([("config".to_string(), "{\"x\": 1}".to_string())]);
    let path = d.join("m.safetensors");
    save_params(&path, &s, &meta).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata(), meta);

    let mut t = ParamStore::new();
    t.add("a.weight", &[2, 3], vec![0.0; 6]).unwrap();
    t.add("a.bias", &[2], vec![0.0; 2]).unwrap();
    t.add("head.weight", &[1, 2], vec![0.0; 2]).unwrap();
    let r = load_params(&mut t, &f, "", false).unwrap();
    assert_eq!(t.data()[..8], s.data()[..]);
    assert_eq!(r.missing, vec!["head.weight".to_string()]);
    let e = load_params(&mut t, &f, "", true).unwrap_err().to_string();
    assert!(e.contains("head.weight"), "{e}");

    let mut wrong = ParamStore::new();
    wrong.add("a.weight", &[3, 2], vec![0.0; 6]).unwrap();
    let e = load_params(&mut wrong, &f, "", false).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
}

#[test]
fn corrupt_and_missing_files_are_errors() {
    let tmp = tmpdir("bad");
    let d = tmp.path();
    let p = d.join("junk.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = SafetensorsFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("junk.safetensors") && e.contains("not a valid safetensors"), "{e}");
    // A truncated real file.
    let bytes = std::fs::read(fixture("vit_cls_tiny.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(SafetensorsFile::open(&p).is_err());
    assert!(SafetensorsFile::open(d.join("absent.safetensors")).is_err());
}

#[test]
fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
    let tmp = tmpdir("atomic");
    let d = tmp.path();
    let p = d.join("ck.bin");
    write_atomic(&p, b"first").unwrap();
    write_atomic(&p, b"second").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second");
    let names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
