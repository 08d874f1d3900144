//! Regression tests named after the pitfalls of the Go implementation (BRIEF §5).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use r3map_core::stages::{Puller, PullerOptions, Pusher, PusherOptions, Synced};
use r3map_core::testing::{pattern, FaultyBackend};
use r3map_core::{Backend, Error, MemoryBackend, SharedBackend};

const CHUNK: u64 = 4096;

async fn filled_memory(size: u64, seed: u64) -> (Arc<MemoryBackend>, Vec<u8>) {
    let content = pattern(seed, size as usize);
    let backend = Arc::new(MemoryBackend::new(size));
    backend.write_at(0, &content).await.unwrap();
    (backend, content)
}

async fn read_all(backend: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0; backend.size() as usize];
    backend.read_at(0, &mut buf).await.unwrap();
    buf
}

/// Go: a write racing a push lost the update. Here a writer keeps rewriting one chunk and
/// syncing while two flushers push the same chunk back to back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_write_racing_a_push_is_never_lost() {
    let remote: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 2));
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 2));
    let pusher = Arc::new(Pusher::start(local, remote.clone(), CHUNK, PusherOptions::default()).unwrap());
    let writing = Arc::new(AtomicBool::new(true));
    // Two flushers, like the interval push and an explicit sync meeting.
    let flushers: Vec<_> = (0..2)
        .map(|_| {
            let (pusher, writing) = (pusher.clone(), writing.clone());
            tokio::spawn(async move {
                while writing.load(Ordering::Acquire) {
                    pusher.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // After every sync the remote must hold the write made before it, even though background
    // flushes were pushing the same chunk at the same time.
    for round in 0..500u32 {
        let value = (round % 251) as u8 + 1;
        pusher.write_at(0, &vec![value; CHUNK as usize]).await.unwrap();
        pusher.sync().await.unwrap();
        let remote_bytes = read_all(&*remote).await;
        assert!(
            remote_bytes[..CHUNK as usize].iter().all(|&b| b == value),
            "round {round}: the remote lost the write"
        );
    }
    writing.store(false, Ordering::Release);
    for flusher in flushers {
        flusher.await.unwrap();
    }
    assert_eq!(pusher.dirty_count(), 0);
}

/// Go: concurrent write + sync crashed. Many writers and syncs at once all succeed, and the
/// remote ends up equal to the local side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_concurrent_write_and_sync_succeed() {
    let size = CHUNK * 64 + 100;
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let pusher =
        Arc::new(Pusher::start(local.clone(), remote.clone(), CHUNK, PusherOptions::default()).unwrap());
    let mut tasks = Vec::new();
    for task in 0..16u64 {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let offset = ((task * 50 + i) * 977) % (size - 300);
                pusher.write_at(offset, &pattern(task * 1000 + i, 300)).await?;
                if i % 5 == 0 {
                    pusher.sync().await?;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    pusher.sync().await.unwrap();
    assert_eq!(read_all(&*remote).await, read_all(&*local).await);
}

/// Go: failing puller workers made `wait` hang forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puller_failing_remote_surfaces_the_error_and_wait_returns() {
    let (memory, _) = filled_memory(CHUNK * 100, 1).await;
    let remote = Arc::new(FaultyBackend::new(memory));
    remote.fail_reads.store(true, Ordering::SeqCst);
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 100));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let puller = Puller::start(
        synced.clone(),
        PullerOptions {
            workers: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), puller.wait())
        .await
        .expect("wait hung");
    let err = result.unwrap_err();
    assert!(err.to_string().contains("injected read failure"), "{err}");
    assert_eq!(
        puller.progress().borrow().error.as_ref().map(|e| e.to_string()),
        Some(err.to_string())
    );
    // Once the remote recovers, the failed chunks can be pulled again.
    remote.fail_reads.store(false, Ordering::SeqCst);
    let missing: Vec<u64> = (0..100).filter(|&c| !synced.is_local(c)).collect();
    puller.pull_first(&missing);
    tokio::time::timeout(Duration::from_secs(10), puller.wait())
        .await
        .expect("wait hung")
        .unwrap();
    assert_eq!(synced.local_count(), 100);
}

/// Go: the migration leecher's wait could block forever (a count off by one when a dirty list
/// had nothing new). Here: re-queuing an empty list after the pull finished must not make `wait`
/// hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puller_wait_returns_after_pull_first_of_nothing() {
    let (memory, _) = filled_memory(CHUNK * 10, 2).await;
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 10));
    let synced = Arc::new(Synced::new(local, memory, CHUNK).unwrap());
    let puller = Puller::start(synced.clone(), PullerOptions::default()).unwrap();
    puller.wait().await.unwrap();
    puller.pull_first(&[]);
    tokio::time::timeout(Duration::from_secs(10), puller.wait())
        .await
        .expect("wait hung after pull_first(&[])")
        .unwrap();
    assert!(puller.progress().borrow().finished);
}

/// Go: a size that is not a multiple of the chunk size left the tail chunk never pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_chunk_is_pulled_and_pushed_when_size_is_not_a_chunk_multiple() {
    let size = CHUNK * 10 + 123;
    let (remote, content) = filled_memory(size, 2).await;
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let synced = Arc::new(Synced::new(local.clone(), remote.clone(), CHUNK).unwrap());
    let puller = Puller::start(synced.clone(), PullerOptions::default()).unwrap();
    puller.wait().await.unwrap();
    assert_eq!(synced.local_count(), 11, "the tail chunk was not pulled");
    assert_eq!(read_all(&*local).await, content);

    let pusher = Pusher::start(synced.clone(), remote.clone(), CHUNK, PusherOptions::default()).unwrap();
    pusher.write_at(CHUNK * 10, &[0xAB; 123]).await.unwrap();
    pusher.sync().await.unwrap();
    let remote_bytes = read_all(&*remote).await;
    assert!(
        remote_bytes[(CHUNK * 10) as usize..].iter().all(|&b| b == 0xAB),
        "the tail chunk was not pushed"
    );
    assert_eq!(
        remote_bytes[..(CHUNK * 10) as usize],
        content[..(CHUNK * 10) as usize]
    );
}

/// Go: close ignored the final sync error, and sync always returned success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_returns_the_final_sync_error() {
    let remote = Arc::new(FaultyBackend::new(Arc::new(MemoryBackend::new(CHUNK * 4))));
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 4));
    let pusher = Pusher::start(local, remote.clone(), CHUNK, PusherOptions::default()).unwrap();
    pusher.write_at(0, &[1; 10]).await.unwrap();
    remote.fail_writes.store(true, Ordering::SeqCst);
    let err = pusher.sync().await.unwrap_err();
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert_eq!(pusher.dirty_count(), 1, "a failed push must keep the chunk dirty");
    let err = pusher.close().await.unwrap_err();
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert!(matches!(pusher.write_at(0, &[2]).await, Err(Error::Closed)));
}

/// Go: the default options silently disabled push. The defaults push on their own, and a
/// configuration that would never push is refused.
#[tokio::test(start_paused = true)]
async fn default_pusher_options_push_in_the_background() {
    let options = PusherOptions::default();
    let remote: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 4));
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 4));
    let pusher = Pusher::start(local, remote.clone(), CHUNK, options.clone()).unwrap();
    pusher.write_at(CHUNK, &[5; 100]).await.unwrap();
    assert_eq!(read_all(&*remote).await[CHUNK as usize], 0);
    tokio::time::sleep(options.interval * 2).await; // paused clock: advances instantly
    for _ in 0..100 {
        if pusher.dirty_count() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        read_all(&*remote).await[CHUNK as usize],
        5,
        "nothing was pushed without an explicit sync"
    );

    let zero_interval = PusherOptions {
        interval: Duration::ZERO,
        ..PusherOptions::default()
    };
    let refused = Pusher::start(
        Arc::new(MemoryBackend::new(1)),
        Arc::new(MemoryBackend::new(1)),
        1,
        zero_interval,
    );
    assert!(matches!(refused, Err(Error::InvalidConfig(_))));
    let no_workers = PusherOptions {
        workers: 0,
        ..PusherOptions::default()
    };
    let refused = Pusher::start(
        Arc::new(MemoryBackend::new(1)),
        Arc::new(MemoryBackend::new(1)),
        1,
        no_workers,
    );
    assert!(matches!(refused, Err(Error::InvalidConfig(_))));
}

/// Go: error paths left locks held. Failing writes, reads and fetches through every locking
/// stage release their chunk locks: once the remote recovers, the same chunks work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_paths_release_chunk_locks() {
    use r3map_core::stages::Arbitrary;
    let (memory, content) = filled_memory(CHUNK * 4, 3).await;
    let remote = Arc::new(FaultyBackend::new(memory));
    let local: SharedBackend = Arc::new(MemoryBackend::new(CHUNK * 4));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let stack = Arbitrary::new(synced.clone(), CHUNK).unwrap();
    remote.fail_reads.store(true, Ordering::SeqCst);
    // A partial write needs the chunk's old bytes: the fetch fails inside the locked section.
    assert!(stack.write_at(10, &[1; 10]).await.is_err());
    assert!(stack.read_at(CHUNK, &mut [0; 100]).await.is_err());
    remote.fail_reads.store(false, Ordering::SeqCst);
    let recovered = tokio::time::timeout(Duration::from_secs(5), async {
        stack.write_at(10, &[1; 10]).await.unwrap();
        let mut buf = vec![0; 100];
        stack.read_at(CHUNK, &mut buf).await.unwrap();
        buf
    })
    .await
    .expect("a lock was left held by a failed request");
    assert_eq!(recovered, content[CHUNK as usize..CHUNK as usize + 100]);
}
