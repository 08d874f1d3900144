//! Region settings and write-tracking modes.

use std::sync::Arc;
use std::time::Duration;

/// Default chunk size: 256 KiB (see docs/benchmarks.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 256 << 10;

/// What kind of memory backs a local region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryKind {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A shared memfd mapping (other mappings of the memfd see the same pages).
    Memfd,
}

/// Which write tracking to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteTracking {
    /// No tracking.
    Off,
    /// Async write-protect + PAGEMAP_SCAN where the kernel has it, else sync write-protect.
    #[default]
    Auto,
    /// Sync write-protect faults even where async is available (the fallback path).
    Sync,
}

/// Which write tracking runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingMode {
    /// Writes are not tracked.
    Off,
    /// UFFD_FEATURE_WP_ASYNC: no faults for writes; PAGEMAP_SCAN collects them.
    AsyncWriteProtect,
    /// Each first write to a chunk after a scan faults to the handler.
    SyncWriteProtect,
}

/// What a fault whose chunk cannot be fetched (backend error, timeout) does. Never zeros: a
/// chunk counts as installed only once its bytes are in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailedFetch {
    /// The chunk is poisoned (`UFFDIO_POISON`): threads touching it get SIGBUS, and the error
    /// is reported through [`RegionHandle::errors`](super::RegionHandle::errors). Needs
    /// UFFD_FEATURE_POISON (Linux 6.6+); a region is refused where the kernel lacks it.
    #[default]
    Sigbus,
    /// Faulting threads stay blocked while the fetch is retried (with back-off, each attempt
    /// reported as an error) until it succeeds or the region closes. Works on every kernel.
    Retry,
}

/// Region settings.
#[derive(Debug, Clone)]
pub struct RegionOptions {
    /// Bytes per chunk: the unit of fetching and of dirty tracking. A multiple of the page size.
    pub chunk_size: u64,
    /// Anonymous or memfd-backed memory (local regions only).
    pub memory: MemoryKind,
    /// Write tracking.
    pub write_tracking: WriteTracking,
    /// A backend read that takes longer fails (see [`Self::failed_fetch`]) instead of hanging
    /// the fault.
    pub fetch_timeout: Option<Duration>,
    /// What a fault does when its chunk cannot be fetched.
    pub failed_fetch: FailedFetch,
    /// Install fetched chunks that are all zeros with UFFDIO_ZEROPAGE (no memory used).
    pub detect_zero_chunks: bool,
    /// Worker threads of the region's own fetch runtime. Fetches never run on the caller's
    /// runtime, so application threads that are its workers can fault without starving the
    /// fetches that would wake them.
    pub fetch_threads: usize,
    /// Pretend the kernel lacks these `UFFD_FEATURE_*` bits: exercises the fallbacks and the
    /// refusals of older kernels on one that has everything (tests). Normally 0.
    pub ignore_features: u64,
    /// Told how long each served missing fault took, from reading its event to waking its
    /// threads with the chunk installed (metrics). Not told of faults that failed.
    pub fault_observer: Option<FaultObserver>,
}

/// Receives the duration of every served fault (see [`RegionOptions::fault_observer`]).
#[derive(Clone)]
pub struct FaultObserver(pub Arc<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for FaultObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultObserver")
    }
}

impl Default for RegionOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            memory: MemoryKind::Anonymous,
            write_tracking: WriteTracking::Auto,
            fetch_timeout: Some(Duration::from_secs(30)),
            failed_fetch: FailedFetch::Sigbus,
            detect_zero_chunks: true,
            fetch_threads: 2,
            ignore_features: 0,
            fault_observer: None,
        }
    }
}
