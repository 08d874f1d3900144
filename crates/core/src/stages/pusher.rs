//! Pusher: remembers written chunks and writes them back to the remote in the background
//! (every interval) and on `sync`/`close`.
//!
//! Ordering that keeps racing writes safe: a write marks its chunks dirty *before* it lands in
//! the inner backend (so a process killed in between leaves the chunk dirty, never a torn chunk
//! taken for clean) and again *after* (so a push that cleared the bit and read the chunk before
//! the write landed leaves it set for the next push). A push clears the dirty bit *before*
//! reading the chunk. Only one flush runs at a time, so two pushes of one chunk can never reach
//! the remote out of order.
//!
//! A chunk being pushed is marked in a second bitmap (`pushing`) before its dirty bit is
//! cleared, and unmarked only once the remote has acknowledged a flush (`sync`) after the
//! write: until then the remote may lose it (a power loss drops unflushed writes). With both
//! bitmaps in a persistent state file, a process killed mid-push still knows on restart which
//! chunks to push (`dirty | pushing`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{Mutex as AsyncMutex, Notify};

use crate::{check_range, AtomicBitmap, Backend, ChunkLayout, Error, Extent, Result, SharedBackend};

/// Pusher settings. The defaults push: there is no setting that silently turns pushing off.
#[derive(Debug, Clone)]
pub struct PusherOptions {
    /// Concurrent chunk pushes during a flush.
    pub workers: usize,
    /// Time between background flushes (must be non-zero).
    pub interval: Duration,
}

impl Default for PusherOptions {
    fn default() -> Self {
        Self {
            workers: 64,
            interval: Duration::from_secs(1),
        }
    }
}

/// The pusher's chunk state: by default in memory; a persistent cache passes bitmaps stored in
/// its state file.
#[derive(Debug)]
pub struct PushState {
    /// Chunks written and not yet pushed.
    pub dirty: AtomicBitmap,
    /// Chunks whose push has started and not yet succeeded.
    pub pushing: AtomicBitmap,
}

impl PushState {
    /// Clean in-memory state for `chunks` chunks.
    pub fn new(chunks: u64) -> Self {
        Self {
            dirty: AtomicBitmap::new(chunks),
            pushing: AtomicBitmap::new(chunks),
        }
    }

    /// After a restart: chunks whose push may not have finished are dirty again.
    fn recover(&self) {
        for chunk in self.pushing.take() {
            self.dirty.set(chunk);
        }
    }
}

struct Shared {
    inner: SharedBackend,
    remote: SharedBackend,
    layout: ChunkLayout,
    dirty: AtomicBitmap,
    pushing: AtomicBitmap,
    flush_lock: AsyncMutex<()>,
    workers: usize,
    pushed_bytes: AtomicU64,
    closed: AtomicBool,
    /// Whether `sync` pushes (the default) or only syncs the inner backend.
    push_on_sync: AtomicBool,
    stop: Notify,
}

/// Write-back of an inner (local) backend to a remote.
pub struct Pusher {
    shared: Arc<Shared>,
    interval_task: tokio::task::JoinHandle<()>,
}

impl Pusher {
    /// Starts pushing writes made through this stage from `inner` to `remote` (needs a Tokio
    /// runtime). `inner` must accept whole-chunk reads.
    pub fn start(
        inner: SharedBackend,
        remote: SharedBackend,
        chunk_size: u64,
        options: PusherOptions,
    ) -> Result<Self> {
        let chunks = ChunkLayout::new(remote.size(), chunk_size)?.chunk_count();
        Self::start_with_state(inner, remote, chunk_size, options, PushState::new(chunks))
    }

    /// Like [`Pusher::start`], continuing from `state` (e.g. a persistent cache's bitmaps from
    /// an earlier run: its dirty chunks are pushed in the first flush).
    pub fn start_with_state(
        inner: SharedBackend,
        remote: SharedBackend,
        chunk_size: u64,
        options: PusherOptions,
        state: PushState,
    ) -> Result<Self> {
        if options.workers == 0 {
            return Err(Error::InvalidConfig(
                "the pusher needs at least one worker".into(),
            ));
        }
        if options.interval.is_zero() {
            return Err(Error::InvalidConfig(
                "the push interval must be greater than zero".into(),
            ));
        }
        if inner.size() != remote.size() {
            return Err(Error::InvalidConfig(format!(
                "the local side has {} bytes but the remote has {}",
                inner.size(),
                remote.size()
            )));
        }
        let layout = ChunkLayout::new(remote.size(), chunk_size)?;
        if state.dirty.len() != layout.chunk_count() || state.pushing.len() != layout.chunk_count() {
            return Err(Error::InvalidConfig(format!(
                "the push state does not have {} chunks",
                layout.chunk_count()
            )));
        }
        state.recover();
        let shared = Arc::new(Shared {
            dirty: state.dirty,
            pushing: state.pushing,
            inner,
            remote,
            layout,
            flush_lock: AsyncMutex::new(()),
            workers: options.workers,
            pushed_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            push_on_sync: AtomicBool::new(true),
            stop: Notify::new(),
        });
        let interval_task = tokio::spawn(Shared::push_every(shared.clone(), options.interval));
        Ok(Self {
            shared,
            interval_task,
        })
    }

    /// With `false`, `sync` only syncs the inner backend and returns: the writes reach the
    /// remote with the next background flush (or `flush`/`close`), retried while the remote is
    /// away. For an inner backend that is durable on its own (a persistent cache), so that an
    /// application's fsync does not wait for, or fail with, an absent remote.
    pub fn set_push_on_sync(&self, push: bool) {
        self.shared.push_on_sync.store(push, Ordering::Release);
    }

    /// Marks chunks dirty that were written behind this stage's back (e.g. through a mapped
    /// memory region whose writes are found by dirty-page scanning). Chunks past the end are
    /// ignored.
    pub fn mark_dirty(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.shared.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.shared.dirty.set(chunk);
        }
    }

    /// Number of chunks waiting to be pushed.
    pub fn dirty_count(&self) -> u64 {
        self.shared.dirty.count_ones()
    }

    /// Number of chunks the remote is not known to hold: dirty, or pushed by a flush that has
    /// not confirmed them yet.
    pub fn unpushed_count(&self) -> u64 {
        let shared = &self.shared;
        let in_flight = shared
            .pushing
            .ones()
            .into_iter()
            .filter(|&c| !shared.dirty.get(c));
        shared.dirty.count_ones() + in_flight.count() as u64
    }

    /// Bytes written to the remote so far.
    pub fn pushed_bytes(&self) -> u64 {
        self.shared.pushed_bytes.load(Ordering::Relaxed)
    }

    /// Pushes every dirty chunk now, then flushes the remote; stops at the first error and
    /// returns it (then every chunk of this round is dirty again).
    pub async fn flush(&self) -> Result<()> {
        self.shared.flush().await
    }

    /// Stops background pushing, then syncs: returns the final sync's error, if any. Later
    /// writes fail with `Error::Closed`.
    pub async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.stop.notify_one();
        self.shared.inner.sync().await?;
        self.shared.push_and_sync_remote().await
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.interval_task.abort();
    }
}

impl Shared {
    async fn push_every(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.stop.notified() => return,
            }
            if let Err(err) = self.flush().await {
                tracing::warn!(%err, "background push failed; the chunks stay dirty and are retried");
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        self.flush_round().await.map(|_| ())
    }

    /// Pushes every dirty chunk and syncs the remote once (a flush that pushed something has
    /// synced it already).
    async fn push_and_sync_remote(&self) -> Result<()> {
        if self.flush_round().await? {
            return Ok(());
        }
        self.remote.sync().await
    }

    /// One round: pushes the chunks dirty now with `workers` in parallel, then flushes the
    /// remote; only then are they pushed. The first failure ends the round at once: pushes in
    /// flight are abandoned, and every chunk of the round is dirty again (the remote may not
    /// keep what it was not made to flush). So a dead remote costs one request deadline per
    /// flush, not one per batch of `workers` chunks. Returns whether it flushed the remote.
    async fn flush_round(&self) -> Result<bool> {
        let _one_flush_at_a_time = self.flush_lock.lock().await;
        let chunks = self.dirty.ones();
        if chunks.is_empty() {
            return Ok(false);
        }
        for &chunk in &chunks {
            self.pushing.set(chunk);
            self.dirty.clear(chunk);
        }
        let mut results = futures::stream::iter(chunks.iter().copied())
            .map(|chunk| async move { self.push_chunk(chunk).await })
            .buffer_unordered(self.workers);
        let mut failure = None;
        while let Some(result) = results.next().await {
            if let Err(err) = result {
                failure = Some(err);
                break;
            }
        }
        drop(results); // cancels the pushes still in flight
        let outcome = match failure {
            Some(err) => Err(err),
            None => self.remote.sync().await,
        };
        for &chunk in &chunks {
            if outcome.is_err() {
                // Never lose a write: the next flush pushes it again.
                self.dirty.set(chunk);
            }
            self.pushing.clear(chunk);
        }
        outcome.map(|()| true)
    }

    async fn push_chunk(&self, chunk: u64) -> Result<()> {
        let range = self.layout.chunk_range(chunk);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.inner.read_at(range.start, &mut buf).await?;
        self.remote.write_at(range.start, &buf).await?;
        self.pushed_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A write may proceed: the stage is open and the range lies within the resource (so
    /// marking its chunks cannot go out of range).
    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        check_range(offset, len, self.layout.size())
    }

    fn mark_range(&self, offset: u64, len: u64) {
        for chunk in self.layout.chunks_touching(offset, len) {
            self.dirty.set(chunk);
        }
    }
}

#[async_trait]
impl Backend for Pusher {
    fn size(&self) -> u64 {
        self.shared.layout.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.shared.inner.read_alignment()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.shared.inner.read_at(offset, buf).await
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.shared.check_write(offset, data.len() as u64)?;
        // Marked before and after the write (see the module note); marked even on failure,
        // since part of the write may have landed.
        self.shared.mark_range(offset, data.len() as u64);
        let result = self.shared.inner.write_at(offset, data).await;
        self.shared.mark_range(offset, data.len() as u64);
        result
    }

    /// Syncs the inner backend, pushes every dirty chunk, then syncs the remote (once: a flush
    /// that pushed something has synced it already); returns the first error.
    async fn sync(&self) -> Result<()> {
        self.shared.inner.sync().await?;
        if !self.shared.push_on_sync.load(Ordering::Acquire) {
            return Ok(());
        }
        self.shared.push_and_sync_remote().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.check_write(offset, len)?;
        self.shared.mark_range(offset, len);
        let result = self.shared.inner.trim(offset, len).await;
        self.shared.mark_range(offset, len);
        result
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.check_write(offset, len)?;
        self.shared.mark_range(offset, len);
        let result = self.shared.inner.write_zeroes(offset, len).await;
        self.shared.mark_range(offset, len);
        result
    }
    /// The inner backend's: it holds every write, pushed or not.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.shared.inner.extents(offset, len).await
    }
}
