//! Hole skipping (`SkipHoles` over `Synced`) against a `Vec<u8>` model: the pulled resource
//! equals the model whatever the remote's holes, however it splits or shortens its answers,
//! whatever the cache held before, and whatever is written locally during the pull; whole-chunk
//! holes are never transferred; an answer that predates `mark_remote` is not used; and the
//! synced stage never reports a hole where a read returns data.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use proptest::prelude::*;
use r3map_core::stages::{Arbitrary, PullTarget, Puller, PullerOptions, SkipHoles, Synced};
use r3map_core::testing::{self, pattern};
use r3map_core::{check_range, Backend, Extent, MemoryBackend, Result, SharedBackend};
use tokio::sync::Semaphore;

/// Granularity at which the test remote tracks what was written.
const BLOCK: u64 = 64;

/// A remote that knows its holes exactly (every `BLOCK` never written is a hole) and answers
/// extents in pieces: at most `max_extents` per answer, and sometimes claiming data for a hole
/// (`lie`, always allowed). Counts the bytes read from it. With `hold`, an extents answer waits
/// for a permit before it is returned.
struct SparseRemote {
    data: MemoryBackend,
    written: Mutex<Vec<bool>>,
    max_extents: usize,
    lie: bool,
    read_bytes: AtomicU64,
    hold: Option<Arc<Semaphore>>,
    asked: AtomicBool,
}

impl SparseRemote {
    fn new(size: u64, max_extents: usize, lie: bool) -> Self {
        Self {
            data: MemoryBackend::new(size),
            written: Mutex::new(vec![false; size.div_ceil(BLOCK) as usize]),
            max_extents: max_extents.max(1),
            lie,
            read_bytes: AtomicU64::new(0),
            hold: None,
            asked: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Backend for SparseRemote {
    fn size(&self) -> u64 {
        self.data.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.data.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.data.write_at(offset, data).await?;
        let mut written = self.written.lock();
        if !data.is_empty() {
            for block in offset / BLOCK..=(offset + data.len() as u64 - 1) / BLOCK {
                written[block as usize] = true;
            }
        }
        Ok(())
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        let written = self.written.lock().clone();
        let mut extents: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end && extents.len() < self.max_extents {
            let block = (at / BLOCK) as usize;
            let next = ((block as u64 + 1) * BLOCK).min(end);
            let claimed_data = self.lie && block.is_multiple_of(3);
            let hole = !(written[block] || claimed_data);
            let extent = if hole {
                Extent::hole(next - at)
            } else {
                Extent::data(next - at)
            };
            match extents.last_mut() {
                Some(last) if last.allocation == extent.allocation => last.len += extent.len,
                _ => extents.push(extent),
            }
            at = next;
        }
        // The answer is what the remote held when asked, however late it arrives.
        self.asked.store(true, Ordering::SeqCst);
        if let Some(hold) = &self.hold {
            drop(hold.acquire().await.unwrap());
        }
        Ok(extents)
    }
}

/// Remote data: `(chunk-relative start, length)` pieces in chunks picked by the strategy.
fn written_strategy() -> impl Strategy<Value = Vec<(u64, u64, u64)>> {
    proptest::collection::vec((0u64..40, 0u64..4096, 1u64..3000), 0..12)
}

struct Case {
    remote: Arc<SparseRemote>,
    synced: Arc<Synced>,
    model: Vec<u8>,
    chunk: u64,
}

/// A remote of `chunks` chunks (plus a short tail) with data at `pieces`, and a synced stage
/// over it whose cache holds garbage (a cache's stale bytes must never show through).
async fn case(
    chunks: u64,
    tail: u64,
    chunk: u64,
    pieces: &[(u64, u64, u64)],
    max_extents: usize,
    lie: bool,
) -> Case {
    let size = chunks * chunk + tail;
    let remote = Arc::new(SparseRemote::new(size, max_extents, lie));
    let mut model = vec![0u8; size as usize];
    for &(at_chunk, within, len) in pieces {
        let start = ((at_chunk % chunks.max(1)) * chunk + within % chunk).min(size - 1);
        let len = len.min(size - start);
        let data = pattern(start ^ len, len as usize);
        remote.write_at(start, &data).await.unwrap();
        model[start as usize..(start + len) as usize].copy_from_slice(&data);
    }
    let local = MemoryBackend::new(size);
    local.write_at(0, &pattern(99, size as usize)).await.unwrap();
    let synced = Arc::new(Synced::new(Arc::new(local), remote.clone(), chunk).unwrap());
    Case {
        remote,
        synced,
        model,
        chunk,
    }
}

/// Chunks of the model that hold only zeros and were never written on the remote.
fn hole_chunks(case: &Case) -> Vec<u64> {
    let written = case.remote.written.lock();
    (0..case.synced.layout().chunk_count())
        .filter(|&c| {
            let range = case.synced.layout().chunk_range(c);
            (range.start / BLOCK..range.end.div_ceil(BLOCK)).all(|b| !written[b as usize])
        })
        .collect()
}

fn pull(case: &Case, region_chunks: u64, workers: usize) -> Puller {
    let skip = SkipHoles::new(case.synced.clone(), region_chunks * case.chunk);
    Puller::start(
        Arc::new(skip),
        PullerOptions {
            workers,
            ..PullerOptions::default()
        },
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// An honest remote: every whole-chunk hole is skipped, every other chunk fetched once, only
    /// those bytes are read, and the result equals the model (the garbage cache is zeroed).
    #[test]
    fn holes_are_skipped_and_data_fetched(
        chunks in 1u64..40, tail in 0u64..3000, pieces in written_strategy(),
        max_extents in 1usize..6, region_chunks in 1u64..12, workers in 1usize..9,
    ) {
        testing::block_on(async {
            let case = case(chunks, tail, 4096, &pieces, max_extents, false).await;
            let holes = hole_chunks(&case);
            let puller = pull(&case, region_chunks, workers);
            puller.wait().await.unwrap();
            let count = case.synced.layout().chunk_count();
            prop_assert_eq!(case.synced.hole_count(), holes.len() as u64);
            prop_assert_eq!(case.synced.fetch_count(), count - holes.len() as u64);
            let fetched: u64 = (0..count)
                .filter(|c| !holes.contains(c))
                .map(|c| case.synced.layout().chunk_len(c) as u64)
                .sum();
            prop_assert_eq!(case.remote.read_bytes.load(Ordering::Relaxed), fetched);
            testing::check_content(&*case.synced, &case.model).await
        })?;
    }

    /// A remote that sometimes claims data for its holes, and writes through the stage while
    /// the pull runs (into holes and data alike): the content is the model's, every write
    /// survives, and the stage's extents never call written bytes a hole.
    #[test]
    fn writes_during_a_skipping_pull_survive(
        chunks in 1u64..30, tail in 0u64..3000, pieces in written_strategy(),
        max_extents in 1usize..6, region_chunks in 1u64..8, workers in 1usize..9,
        ops in testing::ops_strategy(9000, 30),
    ) {
        testing::block_on(async {
            let mut case = case(chunks, tail, 4096, &pieces, max_extents, true).await;
            let puller = pull(&case, region_chunks, workers);
            let stage = Arbitrary::new(case.synced.clone() as SharedBackend, 4096).unwrap();
            let size = stage.size();
            testing::run_ops(&stage, &mut case.model, 0..size, 1, &ops).await?;
            // Pulling does not change the content: the extents hold against the model while
            // some chunks are still remote.
            testing::check_extents(&*case.synced, &case.model).await?;
            puller.wait().await.unwrap();
            prop_assert!(case.synced.hole_count() + case.synced.fetch_count() <= case.synced.layout().chunk_count());
            testing::check_content(&stage, &case.model).await?;
            testing::check_content(&*case.synced, &case.model).await
        })?;
    }

    /// Without a pull, after local writes into a sparse remote (some chunks local, most not):
    /// the stage's extents never call a written byte a hole.
    #[test]
    fn synced_extents_hold_for_partly_local_chunks(
        chunks in 1u64..30, tail in 0u64..3000, pieces in written_strategy(),
        max_extents in 1usize..6, lie in any::<bool>(), ops in testing::ops_strategy(9000, 30),
    ) {
        testing::block_on(async {
            let mut case = case(chunks, tail, 4096, &pieces, max_extents, lie).await;
            let stage = Arbitrary::new(case.synced.clone() as SharedBackend, 4096).unwrap();
            let size = stage.size();
            testing::run_ops(&stage, &mut case.model, 0..size, 1, &ops).await?;
            testing::check_extents(&*case.synced, &case.model).await?;
            testing::check_content(&stage, &case.model).await
        })?;
    }
}

/// Chunks marked remote again after their region was looked up are fetched, not taken for the
/// holes they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_marked_remote_after_the_look_up_are_fetched() {
    let case = case(8, 0, 4096, &[(1, 0, 4096)], 16, false).await;
    let skip = SkipHoles::new(case.synced.clone(), 8 * 4096);
    skip.pull(0).await.unwrap();
    assert_eq!(case.synced.hole_count(), 7, "the region's holes were installed");
    let data = pattern(5, 4096);
    case.remote.write_at(3 * 4096, &data).await.unwrap();
    case.synced.mark_remote(&[3]).await;
    skip.pull(3).await.unwrap();
    let mut back = vec![0u8; 4096];
    case.synced.read_at(3 * 4096, &mut back).await.unwrap();
    assert!(back == data, "chunk 3 kept the zeros of the old answer");
}

/// An answer asked before `mark_remote` and arriving after it is not used: the chunks it
/// called holes are fetched. (Without the remote epoch, chunk 3 would be installed as zeros.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_older_than_mark_remote_is_not_used() {
    let size = 8 * 4096;
    let hold = Arc::new(Semaphore::new(0));
    let remote = Arc::new(SparseRemote {
        hold: Some(hold.clone()),
        ..SparseRemote::new(size, 16, false)
    });
    let synced = Arc::new(Synced::new(Arc::new(MemoryBackend::new(size)), remote.clone(), 4096).unwrap());
    let skip = Arc::new(SkipHoles::new(synced.clone(), size));
    let pulling = tokio::spawn({
        let skip = skip.clone();
        async move { skip.pull(0).await }
    });
    while !remote.asked.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    // The look-up's answer (all holes) is on its way; the remote gets data at chunk 3 and the
    // chunk is marked remote, as a migration's finalize does.
    let data = pattern(6, 4096);
    remote.write_at(3 * 4096, &data).await.unwrap();
    synced.mark_remote(&[3]).await;
    hold.add_permits(1);
    pulling.await.unwrap().unwrap();
    assert_eq!(synced.hole_count(), 0, "a stale answer was installed");
    skip.pull(3).await.unwrap();
    let mut back = vec![0u8; 4096];
    synced.read_at(3 * 4096, &mut back).await.unwrap();
    assert!(back == data);
}

/// Without hole information (the default `extents`), everything is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_without_extents_is_pulled_whole() {
    let size = 10 * 4096 + 7;
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    struct NoExtents(SharedBackend);
    #[async_trait]
    impl Backend for NoExtents {
        fn size(&self) -> u64 {
            self.0.size()
        }
        async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read_at(offset, buf).await
        }
        async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
            self.0.write_at(offset, data).await
        }
        async fn sync(&self) -> Result<()> {
            Ok(())
        }
    }
    let synced = Arc::new(
        Synced::new(
            Arc::new(MemoryBackend::new(size)),
            Arc::new(NoExtents(remote)),
            4096,
        )
        .unwrap(),
    );
    let puller = Puller::start(
        Arc::new(SkipHoles::new(synced.clone(), 4 * 4096)),
        PullerOptions::default(),
    )
    .unwrap();
    puller.wait().await.unwrap();
    assert_eq!((synced.fetch_count(), synced.hole_count()), (11, 0));
}

/// The synced stage's extents: local chunks are the cache's answer (a chunk written locally is
/// data even where the remote has a hole), remote chunks the remote's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_extents_take_local_chunks_from_the_cache() {
    let case = case(4, 0, 4096, &[(2, 0, 4096)], 16, false).await;
    let synced = &case.synced;
    // Nothing local: the remote's holes and data.
    assert_eq!(
        collect(synced, 0..4 * 4096).await,
        vec![(0..8192, false), (8192..12288, true), (12288..16384, false)]
    );
    // A local write into a remote hole is data; the local garbage cache is not asked about
    // chunks that are not local.
    synced.write_at(4096, &[1u8; 4096]).await.unwrap();
    let map = collect(synced, 0..4 * 4096).await;
    assert!(map.iter().any(|(r, data)| *data && r.contains(&4096)), "{map:?}");
    assert!(map.iter().any(|(r, data)| !*data && r.contains(&0)), "{map:?}");
}

/// `(range, is data)` for the whole of `range`, asking again after short answers, merged.
async fn collect(backend: &dyn Backend, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
    let mut out: Vec<(Range<u64>, bool)> = Vec::new();
    let mut at = range.start;
    while at < range.end {
        for extent in backend.extents(at, range.end - at).await.unwrap() {
            let data = extent.allocation == r3map_core::Allocation::Data;
            match out.last_mut() {
                Some((last, kind)) if *kind == data => last.end += extent.len,
                _ => out.push((at..at + extent.len, data)),
            }
            at += extent.len;
        }
    }
    out
}

/// A remote whose extents answers break the contract in turn: an error, nothing, an extent of
/// length 0 first, extents longer than the range asked (a hole reaching past it), or its honest
/// answer. Reads are the honest remote's.
struct Misbehaving {
    inner: Arc<SparseRemote>,
    calls: AtomicU64,
}

#[async_trait]
impl Backend for Misbehaving {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let honest = self.inner.extents(offset, len).await?;
        Ok(match self.calls.fetch_add(1, Ordering::Relaxed) % 5 {
            0 => return Err(r3map_core::Error::Remote("the server broke the protocol".into())),
            1 => Vec::new(),
            2 => std::iter::once(Extent::hole(0)).chain(honest).collect(),
            3 => {
                // Data reaching far past the range, then a hole past it (which must not be
                // taken for a hole inside the range). A hole reaching past the range is not
                // among these: a hole longer than the remote's is a lie, like any other.
                let mut long = honest;
                match long.last_mut() {
                    Some(last) if last.allocation == r3map_core::Allocation::Data => last.len += 1 << 40,
                    _ => long.push(Extent::data(1 << 40)),
                }
                long.push(Extent::hole(1 << 20));
                long
            }
            _ => honest,
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the remote's extents answers do, the pulled resource is the model and no chunk
    /// holding remote data is taken for a hole (with an honest answer at least sometimes, some
    /// holes may still be skipped).
    #[test]
    fn a_misbehaving_remote_costs_transfers_never_data(
        chunks in 1u64..30, tail in 0u64..3000, pieces in written_strategy(),
        max_extents in 1usize..6, region_chunks in 1u64..8, workers in 1usize..9,
    ) {
        testing::block_on(async {
            let honest = case(chunks, tail, 4096, &pieces, max_extents, false).await;
            let holes = hole_chunks(&honest);
            let remote = Arc::new(Misbehaving { inner: honest.remote.clone(), calls: AtomicU64::new(0) });
            let size = remote.size();
            let local = MemoryBackend::new(size);
            local.write_at(0, &pattern(98, size as usize)).await.unwrap();
            let synced = Arc::new(Synced::new(Arc::new(local), remote, 4096).unwrap());
            let skip = SkipHoles::new(synced.clone(), region_chunks * 4096);
            let puller = Puller::start(Arc::new(skip), PullerOptions { workers, ..PullerOptions::default() }).unwrap();
            puller.wait().await.unwrap();
            prop_assert!(synced.hole_count() <= holes.len() as u64);
            prop_assert_eq!(synced.hole_count() + synced.fetch_count(), synced.layout().chunk_count());
            testing::check_content(&*synced, &honest.model).await
        })?;
    }
}
