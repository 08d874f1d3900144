//! Migration errors: what went wrong, in which phase, and what the user can do about it.

use std::time::Duration;

use crate::SessionId;

/// Result alias of this crate.
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;

/// What went wrong in a migration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MigrationError {
    /// A backend or the transport failed.
    #[error(transparent)]
    Backend(#[from] r3map_core::Error),

    /// The seeder serves another session (a newer leecher replaced this one, or it was aborted).
    #[error("the seeder no longer serves migration session {session} (another leecher replaced it, or the migration was aborted); start a new leecher")]
    StaleSession { session: SessionId },

    /// A call arrived in a phase that does not allow it.
    #[error("{call} is not possible while the seeder is {phase}")]
    WrongPhase { call: &'static str, phase: String },

    /// Authority was already handed to a leecher; the source must not resume.
    #[error("the resource was handed over to migration session {session}; the destination is authoritative and the source must not resume")]
    HandedOff { session: SessionId },

    /// Suspending or resuming the application failed.
    #[error("could not {action} the application: {reason}")]
    Application { action: &'static str, reason: String },

    /// The leecher could not get every chunk (the seeder went away after finalize).
    #[error("the destination is missing {} of {total} chunks (first: {:?}); the seeder went away before they were pulled, so the copy is NOT complete", missing.len(), &missing[..missing.len().min(8)])]
    Incomplete { missing: Vec<u64>, total: u64 },

    /// End-to-end verification found chunks that differ.
    #[error("verification failed: {} chunks differ between source and destination (first: {:?})", differing.len(), &differing[..differing.len().min(8)])]
    VerificationFailed { differing: Vec<u64> },

    /// A step did not finish in time.
    #[error("{step} did not finish within {limit:?}")]
    Timeout { step: &'static str, limit: Duration },

    /// Settings that cannot work.
    #[error("invalid migration settings: {0}")]
    InvalidConfig(String),
}

impl MigrationError {
    /// Whether retrying the same call on a new connection may succeed.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            MigrationError::Backend(err) => {
                err.is_connection_loss() || matches!(err, r3map_core::Error::Timeout(_))
            }
            _ => false,
        }
    }
}

impl From<MigrationError> for r3map_core::Error {
    fn from(err: MigrationError) -> Self {
        match err {
            MigrationError::Backend(err) => err,
            other => r3map_core::Error::Remote(other.to_string()),
        }
    }
}
