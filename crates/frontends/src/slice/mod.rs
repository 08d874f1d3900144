//! The slice frontend: a memory region whose pages come from a [`Backend`](r3map_core::Backend) on first touch.
//!
//! # How it works
//!
//! The region is registered with userfaultfd. A handler thread reads fault events and never
//! does I/O itself: a fault on a chunk that is not installed yet hands that chunk to a task on a
//! Tokio runtime (one task per chunk, however many threads fault on it), which reads the whole
//! chunk from the backend and installs it with one `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE` when the
//! chunk is known or found to be all zeros). The copy wakes every thread waiting on the chunk.
//! The [`Puller`](r3map_core::stages::Puller) installs chunks the same way before they are touched (a chunk that is already
//! there is simply skipped).
//!
//! Writes are tracked without faults where the kernel can (`UFFD_FEATURE_WP_ASYNC`): chunks are
//! installed write-protected, the kernel clears the protection on the first write to a page by
//! itself, and [`RegionHandle::take_dirty`] collects written pages with one `PAGEMAP_SCAN` that
//! also re-protects them. Where async write-protect is missing, write-protect faults are
//! handled synchronously (one fault per chunk per round). [`RegionHandle::tracking_mode`] says
//! which mode runs.
//!
//! A fault that cannot be served (backend error, timeout) poisons the chunk (`UFFDIO_POISON`):
//! the faulting thread gets SIGBUS instead of hanging, and the error is reported to the owner
//! through [`RegionHandle::errors`].
//!
//! Memory for tracking is a handful of bits per chunk ([`AtomicBitmap`](r3map_core::AtomicBitmap)s).
//!
//! # Layout
//!
//! - [`options`]: settings ([`RegionOptions`]) and the tracking modes.
//! - `state`: the state shared by the handler, fetch tasks and handles, and the feature
//!   negotiation with the kernel that creates it.
//! - `handler`: the fault-handler thread (reads userfaultfd events, never does I/O).
//! - `install`: fetching chunks from the backend and installing them (COPY, ZEROPAGE, POISON).
//! - `tracking`: dirty-chunk collection (PAGEMAP_SCAN or sync write-protect) and write-back.
//! - [`region`]: [`Region`], a region in this process, and [`RegionHandle`], the control side.
//! - [`remote`]: [`RemoteRegion`], serving another process' memory, and the socket protocol
//!   ([`RemoteRequest`]) it arrives by.

mod handler;
mod install;
pub mod options;
pub mod region;
pub mod remote;
mod state;
mod tracking;

use std::io;

use r3map_core::Error;

use crate::uffd::UffdError;

pub use options::{MemoryKind, RegionOptions, TrackingMode, WriteTracking, DEFAULT_CHUNK_SIZE};
pub use region::{Region, RegionHandle};
pub use remote::{RemoteRegion, RemoteRequest};

/// Why a region could not be set up or a tracking operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A setting is unusable.
    #[error("invalid region configuration: {0}")]
    InvalidConfig(String),
    /// userfaultfd refused something.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Mapping memory, opening pagemap, or starting threads failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The region was closed.
    #[error("the region has been closed")]
    Closed,
}

impl RegionError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| RegionError::Io { what, source }
    }
}

/// A fault the region could not serve: the chunk was poisoned (SIGBUS on access).
#[derive(Debug, Clone)]
pub struct FaultError {
    /// The chunk that could not be fetched.
    pub chunk: u64,
    /// Why.
    pub error: Error,
}

/// Counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Fault events read (missing and write-protect).
    pub faults: u64,
    /// Chunks read from the backend.
    pub fetches: u64,
    /// Chunks installed with the zero page.
    pub zero_chunks: u64,
    /// Chunks installed (by faults or the puller).
    pub installed: u64,
    /// Chunks poisoned after a failed fetch.
    pub poisoned: u64,
    /// Fill ioctls that found a page already there.
    pub already_present: u64,
}
