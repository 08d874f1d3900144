//! The puller: order, re-queueing, completion and progress.

use std::sync::Arc;

use parking_lot::Mutex;
use r3map_core::stages::{Priority, Puller, PullerOptions, Synced};
use r3map_core::testing::pattern;
use r3map_core::{Backend, ChunkLayout, MemoryBackend, SharedBackend};

const CHUNK: u64 = 512;

/// A synced stage over a remote with known content that records the order chunks became local.
async fn recording_synced(chunks: u64) -> (Arc<Synced>, Arc<Mutex<Vec<u64>>>, Vec<u8>) {
    let size = chunks * CHUNK;
    let content = pattern(9, size as usize);
    let remote = MemoryBackend::new(size);
    remote.write_at(0, &content).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let hook_order = order.clone();
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let synced = Synced::new(local, Arc::new(remote), CHUNK)
        .unwrap()
        .with_hook(Arc::new(move |chunk| hook_order.lock().push(chunk)));
    (Arc::new(synced), order, content)
}

async fn pull_order(priority: Priority) -> Vec<u64> {
    let (synced, order, _) = recording_synced(8).await;
    let puller = Puller::start(synced, PullerOptions { workers: 1, priority }).unwrap();
    puller.wait().await.unwrap();
    let order = order.lock().clone();
    order
}

#[tokio::test]
async fn one_worker_pulls_in_priority_order() {
    assert_eq!(
        pull_order(Priority::sequential()).await,
        vec![0, 1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(
        pull_order(Priority::reverse()).await,
        vec![7, 6, 5, 4, 3, 2, 1, 0]
    );
    let layout = ChunkLayout::new(8 * CHUNK, CHUNK).unwrap();
    let first = Priority::ranges_first(layout, vec![5 * CHUNK + 10..5 * CHUNK + 20, 2 * CHUNK..4 * CHUNK]);
    assert_eq!(pull_order(first).await, vec![5, 2, 3, 0, 1, 4, 6, 7]);
    // Clipped at the end; a chunk in two ranges ranks by the first; an empty range is no range.
    let clipped = Priority::ranges_first(
        layout,
        vec![
            7 * CHUNK + 1..100 * CHUNK,
            3 * CHUNK..3 * CHUNK,
            6 * CHUNK..8 * CHUNK,
        ],
    );
    assert_eq!(pull_order(clipped).await, vec![7, 6, 0, 1, 2, 3, 4, 5]);
    assert_eq!(
        pull_order(Priority::custom(|c| (c % 2) as i64)).await,
        vec![1, 3, 5, 7, 0, 2, 4, 6]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_workers_pull_everything_exactly_once() {
    let (synced, order, content) = recording_synced(3000).await;
    let puller = Puller::start(
        synced.clone(),
        PullerOptions {
            workers: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    puller.wait().await.unwrap();
    let progress = puller.progress().borrow().clone();
    assert!(progress.finished && progress.error.is_none());
    assert_eq!((progress.pulled, progress.total), (3000, 3000));
    assert_eq!(synced.fetch_count(), 3000);
    let mut seen = order.lock().clone();
    seen.sort_unstable();
    assert_eq!(seen, (0..3000).collect::<Vec<_>>());
    let mut all = vec![0; content.len()];
    synced.read_at(0, &mut all).await.unwrap();
    assert_eq!(all, content);
}

#[tokio::test]
async fn pull_first_requeues_chunks_ahead_of_the_rest() {
    let (synced, order, content) = recording_synced(6).await;
    let puller = Puller::start(
        synced.clone(),
        PullerOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .unwrap();
    puller.wait().await.unwrap();
    // Chunks 4 and 1 change remotely; a migration destination marks them remote and re-pulls.
    synced.mark_remote(&[4, 1]).await;
    order.lock().clear();
    puller.pull_first(&[4, 1]);
    puller.wait().await.unwrap();
    assert_eq!(*order.lock(), vec![4, 1]);
    assert_eq!(synced.fetch_count(), 8);
    let mut all = vec![0; content.len()];
    synced.read_at(0, &mut all).await.unwrap();
    assert_eq!(all, content);
}

#[tokio::test]
async fn stopped_puller_makes_wait_return() {
    let (synced, _, _) = recording_synced(64).await;
    let puller = Puller::start(
        synced,
        PullerOptions {
            workers: 1,
            ..Default::default()
        },
    )
    .unwrap();
    // Stopped before its worker ran (this runtime has one thread, not yielded to yet): the
    // pull never finished, so `wait` reports the closure, and returns (bounded here: a hang
    // fails with a name instead of holding up the suite).
    puller.stop();
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), puller.wait())
        .await
        .expect("wait did not return after stop");
    assert!(matches!(result, Err(r3map_core::Error::Closed)), "{result:?}");
}

#[tokio::test]
async fn a_puller_stopped_after_it_finished_still_reports_success() {
    let (synced, _, _) = recording_synced(8).await;
    let puller = Puller::start(
        synced.clone(),
        PullerOptions {
            workers: 2,
            ..Default::default()
        },
    )
    .unwrap();
    puller.wait().await.unwrap();
    puller.stop();
    puller.wait().await.unwrap();
    assert_eq!(synced.local_count(), 8);
}

#[tokio::test]
async fn zero_workers_are_refused() {
    let (synced, _, _) = recording_synced(1).await;
    assert!(Puller::start(
        synced,
        PullerOptions {
            workers: 0,
            ..Default::default()
        }
    )
    .is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Whatever the size, chunk size, worker count and priority, the puller makes every chunk
    /// local exactly once, the cache then equals the remote (the model), and reads racing the
    /// pull see the model too.
    #[test]
    fn pulls_every_chunk_once_and_the_cache_equals_the_remote(
        size in 1u64..20_000,
        chunk in 1u64..2_000,
        workers in 1usize..300,
        seed in proptest::prelude::any::<u64>(),
        reads in proptest::collection::vec((proptest::prelude::any::<u64>(), 1u64..3000), 0..20),
    ) {
        r3map_core::testing::block_on(async move {
            let content = pattern(seed, size as usize);
            let remote = MemoryBackend::new(size);
            remote.write_at(0, &content).await.unwrap();
            let local: SharedBackend = Arc::new(MemoryBackend::new(size));
            let synced = Arc::new(Synced::new(local, Arc::new(remote), chunk).unwrap());
            let priority = Priority::custom(move |c| (c.wrapping_mul(seed | 1) % 7) as i64);
            let puller = Puller::start(synced.clone(), PullerOptions { workers, priority }).unwrap();
            let stack = r3map_core::stages::Arbitrary::new(synced.clone(), chunk).unwrap();
            for (at, len) in reads {
                let offset = at % size;
                let len = len.min(size - offset);
                let mut buf = vec![0; len as usize];
                stack.read_at(offset, &mut buf).await.unwrap();
                assert_eq!(buf, content[offset as usize..(offset + len) as usize]);
            }
            puller.wait().await.unwrap();
            let count = size.div_ceil(chunk);
            assert_eq!(synced.local_count(), count);
            assert_eq!(synced.fetch_count(), count, "some chunk was fetched twice");
            r3map_core::testing::check_content(&*synced, &content).await.unwrap();
        });
    }
}

/// Chunk numbers given by callers past the end are ignored, never a panic.
#[tokio::test]
async fn chunk_numbers_past_the_end_are_ignored() {
    let (synced, _, _) = recording_synced(4).await;
    synced.mark_local([2, 4, u64::MAX]);
    synced.mark_remote(&[2, 99]).await;
    assert_eq!(synced.local_count(), 0);
    let remote: SharedBackend = Arc::new(MemoryBackend::new(4 * CHUNK));
    let pusher = r3map_core::stages::Pusher::start(synced, remote, CHUNK, Default::default()).unwrap();
    pusher.mark_dirty([1, 4, 1000]);
    assert_eq!(pusher.dirty_count(), 1);
}

/// A target whose pulls wait until released, counting those that ended.
struct HeldPulls {
    started: tokio::sync::watch::Sender<u64>,
    release: tokio::sync::Semaphore,
    ended: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl r3map_core::stages::PullTarget for HeldPulls {
    fn chunk_count(&self) -> u64 {
        16
    }
    async fn pull(&self, _chunk: u64) -> r3map_core::Result<()> {
        self.started.send_modify(|n| *n += 1);
        self.release.acquire().await.unwrap().forget();
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// `stop_and_wait` returns only once the pulls in flight have ended, and no pull starts after
/// it (a mount's last checkpoint comes after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_wait_waits_for_the_pulls_in_flight() {
    use std::sync::atomic::Ordering::SeqCst;
    let target = Arc::new(HeldPulls {
        started: tokio::sync::watch::channel(0).0,
        release: tokio::sync::Semaphore::new(0),
        ended: Default::default(),
    });
    let puller = Puller::start(
        target.clone(),
        PullerOptions {
            workers: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut started = target.started.subscribe();
    started.wait_for(|&n| n == 3).await.unwrap();
    let stopping = puller.stop_and_wait();
    tokio::pin!(stopping);
    // Polled until it has stopped the workers and waits: it cannot finish with three pulls held.
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    // Two of the three end; the third still holds it.
    target.release.add_permits(2);
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    target.release.add_permits(16);
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("stop_and_wait did not return after the pulls ended");
    assert_eq!(
        target.ended.load(SeqCst),
        3,
        "a pull started after the stop or was not waited for"
    );
    assert_eq!(*target.started.borrow(), 3);
}
