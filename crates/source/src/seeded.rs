//! One seeded generator for jitter, tests, benches and demos.

use serde::{Deserialize, Serialize};

/// A small, seedable, serialisable generator (SplitMix64, Steele, Lea and Flood 2014).
///
/// Not cryptographic, and not meant to be: it spreads retries apart and makes test, bench
/// and demo inputs that are the same on every run. Its state is one `u64`, so a driver can
/// persist it with the rest of its state.
///
/// ```
/// use lifeboat_source::SplitMix64;
///
/// let mut g = SplitMix64::new(1);
/// let (a, b) = (g.next_u64(), g.next_u64());
/// assert_ne!(a, b);
/// assert!(g.below(10) < 10);
/// assert_eq!(SplitMix64::new(1).next_u64(), a);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0). Modulo bias is below 2^-40 for `n` under
    /// 2^24, which is all tests and jitter need.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A fraction in `[0, 1)` with 53 random bits.
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fills `buf` with pseudo-random bytes (eight per step, little-endian).
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&self.next_u64().to_le_bytes()[..n]);
        }
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.fill(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference outputs of SplitMix64 for seed 1234567 (from the published C code),
    /// so retry jitter and every seeded input stay what they were.
    #[test]
    fn matches_the_reference_sequence() {
        let mut g = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(
            got,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423
            ]
        );
    }

    #[test]
    fn fill_is_the_words_in_order() {
        let mut a = SplitMix64::new(9);
        let words: Vec<u8> = (0..3).flat_map(|_| a.next_u64().to_le_bytes()).collect();
        for len in [0, 1, 7, 8, 9, 23, 24] {
            assert_eq!(SplitMix64::new(9).bytes(len), words[..len], "len {len}");
        }
    }

    #[test]
    fn below_and_fraction_stay_in_range() {
        let mut g = SplitMix64::new(3);
        for n in [0, 1, 2, 1000] {
            assert!(g.below(n) < n.max(1));
        }
        for _ in 0..1000 {
            let f = g.fraction();
            assert!((0.0..1.0).contains(&f));
        }
        assert!(!SplitMix64::new(5).chance(0));
        assert!(SplitMix64::new(5).chance(100));
    }
}
