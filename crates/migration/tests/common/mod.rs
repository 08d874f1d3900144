//! Helpers for the migration tests: an application whose suspension can be observed, and a
//! link that loses its connection on command.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::{Backend, Error, SharedBackend};
use r3map_migration::{hook, ResourceInfo, Result, SeederHooks, SeederLink, SessionId, SyncReport};
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, OwnedRwLockWriteGuard, RwLock};

/// A stand-in for an application: a task that keeps writing random chunks of its resource.
/// Suspending it takes a lock every write holds, so once `suspend` returns no write is in
/// flight and none starts until `resume`.
pub struct Writer {
    running: Arc<RwLock<()>>,
    held: Arc<Mutex<Option<OwnedRwLockWriteGuard<()>>>>,
    pub writes: Arc<AtomicU64>,
    pub suspends: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    /// A writer that has not started; its hooks can be given to a seeder first.
    pub fn new() -> Self {
        Self {
            running: Arc::new(RwLock::new(())),
            held: Arc::new(Mutex::new(None)),
            writes: Arc::new(AtomicU64::new(0)),
            suspends: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            task: None,
        }
    }

    /// Starts writing `len`-byte pieces at random offsets of `backend`.
    pub fn start(&mut self, backend: SharedBackend, len: usize, seed: u64) {
        let (running, writes, stop) = (self.running.clone(), self.writes.clone(), self.stop.clone());
        self.task = Some(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let size = backend.size();
            while !stop.load(Ordering::Relaxed) {
                let pass = running.read().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let offset = rng.gen_range(0..size - len as u64);
                let byte: u8 = rng.gen();
                // A write refused by the fence would be a bug the tests look for.
                backend
                    .write_at(offset, &vec![byte; len])
                    .await
                    .expect("a write of the running application failed");
                writes.fetch_add(1, Ordering::Relaxed);
                drop(pass);
                tokio::task::yield_now().await;
            }
        }));
    }

    /// Hooks that suspend and resume this writer.
    pub fn hooks(&self) -> SeederHooks {
        let (running, held, suspends) = (self.running.clone(), self.held.clone(), self.suspends.clone());
        let held2 = self.held.clone();
        SeederHooks {
            suspend: Some(hook(move || {
                let (running, held, suspends) = (running.clone(), held.clone(), suspends.clone());
                async move {
                    *held.lock().await = Some(running.write_owned().await);
                    suspends.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })),
            resume: Some(hook(move || {
                let held = held2.clone();
                async move {
                    held.lock().await.take();
                    Ok(())
                }
            })),
            flush: None,
        }
    }

    pub async fn is_suspended(&self) -> bool {
        self.held.lock().await.is_some()
    }

    /// Waits until the writer has made `count` more writes than it had made so far.
    pub async fn wait_for_more_writes(&self, count: u64) {
        let target = self.writes.load(Ordering::SeqCst) + count;
        while self.writes.load(Ordering::SeqCst) < target {
            let task = self.task.as_ref().expect("the writer was started");
            assert!(!task.is_finished(), "the writer stopped (a write failed)");
            tokio::task::yield_now().await;
        }
    }

    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.held.lock().await.take();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// The bytes of a whole backend.
pub async fn contents(backend: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; backend.size() as usize];
    backend.read_at(0, &mut buf).await.unwrap();
    buf
}

/// Which calls of a [`FlakyLink`] fail as if the connection were lost.
#[derive(Default)]
pub struct Faults {
    /// The next this-many `sync` calls fail (after reaching the seeder, so its reply is lost).
    pub sync_replies_lost: AtomicU64,
    /// The next this-many `commit` calls fail before reaching the seeder.
    pub commits_lost: AtomicU64,
    /// The next this-many `commit` calls reach the seeder but their reply is lost.
    pub commit_replies_lost: AtomicU64,
    /// Every call fails (the seeder is gone).
    pub dead: AtomicBool,
    /// Once `sync` has answered, every call but `commit` fails (the seeder's data path died
    /// right after finalize).
    pub dead_after_sync: AtomicBool,
    /// Dirty lists the pre-copy rounds report instead of asking the seeder.
    pub scripted_rounds: parking_lot::Mutex<std::collections::VecDeque<Vec<u64>>>,
    synced: AtomicBool,
}

fn lost() -> r3map_migration::MigrationError {
    Error::Io(Arc::new(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )))
    .into()
}

fn take(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A link to a seeder that fails on command.
pub struct FlakyLink {
    pub seeder: Arc<dyn SeederLink>,
    pub faults: Arc<Faults>,
}

impl FlakyLink {
    fn check(&self) -> Result<()> {
        let f = &self.faults;
        if f.dead.load(Ordering::SeqCst)
            || (f.dead_after_sync.load(Ordering::SeqCst) && f.synced.load(Ordering::SeqCst))
        {
            return Err(lost());
        }
        Ok(())
    }
}

#[async_trait]
impl SeederLink for FlakyLink {
    async fn info(&self) -> Result<ResourceInfo> {
        self.check()?;
        self.seeder.info().await
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        self.seeder.read_at(offset, buf).await
    }
    async fn track(&self, session: SessionId) -> Result<()> {
        self.check()?;
        self.seeder.track(session).await
    }
    async fn dirty_round(&self, session: SessionId) -> Result<Vec<u64>> {
        self.check()?;
        let real = self.seeder.dirty_round(session).await?;
        Ok(self.faults.scripted_rounds.lock().pop_front().unwrap_or(real))
    }
    async fn sync(&self, session: SessionId) -> Result<SyncReport> {
        self.check()?;
        let report = self.seeder.sync(session).await?;
        self.faults.synced.store(true, Ordering::SeqCst);
        if take(&self.faults.sync_replies_lost) {
            return Err(lost());
        }
        Ok(report)
    }
    async fn commit(&self, session: SessionId) -> Result<()> {
        if self.faults.dead.load(Ordering::SeqCst) {
            return Err(lost());
        }
        if take(&self.faults.commits_lost) {
            return Err(lost());
        }
        self.seeder.commit(session).await?;
        if take(&self.faults.commit_replies_lost) {
            return Err(lost());
        }
        Ok(())
    }
    async fn hashes(&self, session: SessionId, first: u64, count: u64) -> Result<Vec<[u8; 32]>> {
        self.check()?;
        self.seeder.hashes(session, first, count).await
    }
    async fn close(&self, session: SessionId) -> Result<()> {
        self.check()?;
        self.seeder.close(session).await
    }
}
