//! The managed mount: `Arbitrary(Pusher(Synced(cache, remote)))` with a puller filling the
//! cache in the background. Reads hit the cache after the first fetch; writes land in the cache
//! and are pushed to the remote every interval and on sync/close.

use std::sync::Arc;

use r3map_core::stages::synced::ChunkHook;
use r3map_core::stages::{
    sparse, Arbitrary, PullProgress, PullTarget, Puller, PullerOptions, PushState, Pusher, PusherOptions,
    SkipHoles, Synced,
};
use r3map_core::{AtomicBitmap, Backend, ChunkLayout, Result, SharedBackend};

use crate::cache::{CacheHandle, PersistentCache, Recovery};
use futures::StreamExt;
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
    /// Pull everything before `open` returns (instead of in the background).
    pub pull_first: bool,
    /// Callbacks at points of the mount's life.
    pub hooks: Hooks,
    /// What a sync of the mounted resource (an application's fsync) waits for.
    pub sync_to: SyncTo,
    /// The background pull asks the remote where its holes are (64 MiB at a time) and makes
    /// chunks that lie wholly in a hole local as zeros, without a transfer. On by default;
    /// remotes that cannot tell (no NBD `base:allocation`, gRPC, stores) are pulled whole.
    pub skip_holes: bool,
}

/// What a sync of a managed mount's resource waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncTo {
    /// The remote holds every write (pushed and flushed there).
    #[default]
    Remote,
    /// The persistent cache holds every write durably (data fsynced, state checkpointed); the
    /// remote gets them with the next background push, retried until it is back. A mount keeps
    /// working while its remote is away; [`ManagedMount::sync`] and `close` still push.
    Cache,
}

/// A callback run before the mount syncs or closes (e.g. a frontend flushing its own buffers);
/// an error aborts the sync or close.
pub type LifecycleHook = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// Callbacks at points of a managed mount's life.
#[derive(Clone, Default)]
pub struct Hooks {
    /// A chunk became local (fetched, or written whole).
    pub chunk_local: Option<ChunkHook>,
    /// Runs first in every `sync` (and so in `close`).
    pub before_sync: Option<LifecycleHook>,
    /// Runs first in `close`.
    pub before_close: Option<LifecycleHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("chunk_local", &self.chunk_local.is_some())
            .field("before_sync", &self.before_sync.is_some())
            .field("before_close", &self.before_close.is_some())
            .finish()
    }
}

impl Default for ManagedOptions {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            puller: PullerOptions::default(),
            pusher: PusherOptions::default(),
            pull_first: false,
            hooks: Hooks::default(),
            sync_to: SyncTo::Remote,
            skip_holes: true,
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
    /// Bytes written locally that the remote is not known to hold (dirty, or being pushed).
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
    cache: Option<CacheHandle>,
    recovery: Option<Recovery>,
    hooks: Hooks,
}

impl ManagedMount {
    /// Starts a managed mount of `remote` cached in `cache` (same size). The background pull
    /// starts at once; the mount is usable immediately.
    pub async fn open(remote: SharedBackend, cache: SharedBackend, options: ManagedOptions) -> Result<Self> {
        if options.sync_to == SyncTo::Cache {
            return Err(r3map_core::Error::InvalidConfig(
                "syncing to the cache needs a persistent cache (open_cached): a sync to memory keeps nothing"
                    .into(),
            ));
        }
        let chunks = ChunkLayout::new(remote.size(), options.chunk_size)?.chunk_count();
        Self::assemble(
            remote,
            cache,
            AtomicBitmap::new(chunks),
            PushState::new(chunks),
            None,
            options,
        )
        .await
    }

    /// Starts a managed mount over a persistent cache: chunks it holds from an earlier run are
    /// not fetched again, and writes it had not pushed yet are pushed.
    pub async fn open_cached(
        remote: SharedBackend,
        cache: PersistentCache,
        options: ManagedOptions,
    ) -> Result<Self> {
        let recovery = cache.recovery;
        if recovery.dropped > 0 || recovery.refetch > 0 {
            tracing::warn!(
                shutdown = ?recovery.shutdown,
                refetch = recovery.refetch,
                dropped = recovery.dropped,
                "the cache was not closed cleanly: chunks whose data may be stale are fetched again, and unacknowledged or never-fsynced writes of chunks that could not be trusted were dropped"
            );
        }
        let (data, local, push, handle) = cache.into_parts();
        let mut mount = Self::assemble(remote, data, local, push, Some(handle), options).await?;
        mount.recovery = Some(recovery);
        Ok(mount)
    }

    async fn assemble(
        remote: SharedBackend,
        cache: SharedBackend,
        local_chunks: AtomicBitmap,
        push_state: PushState,
        handle: Option<CacheHandle>,
        options: ManagedOptions,
    ) -> Result<Self> {
        let chunk_size = options.chunk_size;
        let mut synced = Synced::with_local_chunks(cache, remote.clone(), chunk_size, local_chunks)?;
        if let Some(hook) = options.hooks.chunk_local.clone() {
            synced = synced.with_hook(hook);
        }
        let synced = Arc::new(synced);
        let pusher = Arc::new(Pusher::start_with_state(
            synced.clone(),
            remote,
            chunk_size,
            options.pusher,
            push_state,
        )?);
        pusher.set_push_on_sync(options.sync_to == SyncTo::Remote);
        let stack = Arc::new(Arbitrary::new(pusher.clone(), chunk_size)?);
        let target: Arc<dyn PullTarget> = if options.skip_holes {
            Arc::new(SkipHoles::new(synced.clone(), sparse::DEFAULT_REGION))
        } else {
            synced.clone()
        };
        let puller = Puller::start(target, options.puller)?;
        let mount = Self {
            stack,
            synced,
            pusher,
            puller,
            chunk_size,
            cache: handle,
            recovery: None,
            hooks: options.hooks,
        };
        if options.pull_first {
            mount.wait_pulled().await?;
        }
        Ok(mount)
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
        stats_of(&self.synced, &self.pusher, self.chunk_size, self.stack.size())
    }

    /// Pushes every local write to the remote and syncs both sides; returns the first error.
    /// (With [`SyncTo::Cache`] too: only the resource's own sync stops at the cache.)
    pub async fn sync(&self) -> Result<()> {
        if let Some(hook) = &self.hooks.before_sync {
            hook()?;
        }
        self.stack.sync().await?;
        self.pusher.flush().await
    }

    /// Byte counters every `period`, as a stream (ends when the mount is dropped).
    pub fn progress(&self, period: std::time::Duration) -> futures::stream::BoxStream<'static, MountStats> {
        let reader = self.stats_reader();
        futures::stream::unfold(tokio::time::interval(period), move |mut ticks| {
            let reader = reader.clone();
            async move {
                ticks.tick().await;
                Some((reader.stats()?, ticks))
            }
        })
        .boxed()
    }

    /// Reads this mount's counters on demand without keeping it alive (metrics read them at
    /// every scrape).
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader {
            synced: Arc::downgrade(&self.synced),
            pusher: Arc::downgrade(&self.pusher),
            chunk_size: self.chunk_size,
            total_bytes: self.stack.size(),
        }
    }

    /// Stops the background pull and the fills of chunks read in part (waiting for the pulls
    /// and fills in flight), then pushes and syncs one last time; returns that sync's error (nothing is
    /// dropped silently). A persistent cache is closed cleanly even when the
    /// push failed: its state records what is still to push, for the next start.
    pub async fn close(self) -> Result<()> {
        if let Some(hook) = &self.hooks.before_close {
            hook()?;
        }
        if let Some(hook) = &self.hooks.before_sync {
            hook()?;
        }
        // No pull in flight installs a chunk after the last checkpoint (a persistent cache
        // would record it local without its data being durable).
        self.puller.stop_and_wait().await;
        // No background fill (critical word first) writes to the cache after the last
        // checkpoint, or holds the remote open after the mount is closed.
        self.synced.stop_fills().await;
        let pushed = self.pusher.close().await;
        let closed = match &self.cache {
            Some(cache) => cache.close().await,
            None => Ok(()),
        };
        pushed.and(closed)
    }

    /// What opening a persistent cache recovered from the previous run (`None` without one).
    pub fn recovery(&self) -> Option<Recovery> {
        self.recovery
    }

    /// Number of chunks fetched from the remote by this mount (not counting cached ones).
    pub fn fetched_chunks(&self) -> u64 {
        self.synced.fetch_count()
    }

    /// Number of chunks made local as zeros without a transfer, because the remote reported
    /// them as holes ([`ManagedOptions::skip_holes`]).
    pub fn skipped_chunks(&self) -> u64 {
        self.synced.hole_count()
    }

    /// Number of misses answered from a read of just the requested range of the remote (the
    /// rest of the chunk is filled right after it; ARCHITECTURE.md, "Critical word first").
    pub fn range_reads(&self) -> u64 {
        self.synced.range_read_count()
    }

    /// Whether chunk `index` is held in the cache (fetched, filled, written, or a remote hole
    /// installed as zeros).
    pub fn is_chunk_local(&self, index: u64) -> bool {
        self.synced.is_local(index)
    }

    /// Stops the background pull: from now on chunks are fetched only when read (and filled
    /// after a range read). `wait_pulled` then returns `Closed` unless the pull had finished.
    pub fn stop_pull(&self) {
        self.puller.stop();
    }
}

/// A mount's counters, readable while the mount exists (`None` after it is dropped).
#[derive(Clone)]
pub struct StatsReader {
    synced: std::sync::Weak<Synced>,
    pusher: std::sync::Weak<Pusher>,
    chunk_size: u64,
    total_bytes: u64,
}

impl StatsReader {
    /// The byte counters now.
    pub fn stats(&self) -> Option<MountStats> {
        let (synced, pusher) = (self.synced.upgrade()?, self.pusher.upgrade()?);
        Some(stats_of(&synced, &pusher, self.chunk_size, self.total_bytes))
    }

    /// Chunks fetched from the remote so far (see [`ManagedMount::fetched_chunks`]).
    pub fn fetched_chunks(&self) -> Option<u64> {
        Some(self.synced.upgrade()?.fetch_count())
    }

    /// Chunks skipped as holes so far (see [`ManagedMount::skipped_chunks`]).
    pub fn skipped_chunks(&self) -> Option<u64> {
        Some(self.synced.upgrade()?.hole_count())
    }
}

fn stats_of(synced: &Synced, pusher: &Pusher, chunk_size: u64, total_bytes: u64) -> MountStats {
    let bytes = |chunks: u64| (chunks * chunk_size).min(total_bytes);
    MountStats {
        total_bytes,
        local_bytes: bytes(synced.local_count()),
        dirty_bytes: bytes(pusher.unpushed_count()),
        pushed_bytes: pusher.pushed_bytes(),
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
            .await
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

#[cfg(test)]
mod persistence_tests {
    use super::*;
    use r3map_core::testing::{self, pattern};
    use r3map_core::MemoryBackend;

    /// A mount process that dies without closing: its runtime (and every background task) is
    /// dropped mid-flight, like a SIGKILL. The next mount on the same cache must not fetch again
    /// and must push what the dead one had not.
    #[test]
    fn a_restarted_mount_reuses_its_cache_and_pushes_unpushed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let content = pattern(11, size);
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size as u64));
        testing::block_on(remote.write_at(0, &content)).unwrap();
        let options = || ManagedOptions {
            chunk_size: 64 << 10,
            pusher: PusherOptions {
                interval: std::time::Duration::from_secs(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut model = content.clone();
        {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let cache = PersistentCache::open(dir.path(), size as u64, 64 << 10, "test-remote").unwrap();
                let mount = ManagedMount::open_cached(remote.clone(), cache, options())
                    .await
                    .unwrap();
                mount.wait_pulled().await.unwrap();
                assert_eq!(mount.fetched_chunks(), 16);
                mount.backend().write_at(70_000, &[9; 5000]).await.unwrap();
                drop(mount); // no close, no final push: what a killed process leaves behind
            });
            model[70_000..75_000].fill(9);
        }
        testing::block_on(async {
            let mut remote_now = vec![0; size];
            remote.read_at(0, &mut remote_now).await.unwrap();
            assert_eq!(
                remote_now, content,
                "the write reached the remote before the crash?"
            );
            let cache = PersistentCache::open(dir.path(), size as u64, 64 << 10, "test-remote").unwrap();
            let mount = ManagedMount::open_cached(remote.clone(), cache, options())
                .await
                .unwrap();
            mount.wait_pulled().await.unwrap();
            assert_eq!(mount.fetched_chunks(), 0, "the restarted mount downloaded again");
            assert_eq!(mount.stats().dirty_bytes, 64 << 10);
            testing::check_content(&*mount.backend(), &model).await.unwrap();
            mount.close().await.unwrap();
            testing::check_content(&*remote, &model).await.unwrap();
        });
    }
}

#[cfg(test)]
mod option_tests {
    use super::*;
    use r3map_core::{Error, MemoryBackend};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_first_hooks_and_progress() {
        let size = 10 * 4096 + 5;
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
        let (local_events, syncs, closes) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let hooks = Hooks {
            chunk_local: Some({
                let n = local_events.clone();
                Arc::new(move |_| {
                    n.fetch_add(1, Ordering::SeqCst);
                })
            }),
            before_sync: Some({
                let n = syncs.clone();
                Arc::new(move || {
                    // The third sync is refused, like a frontend that cannot flush.
                    if n.fetch_add(1, Ordering::SeqCst) == 2 {
                        return Err(Error::Remote("frontend flush failed".into()));
                    }
                    Ok(())
                })
            }),
            before_close: Some({
                let n = closes.clone();
                Arc::new(move || {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            }),
        };
        let options = ManagedOptions {
            chunk_size: 4096,
            pull_first: true,
            hooks,
            // Only the syncs below push (the progress checks count on it).
            pusher: PusherOptions {
                interval: std::time::Duration::from_secs(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let mount = ManagedMount::open(remote, Arc::new(MemoryBackend::new(size)), options)
            .await
            .unwrap();
        assert_eq!(
            mount.stats().local_bytes,
            size,
            "pull_first returned before everything was local"
        );
        assert_eq!(local_events.load(Ordering::SeqCst), 11);
        // The progress stream reports what is known independently: everything local, nothing
        // dirty; then a write of one chunk is one chunk dirty, and after a sync it was pushed.
        let mut progress = mount.progress(std::time::Duration::from_millis(1));
        let first = progress.next().await.unwrap();
        assert_eq!(
            (
                first.total_bytes,
                first.local_bytes,
                first.dirty_bytes,
                first.pushed_bytes
            ),
            (size, size, 0, 0)
        );
        mount.backend().write_at(4096, &[1; 4096]).await.unwrap();
        let after_write = progress.next().await.unwrap();
        assert_eq!((after_write.dirty_bytes, after_write.pushed_bytes), (4096, 0));
        mount.sync().await.unwrap();
        let after_sync = progress.next().await.unwrap();
        assert_eq!((after_sync.dirty_bytes, after_sync.pushed_bytes), (0, 4096));
        drop(progress);
        mount.sync().await.unwrap();
        let err = mount.sync().await.unwrap_err();
        assert!(err.to_string().contains("frontend flush failed"));
        mount.close().await.unwrap();
        assert_eq!(
            (syncs.load(Ordering::SeqCst), closes.load(Ordering::SeqCst)),
            (4, 1)
        );
    }
}
