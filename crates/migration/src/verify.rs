//! End-to-end verification: blake3 hashes of chunks, compared between source and destination.

use futures::{StreamExt, TryStreamExt};
use r3map_core::{Backend, ChunkLayout};

use crate::Result;

/// Chunks hashed per request when comparing a whole resource.
pub const HASH_BATCH: u64 = 1024;

/// blake3 hashes of `count` chunks from `first` of `backend` (clamped to the last chunk).
pub async fn chunk_hashes<B: Backend + ?Sized>(
    backend: &B,
    layout: ChunkLayout,
    first: u64,
    count: u64,
) -> Result<Vec<[u8; 32]>> {
    let end = first.saturating_add(count).min(layout.chunk_count());
    futures::stream::iter(first..end)
        .map(|chunk| async move {
            let range = layout.chunk_range(chunk);
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            backend.read_at(range.start, &mut buf).await?;
            Ok(*blake3::hash(&buf).as_bytes())
        })
        .buffered(8)
        .try_collect()
        .await
}
