//! The leecher: the destination of a migration. It pulls the resource from a seeder in the
//! background into a local backend while the application's I/O waits behind a closed gate;
//! optional pre-copy rounds re-pull what the still-running source wrote meanwhile; `finalize`
//! takes the final dirty list, re-pulls those chunks first, commits, and opens the gate. When
//! every chunk is local it detaches from the seeder and can seed onward.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use r3map_core::stages::{
    Arbitrary, Gate, Priority, PullProgress, PullTarget, Puller, PullerOptions, Synced,
};
use r3map_core::{Backend, ChunkLayout, SharedBackend};
use tokio::sync::watch;

use crate::hooks::SeederHooks;
use crate::link::{ResourceInfo, SeederLink, SessionId};
use crate::remote::LinkBackend;
use crate::seeder::{tracked_stack, Seeder, TrackedStack};
use crate::{verify, MigrationError, Result};

/// When pre-copy rounds stop (and finalize may begin). The default runs none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundPolicy {
    /// Most rounds; 0 = none (a single round: the background pull, then finalize).
    pub max_rounds: u32,
    /// Stop once a round finds at most this many dirty chunks.
    pub max_dirty: u64,
}

/// Leecher settings.
#[derive(Debug, Clone)]
pub struct LeecherOptions {
    /// Concurrent background pulls.
    pub pull_workers: usize,
    /// Pull order.
    pub priority: Priority,
    /// Pre-copy rounds before finalize.
    pub rounds: RoundPolicy,
    /// How long `finalize` keeps retrying a call whose connection was lost.
    pub retry_for: Duration,
}

impl Default for LeecherOptions {
    fn default() -> Self {
        Self {
            pull_workers: 512,
            priority: Priority::sequential(),
            rounds: RoundPolicy::default(),
            retry_for: Duration::from_secs(60),
        }
    }
}

/// Where the leecher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeecherPhase {
    /// Pulling every chunk; the application waits.
    Pulling,
    /// Pre-copy round `round` (1-based).
    PreCopy { round: u32 },
    /// Taking the final dirty list and committing; the source is suspended.
    Finalizing,
    /// The gate is open and this copy is authoritative; the rest is being pulled.
    Finalized,
    /// Every chunk is local and the seeder is detached.
    Complete,
}

/// A snapshot of a leecher's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeecherStatus {
    pub phase: LeecherPhase,
    /// Chunks held locally.
    pub local_chunks: u64,
    /// Chunks in all.
    pub total_chunks: u64,
    /// Dirty chunks found by each pre-copy round so far.
    pub rounds: Vec<u64>,
    /// Chunks re-pulled because the source wrote them (rounds and finalize).
    pub repulled: u64,
}

/// What `finalize` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalizeReport {
    /// Chunks the source wrote since the last dirty list (re-pulled first).
    pub dirty_chunks: u64,
    /// From the source's suspend to this gate opening, by the two hosts' wall clocks.
    pub downtime: Duration,
    /// From sending `sync` to the gate opening, by this host's clock alone: an upper bound of
    /// the downtime that does not depend on synchronised clocks.
    pub downtime_bound: Duration,
}

/// What a completed migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteReport {
    /// Chunks fetched from the seeder (including re-pulls).
    pub fetched_chunks: u64,
    /// Bytes fetched from the seeder.
    pub fetched_bytes: u64,
    /// Chunks verified against the seeder's hashes (0 unless asked for).
    pub verified_chunks: u64,
}

/// A leecher's progress, readable without the leecher (see [`Leecher::status_reader`]).
#[derive(Clone)]
pub struct StatusReader {
    status: Arc<Mutex<LeecherStatus>>,
    synced: Arc<Synced>,
}

impl StatusReader {
    /// Progress now.
    pub fn status(&self) -> LeecherStatus {
        let mut status = self.status.lock().clone();
        status.local_chunks = self.synced.local_count();
        status
    }

    /// Chunks fetched from the seeder so far (including re-pulls).
    pub fn fetched_chunks(&self) -> u64 {
        self.synced.fetch_count()
    }
}

type AppStack = Gate<Arc<Arbitrary<Arc<Synced>>>>;

/// The destination of a migration.
pub struct Leecher {
    link: Arc<dyn SeederLink>,
    session: SessionId,
    info: ResourceInfo,
    layout: ChunkLayout,
    synced: Arc<Synced>,
    gate: Arc<AppStack>,
    stack: Arc<TrackedStack>,
    puller: Puller,
    options: LeecherOptions,
    status: Arc<Mutex<LeecherStatus>>,
    phase: watch::Sender<LeecherPhase>,
}

impl Leecher {
    /// Starts a migration from the seeder behind `link` into `local` (which must have the
    /// resource's size): tracking begins on the seeder, then the background pull.
    pub async fn open(
        link: Arc<dyn SeederLink>,
        local: SharedBackend,
        options: LeecherOptions,
    ) -> Result<Self> {
        let info = link.info().await?;
        if local.size() != info.size {
            return Err(MigrationError::InvalidConfig(format!(
                "the local resource has {} bytes but the seeder's has {}",
                local.size(),
                info.size
            )));
        }
        let layout = ChunkLayout::new(info.size, info.chunk_size)?;
        let session = SessionId::random();
        // Tracking must start before the first read, so no write the leecher missed goes
        // unrecorded.
        link.track(session).await?;
        let remote: SharedBackend = Arc::new(LinkBackend::new(link.clone(), info.size));
        let synced = Arc::new(Synced::new(local, remote, info.chunk_size)?);
        let arbitrary = Arc::new(Arbitrary::new(synced.clone(), info.chunk_size)?);
        let gate = Arc::new(Gate::new(arbitrary, false));
        let stack = tracked_stack(gate.clone(), info.chunk_size)?;
        let puller = Puller::start(
            synced.clone() as Arc<dyn PullTarget>,
            PullerOptions {
                workers: options.pull_workers,
                priority: options.priority.clone(),
            },
        )?;
        let (phase, _) = watch::channel(LeecherPhase::Pulling);
        Ok(Self {
            status: Arc::new(Mutex::new(LeecherStatus {
                phase: LeecherPhase::Pulling,
                local_chunks: 0,
                total_chunks: layout.chunk_count(),
                rounds: Vec::new(),
                repulled: 0,
            })),
            link,
            session,
            info,
            layout,
            synced,
            gate,
            stack,
            puller,
            options,
            phase,
        })
    }

    /// The resource as the destination's application uses it: I/O waits until finalize.
    pub fn backend(&self) -> SharedBackend {
        self.stack.clone()
    }

    /// Size and chunk size of the resource.
    pub fn info(&self) -> ResourceInfo {
        self.info
    }

    /// This migration's session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The background pull's progress.
    pub fn pull_progress(&self) -> watch::Receiver<PullProgress> {
        self.puller.progress()
    }

    /// Every phase change.
    pub fn watch_phase(&self) -> watch::Receiver<LeecherPhase> {
        self.phase.subscribe()
    }

    /// Progress so far.
    pub fn status(&self) -> LeecherStatus {
        self.status_reader().status()
    }

    /// Reads the progress on demand, also after this leecher became a seeder or was dropped
    /// (metrics read it at every scrape).
    pub fn status_reader(&self) -> StatusReader {
        StatusReader {
            status: self.status.clone(),
            synced: self.synced.clone(),
        }
    }

    fn set_phase(&self, phase: LeecherPhase) {
        self.status.lock().phase = phase;
        self.phase.send_replace(phase);
    }

    /// Waits for the background pull of every chunk.
    pub async fn wait_pulled(&self) -> Result<()> {
        Ok(self.puller.wait().await?)
    }

    /// Marks `dirty` chunks remote and pulls them ahead of everything else.
    async fn repull(&self, dirty: &[u64]) {
        self.synced.mark_remote(dirty).await;
        self.queue_repull(dirty);
    }

    /// Queues chunks already marked remote ahead of the rest of the pull.
    fn queue_repull(&self, dirty: &[u64]) {
        self.puller.pull_first(dirty);
        self.status.lock().repulled += dirty.len() as u64;
    }

    /// Pre-copy rounds: waits for the background pull, then asks the running source for what
    /// it wrote meanwhile and re-pulls it, round after round, until a round finds at most
    /// `max_dirty` chunks, the dirty set stops shrinking, or `max_rounds` is reached. Returns
    /// the dirty count of each round.
    pub async fn precopy(&self) -> Result<Vec<u64>> {
        self.wait_pulled().await?;
        let policy = self.options.rounds;
        let mut previous = u64::MAX;
        for round in 1..=policy.max_rounds {
            self.set_phase(LeecherPhase::PreCopy { round });
            let dirty = self.link.dirty_round(self.session).await?;
            let count = dirty.len() as u64;
            self.status.lock().rounds.push(count);
            tracing::info!(round, dirty = count, "pre-copy round");
            self.repull(&dirty).await;
            self.wait_pulled().await?;
            if count <= policy.max_dirty || count >= previous {
                break;
            }
            previous = count;
        }
        Ok(self.status.lock().rounds.clone())
    }

    /// Calls `call` until it succeeds, fails for a reason other than a lost connection, or
    /// `retry_for` has passed.
    async fn retried<T, F, Fut>(&self, step: &'static str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + self.options.retry_for;
        let mut pause = Duration::from_millis(20);
        loop {
            match call().await {
                Err(err) if err.is_connection_loss() && Instant::now() < deadline => {
                    tracing::warn!(%err, step, "lost the seeder; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(err) if err.is_connection_loss() => {
                    return Err(MigrationError::Timeout {
                        step,
                        limit: self.options.retry_for,
                    })
                }
                result => return result,
            }
        }
    }

    /// Suspends the source and takes over: the final dirty list is marked remote and queued
    /// first, authority is committed, and the gate opens. If the commit cannot be confirmed
    /// (the seeder is unreachable), the gate stays closed and the error says so: the source
    /// then stays suspended until a leecher commits or an operator aborts it.
    pub async fn finalize(&self) -> Result<FinalizeReport> {
        self.set_phase(LeecherPhase::Finalizing);
        let started = Instant::now();
        let report = self.retried("sync", || self.link.sync(self.session)).await?;
        // Stale copies are never read from here on, but their re-pulls are queued only after
        // the commit: queued first, they would share the link with the commit's round trip and
        // hold it up by the time their bytes take (downtime growing with the dirty set).
        self.synced.mark_remote(&report.dirty).await;
        self.retried("commit", || self.link.commit(self.session)).await?;
        self.queue_repull(&report.dirty);
        // From here on the application's writes are legitimate differences from the source:
        // recorded, so verification leaves those chunks out.
        self.stack.inner().track();
        self.gate.open();
        let opened = SystemTime::now();
        let downtime_bound = started.elapsed();
        self.set_phase(LeecherPhase::Finalized);
        // Zero if the clocks disagree so much that the source's suspend seems to lie in the future.
        let downtime = opened.duration_since(report.suspended_at).unwrap_or_default();
        Ok(FinalizeReport {
            dirty_chunks: report.dirty.len() as u64,
            downtime,
            downtime_bound,
        })
    }

    /// Whether the gate is open (finalize committed and this copy is authoritative).
    pub fn is_open(&self) -> bool {
        !self.gate.is_closed()
    }

    /// Chunks not held locally.
    pub fn missing_chunks(&self) -> Vec<u64> {
        (0..self.layout.chunk_count())
            .filter(|&c| !self.synced.is_local(c))
            .collect()
    }

    /// Waits until every chunk is local (after `finalize`), optionally verifies every chunk
    /// against the seeder's hashes, then detaches from the seeder. If the seeder went away
    /// first, says which chunks are missing and stays incomplete; calling it again retries them.
    pub async fn complete(&self, verify: bool) -> Result<CompleteReport> {
        if self.gate.is_closed() {
            return Err(MigrationError::WrongPhase {
                call: "complete",
                phase: "not finalized".into(),
            });
        }
        let missing = self.missing_chunks();
        if !missing.is_empty() {
            self.puller.pull_first(&missing);
        }
        if let Err(err) = self.puller.wait().await {
            let missing = self.missing_chunks();
            if missing.is_empty() {
                return Err(err.into());
            }
            tracing::warn!(%err, missing = missing.len(), "the seeder went away before every chunk was pulled");
            return Err(MigrationError::Incomplete {
                missing,
                total: self.layout.chunk_count(),
            });
        }
        let verified_chunks = if verify { self.verify().await? } else { 0 };
        match self.link.close(self.session).await {
            // Every chunk is here: the copy is complete even if the seeder cannot be told.
            Err(err) if err.is_connection_loss() => {
                tracing::warn!(%err, "every chunk is local, but the seeder could not be told; it may keep waiting")
            }
            result => result?,
        }
        self.set_phase(LeecherPhase::Complete);
        let fetched_chunks = self.synced.fetch_count();
        Ok(CompleteReport {
            fetched_chunks,
            fetched_bytes: fetched_chunks.saturating_mul(self.info.chunk_size),
            verified_chunks,
        })
    }

    /// Compares every chunk's blake3 hash with the seeder's, except chunks the application
    /// wrote here after finalize; returns how many were compared.
    async fn verify(&self) -> Result<u64> {
        let count = self.layout.chunk_count();
        let mut differing = Vec::new();
        let mut first = 0;
        while first < count {
            let batch = verify::HASH_BATCH.min(count - first);
            let theirs = self.link.hashes(self.session, first, batch).await?;
            let ours = verify::chunk_hashes(&*self.synced, self.layout, first, batch).await?;
            if theirs.len() != ours.len() {
                return Err(MigrationError::InvalidConfig(format!(
                    "the seeder sent {} hashes for {} chunks",
                    theirs.len(),
                    ours.len()
                )));
            }
            differing.extend(
                (first..)
                    .zip(theirs.iter().zip(&ours))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(c, _)| c),
            );
            first += batch;
        }
        // Read after hashing: a chunk written while it was hashed is left out too.
        let written_here = self.stack.inner().dirty();
        differing.retain(|chunk| written_here.binary_search(chunk).is_err());
        if differing.is_empty() {
            Ok(count - written_here.len() as u64)
        } else {
            Err(MigrationError::VerificationFailed { differing })
        }
    }

    /// Gives up before finalize: the seeder is told (it keeps running unaffected).
    pub async fn abandon(self) -> Result<()> {
        self.puller.stop();
        self.link.close(self.session).await
    }

    /// After `complete`: seeds the same resource onward (the application keeps using
    /// [`Leecher::backend`], now tracked for the next hop).
    pub fn into_seeder(self, hooks: SeederHooks) -> Result<Arc<Seeder>> {
        if *self.phase.borrow() != LeecherPhase::Complete {
            return Err(MigrationError::WrongPhase {
                call: "seeding onward",
                phase: "not complete".into(),
            });
        }
        Seeder::over(self.stack, hooks)
    }
}
