//! The seeder as a read-only backend, so the leecher's synced cache can fetch from it.

use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::{Backend, Error, Result};

use crate::link::SeederLink;

/// Reads go to the seeder; the leecher never writes to it. It names no read unit
/// ([`Backend::read_alignment`] is `None`), so the leecher's cache fetches whole chunks and
/// does not read ranges first: a migration moves chunks.
pub struct LinkBackend {
    link: Arc<dyn SeederLink>,
    size: u64,
}

impl LinkBackend {
    /// The seeder behind `link`, whose resource has `size` bytes.
    pub fn new(link: Arc<dyn SeederLink>, size: u64) -> Self {
        Self { link, size }
    }
}

#[async_trait]
impl Backend for LinkBackend {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        r3map_core::check_range(offset, buf.len() as u64, self.size)?;
        Ok(self.link.read_at(offset, buf).await?)
    }
    async fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(Error::ReadOnly)
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}
