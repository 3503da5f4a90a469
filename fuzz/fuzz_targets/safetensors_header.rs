//! safetensors files from arbitrary bytes: rejected, or every tensor readable without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sg_tensor::io::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes(data.to_vec(), "fuzz.safetensors") else { return };
    let _ = f.metadata();
    for name in f.names() {
        let _ = f.f32(&name);
        let _ = f.i64(&name);
    }
});
