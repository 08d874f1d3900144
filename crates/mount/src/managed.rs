//! The managed mount: `Arbitrary(Pusher(Synced(cache, remote)))` with a puller filling the
//! cache in the background. Reads hit the cache after the first fetch; writes land in the cache
//! and are pushed to the remote every interval and on sync/close.

use std::sync::Arc;

use r3map_core::stages::{
    Arbitrary, PullProgress, Puller, PullerOptions, Pusher, PusherOptions, Synced,
};
use r3map_core::{Backend, Result, SharedBackend};
use tokio::sync::watch;

/// Settings of a managed mount.
#[derive(Debug, Clone)]
pub struct ManagedOptions {
    /// Unit of transfer and tracking.
    pub chunk_size: u64,
    /// Background pull.
    pub puller: PullerOptions,
    /// Background push.
    pub pusher: PusherOptions,
}

impl Default for ManagedOptions {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            puller: PullerOptions::default(),
            pusher: PusherOptions::default(),
        }
    }
}

/// Byte counters of a managed mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountStats {
    /// Size of the resource.
    pub total_bytes: u64,
    /// Bytes held in the local cache.
    pub local_bytes: u64,
    /// Bytes written locally and not yet pushed.
    pub dirty_bytes: u64,
    /// Bytes pushed to the remote so far.
    pub pushed_bytes: u64,
}

/// A remote resource used through a local cache with background pull and push.
pub struct ManagedMount {
    stack: Arc<Arbitrary<Arc<Pusher>>>,
    synced: Arc<Synced>,
    pusher: Arc<Pusher>,
    puller: Puller,
    chunk_size: u64,
}

impl ManagedMount {
    /// Starts a managed mount of `remote` cached in `cache` (same size). The background pull
    /// starts at once; the mount is usable immediately.
    pub fn open(
        remote: SharedBackend,
        cache: SharedBackend,
        options: ManagedOptions,
    ) -> Result<Self> {
        let synced = Arc::new(Synced::new(cache, remote.clone(), options.chunk_size)?);
        let pusher = Arc::new(Pusher::start(
            synced.clone(),
            remote,
            options.chunk_size,
            options.pusher,
        )?);
        let stack = Arc::new(Arbitrary::new(pusher.clone(), options.chunk_size)?);
        let puller = Puller::start(synced.clone(), options.puller)?;
        Ok(Self {
            stack,
            synced,
            pusher,
            puller,
            chunk_size: options.chunk_size,
        })
    }

    /// The mounted resource: any offset and length, reads and writes.
    pub fn backend(&self) -> SharedBackend {
        self.stack.clone()
    }

    /// Progress of the background pull.
    pub fn pull_progress(&self) -> watch::Receiver<PullProgress> {
        self.puller.progress()
    }

    /// Waits until every chunk is local, or returns the pull error.
    pub async fn wait_pulled(&self) -> Result<()> {
        self.puller.wait().await
    }

    /// Current byte counters.
    pub fn stats(&self) -> MountStats {
        let total_bytes = self.stack.size();
        let bytes = |chunks: u64| (chunks * self.chunk_size).min(total_bytes);
        MountStats {
            total_bytes,
            local_bytes: bytes(self.synced.local_count()),
            dirty_bytes: bytes(self.pusher.dirty_count()),
            pushed_bytes: self.pusher.pushed_bytes(),
        }
    }

    /// Pushes every local write to the remote and syncs both sides; returns the first error.
    pub async fn sync(&self) -> Result<()> {
        self.stack.sync().await
    }

    /// Stops the background pull, then pushes and syncs one last time; returns that sync's
    /// error (nothing is dropped silently).
    pub async fn close(self) -> Result<()> {
        self.puller.stop();
        self.pusher.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::testing::{self, pattern};
    use r3map_core::MemoryBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulls_everything_and_pushes_writes_back() {
        let size = (4 << 20) + 1000;
        let content = pattern(5, size as usize);
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
        remote.write_at(0, &content).await.unwrap();
        let pusher = PusherOptions {
            interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let options = ManagedOptions {
            chunk_size: 64 << 10,
            pusher,
            ..Default::default()
        };
        let mount = ManagedMount::open(remote.clone(), Arc::new(MemoryBackend::new(size)), options)
            .unwrap();
        let backend = mount.backend();
        let mut model = content.clone();
        backend.write_at(12345, &[7; 70000]).await.unwrap();
        model[12345..12345 + 70000].fill(7);
        mount.wait_pulled().await.unwrap();
        let stats = mount.stats();
        assert_eq!((stats.local_bytes, stats.total_bytes), (size, size));
        assert_eq!(stats.dirty_bytes, 2 * (64 << 10));
        testing::check_content(&*backend, &model).await.unwrap();
        mount.close().await.unwrap();
        testing::check_content(&*remote, &model).await.unwrap();
    }
}
