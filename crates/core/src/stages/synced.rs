//! Synced: a local cache in front of a remote. The first read of a chunk fetches it from the
//! remote once (concurrent readers share that fetch); later reads are local. Writes go to the
//! cache only: pushing them back is the pusher's job.
//!
//! A chunk the remote reports as a hole can be made local without a transfer
//! ([`Synced::install_zeros`]): the cache's copy is trimmed to zeros, as if zeros had been
//! fetched. Extents report what a read would return: the cache's extents for local chunks (the
//! cache is authoritative for them, so a chunk written locally is never taken for the remote's
//! hole), the remote's for the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::try_join_all;
use tokio::sync::Notify;

use crate::stages::puller::PullTarget;
use crate::{check_range, AtomicBitmap, Backend, ChunkLayout, ChunkLocks, Extent, Result, SharedBackend};

/// Called with a chunk index whenever a chunk becomes local.
pub type ChunkHook = Arc<dyn Fn(u64) + Send + Sync>;

/// A chunk-aligned cache over a remote. All access must be chunk-aligned (put `Arbitrary` in
/// front for anything else); the tail chunk may be short.
pub struct Synced {
    local: SharedBackend,
    remote: SharedBackend,
    layout: ChunkLayout,
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
    fetches: AtomicU64,
    /// Chunks made local as zeros because the remote reported them as holes.
    holes: AtomicU64,
    /// Bumped by every `mark_remote`: what was learnt about the remote before it may be stale.
    remote_epoch: AtomicU64,
    on_local: Option<ChunkHook>,
}

impl std::fmt::Debug for Synced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synced")
            .field("layout", &self.layout)
            .field("local_chunks", &self.local_chunks.count_ones())
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
            return Err(crate::Error::InvalidConfig(format!(
                "local cache has {} bytes but the remote has {}",
                local.size(),
                remote.size()
            )));
        }
        let layout = ChunkLayout::new(remote.size(), chunk_size)?;
        if local_chunks.len() != layout.chunk_count() {
            return Err(crate::Error::InvalidConfig(format!(
                "the local-chunk bitmap has {} bits for {} chunks",
                local_chunks.len(),
                layout.chunk_count()
            )));
        }
        Ok(Self {
            local_chunks,
            local,
            remote,
            layout,
            locks: ChunkLocks::new(),
            fetching: AtomicBitmap::new(layout.chunk_count()),
            fetch_done: Notify::new(),
            fetches: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            remote_epoch: AtomicU64::new(0),
            on_local: None,
        })
    }

    /// Calls `hook(chunk)` whenever a chunk becomes local.
    pub fn with_hook(mut self, hook: ChunkHook) -> Self {
        self.on_local = Some(hook);
        self
    }

    /// The chunk layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The remote this cache fronts.
    pub fn remote(&self) -> &SharedBackend {
        &self.remote
    }

    /// Whether chunk `index` is held locally.
    pub fn is_local(&self, index: u64) -> bool {
        self.local_chunks.get(index)
    }

    /// Number of chunks held locally.
    pub fn local_count(&self) -> u64 {
        self.local_chunks.count_ones()
    }

    /// Number of chunk fetches from the remote so far.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Number of chunks made local as zeros, without a transfer ([`Synced::install_zeros`]).
    pub fn hole_count(&self) -> u64 {
        self.holes.load(Ordering::Relaxed)
    }

    /// The current remote epoch: read it before asking the remote where its holes are, and
    /// pass it to [`Synced::install_zeros`], which refuses answers older than a `mark_remote`.
    pub fn remote_epoch(&self) -> u64 {
        self.remote_epoch.load(Ordering::Acquire)
    }

    /// Makes `chunk` local as zeros without fetching it, because the remote said the chunk is
    /// a hole in an answer asked for at `epoch` ([`Synced::remote_epoch`]): the cache's copy is
    /// trimmed (in a persistent cache the zeros are real in the data file: a punched hole) and
    /// only then marked local, like a fetch that brought zeros. Nothing happens, and `false` is
    /// returned, if the chunk is local already (a write or a fetch got there first) or chunks
    /// were marked remote since `epoch` (the answer may predate the remote's newer data).
    pub async fn install_zeros(&self, chunk: u64, epoch: u64) -> Result<bool> {
        if chunk >= self.layout.chunk_count() || self.local_chunks.get(chunk) {
            return Ok(false);
        }
        let _guard = self.locks.lock(chunk).await;
        // Checked under the chunk lock: `mark_remote` bumps the epoch before it takes the locks,
        // so either it is seen here, or the chunk is marked remote after this install.
        if self.local_chunks.get(chunk) || self.remote_epoch.load(Ordering::Acquire) != epoch {
            return Ok(false);
        }
        let range = self.layout.chunk_range(chunk);
        self.local.trim(range.start, range.end - range.start).await?;
        self.local_chunks.set(chunk);
        self.holes.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.on_local {
            hook(chunk);
        }
        Ok(true)
    }

    /// Marks chunks as remote again, so the next read re-fetches them (used by a migration
    /// destination for chunks the source wrote after sending them). Chunks past the end are
    /// ignored.
    pub async fn mark_remote(&self, chunks: &[u64]) {
        self.remote_epoch.fetch_add(1, Ordering::AcqRel);
        for &chunk in chunks.iter().filter(|&&c| c < self.layout.chunk_count()) {
            let _guard = self.locks.lock(chunk).await;
            self.local_chunks.clear(chunk);
        }
    }

    /// Marks chunks as local without fetching (the caller knows the cache holds them, e.g.
    /// after re-opening a persistent cache). Chunks past the end are ignored.
    pub fn mark_local(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.local_chunks.set(chunk);
        }
    }

    /// Ensures `chunk` is local, fetching it unless it is or another task already is.
    pub async fn fetch(&self, chunk: u64) -> Result<()> {
        if self.local_chunks.get(chunk) {
            return Ok(());
        }
        let range = self.layout.chunk_range(chunk);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.fetch_into(chunk, &mut buf).await
    }

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
            return self.fetch_as_leader(chunk, start, buf).await;
        }
    }

    async fn fetch_as_leader(&self, chunk: u64, start: u64, buf: &mut [u8]) -> Result<()> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.remote.read_at(start, buf).await?;
        let _guard = self.locks.lock(chunk).await;
        if self.local_chunks.get(chunk) {
            // Written while we fetched: the local copy is newer than what we got.
            return self.local.read_at(start, buf).await;
        }
        self.local.write_at(start, buf).await?;
        self.local_chunks.set(chunk);
        if let Some(hook) = &self.on_local {
            hook(chunk);
        }
        Ok(())
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
    synced: &'a Synced,
    chunk: u64,
}

impl Drop for FetchInFlight<'_> {
    fn drop(&mut self) {
        self.synced.fetching.clear(self.chunk);
        self.synced.fetch_done.notify_waiters();
    }
}

#[async_trait]
impl Backend for Synced {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.layout.size())?;
        self.layout.check_aligned(offset, len)?;
        let chunks = self.layout.chunks_touching(offset, len);
        if chunks.clone().all(|c| self.local_chunks.get(c)) {
            return self.local.read_at(offset, buf).await;
        }
        // Fetch missing chunks concurrently, straight into the caller's buffer.
        let cs = self.layout.chunk_size() as usize;
        try_join_all(buf.chunks_mut(cs).zip(chunks).map(|(piece, chunk)| async move {
            if self.local_chunks.get(chunk) {
                self.local.read_at(chunk * cs as u64, piece).await
            } else {
                self.fetch_into(chunk, piece).await
            }
        }))
        .await?;
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _guards = self.locked_chunks(offset, data.len() as u64).await?;
        self.local.write_at(offset, data).await?;
        self.mark_range_local(offset, data.len() as u64);
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.local.sync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _guards = self.locked_chunks(offset, len).await?;
        self.local.trim(offset, len).await?;
        self.mark_range_local(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _guards = self.locked_chunks(offset, len).await?;
        self.local.write_zeroes(offset, len).await?;
        self.mark_range_local(offset, len);
        Ok(())
    }

    /// The extents of the first run of chunks that are all local (asked of the cache) or all
    /// remote (asked of the remote), cut to the range. A remote answer is cut again before the
    /// first chunk that became local while it was asked: that chunk's data is in the cache now.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.layout.size())?;
        let end = offset + len;
        for _ in 0..RACING_TRIES {
            let chunks = self.layout.chunks_touching(offset, len);
            let local = self.local_chunks.get(chunks.start);
            // From the second chunk on: the first one may turn local after it was looked at,
            // and the run must not end before it starts.
            let run_end = (chunks.start + 1..chunks.end)
                .find(|&c| self.local_chunks.get(c) != local)
                .map_or(end, |c| self.layout.chunk_range(c).start);
            if local {
                return self.local.extents(offset, run_end - offset).await;
            }
            let answer = self.remote.extents(offset, run_end - offset).await?;
            // A remote answer is cut to the run (one that says nothing is data).
            let answered = answer.iter().map(|e| e.len).sum::<u64>().min(run_end - offset);
            let answer = match answered {
                0 => vec![Extent::data(run_end - offset)],
                _ => cut_extents(answer, answered),
            };
            let answered = offset + answered.max(1);
            let now_local = self
                .layout
                .chunks_touching(offset, answered - offset)
                .find(|&c| self.local_chunks.get(c))
                .map(|c| self.layout.chunk_range(c).start.max(offset));
            match now_local {
                None => return Ok(answer),
                Some(cut) if cut > offset => return Ok(cut_extents(answer, cut - offset)),
                Some(_) => continue, // the first chunk became local: ask again
            }
        }
        // Chunks keep changing under the question: "data" is always a correct answer.
        Ok(vec![Extent::data(
            (self.layout.chunk_range(self.layout.chunk_of(offset)).end).min(end) - offset,
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
        self.layout.chunk_count()
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
