//! [`Region`]: a memory region in this process, and [`RegionHandle`], its control side.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::stages::{PullTarget, Puller, PullerOptions};
use r3map_core::{ChunkLayout, Error, SharedBackend};
use tokio::sync::watch;

use super::handler::Handler;
use super::state::{fetch_runtime, Inner};
use super::{FaultError, MemoryKind, RegionError, RegionOptions, RegionStats, TrackingMode};
use crate::uffd::{self, Features, Mapping, Uffd};

/// A cloneable handle to a region's control side: dirty tracking, population, statistics and
/// errors. It is the [`PullTarget`] for the [`Puller`]. Operations fail with `Closed` once the
/// region is dropped.
#[derive(Clone)]
pub struct RegionHandle {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for RegionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionHandle")
            .field("base", &format_args!("{:#x}", self.inner.base))
            .field("layout", &self.inner.layout)
            .field("tracking", &self.inner.tracking)
            .finish()
    }
}

/// A local memory region backed by a [`Backend`](r3map_core::Backend). Dropping it stops the
/// handler and unmaps the memory without waiting for fetches in flight.
pub struct Region {
    handler: Handler,
    mapping: Mapping,
    handle: RegionHandle,
    /// The fetch runtime (the region's own; see [`RegionOptions::fetch_threads`]).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("handle", &self.handle).finish()
    }
}

impl Region {
    /// Maps `backend.size()` bytes (rounded up to whole pages) whose content comes from
    /// `backend` on first touch.
    pub fn new(backend: SharedBackend, options: RegionOptions) -> Result<Self, RegionError> {
        let page = uffd::page_size();
        let size = backend.size();
        if size == 0 {
            return Err(RegionError::InvalidConfig(
                "the backend is empty; a region needs at least one byte".into(),
            ));
        }
        let map_len = size.div_ceil(page) * page;
        let mapping = match options.memory {
            MemoryKind::Anonymous => Mapping::anonymous(map_len as usize),
            MemoryKind::Memfd => Mapping::shared_memfd(map_len as usize, "r3map-region"),
        }
        .map_err(RegionError::io("mapping the region"))?;
        // A forked child would get a copy of the range that nobody serves: its never-fetched
        // pages would read as zeros (anonymous) or, shared, zero the parent's too. Without the
        // mapping the child faults loudly (SIGSEGV) instead.
        mapping
            .exclude_from_fork()
            .map_err(RegionError::io("madvise(MADV_DONTFORK) on the region"))?;
        let uffd = Uffd::create()?;
        let runtime = fetch_runtime(options.fetch_threads)?;
        let runtime_handle = runtime.handle().clone();
        let inner = Inner::setup(
            uffd,
            mapping.addr(),
            size,
            None,
            options.memory == MemoryKind::Memfd,
            backend,
            &options,
            runtime_handle,
        )?;
        let inner = Arc::new(inner);
        let handler = Handler::start(inner.clone(), None)?;
        Ok(Self {
            handler,
            mapping,
            handle: RegionHandle { inner },
            runtime: Some(runtime),
        })
    }

    /// The memory (faults in missing chunks as it is read).
    pub fn as_slice(&self) -> &[u8] {
        &self.mapping.as_slice()[..self.len()]
    }

    /// The memory, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.mapping.as_mut_slice()[..len]
    }

    /// Start of the memory, for FFI. Valid for [`Self::len`] bytes while the region lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// Size in bytes (the backend's size).
    pub fn len(&self) -> usize {
        self.handle.inner.layout.size() as usize
    }

    /// Always false: empty regions are refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memfd of a [`MemoryKind::Memfd`] region.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.mapping.memfd()
    }

    /// Drops the pages of a range: they read as zeros afterwards (and their chunks count as
    /// dirty), like `madvise(MADV_DONTNEED)` on ordinary memory.
    pub fn discard(&mut self, offset: usize, len: usize) -> io::Result<()> {
        self.mapping.discard(offset, len)
    }

    /// A cloneable handle for the control side.
    pub fn handle(&self) -> RegionHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Region {
    type Target = RegionHandle;
    fn deref(&self) -> &RegionHandle {
        &self.handle
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let inner = &self.handle.inner;
        inner.closing.store(true, Ordering::Release);
        // Unregister first: it wakes any blocked thread, and a registered range would make
        // munmap wait for its UNMAP event to be read.
        if let Err(err) = inner.uffd.unregister(inner.base, inner.map_len) {
            tracing::warn!(%err, "unregistering the region failed");
        }
        self.handler.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        // `mapping` is unmapped when the fields drop; tasks still in flight find the range
        // unregistered and give up with ENOENT.
    }
}

impl RegionHandle {
    /// Chunk layout (size = the backend's size).
    pub fn layout(&self) -> ChunkLayout {
        self.inner.layout
    }

    /// Start address of the region (in the serving process or the client).
    pub fn addr(&self) -> u64 {
        self.inner.base
    }

    /// The process whose memory this is (`None`: this process).
    pub fn pid(&self) -> Option<i32> {
        self.inner.pid
    }

    /// Which write tracking runs.
    pub fn tracking_mode(&self) -> TrackingMode {
        self.inner.tracking
    }

    /// The userfaultfd features enabled for this region.
    pub fn features(&self) -> Features {
        self.inner.features
    }

    /// Whether UFFDIO_POISON is used for faults that cannot be served.
    pub fn poison_supported(&self) -> bool {
        self.inner.poison_supported
    }

    /// Whether chunk `chunk` is present (installed by a fault or the puller, or poisoned).
    pub fn is_installed(&self, chunk: u64) -> bool {
        self.inner.installed.get(chunk)
    }

    /// Number of chunks present.
    pub fn installed_count(&self) -> u64 {
        self.inner.installed.count_ones()
    }

    /// Counters.
    pub fn stats(&self) -> RegionStats {
        let i = &self.inner;
        RegionStats {
            faults: i.faults.load(Ordering::Relaxed),
            fetches: i.fetches.load(Ordering::Relaxed),
            zero_chunks: i.zero_chunks.load(Ordering::Relaxed),
            installed: i.installed.count_ones(),
            poisoned: i.poisoned_count.load(Ordering::Relaxed),
            already_present: i.already_present.load(Ordering::Relaxed),
        }
    }

    /// Declares chunks to be all zeros (e.g. holes the backend reported): they are installed
    /// with the zero page, without a fetch. Chunks past the end are ignored.
    pub fn mark_zero(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.inner.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.inner.known_zero.set(chunk);
        }
    }

    /// Installs `chunk` now (fetching it unless present). The puller calls this.
    pub async fn install(&self, chunk: u64) -> Result<(), Error> {
        if chunk >= self.inner.layout.chunk_count() {
            return Err(Error::OutOfBounds {
                offset: chunk * self.inner.layout.chunk_size(),
                len: 1,
                size: self.inner.layout.size(),
            });
        }
        self.inner.ensure(chunk).await
    }

    /// Starts a [`Puller`] that installs every chunk in the background (on the region's
    /// runtime). Progress: [`Puller::progress`] and [`Self::installed_count`].
    pub fn start_puller(&self, options: PullerOptions) -> Result<Puller, Error> {
        let _enter = self.inner.runtime.enter();
        Puller::start(Arc::new(self.clone()), options)
    }

    /// Faults that could not be served (the most recent 64).
    pub fn errors(&self) -> Vec<FaultError> {
        self.inner.errors.lock().iter().cloned().collect()
    }

    /// A receiver of the number of fault errors so far (changes on every new error).
    pub fn error_count(&self) -> watch::Receiver<u64> {
        self.inner.error_count.subscribe()
    }
}

#[async_trait]
impl PullTarget for RegionHandle {
    fn chunk_count(&self) -> u64 {
        self.inner.layout.chunk_count()
    }

    async fn pull(&self, chunk: u64) -> Result<(), Error> {
        self.install(chunk).await
    }
}
