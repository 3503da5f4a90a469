//! Masking from arbitrary noise and ratios: an error, or a mask with the documented invariants.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sg_mae3d::Masking;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let batch = (data[0] % 4) as usize;
    let ratio = f64::from(data[1]) / 200.0 - 0.1; // [-0.1, 1.175]: out-of-range ratios included
    let noise: Vec<f32> = data[2..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let len = if batch == 0 { noise.len() } else { noise.len() / batch };
    let Ok(m) = Masking::from_noise(&noise[..batch * len], batch, len, ratio) else { return };
    assert_eq!(m.keep, (len as f64 * (1.0 - ratio)) as usize);
    for n in 0..batch {
        for (pos, &tok) in m.ids_shuffle[n * len..(n + 1) * len].iter().enumerate() {
            assert_eq!(m.ids_restore[n * len + tok], pos);
        }
        let removed = m.mask[n * len..(n + 1) * len].iter().filter(|&&v| v == 1.0).count();
        assert_eq!(removed, len - m.keep);
    }
});
