//! Region settings and write-tracking modes.

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

/// Region settings.
#[derive(Debug, Clone)]
pub struct RegionOptions {
    /// Bytes per chunk: the unit of fetching and of dirty tracking. A multiple of the page size.
    pub chunk_size: u64,
    /// Anonymous or memfd-backed memory (local regions only).
    pub memory: MemoryKind,
    /// Write tracking.
    pub write_tracking: WriteTracking,
    /// A backend read that takes longer fails the fault (SIGBUS) instead of hanging it.
    /// Needs a runtime with the time driver.
    pub fetch_timeout: Option<Duration>,
    /// Install fetched chunks that are all zeros with UFFDIO_ZEROPAGE (no memory used).
    pub detect_zero_chunks: bool,
    /// Runtime for fetch tasks; when `None`, the current one, else a private 2-thread one.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for RegionOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            memory: MemoryKind::Anonymous,
            write_tracking: WriteTracking::Auto,
            fetch_timeout: Some(Duration::from_secs(30)),
            detect_zero_chunks: true,
            runtime: None,
        }
    }
}
