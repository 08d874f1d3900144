//! The slice frontend: a memory region whose pages come from a [`Backend`](r3map_core::Backend) on first touch.
//!
//! # How it works
//!
//! The region is registered with userfaultfd. A handler thread reads fault events and never
//! does I/O or fills itself: a fault on a chunk that is not installed yet hands that chunk to a
//! task on the region's own Tokio runtime (never the caller's, so application threads that are
//! workers of the caller's runtime cannot starve it; one task per chunk, however many threads
//! fault on it), which reads the whole chunk from the backend and installs it with one
//! `UFFDIO_COPY` (or zeros when the chunk is known or found to be all zeros). The install wakes
//! every thread waiting on the chunk. The [`Puller`](r3map_core::stages::Puller) installs
//! chunks the same way, on the same runtime, before they are touched.
//!
//! Writes are tracked without faults where the kernel can (`UFFD_FEATURE_WP_ASYNC`): chunks are
//! installed write-protected, the kernel clears the protection on the first write to a page by
//! itself, and [`RegionHandle::take_dirty`] collects written pages, present or swapped out,
//! with one `PAGEMAP_SCAN` that also re-protects them. Where async write-protect is missing,
//! write-protect faults are handled synchronously (one fault per chunk per round; zeros go in
//! write-protected in the same ioctl). [`RegionHandle::tracking_mode`] says which mode runs.
//!
//! Zeros never stand in for data. A fault whose chunk cannot be fetched (backend error,
//! timeout) poisons the chunk (`UFFDIO_POISON`, SIGBUS for the faulting thread; a region is
//! refused where the kernel lacks it) or, with [`FailedFetch::Retry`], stays blocked while the
//! fetch is retried; errors are reported through [`RegionHandle::errors`]. Pages dropped
//! (`MADV_DONTNEED`) before or while their chunk is fetched read as zeros, not as resurrected
//! backend bytes. A forked child gets no copy of a local region (MADV_DONTFORK); a served
//! process' child gets its never-fetched pages poisoned. A served process that moves the range
//! with `mremap` gets SIGBUS there, and `take_dirty` fails from then on. A served process that
//! outlives its server gets its never-fetched pages poisoned ([`RemoteRegion::stop_serving`]).
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

pub use options::{
    FailedFetch, FaultObserver, MemoryKind, RegionOptions, TrackingMode, WriteTracking, DEFAULT_CHUNK_SIZE,
};
pub use region::{Region, RegionHandle};
pub use remote::{hand_over, RemoteRegion, RemoteRequest};
pub use state::probe;

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
    /// The process moved part of the range with mremap: writes there cannot be tracked.
    #[error(
        "the process moved {len} bytes of the region from {from:#x} to {to:#x} (mremap); writes \
         there can no longer be tracked, so the region refuses to report dirty chunks"
    )]
    Remapped { from: u64, to: u64, len: u64 },
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
