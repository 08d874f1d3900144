//! Crash consistency of a managed mount over a persistent cache, with faults injected at exact
//! points: the process dies right after a write reached the cache's data file, or the remote
//! loses power (every write since its last flush is gone) while the process dies with it.
//! A dying process is a runtime dropped mid-flight; the cache's files stay as the kernel has them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::stages::PusherOptions;
use r3map_core::testing::pattern;
use r3map_core::{Backend, MemoryBackend, Result, SharedBackend};
use r3map_mount::cache::Shutdown;
use r3map_mount::{ManagedMount, ManagedOptions, PersistentCache};
use tokio::sync::Notify;

const CHUNK: u64 = 4096;
const SIZE: u64 = 16 * CHUNK;
const ID: &str = "test-remote";

fn options(push_every: Duration) -> ManagedOptions {
    ManagedOptions {
        chunk_size: CHUNK,
        pusher: PusherOptions {
            workers: 4,
            interval: push_every,
        },
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The point where a process dies: once armed, the next write (or remote operation) runs, or
/// not, and then never returns; `died` is signalled.
struct Death {
    armed: AtomicBool,
    countdown: AtomicU64,
    died: Notify,
    dead: AtomicBool,
}

impl Death {
    fn new(countdown: u64, armed: bool) -> Arc<Self> {
        Arc::new(Self {
            armed: AtomicBool::new(armed),
            countdown: AtomicU64::new(countdown),
            died: Notify::new(),
            dead: AtomicBool::new(false),
        })
    }
    /// Whether this operation is the one the process dies at (or one after it).
    fn strikes(&self) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return true;
        }
        if !self.armed.load(Ordering::SeqCst) {
            return false;
        }
        if self.countdown.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.dead.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
    async fn never_return(&self) -> ! {
        self.died.notify_one();
        std::future::pending().await
    }
}

/// The cache's data file, through which the process dies right after a write has landed.
struct DiesAfterWrite {
    inner: SharedBackend,
    death: Arc<Death>,
}

#[async_trait]
impl Backend for DiesAfterWrite {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await?;
        if self.death.strikes() {
            self.death.never_return().await;
        }
        Ok(())
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
}

async fn read_async(backend: &dyn Backend) -> Vec<u8> {
    let mut all = vec![0; backend.size() as usize];
    backend.read_at(0, &mut all).await.unwrap();
    all
}

/// For in-memory backends, whose futures never wait.
fn read_all(backend: &dyn Backend) -> Vec<u8> {
    let mut all = vec![0; backend.size() as usize];
    futures::executor::block_on(backend.read_at(0, &mut all)).unwrap();
    all
}

/// A write whose data reached the cache but whose process died before it returned must still
/// be pushed on the next start (the dirty bit is recorded before the data is written): after a
/// clean close, the remote equals the cache.
#[test]
fn a_write_killed_after_its_data_landed_is_pushed_after_the_restart() {
    for round in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let content = pattern(round + 1, SIZE as usize);
        let remote = Arc::new(MemoryBackend::new(SIZE));
        futures::executor::block_on(remote.write_at(0, &content)).unwrap();
        let death = Death::new(1, false);
        {
            let rt = runtime();
            let mount = rt.block_on(async {
                let mut cache = PersistentCache::open(dir.path(), SIZE, CHUNK, ID).unwrap();
                cache.data = Arc::new(DiesAfterWrite {
                    inner: cache.data.clone(),
                    death: death.clone(),
                });
                let mount =
                    ManagedMount::open_cached(remote.clone(), cache, options(Duration::from_secs(3600)))
                        .await
                        .unwrap();
                mount.wait_pulled().await.unwrap();
                death.armed.store(true, Ordering::SeqCst);
                let backend = mount.backend();
                let offset = round * 3000 + 17;
                tokio::spawn(async move { backend.write_at(offset, &[0xEE; 100]).await });
                death.died.notified().await;
                mount
            });
            // Killed: no task of it runs again (dropping the runtime drops them mid-flight);
            // only then is the mount dropped, which pushes nothing and leaves the session open.
            drop(rt);
            drop(mount);
        }
        let rt = runtime();
        rt.block_on(async {
            let cache = PersistentCache::open(dir.path(), SIZE, CHUNK, ID).unwrap();
            assert_eq!(cache.recovery.shutdown, Shutdown::ProcessCrash);
            let mount = ManagedMount::open_cached(remote.clone(), cache, options(Duration::from_secs(3600)))
                .await
                .unwrap();
            let local = read_async(&*mount.backend()).await;
            assert_ne!(
                local, content,
                "round {round}: the killed write's data did not land"
            );
            mount.close().await.unwrap();
            assert!(
                read_all(&*remote) == local,
                "round {round}: the cache holds a write that was never pushed"
            );
        });
    }
}

/// A remote that loses power: reads see every write, but only writes before its last `sync`
/// survive `power_loss`. A process dies with it at the `death` point (that operation, and every
/// later one, never returns).
struct PowerLossRemote {
    current: MemoryBackend,
    durable: MemoryBackend,
    death: Arc<Death>,
}

impl PowerLossRemote {
    fn new(content: &[u8], death: Arc<Death>) -> Arc<Self> {
        let (current, durable) = (MemoryBackend::new(SIZE), MemoryBackend::new(SIZE));
        futures::executor::block_on(async {
            current.write_at(0, content).await.unwrap();
            durable.write_at(0, content).await.unwrap();
        });
        Arc::new(Self {
            current,
            durable,
            death,
        })
    }
    fn copy(from: &MemoryBackend, to: &MemoryBackend) {
        to_block(to.write_at(0, &read_all(from)));
    }
    fn power_loss(&self) {
        Self::copy(&self.durable, &self.current);
    }
}

fn to_block(f: impl std::future::Future<Output = Result<()>>) {
    futures::executor::block_on(f).unwrap()
}

#[async_trait]
impl Backend for PowerLossRemote {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.death.dead.load(Ordering::SeqCst) {
            self.death.never_return().await;
        }
        self.current.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.death.strikes() {
            self.power_loss();
            self.death.never_return().await;
        }
        self.current.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        if self.death.strikes() {
            self.power_loss();
            self.death.never_return().await;
        }
        Self::copy(&self.current, &self.durable);
        Ok(())
    }
}

/// What the application saw before it died.
#[derive(Default)]
struct Seen {
    /// Content with every acknowledged write.
    acked: Vec<u8>,
    /// Content at the last fsync that returned.
    synced: Vec<u8>,
    /// Bytes written since that fsync.
    written_since_sync: Vec<bool>,
    /// The write in flight when the process died (its bytes may be old or new).
    in_flight: Option<(usize, Vec<u8>)>,
}

/// The remote loses power and the mount process dies with it, at every point of a workload of
/// writes, fsyncs and background pushes in turn. Then: no byte the application had fsynced is
/// lost on the remote, the restarted mount reads every acknowledged write, and after its clean
/// close the remote equals the cache (nothing unpushed was taken for pushed).
#[test]
fn a_remote_power_loss_keeps_fsynced_writes_and_nothing_unpushed_counts_as_pushed() {
    let mut crashes = 0;
    for crash_at in 1..=40u64 {
        let dir = tempfile::tempdir().unwrap();
        let content = pattern(crash_at, SIZE as usize);
        let death = Death::new(crash_at, true);
        let remote = PowerLossRemote::new(&content, death.clone());
        let seen = Arc::new(Mutex::new(Seen {
            acked: content.clone(),
            synced: content.clone(),
            written_since_sync: vec![false; SIZE as usize],
            in_flight: None,
        }));
        {
            let rt = runtime();
            let mount = rt.block_on(async {
                let cache = PersistentCache::open(dir.path(), SIZE, CHUNK, ID).unwrap();
                let mount = Arc::new(
                    ManagedMount::open_cached(remote.clone(), cache, options(Duration::from_millis(1)))
                        .await
                        .unwrap(),
                );
                let workload = {
                    let (mount, seen) = (mount.clone(), seen.clone());
                    tokio::spawn(async move {
                        for step in 0..60u64 {
                            if step % 4 == 3 {
                                mount.sync().await.unwrap();
                                let mut seen = seen.lock();
                                seen.synced = seen.acked.clone();
                                seen.written_since_sync.fill(false);
                                continue;
                            }
                            let offset = (step * 7919 + crash_at * 131) as usize % (SIZE as usize - 6000);
                            let data = pattern(step * 1000 + crash_at, 1 + (step as usize * 977) % 6000);
                            seen.lock().in_flight = Some((offset, data.clone()));
                            mount.backend().write_at(offset as u64, &data).await.unwrap();
                            let mut seen = seen.lock();
                            seen.acked[offset..offset + data.len()].copy_from_slice(&data);
                            seen.written_since_sync[offset..offset + data.len()].fill(true);
                            seen.in_flight = None;
                        }
                    })
                };
                tokio::select! {
                    _ = death.died.notified() => {}
                    done = workload => done.unwrap(),
                }
                mount
            });
            drop(rt);
            drop(mount);
        }
        let died = death.dead.load(Ordering::SeqCst);
        crashes += u64::from(died);
        death.dead.store(false, Ordering::SeqCst);
        death.armed.store(false, Ordering::SeqCst);
        let seen = seen.lock();
        if died {
            let on_remote = read_all(&remote.current);
            let since_sync = seen.written_since_sync.iter().zip(&seen.synced);
            for (x, (&got, (&written, &synced))) in on_remote.iter().zip(since_sync).enumerate() {
                assert!(
                    written || got == synced,
                    "crash at {crash_at}: byte {x} fsynced by the application was lost on the remote"
                );
            }
        }
        let rt = runtime();
        rt.block_on(async {
            let cache = PersistentCache::open(dir.path(), SIZE, CHUNK, ID).unwrap();
            let mount = ManagedMount::open_cached(remote.clone(), cache, options(Duration::from_secs(3600)))
                .await
                .unwrap();
            let local = read_async(&*mount.backend()).await;
            for x in 0..SIZE as usize {
                let in_flight = seen
                    .in_flight
                    .as_ref()
                    .filter(|(at, data)| (*at..at + data.len()).contains(&x))
                    .map(|(at, data)| data[x - at]);
                assert!(
                    local[x] == seen.acked[x] || Some(local[x]) == in_flight,
                    "crash at {crash_at}: byte {x} of an acknowledged write was lost by the cache"
                );
            }
            mount.close().await.unwrap();
            assert!(
                read_all(&remote.current) == local,
                "crash at {crash_at}: after a clean close the remote differs from the cache (an unpushed write was taken for pushed)"
            );
        });
    }
    // Every crash point lies within the workload's remote operations (it makes far more).
    assert_eq!(crashes, 40, "some crash points were never reached");
}
