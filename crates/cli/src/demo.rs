//! Reproducible demo data for the commands' embedded defaults.

use r3map_core::{Backend, MemoryBackend, Result};
use rand::{Rng, SeedableRng};

/// Bytes per independently seeded piece of demo data.
pub const PIECE: usize = 8 << 20;

/// Fills `buf` with piece number `index` of the demo data for `seed`.
pub fn fill_piece(seed: u64, index: u64, buf: &mut [u8]) {
    rand::rngs::SmallRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).fill(buf);
}

/// A memory backend of `size` bytes holding the demo data for `seed`.
pub async fn memory(size: u64, seed: u64) -> Result<MemoryBackend> {
    let backend = MemoryBackend::new(size);
    let mut piece = vec![0u8; PIECE.min(size as usize)];
    for (index, offset) in (0..size).step_by(PIECE).enumerate() {
        let n = piece.len().min((size - offset) as usize);
        fill_piece(seed, index as u64, &mut piece[..n]);
        backend.write_at(offset, &piece[..n]).await?;
    }
    Ok(backend)
}
