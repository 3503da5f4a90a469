//! The pickle virtual machine alone on arbitrary bytes (the checkpoint reader's riskiest part).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sg_tensor::pth::parse_pickle(data, "fuzz.pkl");
});
