//! Every stage in the same-chunk race mode of the conformance suite: tasks read and write
//! overlapping ranges of a few chunks while a pull, a push, a gate or a dropped connection
//! races them; every read and the final content are checked against every linearisable
//! outcome (see `r3map_core::testing::check_races`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::stages::{
    Arbitrary, Chunked, Connector, Gate, Puller, PullerOptions, Pusher, PusherOptions, ReconnectOptions,
    Reconnecting, Synced, Tracker,
};
use r3map_core::testing::{self, check_races, pattern, racer, RaceOptions, Racer, Yielding};
use r3map_core::{Backend, ChunkLayout, MemoryBackend, Result, SharedBackend};

const CHUNK: u64 = 64;
/// Four whole chunks and a short tail: every request shares chunks with others.
const SIZE: u64 = 4 * CHUNK + 19;
const ROUNDS: u64 = 4;

fn options(alignment: u64, seed: u64) -> RaceOptions {
    RaceOptions {
        alignment,
        tasks: 8,
        ops_per_task: 150,
        max_len: if alignment == 1 {
            CHUNK + CHUNK / 2
        } else {
            2 * CHUNK
        },
        seed,
        refused_writes: false,
    }
}

/// Runs `race` once per round (each with another seed) on a fresh multi-threaded runtime.
fn rounds<F: std::future::Future<Output = ()>>(race: impl Fn(u64) -> F) {
    for seed in 1..=ROUNDS {
        testing::block_on(race(seed));
    }
}

fn zeros() -> Vec<u8> {
    vec![0; SIZE as usize]
}

#[test]
fn memory_backend_races() {
    rounds(|seed| async move {
        let backend = Arc::new(MemoryBackend::new(SIZE));
        check_races(backend, &zeros(), options(1, seed), vec![])
            .await
            .unwrap();
    });
}

#[test]
fn chunked_races() {
    rounds(|seed| async move {
        let backend =
            Arc::new(Chunked::new(Yielding::new(MemoryBackend::new(SIZE)), CHUNK, u64::MAX).unwrap());
        check_races(backend, &zeros(), options(CHUNK, seed), vec![])
            .await
            .unwrap();
    });
}

#[test]
fn arbitrary_races_with_unaligned_ranges() {
    rounds(|seed| async move {
        let inner = Chunked::new(Yielding::new(MemoryBackend::new(SIZE)), CHUNK, u64::MAX).unwrap();
        let backend = Arc::new(Arbitrary::new(inner, CHUNK).unwrap());
        check_races(backend, &zeros(), options(1, seed), vec![])
            .await
            .unwrap();
    });
}

/// A remote holding pseudo-random content (behind Chunked: only whole chunks reach it), and a
/// synced stage over it with an empty local cache.
async fn synced(seed: u64) -> (Arc<Synced>, SharedBackend, Vec<u8>) {
    synced_with_remote_unit(seed, CHUNK).await
}

/// A quarter of a chunk: the remote's read unit in the range-first races.
const RANGE_UNIT: u64 = CHUNK / 4;

/// Like [`synced`], with a remote that takes requests aligned to `unit` (Chunked proves it): a
/// unit smaller than a chunk turns on reading the requested range first.
async fn synced_with_remote_unit(seed: u64, unit: u64) -> (Arc<Synced>, SharedBackend, Vec<u8>) {
    let content = pattern(seed + 100, SIZE as usize);
    let remote = MemoryBackend::new(SIZE);
    remote.write_at(0, &content).await.unwrap();
    let remote: SharedBackend = Arc::new(Chunked::new(Yielding::new(remote), unit, u64::MAX).unwrap());
    let local: SharedBackend = Arc::new(Yielding::new(MemoryBackend::new(SIZE)));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    assert_eq!(synced.range_first(), unit < CHUNK);
    (synced, remote, content)
}

fn chunk_count() -> u64 {
    ChunkLayout::new(SIZE, CHUNK).unwrap().chunk_count()
}

/// Pulls chunk after chunk while the workload runs: fetches race reads and writes of the chunk.
fn pull_racer(synced: &Arc<Synced>) -> Racer {
    let synced = synced.clone();
    racer(move |i| {
        let synced = synced.clone();
        async move { synced.fetch(i % chunk_count()).await }
    })
}

#[test]
fn synced_races_with_fetches() {
    rounds(|seed| async move {
        let (synced, remote, content) = synced(seed).await;
        let pull = pull_racer(&synced);
        check_races(synced.clone(), &content, options(CHUNK, seed), vec![pull])
            .await
            .unwrap();
        let mut on_remote = vec![0; SIZE as usize];
        remote.read_at(0, &mut on_remote).await.unwrap();
        assert_eq!(on_remote, content, "the synced stage alone wrote to the remote");
    });
}

#[test]
fn synced_races_with_unaligned_ranges_and_fetches() {
    rounds(|seed| async move {
        let (synced, _, content) = synced(seed).await;
        let pull = pull_racer(&synced);
        let backend = Arc::new(Arbitrary::new(synced.clone(), CHUNK).unwrap());
        check_races(backend, &content, options(1, seed), vec![pull])
            .await
            .unwrap();
    });
}

/// Critical word first: reads of parts of chunks not yet local are answered from range reads of
/// the remote while background fills, pulls and writes (read-modify-writes through Arbitrary)
/// race on the same chunks. No fill may overwrite a write, and no read may see anything but a
/// linearisable value.
#[test]
fn synced_range_first_races_reads_writes_fills_and_pulls() {
    let range_reads = &AtomicU64::new(0);
    rounds(|seed| async move {
        let (synced, remote, content) = synced_with_remote_unit(seed, RANGE_UNIT).await;
        let pull = pull_racer(&synced);
        let backend = Arc::new(Arbitrary::new(synced.clone(), CHUNK).unwrap());
        let last = check_races(backend.clone(), &content, options(1, seed), vec![pull])
            .await
            .unwrap();
        assert_no_late_fill(&synced, &*backend, &last).await;
        range_reads.fetch_add(synced.range_read_count(), Ordering::Relaxed);
        let mut on_remote = vec![0; SIZE as usize];
        remote.read_at(0, &mut on_remote).await.unwrap();
        assert_eq!(on_remote, content, "the synced stage alone wrote to the remote");
    });
    assert_range_first_ran(range_reads);
}

/// The same without a pull: only the fills started by range reads make chunks local (and the
/// writes), so the fills themselves race the reads and writes.
#[test]
fn synced_range_first_races_reads_writes_and_fills_alone() {
    let range_reads = &AtomicU64::new(0);
    rounds(|seed| async move {
        let (synced, _, content) = synced_with_remote_unit(seed, RANGE_UNIT).await;
        let backend = Arc::new(Arbitrary::new(synced.clone(), CHUNK).unwrap());
        let last = check_races(backend.clone(), &content, options(1, seed), vec![])
            .await
            .unwrap();
        assert_no_late_fill(&synced, &*backend, &last).await;
        range_reads.fetch_add(synced.range_read_count(), Ordering::Relaxed);
    });
    assert_range_first_ran(range_reads);
}

/// Fills may still run when the racers are done: once they have all ended, the content must
/// still be what the final read saw (a fill that installed over a write would change it).
async fn assert_no_late_fill(synced: &Synced, backend: &impl Backend, last: &[u8]) {
    synced.stop_fills().await;
    let mut after = vec![0u8; last.len()];
    backend.read_at(0, &mut after).await.unwrap();
    assert!(
        after == last,
        "a fill that ended after the racers changed the content"
    );
}

/// Whether a round reads part of a chunk before a whole-chunk read or a write makes it local
/// is up to the schedule; over all rounds some must have.
fn assert_range_first_ran(range_reads: &AtomicU64) {
    assert!(
        range_reads.load(Ordering::Relaxed) > 0,
        "no read went range-first in any round"
    );
}

#[test]
fn puller_races_reads_and_writes() {
    rounds(|seed| async move {
        let (synced, _, content) = synced(seed).await;
        let puller = Arc::new(
            Puller::start(
                synced.clone(),
                PullerOptions {
                    workers: 3,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        // Re-queues chunks ahead of the rest all through the race (a migration destination does).
        let requeue = {
            let puller = puller.clone();
            racer(move |i| {
                puller.pull_first(&[i % chunk_count()]);
                async { Ok(()) }
            })
        };
        let backend = Arc::new(Arbitrary::new(synced.clone(), CHUNK).unwrap());
        check_races(backend, &content, options(1, seed), vec![requeue])
            .await
            .unwrap();
        puller.wait().await.unwrap();
        assert_eq!(synced.local_count(), chunk_count());
    });
}

#[test]
fn pusher_races_reads_writes_pulls_and_pushes() {
    rounds(|seed| pusher_race(seed, CHUNK));
}

/// With range reads of the remote racing the pushes to it: a range read of a chunk not local
/// must never see bytes older than a write that ended before it began.
#[test]
fn pusher_races_with_range_first() {
    rounds(|seed| pusher_race(seed, RANGE_UNIT));
}

async fn pusher_race(seed: u64, remote_unit: u64) {
    {
        let (synced, remote, content) = synced_with_remote_unit(seed, remote_unit).await;
        let pusher = Arc::new(
            Pusher::start(
                synced.clone(),
                remote.clone(),
                CHUNK,
                PusherOptions {
                    workers: 3,
                    interval: Duration::from_millis(1),
                },
            )
            .unwrap(),
        );
        let push = {
            let pusher = pusher.clone();
            racer(move |_| {
                let pusher = pusher.clone();
                async move { pusher.flush().await }
            })
        };
        let backend = Arc::new(Arbitrary::new(pusher.clone(), CHUNK).unwrap());
        let last = check_races(
            backend.clone(),
            &content,
            options(1, seed),
            vec![push, pull_racer(&synced)],
        )
        .await
        .unwrap();
        // A write that raced a push is never lost: after a sync the remote holds the final content.
        backend.sync().await.unwrap();
        assert_eq!(pusher.dirty_count(), 0);
        let mut on_remote = vec![0; SIZE as usize];
        remote.read_at(0, &mut on_remote).await.unwrap();
        assert_eq!(on_remote, last, "the remote lost a write that raced a push");
    }
}

#[test]
fn tracker_races_take_dirty() {
    rounds(|seed| async move {
        let tracker = Arc::new(Tracker::new(Yielding::new(MemoryBackend::new(SIZE)), CHUNK).unwrap());
        tracker.track();
        let taken = Arc::new(Mutex::new(BTreeSet::new()));
        let take = {
            let (tracker, taken) = (tracker.clone(), taken.clone());
            racer(move |_| {
                taken.lock().extend(tracker.take_dirty());
                async { Ok(()) }
            })
        };
        let last = check_races(tracker.clone(), &zeros(), options(1, seed), vec![take])
            .await
            .unwrap();
        // Every chunk that changed was reported by some take_dirty (or is still recorded).
        let mut reported = taken.lock().clone();
        reported.extend(tracker.take_dirty());
        let layout = ChunkLayout::new(SIZE, CHUNK).unwrap();
        for chunk in 0..layout.chunk_count() {
            let r = layout.chunk_range(chunk);
            if last[r.start as usize..r.end as usize].iter().any(|&b| b != 0) {
                assert!(
                    reported.contains(&chunk),
                    "chunk {chunk} changed but was never reported"
                );
            }
        }
    });
}

#[test]
fn gate_races_closing_and_opening() {
    rounds(|seed| async move {
        let gate = Arc::new(Gate::new(Yielding::new(MemoryBackend::new(SIZE)), true));
        let toggle = {
            let gate = gate.clone();
            racer(move |_| {
                let gate = gate.clone();
                async move {
                    gate.close().await;
                    tokio::task::yield_now().await;
                    gate.open();
                    Ok(())
                }
            })
        };
        check_races(gate.clone(), &zeros(), options(1, seed), vec![toggle])
            .await
            .unwrap();
        assert!(!gate.is_closed());
    });
}

/// A server whose connections are all dropped at once by `drop_connections`; a write on a
/// dropped connection may have landed although its reply is lost (it is applied, then fails).
struct Server {
    data: MemoryBackend,
    epoch: AtomicU64,
}

struct Connection {
    server: Arc<Server>,
    epoch: u64,
}

impl Connection {
    fn alive(&self) -> Result<()> {
        if self.server.epoch.load(Ordering::SeqCst) == self.epoch {
            Ok(())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection dropped").into())
        }
    }
}

#[async_trait]
impl Backend for Connection {
    fn size(&self) -> u64 {
        self.server.data.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.alive()?;
        self.server.data.read_at(offset, buf).await?;
        tokio::task::yield_now().await;
        self.alive()
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.alive()?;
        self.server.data.write_at(offset, data).await?;
        tokio::task::yield_now().await;
        self.alive()
    }
    async fn sync(&self) -> Result<()> {
        self.alive()
    }
}

#[test]
fn reconnect_races_dropped_connections() {
    rounds(|seed| async move {
        let server = Arc::new(Server {
            data: MemoryBackend::new(SIZE),
            epoch: AtomicU64::new(0),
        });
        let connector: Connector = {
            let server = server.clone();
            Arc::new(move || {
                let server = server.clone();
                Box::pin(async move {
                    let epoch = server.epoch.load(Ordering::SeqCst);
                    Ok(Arc::new(Connection { server, epoch }) as SharedBackend)
                })
            })
        };
        let reconnect_options = ReconnectOptions {
            request_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            ..ReconnectOptions::default()
        };
        let remote = Arc::new(Reconnecting::connect(connector, reconnect_options).await.unwrap());
        let drop_connections = {
            let server = server.clone();
            racer(move |_| {
                let server = server.clone();
                async move {
                    server.epoch.fetch_add(1, Ordering::SeqCst);
                    // Pacing, not synchronisation: let some requests through between drops.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(())
                }
            })
        };
        check_races(remote, &zeros(), options(1, seed), vec![drop_connections])
            .await
            .unwrap();
        assert!(
            server.epoch.load(Ordering::SeqCst) > 0,
            "no connection was dropped"
        );
    });
}
