//! The one checksum MS-HRL uses: the bitwise NOT of a wrapping 32-bit byte sum.

/// Lanes of the vectorisable kernel: 32 × u16 fill two 256-bit registers.
const LANES: usize = 32;
/// Rows added into u16 lanes before they could overflow: 256 × 255 = 65 280 < 65 536.
const ROWS: usize = 256;

/// The wrapping sum of all bytes of `data`, as a `u32`.
///
/// Written so that the compiler vectorises it: bytes are added into 32 independent 16-bit
/// lanes, 256 rows at a time (which cannot overflow), then folded into the 32-bit total.
/// It measures about 5× a plain byte loop on data in cache (see the crate README).
pub fn byte_sum(data: &[u8]) -> u32 {
    let mut total = 0u32;
    let mut blocks = data.chunks_exact(LANES * ROWS);
    for block in &mut blocks {
        let mut lanes = [0u16; LANES];
        for row in block.chunks_exact(LANES) {
            for (lane, &b) in lanes.iter_mut().zip(row) {
                *lane += u16::from(b);
            }
        }
        total = total.wrapping_add(lanes.iter().map(|&l| u32::from(l)).sum::<u32>());
    }
    blocks
        .remainder()
        .iter()
        .fold(total, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// The MS-HRL checksum of `data`: `!byte_sum(data)`.
///
/// This is the `DataChecksum` of a payload. An empty buffer gives `0xFFFF_FFFF`.
///
/// ```
/// assert_eq!(lifeboat_hrl::checksum(&[0xAB; 512]), 0xFFFE_A9FF);
/// ```
pub fn checksum(data: &[u8]) -> u32 {
    !byte_sum(data)
}

/// The MS-HRL checksum of a structure whose own 4-byte checksum field sits at `field`:
/// those four bytes count as zero.
pub(crate) fn checksum_skipping(data: &[u8], field: usize) -> u32 {
    let skipped = data[field..field + 4]
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)));
    !byte_sum(data).wrapping_sub(skipped)
}

/// The obviously-correct reference: one byte at a time.
#[cfg(test)]
pub(crate) fn naive_byte_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for &b in data {
        sum = sum.wrapping_add(u32::from(b));
    }
    sum
}
