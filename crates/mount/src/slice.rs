//! The slice frontend as a mount: a memory region whose pages come from a remote (direct) or
//! from a managed mount's cache (managed), with writes found by dirty-page scanning and written
//! back on `sync`.

use r3map_core::{Backend, Error, Result, SharedBackend};
use r3map_frontends::slice::{Region, RegionOptions};

use crate::managed::ManagedMount;

/// A remote resource as `&mut [u8]`.
pub struct SliceMount {
    region: Region,
    backend: SharedBackend,
    managed: Option<ManagedMount>,
}

impl SliceMount {
    /// Every first touch of a chunk fetches it from `remote`.
    pub fn direct(remote: SharedBackend, options: RegionOptions) -> Result<Self> {
        Self::over(remote, None, options)
    }

    /// First touches are served from the managed mount's cache (which its puller fills in
    /// the background); written chunks go back through the mount and are pushed by it.
    pub fn managed(mount: ManagedMount, options: RegionOptions) -> Result<Self> {
        Self::over(mount.backend(), Some(mount), options)
    }

    fn over(backend: SharedBackend, managed: Option<ManagedMount>, options: RegionOptions) -> Result<Self> {
        let region = Region::new(backend.clone(), options).map_err(|err| Error::Remote(err.to_string()))?;
        Ok(Self {
            region,
            backend,
            managed,
        })
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        self.region.as_slice()
    }

    /// The memory, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.region.as_mut_slice()
    }

    /// The region (raw pointer, statistics, dirty state).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The managed mount behind the region, if any.
    pub fn managed_mount(&self) -> Option<&ManagedMount> {
        self.managed.as_ref()
    }

    /// Writes every chunk changed in memory back, then syncs (a managed mount pushes); returns
    /// the first error.
    pub async fn sync(&self) -> Result<()> {
        self.region.handle().push_dirty().await?;
        match &self.managed {
            Some(mount) => mount.sync().await,
            None => self.backend.sync().await,
        }
    }

    /// Syncs, unmaps the region, and closes the managed mount; returns the first error.
    pub async fn close(self) -> Result<()> {
        self.sync().await?;
        drop(self.region);
        match self.managed {
            Some(mount) => mount.close().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::managed::ManagedOptions;
    use r3map_core::testing::pattern;
    use r3map_core::MemoryBackend;
    use std::sync::Arc;

    async fn remote(size: usize) -> (SharedBackend, Vec<u8>) {
        let content = pattern(21, size);
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size as u64));
        remote.write_at(0, &content).await.unwrap();
        (remote, content)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_slice_reads_the_remote_and_writes_back_on_sync() {
        let (remote, mut model) = remote(3 << 20).await;
        let mut mount = SliceMount::direct(remote.clone(), RegionOptions::default()).unwrap();
        assert_eq!(mount.as_slice(), &model[..]);
        mount.as_mut_slice()[1_000_000..1_000_100].fill(7);
        model[1_000_000..1_000_100].fill(7);
        mount.close().await.unwrap();
        r3map_core::testing::check_content(&*remote, &model)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn managed_slice_is_served_from_the_cache_and_pushes_writes() {
        let (remote, mut model) = remote(4 << 20).await;
        let options = ManagedOptions {
            chunk_size: 256 << 10,
            pull_first: true,
            ..Default::default()
        };
        let managed = ManagedMount::open(remote.clone(), Arc::new(MemoryBackend::new(4 << 20)), options)
            .await
            .unwrap();
        let mut mount = SliceMount::managed(managed, RegionOptions::default()).unwrap();
        assert_eq!(mount.as_slice(), &model[..]);
        assert_eq!(
            mount.managed_mount().unwrap().fetched_chunks(),
            16,
            "the region fetched past the cache"
        );
        mount.as_mut_slice()[3_000_000..3_000_010].copy_from_slice(b"0123456789");
        model[3_000_000..3_000_010].copy_from_slice(b"0123456789");
        mount.sync().await.unwrap();
        r3map_core::testing::check_content(&*remote, &model)
            .await
            .unwrap();
        mount.close().await.unwrap();
    }
}
