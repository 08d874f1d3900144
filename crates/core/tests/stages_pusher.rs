//! The pusher over the synced stage (the managed stack's core) against a model.

use std::sync::Arc;

use proptest::prelude::*;
use r3map_core::stages::{Arbitrary, Pusher, PusherOptions, Synced};
use r3map_core::testing::{self, pattern};
use r3map_core::{Backend, MemoryBackend, SharedBackend};

const CHUNK: u64 = 64;

/// `Arbitrary(Pusher(Synced(local, remote)))` over a remote with pseudo-random content.
async fn managed_stack(
    size: u64,
    seed: u64,
) -> (Arbitrary<Arc<Pusher>>, Arc<Pusher>, SharedBackend, Vec<u8>) {
    let content = pattern(seed, size as usize);
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    remote.write_at(0, &content).await.unwrap();
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let pusher = Arc::new(Pusher::start(synced, remote.clone(), CHUNK, PusherOptions::default()).unwrap());
    let stack = Arbitrary::new(pusher.clone(), CHUNK).unwrap();
    (stack, pusher, remote, content)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any workload through the managed stack reads back like the model, and after sync the
    /// remote holds exactly the model.
    #[test]
    fn managed_stack_matches_model_and_sync_reaches_the_remote(chunks in 1u64..40, tail in 0u64..CHUNK, seed in any::<u64>(), ops in testing::ops_strategy(300, 40)) {
        testing::block_on(async {
            let size = chunks * CHUNK + tail;
            let (stack, pusher, remote, mut model) = managed_stack(size, seed).await;
            testing::run_ops(&stack, &mut model, 0..size, 1, &ops).await?;
            testing::check_content(&stack, &model).await?;
            stack.sync().await.unwrap();
            prop_assert_eq!(pusher.dirty_count(), 0);
            testing::check_content(&*remote, &model).await
        })?;
    }
}

#[test]
fn concurrent_access_through_the_managed_stack_matches_model() {
    testing::block_on(async {
        let size = CHUNK * 300 + 7;
        let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
        let local: SharedBackend = Arc::new(MemoryBackend::new(size));
        let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
        let pusher =
            Arc::new(Pusher::start(synced, remote.clone(), CHUNK, PusherOptions::default()).unwrap());
        let stack = Arc::new(Arbitrary::new(pusher.clone(), CHUNK).unwrap());
        testing::check_concurrent(stack.clone(), 1, 8, 300).await.unwrap();
        pusher.sync().await.unwrap();
        let mut local_view = vec![0; size as usize];
        stack.read_at(0, &mut local_view).await.unwrap();
        testing::check_content(&*remote, &local_view).await.unwrap();
    });
}

#[tokio::test]
async fn pushed_bytes_count_whole_chunks_once() {
    let (stack, pusher, _, _) = managed_stack(CHUNK * 10, 3).await;
    stack.write_at(5, &[1; 10]).await.unwrap();
    stack
        .write_at(CHUNK * 3 + 1, &[2; (CHUNK * 2) as usize])
        .await
        .unwrap();
    assert_eq!(pusher.dirty_count(), 4);
    stack.sync().await.unwrap();
    assert_eq!(pusher.pushed_bytes(), 4 * CHUNK);
    stack.sync().await.unwrap();
    assert_eq!(pusher.pushed_bytes(), 4 * CHUNK, "a clean sync pushed again");
}

/// A remote that, while `frozen`, answers every write only after `deadline`, with a timeout
/// (what the reconnect stage does for a server that stopped answering).
struct FreezingRemote {
    data: MemoryBackend,
    frozen: std::sync::atomic::AtomicBool,
    deadline: std::time::Duration,
    write_attempts: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl Backend for FreezingRemote {
    fn size(&self) -> u64 {
        self.data.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> r3map_core::Result<()> {
        self.data.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> r3map_core::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.write_attempts.fetch_add(1, SeqCst);
        if self.frozen.load(SeqCst) {
            tokio::time::sleep(self.deadline).await;
            return Err(r3map_core::Error::Timeout(self.deadline));
        }
        self.data.write_at(offset, data).await
    }
    async fn sync(&self) -> r3map_core::Result<()> {
        Ok(())
    }
}

/// A flush against a remote that stopped answering fails after one request deadline (not one
/// per batch of workers), leaves every chunk dirty, and the next flush pushes them all.
#[tokio::test(start_paused = true)]
async fn a_failing_flush_stops_at_the_first_failure_and_keeps_every_chunk() {
    use std::sync::atomic::Ordering::SeqCst;
    let chunks = 200u64;
    let deadline = std::time::Duration::from_secs(30);
    let remote = Arc::new(FreezingRemote {
        data: MemoryBackend::new(chunks * CHUNK),
        frozen: true.into(),
        deadline,
        write_attempts: 0.into(),
    });
    let local: SharedBackend = Arc::new(MemoryBackend::new(chunks * CHUNK));
    let options = PusherOptions {
        workers: 8,
        interval: std::time::Duration::from_secs(1 << 20),
    };
    let pusher = Pusher::start(local, remote.clone(), CHUNK, options).unwrap();
    let model = pattern(9, (chunks * CHUNK) as usize);
    pusher.write_at(0, &model).await.unwrap();
    assert_eq!(pusher.dirty_count(), chunks);

    let started = tokio::time::Instant::now();
    let result = pusher.flush().await;
    let took = started.elapsed();
    assert!(matches!(result, Err(r3map_core::Error::Timeout(_))), "{result:?}");
    assert!(
        took < deadline * 2,
        "the failing flush took {took:?}: it waited out the deadline more than once"
    );
    assert!(
        remote.write_attempts.load(SeqCst) <= 2 * 8,
        "{} chunks were tried after the first failure",
        remote.write_attempts.load(SeqCst)
    );
    assert_eq!(
        pusher.dirty_count(),
        chunks,
        "a chunk left the dirty set unpushed"
    );
    assert_eq!(pusher.unpushed_count(), chunks);

    remote.frozen.store(false, SeqCst);
    pusher.flush().await.unwrap();
    assert_eq!((pusher.dirty_count(), pusher.unpushed_count()), (0, 0));
    testing::check_content(&remote.data, &model).await.unwrap();
}

/// Without push on sync, a sync leaves the remote alone (its writes stay dirty), while a flush
/// and close still push; the background flush pushes too (its interval is an hour here, so only
/// the explicit calls can have pushed).
#[tokio::test]
async fn without_push_on_sync_a_sync_stays_local_and_flush_and_close_push() {
    let size = CHUNK * 8;
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let options = PusherOptions {
        interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let pusher = Arc::new(Pusher::start(synced, remote.clone(), CHUNK, options).unwrap());
    pusher.set_push_on_sync(false);
    pusher.write_at(CHUNK, &[7; CHUNK as usize]).await.unwrap();
    pusher.sync().await.unwrap();
    assert_eq!(pusher.dirty_count(), 1, "a local sync pushed");
    testing::check_content(&*remote, &vec![0; size as usize])
        .await
        .unwrap();
    pusher.flush().await.unwrap();
    assert_eq!(pusher.dirty_count(), 0);
    let mut expected = vec![0; size as usize];
    expected[CHUNK as usize..2 * CHUNK as usize].fill(7);
    testing::check_content(&*remote, &expected).await.unwrap();
    pusher.write_at(3 * CHUNK, &[9; CHUNK as usize]).await.unwrap();
    pusher.sync().await.unwrap();
    assert_eq!(pusher.dirty_count(), 1);
    pusher.close().await.unwrap();
    expected[3 * CHUNK as usize..4 * CHUNK as usize].fill(9);
    testing::check_content(&*remote, &expected).await.unwrap();
    assert_eq!(pusher.dirty_count(), 0);
}
