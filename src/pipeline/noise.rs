//! Seeded, reproducible Gaussian noise for initial latents and ancestral sampling.
//!
//! The generator is fixed and documented so that any implementation (see
//! `scripts/reference_sd.py`) reproduces it bit for bit: SplitMix64 seeded with the seed, and
//! Box-Muller (cosine branch only; two 64-bit draws per normal) computed in f64 and rounded to f32:
//!
//! ```text
//! u1 = ((next() >> 11) + 1) * 2^-53          in (0, 1]
//! u2 = (next() >> 11) * 2^-53                in [0, 1)
//! z  = sqrt(-2 ln u1) * cos(2 pi u2)
//! ```
//!
//! Image `i` of a request with seed `s` uses `s + i` (wrapping) for its initial latents,
//! `(s + i) ^ ANCESTRAL_STREAM_KEY` for the noise an ancestral sampler adds at each step, and
//! `(s + i) ^ VAE_ENCODE_STREAM_KEY` to sample its image-to-image latents from the VAE
//! encoder's distribution.

/// XOR-ed into an image's seed to derive its ancestral-noise stream.
pub const ANCESTRAL_STREAM_KEY: u64 = 0xA5A5_A5A5_A5A5_A5A5;

/// XOR-ed into an image's seed to derive the noise of its VAE-encoder sample (img2img).
pub const VAE_ENCODE_STREAM_KEY: u64 = 0x3C3C_3C3C_3C3C_3C3C;

/// SplitMix64 with a Box-Muller normal sampler.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    state: u64,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// One standard normal sample.
    pub fn normal(&mut self) -> f32 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * SCALE;
        let u2 = (self.next_u64() >> 11) as f64 * SCALE;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.normal();
        }
    }
}

/// Standard-normal initial noise for `num_images` images of `per_image` values each,
/// image `i` drawn from seed `seed + i`.
pub fn initial_noise(seed: u64, num_images: usize, per_image: usize) -> Vec<f32> {
    let mut out = vec![0.0; num_images * per_image];
    for (i, chunk) in out.chunks_mut(per_image.max(1)).enumerate() {
        NoiseRng::new(seed.wrapping_add(i as u64)).fill_normal(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let a = initial_noise(7, 2, 4096);
        let b = initial_noise(7, 2, 4096);
        assert_eq!(a, b);
        assert_ne!(a[..4096], a[4096..]);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 from seed 0: the published reference sequence.
        let mut r = NoiseRng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
