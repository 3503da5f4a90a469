//! patchify / unpatchify on arbitrary geometries: errors or an exact round trip, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sg_vit::tokens::{patchify, unpatchify, TokenGeometry};

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    // Raw dimensions, unvalidated: the geometry check must reject the bad ones.
    let d = |i: usize| data[i] as usize;
    let (batch, bands, height, width, p, u) = (d(0) % 4, d(1) % 40, d(2) % 40, d(3) % 40, d(4) % 9, d(5) % 7);
    let Ok(g) = TokenGeometry::new(batch, bands, height, width, p, u) else { return };
    let x: Vec<f32> = (0..g.image_len()).map(|i| data[i % data.len()] as f32 + i as f32 * 0.5).collect();
    let t = patchify(&x, &g).expect("valid geometry");
    assert_eq!(t.len(), batch * g.tokens() * g.token_dim());
    assert_eq!(unpatchify(&t, &g).expect("valid geometry"), x);
    // A buffer of the wrong length is an error.
    assert!(patchify(&x[..x.len().saturating_sub(1)], &g).is_err() || x.is_empty());
    // Arbitrary large dimensions never panic.
    let big =
        |i: usize| u64::from_le_bytes([data[i], data[(i + 1) % data.len()], 0, 0, data[6], 0, 0, data[0] & 1]) as usize;
    let _ = TokenGeometry::new(big(0), big(1), big(2), big(3), big(4).max(1), big(5).max(1));
});
