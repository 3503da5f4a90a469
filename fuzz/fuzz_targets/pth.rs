//! PyTorch checkpoints (zip + pickle + storages) from arbitrary bytes: an error or tensors, never a
//! panic or an unbounded allocation. Seed the corpus with fixtures/parity/mae3d_tiny_checkpoint.pth.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sg_tensor::pth::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut c) = Checkpoint::from_bytes(data.to_vec(), "fuzz.pth") {
        let _ = c.state_dict();
    }
});
