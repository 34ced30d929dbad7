//! Shared input generators for the Lifeboat benches.

/// Deterministic pseudo-random bytes (the workspace's one seeded generator), so every run
/// benches the same input.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    lifeboat_source::SplitMix64::new(seed).bytes(len)
}
