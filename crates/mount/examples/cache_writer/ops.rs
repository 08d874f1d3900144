//! The writes of `cache_writer`, shared with the test that checks them.

/// Chunk size of the mount (the test uses the same).
pub const CHUNK: u64 = 4096;

/// Write number `n` of run `seed`: offset and bytes (unaligned, up to three chunks).
pub fn op(seed: u64, n: u64, size: u64) -> (u64, Vec<u8>) {
    let x = (seed * 1_000_003 + n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let len = 1 + (x >> 20) % (3 * CHUNK);
    let offset = (x >> 40) % (size - len);
    (offset, r3map_core::testing::pattern(x | 1, len as usize))
}
