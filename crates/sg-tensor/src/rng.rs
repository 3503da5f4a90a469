//! A small deterministic random stream (SplitMix64) shared by model initialisation (xavier-uniform
//! Linear weights, normal embeddings, as the original) and data augmentation: a seed fixes a model,
//! a mask and an augmented batch, whatever the thread count.

/// A deterministic random stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` values of `xavier_uniform_` for a `(fan_out, fan_in)` matrix.
    pub fn xavier(&mut self, fan_out: usize, fan_in: usize) -> Vec<f32> {
        let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
        (0..fan_out * fan_in).map(|_| ((self.uniform() * 2.0 - 1.0) * bound) as f32).collect()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A generator for a sub-stream (say, sample `i` of epoch `e`): independent of draw order.
    pub fn derive(seed: u64, parts: &[u64]) -> Rng {
        let mut r = Rng::new(seed);
        for &p in parts {
            r = Rng::new(r.next_u64() ^ p.wrapping_mul(0xD1B5_4A32_D192_ED03));
        }
        r
    }

    /// `n` values of normal(0, std).
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}
