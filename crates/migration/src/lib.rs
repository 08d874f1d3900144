//! r3map live migration: move a resource that an application keeps using from one host to
//! another, with a pause close to one round trip.
//!
//! # Layout
//!
//! - [`link`]: [`SeederLink`], the calls a leecher makes on its seeder, whatever carries them
//!   (in-process here; gRPC in `r3map-grpc`), and the messages they exchange.
//! - [`seeder`]: [`Seeder`], the source: serves reads, tracks writes, suspends and hands over.
//! - [`leecher`]: [`Leecher`], the destination: pulls behind a gate, pre-copy rounds,
//!   finalize, completion, and seeding onward.
//! - [`fence`]: the stage that stops writes for good once the final dirty list is taken.
//! - [`hooks`]: suspending, resuming and flushing the application (a process, commands).
//! - [`remote`]: the seeder as a read-only backend for the leecher's cache.
//! - [`verify`]: per-chunk blake3 hashes for end-to-end verification.
//!
//! The state machine (what each phase allows, what every failure does, and why at every
//! moment exactly one copy is authoritative) is in ARCHITECTURE.md.

pub mod error;
pub mod fence;
pub mod hooks;
pub mod leecher;
pub mod link;
pub mod remote;
pub mod seeder;
pub mod verify;

pub use error::{MigrationError, Result};
pub use hooks::{hook, Hook, SeederHooks};
pub use leecher::{
    CompleteReport, FinalizeReport, Leecher, LeecherOptions, LeecherPhase, LeecherStatus, RoundPolicy,
    StatusReader,
};
pub use link::{ResourceInfo, SeederLink, SessionId, SyncReport};
pub use seeder::{tracked_stack, Seeder, SeederPhase, TrackedStack};

use std::sync::Arc;

use r3map_core::SharedBackend;

/// Both roles of one host, as the Go r3map's migrators bundle them: a host either seeds a
/// resource it holds, or leeches one and, once complete, seeds it onward (A → B → C).
pub enum Migrator {
    /// This host is the source.
    Seeding(Arc<Seeder>),
    /// This host is a destination.
    Leeching(Box<Leecher>),
}

impl Migrator {
    /// Seeds `resource` (the application must do its I/O through the seeder's backend).
    pub fn seed(resource: SharedBackend, chunk_size: u64, hooks: SeederHooks) -> Result<Self> {
        Ok(Migrator::Seeding(Seeder::new(resource, chunk_size, hooks)?))
    }

    /// Leeches from `link` into `local`.
    pub async fn leech(
        link: Arc<dyn SeederLink>,
        local: SharedBackend,
        options: LeecherOptions,
    ) -> Result<Self> {
        Ok(Migrator::Leeching(Box::new(
            Leecher::open(link, local, options).await?,
        )))
    }

    /// The resource as this host's application uses it.
    pub fn backend(&self) -> SharedBackend {
        match self {
            Migrator::Seeding(seeder) => seeder.backend(),
            Migrator::Leeching(leecher) => leecher.backend(),
        }
    }

    /// Turns a completed leecher into the seeder of the next hop (a seeder stays one).
    pub fn seed_onward(self, hooks: SeederHooks) -> Result<Arc<Seeder>> {
        match self {
            Migrator::Seeding(seeder) => Ok(seeder),
            Migrator::Leeching(leecher) => leecher.into_seeder(hooks),
        }
    }
}
