//! Critical word first in the synced stage: a miss of part of a chunk is answered from a read of
//! just that part, and the whole chunk is filled after it. A remote that holds every
//! whole-chunk read until the test lets it go proves the order without timing anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::stages::{Arbitrary, Synced};
use r3map_core::testing::pattern;
use r3map_core::{Backend, MemoryBackend, Result, SharedBackend};
use tokio::sync::{watch, Semaphore};

const CHUNK: u64 = 1 << 20;
const SIZE: u64 = 4 * CHUNK;

/// A remote that answers reads of up to `small` bytes at once and holds longer ones until
/// `release` lets them go, recording every read and announcing each held one.
struct HoldsWholeChunks {
    inner: MemoryBackend,
    small: u64,
    release: Semaphore,
    reads: Mutex<Vec<(u64, u64)>>,
    held: watch::Sender<u64>,
    /// While set, a held read fails when it is let go (as a lost connection or a deadline
    /// would make it fail).
    fail_held: AtomicBool,
}

impl HoldsWholeChunks {
    async fn new(content: &[u8], small: u64) -> Arc<Self> {
        let inner = MemoryBackend::new(content.len() as u64);
        inner.write_at(0, content).await.unwrap();
        Arc::new(Self {
            inner,
            small,
            release: Semaphore::new(0),
            reads: Mutex::new(Vec::new()),
            held: watch::channel(0).0,
            fail_held: AtomicBool::new(false),
        })
    }

    /// Waits until `count` long reads in all have arrived and are held.
    async fn held(&self, count: u64) {
        let mut held = self.held.subscribe();
        held.wait_for(|&n| n >= count).await.unwrap();
    }

    fn reads(&self) -> Vec<(u64, u64)> {
        self.reads.lock().clone()
    }
}

#[async_trait]
impl Backend for HoldsWholeChunks {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        Some(4096)
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.reads.lock().push((offset, len));
        if len > self.small {
            self.held.send_modify(|n| *n += 1);
            self.release.acquire().await.unwrap().forget();
            if self.fail_held.load(Ordering::SeqCst) {
                return Err(r3map_core::Error::from(std::io::Error::other(
                    "injected fill failure",
                )));
            }
        }
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// A guard against a hang, not a synchronisation: every wait below ends by an event.
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

fn synced_over(remote: &Arc<HoldsWholeChunks>) -> Arc<Synced> {
    let local: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requested_range_is_answered_before_the_rest_of_its_chunk_is_fetched() {
    let content = pattern(17, SIZE as usize);
    let remote = HoldsWholeChunks::new(&content, 64 << 10).await;
    let synced = synced_over(&remote);
    assert!(synced.range_first());
    // Unaligned, through Arbitrary as mounts do: it reaches the remote as one 4 KiB read.
    let stack = Arbitrary::new(synced.clone(), CHUNK).unwrap();
    let at = CHUNK + 10_000;
    let mut buf = vec![0u8; 100];
    bounded("the small read", stack.read_at(at, &mut buf))
        .await
        .unwrap();
    assert_eq!(buf, content[at as usize..at as usize + 100]);
    assert_eq!(
        remote.reads()[0],
        (CHUNK + 8192, 4096),
        "the first request is the range"
    );
    assert!(
        !synced.is_local(1),
        "the chunk was installed before the caller got its bytes"
    );
    // The fill of the whole chunk follows at once, and stays held.
    bounded("the fill", remote.held(1)).await;
    assert_eq!(remote.reads()[1], (CHUNK, CHUNK));
    // Another small reader of the same chunk does not wait for the fill either.
    let mut other = vec![0u8; 4096];
    bounded(
        "a second small read",
        synced.read_at(CHUNK + 3 * 4096, &mut other),
    )
    .await
    .unwrap();
    assert_eq!(
        other,
        content[(CHUNK + 3 * 4096) as usize..(CHUNK + 4 * 4096) as usize]
    );
    // A reader of the whole chunk, and the pull, join the fill in flight.
    let whole = tokio::spawn({
        let synced = synced.clone();
        async move {
            let mut whole = vec![0u8; CHUNK as usize];
            synced.read_at(CHUNK, &mut whole).await.map(|()| whole)
        }
    });
    let pull = tokio::spawn({
        let synced = synced.clone();
        async move { synced.fetch(1).await }
    });
    remote.release.add_permits(1);
    let whole = bounded("the whole-chunk read", whole).await.unwrap().unwrap();
    bounded("the pull", pull).await.unwrap().unwrap();
    assert_eq!(whole, content[CHUNK as usize..2 * CHUNK as usize]);
    assert!(synced.is_local(1));
    assert_eq!(synced.fetch_count(), 1, "the chunk was fetched more than once");
    assert_eq!(synced.range_read_count(), 2);
    let long_reads = remote.reads().iter().filter(|r| r.1 > 4096).count();
    assert_eq!(long_reads, 1);
    // Local now: answered without the remote.
    let before = remote.reads().len();
    synced.read_at(CHUNK + 500, &mut buf).await.unwrap();
    assert_eq!(buf, content[(CHUNK + 500) as usize..(CHUNK + 600) as usize]);
    assert_eq!(remote.reads().len(), before);
}

/// A write that lands while the fill is held is not overwritten by the fill's older bytes, and
/// a reader after the write sees the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_fill_never_overwrites_a_write_made_meanwhile() {
    let content = pattern(18, SIZE as usize);
    let remote = HoldsWholeChunks::new(&content, 64 << 10).await;
    let synced = synced_over(&remote);
    let mut buf = vec![0u8; 4096];
    bounded("the small read", synced.read_at(2 * CHUNK, &mut buf))
        .await
        .unwrap();
    bounded("the fill", remote.held(1)).await;
    let new = vec![0xE7u8; CHUNK as usize];
    bounded("the write", synced.write_at(2 * CHUNK, &new))
        .await
        .unwrap();
    assert!(synced.is_local(2));
    remote.release.add_permits(1);
    // Every fill in flight has ended (installed or given up) once stop_fills returns; a pull
    // would not wait, as the write made the chunk local already.
    bounded("the fill's end", synced.stop_fills()).await;
    let mut after = vec![0u8; CHUNK as usize];
    synced.read_at(2 * CHUNK, &mut after).await.unwrap();
    assert_eq!(after, new, "the fill replaced a newer write");
    let mut on_remote = vec![0u8; CHUNK as usize];
    remote.inner.read_at(2 * CHUNK, &mut on_remote).await.unwrap();
    assert_eq!(on_remote, content[2 * CHUNK as usize..3 * CHUNK as usize]);
}

/// A fill that fails is a failed fetch: the chunk stays remote, its single-flight slot is
/// freed, and a reader of the whole chunk (waiting for the fill or not) fetches it itself and
/// gets the right bytes. Small reads of the chunk are answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_leaves_the_chunk_to_the_next_fetch() {
    let content = pattern(20, SIZE as usize);
    let remote = HoldsWholeChunks::new(&content, 64 << 10).await;
    let synced = synced_over(&remote);
    let mut buf = vec![0u8; 4096];
    bounded("the small read", synced.read_at(CHUNK + 4096, &mut buf))
        .await
        .unwrap();
    assert_eq!(buf, content[(CHUNK + 4096) as usize..(CHUNK + 8192) as usize]);
    bounded("the fill", remote.held(1)).await;
    let whole = tokio::spawn({
        let synced = synced.clone();
        async move {
            let mut whole = vec![0u8; CHUNK as usize];
            synced.read_at(CHUNK, &mut whole).await.map(|()| whole)
        }
    });
    remote.fail_held.store(true, Ordering::SeqCst);
    remote.release.add_permits(1);
    // The whole-chunk reader's own fetch is the second long read; it succeeds.
    bounded("the retry", remote.held(2)).await;
    assert!(!synced.is_local(1), "a failed fill made the chunk local");
    bounded("a small read after the failure", synced.read_at(CHUNK, &mut buf))
        .await
        .unwrap();
    assert_eq!(buf, content[CHUNK as usize..(CHUNK + 4096) as usize]);
    remote.fail_held.store(false, Ordering::SeqCst);
    remote.release.add_permits(1);
    let whole = bounded("the whole-chunk read", whole).await.unwrap().unwrap();
    assert_eq!(whole, content[CHUNK as usize..2 * CHUNK as usize]);
    assert!(synced.is_local(1));
    assert_eq!(synced.fetch_count(), 2, "the failed fill and the reader's fetch");
    let long = remote.reads().iter().filter(|r| r.1 > 4096).count();
    assert_eq!(long, 2, "one more fetch than those two: {:?}", remote.reads());
}

/// `stop_fills` ends the fill in flight without waiting for the remote (a remote that never
/// answers does not hold up a close; the chunk stays remote), and no fill starts after it;
/// misses of part of a chunk are still answered, and a whole-chunk read still fetches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_fills_ends_fills_in_flight_and_starts_none() {
    let content = pattern(21, SIZE as usize);
    let remote = HoldsWholeChunks::new(&content, 64 << 10).await;
    let synced = synced_over(&remote);
    let mut buf = vec![0u8; 4096];
    bounded("the small read", synced.read_at(0, &mut buf))
        .await
        .unwrap();
    bounded("the fill", remote.held(1)).await;
    // The held read is never let go: stop_fills returns only if it gives up on it.
    bounded("stop_fills", synced.stop_fills()).await;
    assert!(!synced.is_local(0), "a fill that gave up made its chunk local");
    bounded("a small read after the stop", synced.read_at(3 * CHUNK, &mut buf))
        .await
        .unwrap();
    assert_eq!(buf, content[3 * CHUNK as usize..(3 * CHUNK + 4096) as usize]);
    // A fill started now would be held by the remote; stop_fills would end it, so check the
    // remote's log too.
    bounded("stop_fills again", synced.stop_fills()).await;
    assert_eq!(remote.reads(), vec![(0, 4096), (0, CHUNK), (3 * CHUNK, 4096)]);
    assert!(!synced.is_local(3));
    // The fill's single-flight slot was freed: a whole-chunk read of chunk 0 fetches it.
    let whole = tokio::spawn({
        let synced = synced.clone();
        async move {
            let mut whole = vec![0u8; CHUNK as usize];
            synced.read_at(0, &mut whole).await.map(|()| whole)
        }
    });
    bounded("the whole-chunk fetch", remote.held(2)).await;
    remote.release.add_permits(1);
    let whole = bounded("the whole-chunk read", whole).await.unwrap().unwrap();
    assert_eq!(whole, content[..CHUNK as usize]);
    assert!(synced.is_local(0));
}

/// Range-first off (or a remote that serves only whole chunks): the miss waits for the chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_range_first_a_small_miss_waits_for_the_whole_chunk() {
    let content = pattern(19, SIZE as usize);
    let remote = HoldsWholeChunks::new(&content, 64 << 10).await;
    let local: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let synced = Arc::new(
        Synced::new(local, remote.clone(), CHUNK)
            .unwrap()
            .with_range_first(false),
    );
    assert!(!synced.range_first());
    let reader = tokio::spawn({
        let synced = synced.clone();
        async move {
            let mut buf = vec![0u8; 4096];
            synced.read_at(4096, &mut buf).await.map(|()| buf)
        }
    });
    bounded("the chunk fetch", remote.held(1)).await;
    assert!(!reader.is_finished());
    assert_eq!(remote.reads(), vec![(0, CHUNK)]);
    remote.release.add_permits(1);
    let buf = bounded("the read", reader).await.unwrap().unwrap();
    assert_eq!(buf, content[4096..8192]);
    assert!(synced.is_local(0));
    assert_eq!(synced.range_read_count(), 0);
}

/// A remote whose read unit is a whole chunk (a store) gets no range reads.
#[test]
fn a_whole_chunk_remote_has_no_range_first() {
    let remote: SharedBackend =
        Arc::new(r3map_core::stages::Chunked::new(MemoryBackend::new(SIZE), CHUNK, u64::MAX).unwrap());
    let synced = Synced::new(Arc::new(MemoryBackend::new(SIZE)), remote, CHUNK).unwrap();
    assert!(!synced.range_first());
    assert_eq!(
        synced.read_alignment(),
        Some(1),
        "local chunks are still read in part"
    );
}
