//! Synced: a local cache in front of a remote. The first read of a chunk fetches it from the
//! remote once (concurrent readers share that fetch); later reads are local. Writes go to the
//! cache only: pushing them back is the pusher's job.
//!
//! A chunk the remote reports as a hole can be made local without a transfer
//! ([`Synced::install_zeros`]): the cache's copy is trimmed to zeros, as if zeros had been
//! fetched. Extents report what a read would return: the cache's extents for local chunks (the
//! cache is authoritative for them, so a chunk written locally is never taken for the remote's
//! hole), the remote's for the others.
//!
//! Critical word first: a read of part of a chunk that is not local asks the remote for just
//! that part (in the remote's [`read_alignment`](Backend::read_alignment)), answers, and then
//! fills the whole chunk in the background, like a CPU cache serving the requested word before
//! the rest of its line. Large chunks keep their throughput on a WAN without making a small
//! read wait for a whole chunk. The fill is an ordinary fetch: one per chunk in flight, shared
//! with the puller and with readers of the whole chunk, and installed under the chunk lock only
//! if no write made the chunk local meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::try_join_all;
use tokio::sync::{watch, Notify, Semaphore};

use crate::stages::puller::PullTarget;
use crate::{
    check_range, read_unit, AtomicBitmap, Backend, ChunkLayout, ChunkLocks, Error, Extent, Result,
    SharedBackend,
};

/// Called with a chunk index whenever a chunk becomes local.
pub type ChunkHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Background fills in flight at most (each holds a chunk's buffer); a read finding them all
/// busy leaves its chunk to a later reader or the puller.
pub const MAX_FILLS: usize = 32;

/// A cache over a remote. Writes must be chunk-aligned and reads aligned to the local cache's
/// read unit (put `Arbitrary` in front for anything else); the tail chunk may be short.
pub struct Synced {
    shared: Arc<Shared>,
}

struct Shared {
    local: SharedBackend,
    remote: SharedBackend,
    layout: ChunkLayout,
    /// Reads are accepted aligned to these chunks (the local cache's read unit).
    reads: ChunkLayout,
    /// A miss of part of a chunk reads this unit of the remote first (`None`: whole chunks).
    range_first: Option<ChunkLayout>,
    /// Bit set = the local copy of the chunk is authoritative.
    local_chunks: AtomicBitmap,
    /// Serialises installing a fetched chunk with writes of that chunk, so a fetch never
    /// overwrites a newer write. Not held during the remote read: writes never wait for the
    /// network.
    locks: ChunkLocks,
    /// Bit set = a fetch of the chunk is in flight; other readers wait for it (one fetch each).
    fetching: AtomicBitmap,
    /// Signalled whenever a fetch ends.
    fetch_done: Notify,
    /// Permits for background fills (bounds their memory).
    fills: Arc<Semaphore>,
    /// Set by [`Synced::stop_fills`]: no fill starts any more, and fills waiting for the
    /// remote give up.
    fills_stopped: watch::Sender<bool>,
    fetches: AtomicU64,
    range_reads: AtomicU64,
    /// Chunks made local as zeros because the remote reported them as holes.
    holes: AtomicU64,
    /// Bumped by every `mark_remote`: what was learnt about the remote before it may be stale.
    remote_epoch: AtomicU64,
    on_local: Option<ChunkHook>,
}

impl std::fmt::Debug for Synced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synced")
            .field("layout", &self.shared.layout)
            .field("local_chunks", &self.shared.local_chunks.count_ones())
            .finish()
    }
}

impl Synced {
    /// A cache of `remote` in `local` (same size), all chunks initially remote.
    pub fn new(local: SharedBackend, remote: SharedBackend, chunk_size: u64) -> Result<Self> {
        let chunks = ChunkLayout::new(remote.size(), chunk_size)?.chunk_count();
        Self::with_local_chunks(local, remote, chunk_size, AtomicBitmap::new(chunks))
    }

    /// Like [`Synced::new`], with the set of chunks the cache already holds (e.g. a persistent
    /// cache's bitmap from an earlier run).
    pub fn with_local_chunks(
        local: SharedBackend,
        remote: SharedBackend,
        chunk_size: u64,
        local_chunks: AtomicBitmap,
    ) -> Result<Self> {
        if local.size() != remote.size() {
            return Err(Error::InvalidConfig(format!(
                "local cache has {} bytes but the remote has {}",
                local.size(),
                remote.size()
            )));
        }
        let layout = ChunkLayout::new(remote.size(), chunk_size)?;
        if local_chunks.len() != layout.chunk_count() {
            return Err(Error::InvalidConfig(format!(
                "the local-chunk bitmap has {} bits for {} chunks",
                local_chunks.len(),
                layout.chunk_count()
            )));
        }
        let size = layout.size();
        let reads = ChunkLayout::new(size, read_unit(local.read_alignment(), chunk_size))?;
        let remote_unit = read_unit(remote.read_alignment(), chunk_size);
        let range_first = if remote_unit < chunk_size {
            Some(ChunkLayout::new(size, remote_unit)?)
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                local_chunks,
                local,
                remote,
                layout,
                reads,
                range_first,
                locks: ChunkLocks::new(),
                fetching: AtomicBitmap::new(layout.chunk_count()),
                fetch_done: Notify::new(),
                fills: Arc::new(Semaphore::new(MAX_FILLS)),
                fills_stopped: watch::channel(false).0,
                fetches: AtomicU64::new(0),
                range_reads: AtomicU64::new(0),
                holes: AtomicU64::new(0),
                remote_epoch: AtomicU64::new(0),
                on_local: None,
            }),
        })
    }

    /// Calls `hook(chunk)` whenever a chunk becomes local.
    pub fn with_hook(mut self, hook: ChunkHook) -> Self {
        self.shared_mut().on_local = Some(hook);
        self
    }

    /// Turns reading the requested range first off (`false`): a miss then always waits for
    /// the whole chunk, as it must for a remote that only serves whole chunks. On by default
    /// where the remote has a read unit smaller than a chunk.
    pub fn with_range_first(mut self, on: bool) -> Self {
        if !on {
            self.shared_mut().range_first = None;
        }
        self
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configured before it is shared")
    }

    /// The chunk layout.
    pub fn layout(&self) -> ChunkLayout {
        self.shared.layout
    }

    /// The remote this cache fronts.
    pub fn remote(&self) -> &SharedBackend {
        &self.shared.remote
    }

    /// Whether chunk `index` is held locally.
    pub fn is_local(&self, index: u64) -> bool {
        self.shared.local_chunks.get(index)
    }

    /// Number of chunks held locally.
    pub fn local_count(&self) -> u64 {
        self.shared.local_chunks.count_ones()
    }

    /// Number of chunk fetches from the remote so far (background fills included).
    pub fn fetch_count(&self) -> u64 {
        self.shared.fetches.load(Ordering::Relaxed)
    }

    /// Number of misses answered by reading just the requested range of the remote.
    pub fn range_read_count(&self) -> u64 {
        self.shared.range_reads.load(Ordering::Relaxed)
    }

    /// Whether a miss of part of a chunk reads that part of the remote first.
    pub fn range_first(&self) -> bool {
        self.shared.range_first.is_some()
    }

    /// Number of chunks made local as zeros, without a transfer ([`Synced::install_zeros`]).
    pub fn hole_count(&self) -> u64 {
        self.shared.holes.load(Ordering::Relaxed)
    }

    /// The current remote epoch: read it before asking the remote where its holes are, and
    /// pass it to [`Synced::install_zeros`], which refuses answers older than a `mark_remote`.
    pub fn remote_epoch(&self) -> u64 {
        self.shared.remote_epoch.load(Ordering::Acquire)
    }

    /// Makes `chunk` local as zeros without fetching it, because the remote said the chunk is
    /// a hole in an answer asked for at `epoch` ([`Synced::remote_epoch`]): the cache's copy is
    /// trimmed (in a persistent cache the zeros are real in the data file: a punched hole) and
    /// only then marked local, like a fetch that brought zeros. Nothing happens, and `false` is
    /// returned, if the chunk is local already (a write or a fetch got there first) or chunks
    /// were marked remote since `epoch` (the answer may predate the remote's newer data).
    pub async fn install_zeros(&self, chunk: u64, epoch: u64) -> Result<bool> {
        let shared = &self.shared;
        if chunk >= shared.layout.chunk_count() || shared.local_chunks.get(chunk) {
            return Ok(false);
        }
        let _guard = shared.locks.lock(chunk).await;
        // Checked under the chunk lock: `mark_remote` bumps the epoch before it takes the locks,
        // so either it is seen here, or the chunk is marked remote after this install.
        if shared.local_chunks.get(chunk) || shared.remote_epoch.load(Ordering::Acquire) != epoch {
            return Ok(false);
        }
        let range = shared.layout.chunk_range(chunk);
        shared.local.trim(range.start, range.end - range.start).await?;
        shared.local_chunks.set(chunk);
        shared.holes.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &shared.on_local {
            hook(chunk);
        }
        Ok(true)
    }

    /// Marks chunks as remote again, so the next read re-fetches them (used by a migration
    /// destination for chunks the source wrote after sending them). Chunks past the end are
    /// ignored.
    pub async fn mark_remote(&self, chunks: &[u64]) {
        let shared = &self.shared;
        shared.remote_epoch.fetch_add(1, Ordering::AcqRel);
        for &chunk in chunks.iter().filter(|&&c| c < shared.layout.chunk_count()) {
            let _guard = shared.locks.lock(chunk).await;
            shared.local_chunks.clear(chunk);
        }
    }

    /// Marks chunks as local without fetching (the caller knows the cache holds them, e.g.
    /// after re-opening a persistent cache). Chunks past the end are ignored.
    pub fn mark_local(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.shared.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.shared.local_chunks.set(chunk);
        }
    }

    /// Starts no more background fills and ends those in flight: a fill still waiting for the
    /// remote gives up (its chunk stays remote), one installing its chunk finishes, and this
    /// returns when all have ended, without waiting for the remote. Misses of part of a chunk
    /// are still answered from the remote. A mount calls it before its last push and
    /// checkpoint, so no fill writes to the cache after them and a frozen remote does not
    /// hold up the close.
    pub async fn stop_fills(&self) {
        let shared = &self.shared;
        // Set before the permits are taken: a fill that got its permit before this either
        // holds it (and is waited for, or gives up its remote read) or sees the flag and gives up.
        shared.fills_stopped.send_replace(true);
        // All permits at once: every fill in flight has ended. They are given back (a second
        // call waits the same way), and the flag keeps new fills from starting.
        let all = shared.fills.acquire_many(MAX_FILLS as u32).await;
        drop(all.expect("the fill semaphore is never closed"));
    }

    /// Ensures `chunk` is local, fetching it unless it is or another task already is.
    pub async fn fetch(&self, chunk: u64) -> Result<()> {
        let shared = &self.shared;
        if shared.local_chunks.get(chunk) {
            return Ok(());
        }
        let mut buf = vec![0u8; shared.layout.chunk_len(chunk)];
        shared.fetch_into(chunk, &mut buf).await
    }
}

impl Shared {
    /// Makes `chunk` local and leaves its content in `buf` (one copy fewer than fetch + read).
    async fn fetch_into(&self, chunk: u64, buf: &mut [u8]) -> Result<()> {
        let start = self.layout.chunk_range(chunk).start;
        loop {
            if self.local_chunks.get(chunk) {
                return self.local.read_at(start, buf).await;
            }
            // Registered before looking at `fetching`, so a fetch ending in between still wakes us.
            let finished = self.fetch_done.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.fetching.set(chunk) {
                finished.await; // another task fetches it; then look again
                continue;
            }
            let _in_flight = FetchInFlight { synced: self, chunk };
            // A fetch that ended between the first look and winning the slot made the chunk
            // local: look again now that no other fetch can start, or it is fetched twice.
            if self.local_chunks.get(chunk) {
                return self.local.read_at(start, buf).await;
            }
            return self
                .fetch_as_leader(chunk, start, buf, std::future::pending())
                .await;
        }
    }

    /// Fetches `chunk` as the holder of its single-flight slot. The remote read gives up with
    /// `Error::Closed` when `give_up` completes first; installing the chunk is never cut short
    /// (a local write dropped half-way could land after the caller moved on).
    async fn fetch_as_leader(
        &self,
        chunk: u64,
        start: u64,
        buf: &mut [u8],
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut give_up = std::pin::pin!(give_up);
        let _guard = loop {
            // Taken before the remote read: chunks marked remote after it (the remote has newer
            // bytes than it may have returned) change the epoch, and the read is repeated.
            let epoch = self.remote_epoch.load(Ordering::Acquire);
            self.fetches.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                read = self.remote.read_at(start, buf) => read?,
                () = &mut give_up => return Err(Error::Closed),
            }
            let guard = self.locks.lock(chunk).await;
            if self.local_chunks.get(chunk) {
                // Written while we fetched: the local copy is newer than what we got.
                return self.local.read_at(start, buf).await;
            }
            // Checked under the chunk lock, as in `install_zeros`: `mark_remote` bumps the
            // epoch before it takes the locks.
            if self.remote_epoch.load(Ordering::Acquire) == epoch {
                break guard;
            }
        };
        self.local.write_at(start, buf).await?;
        self.local_chunks.set(chunk);
        if let Some(hook) = &self.on_local {
            hook(chunk);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, all within `chunk`, which is not (or was not just
    /// now) local.
    async fn read_missing(self: &Arc<Self>, chunk: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = self.layout.chunk_range(chunk);
        if offset == range.start && buf.len() as u64 == range.end - range.start {
            return self.fetch_into(chunk, buf).await;
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (Some(unit), Some(runtime)) = (self.range_first, runtime) else {
            let mut whole = vec![0u8; self.layout.chunk_len(chunk)];
            self.fetch_into(chunk, &mut whole).await?;
            let at = (offset - range.start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            return Ok(());
        };
        // The remote holds the authoritative bytes of a chunk that is not local, and a chunk
        // becomes local only by a write, a fetch or a hole's zeros installed under its lock. A write that makes
        // it local while this read runs is concurrent with it, so the remote's bytes are a
        // valid answer either way.
        self.range_reads.fetch_add(1, Ordering::Relaxed);
        let len = buf.len() as u64;
        if unit.is_aligned(offset, len) {
            self.remote.read_at(offset, buf).await?;
        } else {
            let around = unit.covering(offset, len);
            let mut bytes = vec![0u8; (around.end - around.start) as usize];
            self.remote.read_at(around.start, &mut bytes).await?;
            let at = (offset - around.start) as usize;
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
        }
        // Started only now, so the small answer never waits behind the chunk on the link.
        self.start_fill(chunk, &runtime);
        Ok(())
    }

    /// Fetches `chunk` in the background, unless it is local, a fetch of it is in flight, or
    /// [`MAX_FILLS`] fills are.
    fn start_fill(self: &Arc<Self>, chunk: u64, runtime: &tokio::runtime::Handle) {
        if self.local_chunks.get(chunk) {
            return;
        }
        let Ok(permit) = self.fills.clone().try_acquire_owned() else {
            return;
        };
        if *self.fills_stopped.borrow() || self.fetching.set(chunk) {
            return;
        }
        // Owned by the task from here: dropped (and the slot freed) however the task ends,
        // also if the runtime drops it before it first runs.
        let slot = FillSlot {
            shared: self.clone(),
            chunk,
        };
        runtime.spawn(async move {
            // The answer has just been handed back, and the reader it wakes needs a CPU: this
            // thread gives up its time slice once before the fill starts (measured in
            // docs/benchmarks.md, issue 17: on a busy 2-core machine a fill that starts at once
            // competes with that wake-up and adds about 100 µs to the first read's median).
            std::thread::yield_now();
            slot.fill().await;
            // The slot ends before the permit, so `stop_fills` returns with no fill in flight.
            drop(slot);
            drop(permit);
        });
    }

    /// Ends a fetch's single-flight slot and wakes the readers waiting for it.
    fn end_fetch(&self, chunk: u64) {
        self.fetching.clear(chunk);
        self.fetch_done.notify_waiters();
    }

    async fn locked_chunks(&self, offset: u64, len: u64) -> Result<Vec<crate::ChunkGuard<'_>>> {
        check_range(offset, len, self.layout.size())?;
        self.layout.check_aligned(offset, len)?;
        let mut guards = Vec::new();
        for chunk in self.layout.chunks_touching(offset, len) {
            guards.push(self.locks.lock(chunk).await);
        }
        Ok(guards)
    }

    fn mark_range_local(&self, offset: u64, len: u64) {
        for chunk in self.layout.chunks_touching(offset, len) {
            if !self.local_chunks.set(chunk) {
                if let Some(hook) = &self.on_local {
                    hook(chunk);
                }
            }
        }
    }
}

/// Ends a fetch's single-flight slot however the fetch ends (success, error, cancellation), so
/// readers waiting for it never hang.
struct FetchInFlight<'a> {
    synced: &'a Shared,
    chunk: u64,
}

impl Drop for FetchInFlight<'_> {
    fn drop(&mut self) {
        self.synced.end_fetch(self.chunk);
    }
}

/// The single-flight slot of a background fill, owned by its task.
struct FillSlot {
    shared: Arc<Shared>,
    chunk: u64,
}

impl FillSlot {
    /// Fetches the chunk as the holder of its single-flight slot. A failure is the same as a
    /// failed fetch: the chunk stays remote, and the next miss or the pull fetches it.
    async fn fill(&self) {
        let (shared, chunk) = (&self.shared, self.chunk);
        // A fetch that ended before this task took the slot made it local already.
        if shared.local_chunks.get(chunk) {
            return;
        }
        let start = shared.layout.chunk_range(chunk).start;
        let mut buf = vec![0u8; shared.layout.chunk_len(chunk)];
        let mut stopped = shared.fills_stopped.subscribe();
        let stop = async move {
            // The sender lives in `shared`, which this task holds: the wait ends only by a stop.
            let _ = stopped.wait_for(|&stopped| stopped).await;
        };
        if let Err(err) = shared.fetch_as_leader(chunk, start, &mut buf, stop).await {
            tracing::debug!(chunk, %err, "background fill failed; a later read or the pull fetches the chunk");
        }
    }
}

impl Drop for FillSlot {
    fn drop(&mut self) {
        self.shared.end_fetch(self.chunk);
    }
}

#[async_trait]
impl Backend for Synced {
    fn size(&self) -> u64 {
        self.shared.layout.size()
    }

    /// The local cache's read unit (within a chunk): reads of local chunks cost their length.
    fn read_alignment(&self) -> Option<u64> {
        Some(self.shared.reads.chunk_size())
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let shared = &self.shared;
        let len = buf.len() as u64;
        check_range(offset, len, shared.layout.size())?;
        shared.reads.check_aligned(offset, len)?;
        let chunks = shared.layout.chunks_touching(offset, len);
        if chunks.clone().all(|c| shared.local_chunks.get(c)) {
            return shared.local.read_at(offset, buf).await;
        }
        // Missing chunks are read concurrently, straight into the caller's buffer.
        let mut pieces = Vec::new();
        let mut rest = buf;
        for chunk in chunks {
            let range = shared.layout.chunk_range(chunk);
            let at = offset.max(range.start);
            let piece_len = (range.end.min(offset + len) - at) as usize;
            let (piece, tail) = rest.split_at_mut(piece_len);
            rest = tail;
            pieces.push(async move {
                if shared.local_chunks.get(chunk) {
                    shared.local.read_at(at, piece).await
                } else {
                    shared.read_missing(chunk, at, piece).await
                }
            });
        }
        try_join_all(pieces).await?;
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let shared = &self.shared;
        let _guards = shared.locked_chunks(offset, data.len() as u64).await?;
        shared.local.write_at(offset, data).await?;
        shared.mark_range_local(offset, data.len() as u64);
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.shared.local.sync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let shared = &self.shared;
        let _guards = shared.locked_chunks(offset, len).await?;
        shared.local.trim(offset, len).await?;
        shared.mark_range_local(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let shared = &self.shared;
        let _guards = shared.locked_chunks(offset, len).await?;
        shared.local.write_zeroes(offset, len).await?;
        shared.mark_range_local(offset, len);
        Ok(())
    }

    /// The extents of the first run of chunks that are all local (asked of the cache) or all
    /// remote (asked of the remote), cut to the range. A remote answer is cut again before the
    /// first chunk that became local while it was asked: that chunk's data is in the cache now.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let shared = &self.shared;
        check_range(offset, len, shared.layout.size())?;
        let end = offset + len;
        for _ in 0..RACING_TRIES {
            let chunks = shared.layout.chunks_touching(offset, len);
            let local = shared.local_chunks.get(chunks.start);
            // From the second chunk on: the first one may turn local after it was looked at,
            // and the run must not end before it starts.
            let run_end = (chunks.start + 1..chunks.end)
                .find(|&c| shared.local_chunks.get(c) != local)
                .map_or(end, |c| shared.layout.chunk_range(c).start);
            if local {
                return shared.local.extents(offset, run_end - offset).await;
            }
            let answer = shared.remote.extents(offset, run_end - offset).await?;
            // A remote answer is cut to the run (one that says nothing is data).
            let answered = answer.iter().map(|e| e.len).sum::<u64>().min(run_end - offset);
            let answer = match answered {
                0 => vec![Extent::data(run_end - offset)],
                _ => cut_extents(answer, answered),
            };
            let answered = offset + answered.max(1);
            let now_local = shared
                .layout
                .chunks_touching(offset, answered - offset)
                .find(|&c| shared.local_chunks.get(c))
                .map(|c| shared.layout.chunk_range(c).start.max(offset));
            match now_local {
                None => return Ok(answer),
                Some(cut) if cut > offset => return Ok(cut_extents(answer, cut - offset)),
                Some(_) => continue, // the first chunk became local: ask again
            }
        }
        // Chunks keep changing under the question: "data" is always a correct answer.
        Ok(vec![Extent::data(
            (shared.layout.chunk_range(shared.layout.chunk_of(offset)).end).min(end) - offset,
        )])
    }
}

/// How often [`Synced::extents`] asks again when its first chunk turned local meanwhile.
const RACING_TRIES: usize = 4;

/// The first `len` bytes of `extents` (`len` > 0 and at most their total), without empty
/// extents.
fn cut_extents(extents: Vec<Extent>, len: u64) -> Vec<Extent> {
    let mut left = len;
    let mut cut = Vec::new();
    for mut extent in extents {
        if left == 0 {
            break;
        }
        if extent.len == 0 {
            continue;
        }
        extent.len = extent.len.min(left);
        left -= extent.len;
        cut.push(extent);
    }
    cut
}

#[async_trait]
impl PullTarget for Synced {
    fn chunk_count(&self) -> u64 {
        self.shared.layout.chunk_count()
    }
    async fn pull(&self, chunk: u64) -> Result<()> {
        self.fetch(chunk).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::Chunked;
    use crate::{testing, MemoryBackend};
    use proptest::prelude::*;

    /// A remote with known content, and a cache in front of it (Chunked proves aligned access).
    async fn synced(size: u64, chunk: u64, seed: u64) -> (Synced, Vec<u8>) {
        let content = testing::pattern(seed, size as usize);
        let remote = MemoryBackend::new(size);
        remote.write_at(0, &content).await.unwrap();
        let remote: SharedBackend = Arc::new(Chunked::new(remote, chunk, u64::MAX).unwrap());
        let local: SharedBackend = Arc::new(MemoryBackend::new(size));
        (Synced::new(local, remote, chunk).unwrap(), content)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn aligned_workload_matches_model(chunks in 1u64..30, tail in 0u64..16, seed in any::<u64>(), ops in testing::ops_strategy(100, 40)) {
            let (backend, mut model) = testing::block_on(synced(chunks * 16 + tail, 16, seed));
            let size = backend.size();
            testing::block_on(async {
                testing::run_ops(&backend, &mut model, 0..size, 16, &ops).await?;
                testing::check_content(&backend, &model).await
            })?;
            // The remote never sees writes through Synced alone.
            let mut remote = vec![0u8; size as usize];
            testing::block_on(backend.remote().read_at(0, &mut remote)).unwrap();
            prop_assert_eq!(remote, testing::pattern(seed, size as usize));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Critical word first against the model: a remote that takes a quarter of a chunk
        /// (Chunked proves it) and yields around every call, any offset and length through
        /// Arbitrary, so background fills race the later reads and writes; the content is
        /// checked after every fill has ended, so a late fill that overwrote a write fails.
        #[test]
        fn range_first_workload_matches_model(chunks in 1u64..30, tail in 0u64..16, seed in any::<u64>(), ops in testing::ops_strategy(40, 60)) {
            let size = chunks * 16 + tail;
            testing::block_on(async {
                let content = testing::pattern(seed, size as usize);
                let memory = MemoryBackend::new(size);
                memory.write_at(0, &content).await.unwrap();
                let remote: SharedBackend =
                    Arc::new(Chunked::new(testing::Yielding::new(memory), 4, u64::MAX).unwrap());
                let local: SharedBackend = Arc::new(testing::Yielding::new(MemoryBackend::new(size)));
                let synced = Arc::new(Synced::new(local, remote.clone(), 16).unwrap());
                prop_assert!(synced.range_first());
                let backend = crate::stages::Arbitrary::new(synced.clone(), 16).unwrap();
                let mut model = content.clone();
                testing::run_ops(&backend, &mut model, 0..size, 1, &ops).await?;
                // Every fill has ended (installed or skipped) before the content is read.
                synced.stop_fills().await;
                testing::check_content(&backend, &model).await?;
                let mut on_remote = vec![0u8; size as usize];
                remote.read_at(0, &mut on_remote).await.unwrap();
                prop_assert_eq!(on_remote, content, "the synced stage alone wrote to the remote");
                Ok(())
            })?;
        }
    }

    #[test]
    fn concurrent_readers_of_one_chunk_share_one_fetch() {
        testing::block_on(async {
            let (backend, content) = synced(4096 * 4, 4096, 7).await;
            let backend = Arc::new(backend);
            let readers: Vec<_> = (0..32)
                .map(|_| {
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0; 4096];
                        backend.read_at(4096, &mut buf).await.unwrap();
                        buf
                    })
                })
                .collect();
            for r in readers {
                assert_eq!(r.await.unwrap(), content[4096..8192]);
            }
            assert_eq!(backend.fetch_count(), 1);
            assert!(backend.is_local(1) && !backend.is_local(0));
        });
    }

    /// A reader that looked just before another reader's fetch ended must not fetch again (the
    /// single-flight slot is won only after that fetch released it). Many rounds of readers
    /// racing on every chunk; each chunk is fetched exactly once.
    #[test]
    fn readers_racing_the_end_of_a_fetch_do_not_fetch_again() {
        testing::block_on(async {
            let chunks = 2000u64;
            let (backend, content) = synced(16 * chunks, 16, 3).await;
            let backend = Arc::new(backend);
            let readers: Vec<_> = (0..8)
                .map(|_| {
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 16];
                        for chunk in 0..chunks {
                            backend.read_at(chunk * 16, &mut buf).await.unwrap();
                        }
                    })
                })
                .collect();
            for r in readers {
                r.await.unwrap();
            }
            assert_eq!(backend.fetch_count(), chunks, "a chunk was fetched twice");
            testing::check_content(&*backend, &content).await.unwrap();
        });
    }

    #[test]
    fn concurrent_access_matches_model() {
        // The remote holds zeros here, so the all-zero model of check_concurrent applies.
        let size = 64 * 100 + 9;
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
        let local: SharedBackend = Arc::new(MemoryBackend::new(size));
        let backend = Arc::new(Synced::new(local, remote, 64).unwrap());
        testing::block_on(testing::check_concurrent(backend, 64, 8, 200)).unwrap();
    }

    #[test]
    fn a_fetch_never_overwrites_a_concurrent_write() {
        testing::block_on(async {
            for round in 0..50 {
                let (backend, _) = synced(4096 * 2, 4096, round).await;
                let backend = Arc::new(backend);
                let new = vec![0xEE; 4096];
                let reader = {
                    let backend = backend.clone();
                    tokio::spawn(async move { backend.fetch(0).await })
                };
                backend.write_at(0, &new).await.unwrap();
                reader.await.unwrap().unwrap();
                let mut buf = vec![0; 4096];
                backend.read_at(0, &mut buf).await.unwrap();
                assert_eq!(buf, new, "round {round}: the write was lost to a fetch");
            }
        });
    }

    /// A remote held shut by a closed gate, so a fetch can be kept in flight on purpose.
    fn stalled_remote(size: u64) -> (Arc<crate::stages::Gate<MemoryBackend>>, Arc<Synced>) {
        let remote = Arc::new(crate::stages::Gate::new(MemoryBackend::new(size), false));
        let local: SharedBackend = Arc::new(MemoryBackend::new(size));
        (
            remote.clone(),
            Arc::new(Synced::new(local, remote, 4096).unwrap()),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_never_wait_for_a_fetch_of_the_same_chunk() {
        let (remote, synced) = stalled_remote(8192);
        let fetch = tokio::spawn({
            let synced = synced.clone();
            async move { synced.fetch(0).await }
        });
        while synced.fetch_count() == 0 {
            tokio::task::yield_now().await;
        }
        let write =
            tokio::time::timeout(std::time::Duration::from_secs(5), synced.write_at(0, &[3; 4096])).await;
        assert!(write.expect("the write waited for the stalled remote").is_ok());
        remote.open();
        fetch.await.unwrap().unwrap();
        let mut buf = vec![0; 4096];
        synced.read_at(0, &mut buf).await.unwrap();
        assert_eq!(buf, vec![3; 4096], "the fetched (older) data replaced the write");
        assert_eq!(synced.fetch_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_fetch_does_not_block_later_readers() {
        let (remote, synced) = stalled_remote(8192);
        let reader = tokio::spawn({
            let synced = synced.clone();
            async move { synced.read_at(0, &mut [0; 4096]).await }
        });
        while synced.fetch_count() == 0 {
            tokio::task::yield_now().await;
        }
        reader.abort();
        let _ = reader.await;
        remote.open();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            synced.read_at(0, &mut [0; 4096]),
        )
        .await;
        assert!(read.expect("a reader hung on the cancelled fetch").is_ok());
    }

    #[test]
    fn mismatched_sizes_are_rejected() {
        let err = Synced::new(
            Arc::new(MemoryBackend::new(10)),
            Arc::new(MemoryBackend::new(11)),
            4,
        )
        .unwrap_err();
        assert!(err.to_string().contains("local cache has 10 bytes"));
    }
}
