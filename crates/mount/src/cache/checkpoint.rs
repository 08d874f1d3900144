//! The cache's data file with checkpoints: syncing it fsyncs the data, then records every chunk
//! that was local before the fsync began as durable. That is the "local is durable only after
//! its data is" rule: a `durable` bit on disk always means the chunk's bytes are on disk too.

use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::mapped::MappedFile;
use r3map_core::{AtomicBitmap, Backend, Extent, Result, SharedBackend};

/// The data file of a persistent cache, checkpointing on every sync.
pub struct Checkpointed {
    data: SharedBackend,
    /// The cache's `local` bits (another view of the words the synced stage updates).
    local: AtomicBitmap,
    durable: AtomicBitmap,
    state: Arc<MappedFile>,
}

impl Checkpointed {
    /// Wraps the data file of a cache whose `local` and `durable` bitmaps are given.
    pub fn new(
        data: impl Backend,
        local: AtomicBitmap,
        durable: AtomicBitmap,
        state: Arc<MappedFile>,
    ) -> Self {
        Self {
            data: Arc::new(data),
            local,
            durable,
            state,
        }
    }

    /// Fsyncs the data, then marks as durable exactly the chunks that were local when it began
    /// (a chunk no longer local is no longer durable), then writes the state to disk.
    pub async fn checkpoint(&self) -> Result<()> {
        let local: Vec<bool> = (0..self.local.len()).map(|c| self.local.get(c)).collect();
        self.data.sync().await?;
        for (chunk, was_local) in local.into_iter().enumerate() {
            if was_local && self.local.get(chunk as u64) {
                self.durable.set(chunk as u64);
            } else {
                self.durable.clear(chunk as u64);
            }
        }
        self.state.flush()
    }
}

#[async_trait]
impl Backend for Checkpointed {
    fn size(&self) -> u64 {
        self.data.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.data.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.data.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.data.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.checkpoint().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.data.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.data.write_zeroes(offset, len).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.data.extents(offset, len).await
    }
}
