//! The seeder's side of a migration as the leecher sees it, whatever carries it (in-process, gRPC).
//!
//! Every call names the migration *session* it belongs to, so a seeder can tell a leecher that
//! was replaced (it died, another one started) from the current one, and so repeating a call
//! after a lost reply is safe: `sync` returns the same dirty list again, `commit` succeeds again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::Result;

/// Identifies one leecher's migration of a resource. The Go r3map has no sessions; its calls
/// arrive as [`SessionId::ANONYMOUS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The session of a peer that does not name one (the Go r3map's protocol).
    pub const ANONYMOUS: SessionId = SessionId(0);

    /// A fresh session id (random, never `ANONYMOUS`).
    pub fn random() -> Self {
        SessionId(rand::random::<u64>().max(1))
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a seeder serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceInfo {
    /// Size in bytes.
    pub size: u64,
    /// The seeder's chunk size: dirty lists are in these chunks, so the leecher uses it too.
    pub chunk_size: u64,
}

/// The seeder's answer to `sync`: the application is suspended and flushed, and these chunks
/// changed since tracking began (or since the last pre-copy round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Chunks written since the last dirty list the leecher received.
    pub dirty: Vec<u64>,
    /// When the seeder suspended its application (wall clock, for the downtime figure).
    pub suspended_at: SystemTime,
}

/// Wall-clock instants cross the wire as nanoseconds since the Unix epoch.
pub fn to_unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The inverse of [`to_unix_nanos`].
pub fn from_unix_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// The calls a leecher makes on its seeder. Implemented in-process by [`crate::Seeder`] and
/// over the network by a transport (the gRPC crate's `Seeder` service client).
#[async_trait]
pub trait SeederLink: Send + Sync + 'static {
    /// Size and chunk size of the resource.
    async fn info(&self) -> Result<ResourceInfo>;

    /// Fills `buf` with the resource's bytes at `offset`.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Starts (or restarts) recording writes for `session`. Any earlier session is replaced.
    async fn track(&self, session: SessionId) -> Result<()>;

    /// Pre-copy round: the chunks written since `track` or the previous round, while the
    /// application keeps running (tracking continues).
    async fn dirty_round(&self, session: SessionId) -> Result<Vec<u64>>;

    /// Suspends the application, flushes the frontend, fences off writes, and returns the
    /// chunks written since the last dirty list. Repeating it returns the same report.
    async fn sync(&self, session: SessionId) -> Result<SyncReport>;

    /// Hands authority over the resource to the leecher: from now on the seeder never resumes
    /// its application, and only serves reads until `close`. Repeating it succeeds.
    async fn commit(&self, session: SessionId) -> Result<()>;

    /// blake3 hashes of `count` chunks from `first` (for end-to-end verification).
    async fn hashes(&self, session: SessionId, first: u64, count: u64) -> Result<Vec<[u8; 32]>>;

    /// The leecher is done (or gives up before `sync`): the seeder stops serving this session.
    async fn close(&self, session: SessionId) -> Result<()>;
}
