//! The seeder: the source of a migration. It keeps serving its application while a leecher
//! pulls, records the chunks the application writes, and at `sync` suspends the application,
//! flushes its frontend, fences off writes and hands out the final dirty list. After `commit`
//! the leecher is authoritative and the seeder only serves reads. Phases and what each failure
//! does are written down in ARCHITECTURE.md ("Migration state machine").

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use r3map_core::stages::Tracker;
use r3map_core::{Backend, ChunkLayout, SharedBackend};
use tokio::sync::{watch, Mutex};

use crate::fence::Fence;
use crate::hooks::SeederHooks;
use crate::link::{ResourceInfo, SeederLink, SessionId, SyncReport};
use crate::{verify, MigrationError, Result};

/// The stack an application writes through while its resource can be migrated: writes are
/// recorded per chunk (tracker) and can be fenced off (fence). The fence is outermost, so
/// raising it also waits for the tracker to record the writes in flight.
pub type TrackedStack = Fence<Tracker<SharedBackend>>;

/// Wraps `resource` for an application that may be migrated later.
pub fn tracked_stack(resource: SharedBackend, chunk_size: u64) -> Result<Arc<TrackedStack>> {
    Ok(Arc::new(Fence::new(Tracker::new(resource, chunk_size)?)))
}

/// Where the seeder is in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeederPhase {
    /// No migration: the application runs and writes are not recorded.
    Serving,
    /// A leecher pulls; the application runs and its writes are recorded.
    Tracking { session: SessionId, rounds: u64 },
    /// The application is suspended and writes are fenced off; the final dirty list was handed
    /// out. The seeder is still authoritative: it waits for `commit` (or an abort).
    Synced { session: SessionId },
    /// The leecher is authoritative; the seeder serves reads for the chunks it still lacks.
    HandedOff { session: SessionId },
    /// The leecher has everything; the seeder serves nothing more.
    Closed,
}

impl std::fmt::Display for SeederPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeederPhase::Serving => f.write_str("serving (no migration)"),
            SeederPhase::Tracking { session, rounds } => {
                write!(
                    f,
                    "tracking writes for session {session} ({rounds} pre-copy rounds)"
                )
            }
            SeederPhase::Synced { session } => {
                write!(f, "suspended, waiting for session {session} to commit")
            }
            SeederPhase::HandedOff { session } => write!(f, "handed off to session {session}"),
            SeederPhase::Closed => f.write_str("closed"),
        }
    }
}

impl SeederPhase {
    fn session(&self) -> Option<SessionId> {
        match *self {
            SeederPhase::Tracking { session, .. }
            | SeederPhase::Synced { session }
            | SeederPhase::HandedOff { session } => Some(session),
            SeederPhase::Serving | SeederPhase::Closed => None,
        }
    }
}

struct State {
    phase: SeederPhase,
    /// Set while the application is suspended.
    suspended_at: Option<SystemTime>,
    /// The report `sync` gave, returned again when the call is repeated.
    report: Option<SyncReport>,
}

/// The source of a migration.
pub struct Seeder {
    stack: Arc<TrackedStack>,
    layout: ChunkLayout,
    hooks: SeederHooks,
    /// Transitions await hooks (suspend, flush), so they are serialised by an async lock: an
    /// abort and a commit can never both win.
    state: Mutex<State>,
    phase: watch::Sender<SeederPhase>,
}

impl std::fmt::Debug for Seeder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeder")
            .field("layout", &self.layout)
            .field("phase", &*self.phase.borrow())
            .finish()
    }
}

impl Seeder {
    /// A seeder of `resource`; the application must do its I/O through [`Seeder::backend`].
    pub fn new(resource: SharedBackend, chunk_size: u64, hooks: SeederHooks) -> Result<Arc<Self>> {
        Self::over(tracked_stack(resource, chunk_size)?, hooks)
    }

    /// A seeder of a stack the application already uses (e.g. a finished leecher's, to seed
    /// onward).
    pub fn over(stack: Arc<TrackedStack>, hooks: SeederHooks) -> Result<Arc<Self>> {
        let layout = stack.inner().layout();
        let (phase, _) = watch::channel(SeederPhase::Serving);
        stack.lower();
        Ok(Arc::new(Self {
            stack,
            layout,
            hooks,
            state: Mutex::new(State {
                phase: SeederPhase::Serving,
                suspended_at: None,
                report: None,
            }),
            phase,
        }))
    }

    /// The resource as the application uses it: writes are recorded and can be fenced off.
    pub fn backend(&self) -> SharedBackend {
        self.stack.clone()
    }

    /// The current phase.
    pub fn phase(&self) -> SeederPhase {
        *self.phase.borrow()
    }

    /// Every phase change.
    pub fn watch_phase(&self) -> watch::Receiver<SeederPhase> {
        self.phase.subscribe()
    }

    /// Waits until the leecher has closed the migration.
    pub async fn wait_closed(&self) {
        let mut phases = self.phase.subscribe();
        let _ = phases.wait_for(|p| *p == SeederPhase::Closed).await;
    }

    /// Operator abort: ends a migration that was not handed off yet. The application resumes,
    /// writes are accepted again, and the leecher's later calls fail (it never opens its gate).
    /// Refused once authority was handed to a leecher.
    pub async fn abort(&self) -> Result<SeederPhase> {
        let mut state = self.state.lock().await;
        let before = state.phase;
        match before {
            SeederPhase::HandedOff { session } => return Err(MigrationError::HandedOff { session }),
            SeederPhase::Closed => {
                return Err(MigrationError::WrongPhase {
                    call: "abort",
                    phase: before.to_string(),
                })
            }
            SeederPhase::Serving | SeederPhase::Tracking { .. } | SeederPhase::Synced { .. } => {}
        }
        self.resume(&mut state).await?;
        self.set_phase(&mut state, SeederPhase::Serving);
        tracing::info!(%before, "migration aborted; the source application runs again");
        Ok(before)
    }

    fn set_phase(&self, state: &mut State, phase: SeederPhase) {
        state.phase = phase;
        self.phase.send_replace(phase);
    }

    /// The phase if it belongs to `session`, or the error for a caller of another session.
    fn check_session(state: &State, session: SessionId, call: &'static str) -> Result<SeederPhase> {
        match state.phase {
            SeederPhase::Closed => Err(MigrationError::WrongPhase {
                call,
                phase: state.phase.to_string(),
            }),
            phase if phase.session() == Some(session) => Ok(phase),
            _ => Err(MigrationError::StaleSession { session }),
        }
    }

    /// Lowers the fence and resumes the application (if suspended). The fence goes first: an
    /// application resumed behind a raised fence would see its writes fail.
    async fn resume(&self, state: &mut State) -> Result<()> {
        self.stack.lower();
        state.report = None;
        if state.suspended_at.is_some() {
            self.hooks.resume().await?;
            state.suspended_at = None;
        }
        Ok(())
    }

    async fn flush_frontend(&self) -> Result<()> {
        self.hooks.flush().await?;
        Ok(())
    }

    /// Suspends (unless already suspended), flushes, and fences: afterwards no write can land.
    async fn quiesce(&self, state: &mut State) -> Result<SystemTime> {
        if let Some(at) = state.suspended_at {
            return Ok(at);
        }
        let at = SystemTime::now();
        self.hooks.suspend().await?;
        state.suspended_at = Some(at);
        // The frontend may still hold writes the application made (page cache, dirty pages):
        // they must reach the tracker before the fence goes up.
        if let Err(err) = self.flush_frontend().await {
            self.resume(state).await?;
            return Err(err);
        }
        self.stack.raise().await;
        Ok(at)
    }
}

#[async_trait]
impl SeederLink for Seeder {
    async fn info(&self) -> Result<ResourceInfo> {
        Ok(ResourceInfo {
            size: self.layout.size(),
            chunk_size: self.layout.chunk_size(),
        })
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.phase() == SeederPhase::Closed {
            return Err(MigrationError::WrongPhase {
                call: "read",
                phase: SeederPhase::Closed.to_string(),
            });
        }
        Ok(self.stack.read_at(offset, buf).await?)
    }

    async fn track(&self, session: SessionId) -> Result<()> {
        let mut state = self.state.lock().await;
        match state.phase {
            SeederPhase::HandedOff { session } => return Err(MigrationError::HandedOff { session }),
            SeederPhase::Closed => {
                return Err(MigrationError::WrongPhase {
                    call: "track",
                    phase: state.phase.to_string(),
                })
            }
            // A new leecher replaces one that died or gave up. If the application is already
            // suspended it stays so: the new leecher pulls everything and then syncs.
            SeederPhase::Serving | SeederPhase::Tracking { .. } | SeederPhase::Synced { .. } => {}
        }
        self.stack.inner().track();
        state.report = None;
        self.set_phase(&mut state, SeederPhase::Tracking { session, rounds: 0 });
        tracing::info!(%session, "a leecher started tracking");
        Ok(())
    }

    async fn dirty_round(&self, session: SessionId) -> Result<Vec<u64>> {
        let mut state = self.state.lock().await;
        let SeederPhase::Tracking { rounds, .. } = Self::check_session(&state, session, "a pre-copy round")?
        else {
            return Err(MigrationError::WrongPhase {
                call: "a pre-copy round",
                phase: state.phase.to_string(),
            });
        };
        if state.suspended_at.is_none() {
            self.flush_frontend().await?;
        }
        let dirty = self.stack.inner().take_dirty();
        self.set_phase(
            &mut state,
            SeederPhase::Tracking {
                session,
                rounds: rounds + 1,
            },
        );
        Ok(dirty)
    }

    async fn sync(&self, session: SessionId) -> Result<SyncReport> {
        let mut state = self.state.lock().await;
        match Self::check_session(&state, session, "sync")? {
            SeederPhase::Tracking { .. } => {}
            SeederPhase::Synced { .. } | SeederPhase::HandedOff { .. } => {
                // A repeated call (its reply was lost): the same answer.
                if let Some(report) = &state.report {
                    return Ok(report.clone());
                }
            }
            phase => {
                return Err(MigrationError::WrongPhase {
                    call: "sync",
                    phase: phase.to_string(),
                })
            }
        }
        let suspended_at = self.quiesce(&mut state).await?;
        let report = SyncReport {
            dirty: self.stack.inner().take_dirty(),
            suspended_at,
        };
        state.report = Some(report.clone());
        self.set_phase(&mut state, SeederPhase::Synced { session });
        tracing::info!(%session, dirty = report.dirty.len(), "application suspended; final dirty list handed out");
        Ok(report)
    }

    async fn commit(&self, session: SessionId) -> Result<()> {
        let mut state = self.state.lock().await;
        match Self::check_session(&state, session, "commit")? {
            SeederPhase::Synced { .. } => {
                self.set_phase(&mut state, SeederPhase::HandedOff { session });
                tracing::info!(%session, "authority handed to the leecher");
                Ok(())
            }
            SeederPhase::HandedOff { .. } => Ok(()),
            phase => Err(MigrationError::WrongPhase {
                call: "commit",
                phase: phase.to_string(),
            }),
        }
    }

    async fn hashes(&self, session: SessionId, first: u64, count: u64) -> Result<Vec<[u8; 32]>> {
        {
            let state = self.state.lock().await;
            Self::check_session(&state, session, "hashes")?;
        }
        verify::chunk_hashes(&*self.stack, self.layout, first, count).await
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        let mut state = self.state.lock().await;
        match Self::check_session(&state, session, "close") {
            Ok(SeederPhase::Tracking { .. }) => {
                // The leecher gave up before sync: nothing changes for the application.
                self.stack.inner().take_dirty();
                self.set_phase(&mut state, SeederPhase::Serving);
            }
            Ok(SeederPhase::Synced { .. }) if session == SessionId::ANONYMOUS => {
                // The Go protocol has no commit: its leecher closes after finalizing.
                self.set_phase(&mut state, SeederPhase::Closed);
            }
            Ok(SeederPhase::Synced { .. }) => {
                // The leecher gives up without having committed (it never opens its gate): the
                // source stays authoritative and resumes.
                self.resume(&mut state).await?;
                self.set_phase(&mut state, SeederPhase::Serving);
                tracing::info!(%session, "the leecher gave up before commit; the source application runs again");
            }
            Ok(SeederPhase::HandedOff { .. }) => {
                self.set_phase(&mut state, SeederPhase::Closed);
                tracing::info!(%session, "the leecher has every chunk; seeding finished");
            }
            Ok(SeederPhase::Serving | SeederPhase::Closed) => {}
            Err(MigrationError::WrongPhase { .. }) => {} // already closed: closing again is fine
            Err(err) => return Err(err),
        }
        Ok(())
    }
}
