//! The slice frontend: a memory region whose pages come from a [`Backend`] on first touch.
//!
//! # How it works
//!
//! The region is registered with userfaultfd. A handler thread reads fault events and never
//! does I/O itself: a fault on a chunk that is not installed yet hands that chunk to a task on a
//! Tokio runtime (one task per chunk, however many threads fault on it), which reads the whole
//! chunk from the backend and installs it with one `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE` when the
//! chunk is known or found to be all zeros). The copy wakes every thread waiting on the chunk.
//! The [`Puller`] installs chunks the same way before they are touched (a chunk that is already
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
//! Memory for tracking is a handful of bits per chunk ([`AtomicBitmap`]s).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use r3map_core::stages::{PullTarget, Puller, PullerOptions};
use r3map_core::{AtomicBitmap, ChunkLayout, ChunkLocks, Error, SharedBackend};
use tokio::sync::watch;

use crate::uffd::{self, raw, EventFd, Features, FillError, Mapping, Pagemap, RegisterMode, Uffd, UffdError};

/// Default chunk size: 256 KiB (see docs/benchmarks.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 256 << 10;

/// Kept fault errors (older ones are dropped; the count keeps growing).
const MAX_KEPT_ERRORS: usize = 64;

/// Buffers kept for reuse by fetch tasks.
const MAX_POOLED_BUFFERS: usize = 64;

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
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
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

struct Inner {
    uffd: Uffd,
    base: u64,
    /// Mapped length: the size rounded up to whole pages.
    map_len: u64,
    layout: ChunkLayout,
    page_size: u64,
    backend: SharedBackend,
    features: Features,
    tracking: TrackingMode,
    poison_supported: bool,
    pagemap: Option<Pagemap>,
    /// Process whose memory this is (`None`: this process).
    pid: Option<i32>,
    runtime: tokio::runtime::Handle,
    fetch_timeout: Option<Duration>,
    detect_zero: bool,

    installed: AtomicBitmap,
    fault_pending: AtomicBitmap,
    poisoned: AtomicBitmap,
    known_zero: AtomicBitmap,
    /// Dirty by other means than page writes (discarded pages, failed pushes).
    extra_dirty: AtomicBitmap,
    /// Sync write-protect mode: chunks written since the last `take_dirty`.
    sync_dirty: AtomicBitmap,
    /// One page of zeros (source for refilling single discarded pages).
    zero_page: Box<[u8]>,
    locks: ChunkLocks,
    /// Orders un-protecting (fault handler) against re-protecting (`take_dirty`) in sync mode.
    wp_lock: Mutex<()>,
    scan_lock: Mutex<()>,
    buffers: Mutex<Vec<Vec<u8>>>,

    closing: AtomicBool,
    peer_closed: Mutex<bool>,
    peer_closed_cv: Condvar,
    errors: Mutex<VecDeque<FaultError>>,
    error_count: watch::Sender<u64>,

    faults: AtomicU64,
    fetches: AtomicU64,
    zero_chunks: AtomicU64,
    poisoned_count: AtomicU64,
    already_present: AtomicU64,
}

/// A cloneable handle to a region's control side: dirty tracking, population, statistics and
/// errors. It is the [`PullTarget`] for the [`Puller`]. Operations fail with `Closed` once the
/// region is dropped.
#[derive(Clone)]
pub struct RegionHandle {
    inner: Arc<Inner>,
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
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("handle", &self.handle).finish()
    }
}

/// The handler thread and the eventfd that stops it.
struct Handler {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Handler {
    fn start(inner: Arc<Inner>, pidfd: Option<OwnedFd>) -> Result<Self, RegionError> {
        let stop = Arc::new(EventFd::new().map_err(RegionError::io("creating an eventfd"))?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("r3map-uffd".into())
            .spawn(move || inner.handler_loop(&thread_stop, pidfd))
            .map_err(RegionError::io("spawning the userfaultfd handler thread"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Err(err) = self.stop.signal() {
            tracing::error!(%err, "cannot signal the userfaultfd handler to stop");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the userfaultfd handler thread panicked");
            }
        }
    }
}

fn owned_runtime(
    given: Option<tokio::runtime::Handle>,
) -> Result<(tokio::runtime::Handle, Option<tokio::runtime::Runtime>), RegionError> {
    if let Some(handle) = given {
        return Ok((handle, None));
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        return Ok((handle, None));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("r3map-fetch")
        .enable_all()
        .build()
        .map_err(RegionError::io("starting the fetch runtime"))?;
    Ok((runtime.handle().clone(), Some(runtime)))
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
        let uffd = Uffd::create()?;
        let (runtime_handle, runtime) = owned_runtime(options.runtime.clone())?;
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
            runtime,
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

/// What a client process sends with its userfaultfd: the range to serve and its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRequest {
    /// Start of the range in the client's address space (page-aligned).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The client's process id (for PAGEMAP_SCAN and reading its memory).
    pub pid: i32,
}

impl RemoteRequest {
    const WIRE_LEN: usize = 20;

    fn to_bytes(self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..].copy_from_slice(&self.pid.to_le_bytes());
        out
    }

    /// Client side: sends a fresh userfaultfd (no UFFDIO_API done yet) and this request.
    pub fn send(self, sock: &UnixStream, uffd: BorrowedFd<'_>) -> io::Result<()> {
        uffd::send_fd(sock, uffd, &self.to_bytes())
    }

    /// Server side: receives the userfaultfd and the request.
    pub fn receive(sock: &UnixStream) -> io::Result<(Self, OwnedFd)> {
        let mut buf = [0u8; Self::WIRE_LEN];
        let (fd, n) = uffd::recv_fd(sock, &mut buf)?;
        if n != Self::WIRE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("region request has {n} bytes, expected {}", Self::WIRE_LEN),
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8"));
        Ok((
            Self {
                addr: u64_at(0),
                len: u64_at(8),
                pid: i32::from_le_bytes(buf[16..20].try_into().expect("4")),
            },
            fd,
        ))
    }
}

/// Serves page faults for a range of another process' memory (r3map as its page-fault
/// server). The client creates a userfaultfd, sends it with a [`RemoteRequest`], and touches
/// its memory; this side does the API handshake, registers the range and serves it. Dirty
/// tracking reads the client's `/proc/<pid>/pagemap`.
pub struct RemoteRegion {
    handler: Handler,
    handle: RegionHandle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RemoteRegion {
    /// Starts serving `request.len` bytes at `request.addr` of process `request.pid` from
    /// `backend` (whose size must be at least `request.len`). `options.memory` is ignored: the
    /// client decides (anonymous or shmem mappings both work).
    pub fn serve(
        uffd_fd: OwnedFd,
        request: RemoteRequest,
        backend: SharedBackend,
        options: RegionOptions,
    ) -> Result<Self, RegionError> {
        let page = uffd::page_size();
        if !request.addr.is_multiple_of(page) || request.len == 0 || !request.len.is_multiple_of(page) {
            return Err(RegionError::InvalidConfig(format!(
                "remote range {:#x}+{} is not a non-empty whole number of pages",
                request.addr, request.len
            )));
        }
        if backend.size() < request.len {
            return Err(RegionError::InvalidConfig(format!(
                "the backend has {} bytes but the remote range is {} bytes",
                backend.size(),
                request.len
            )));
        }
        let uffd = Uffd::from_owned_fd(uffd_fd)?;
        let pidfd = uffd::pidfd_open(request.pid).map_err(RegionError::io("pidfd_open"))?;
        let (runtime_handle, runtime) = owned_runtime(options.runtime.clone())?;
        let inner = Arc::new(Inner::setup(
            uffd,
            request.addr,
            request.len,
            Some(request.pid),
            false,
            backend,
            &options,
            runtime_handle,
        )?);
        let handler = Handler::start(inner.clone(), Some(pidfd))?;
        Ok(Self {
            handler,
            handle: RegionHandle { inner },
            runtime,
        })
    }

    /// A cloneable handle for the control side.
    pub fn handle(&self) -> RegionHandle {
        self.handle.clone()
    }

    /// Waits until the client unmapped the range or exited; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let inner = &self.handle.inner;
        let mut closed = inner.peer_closed.lock();
        let deadline = std::time::Instant::now() + timeout;
        while !*closed {
            if inner.peer_closed_cv.wait_until(&mut closed, deadline).timed_out() {
                return *closed;
            }
        }
        true
    }
}

impl std::ops::Deref for RemoteRegion {
    type Target = RegionHandle;
    fn deref(&self) -> &RegionHandle {
        &self.handle
    }
}

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        let inner = &self.handle.inner;
        inner.closing.store(true, Ordering::Release);
        if !*inner.peer_closed.lock() {
            // Best effort: the client may already be gone.
            let _ = inner.uffd.unregister(inner.base, inner.map_len);
        }
        self.handler.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    fn setup(
        uffd: Uffd,
        base: u64,
        size: u64,
        pid: Option<i32>,
        shmem: bool,
        backend: SharedBackend,
        options: &RegionOptions,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, RegionError> {
        let page = uffd::page_size();
        if options.chunk_size == 0 || !options.chunk_size.is_multiple_of(page) {
            return Err(RegionError::InvalidConfig(format!(
                "chunk size {} is not a positive multiple of the {page}-byte page size",
                options.chunk_size
            )));
        }
        let layout = ChunkLayout::new(size, options.chunk_size)
            .map_err(|e| RegionError::InvalidConfig(e.to_string()))?;
        let map_len = size.div_ceil(page) * page;

        let available = Uffd::probe()?;
        let mut wanted = u64::from(raw::UFFD_FEATURE_EVENT_REMOVE | raw::UFFD_FEATURE_EVENT_UNMAP);
        if shmem {
            if !available.has(raw::UFFD_FEATURE_MISSING_SHMEM) {
                return Err(UffdError::Unsupported("userfaultfd on shared memory".into()).into());
            }
            wanted |= u64::from(raw::UFFD_FEATURE_MISSING_SHMEM);
        }
        let wp_possible = available.has(raw::UFFD_FEATURE_PAGEFAULT_FLAG_WP)
            && (!shmem || available.has(raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
        let tracking = match options.write_tracking {
            WriteTracking::Off => TrackingMode::Off,
            _ if !wp_possible => {
                tracing::warn!("the kernel has no userfaultfd write-protect here; writes are not tracked");
                TrackingMode::Off
            }
            WriteTracking::Auto if available.has(raw::UFFD_FEATURE_WP_ASYNC) => {
                TrackingMode::AsyncWriteProtect
            }
            WriteTracking::Auto => {
                tracing::warn!("no UFFD_FEATURE_WP_ASYNC; tracking writes with write-protect faults");
                TrackingMode::SyncWriteProtect
            }
            WriteTracking::Sync => TrackingMode::SyncWriteProtect,
        };
        if tracking != TrackingMode::Off {
            wanted |= u64::from(raw::UFFD_FEATURE_PAGEFAULT_FLAG_WP);
            if shmem {
                wanted |= u64::from(raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
            }
        }
        if tracking == TrackingMode::AsyncWriteProtect {
            wanted |= u64::from(raw::UFFD_FEATURE_WP_ASYNC);
        }
        let poison_supported = available.has(raw::UFFD_FEATURE_POISON);
        if poison_supported {
            wanted |= u64::from(raw::UFFD_FEATURE_POISON);
        } else {
            tracing::warn!("no UFFDIO_POISON: a fault that cannot be served stays blocked");
        }
        let features = uffd.api(wanted)?;
        let ioctls = uffd.register(
            base,
            map_len,
            RegisterMode {
                missing: true,
                write_protect: tracking != TrackingMode::Off,
            },
        )?;
        for (bit, name) in [
            (raw::IOCTL_BIT_COPY, "UFFDIO_COPY"),
            (raw::IOCTL_BIT_ZEROPAGE, "UFFDIO_ZEROPAGE"),
        ] {
            if ioctls & bit == 0 {
                return Err(UffdError::Unsupported(format!("{name} on this memory")).into());
            }
        }
        if tracking != TrackingMode::Off && ioctls & raw::IOCTL_BIT_WRITEPROTECT == 0 {
            return Err(UffdError::Unsupported("UFFDIO_WRITEPROTECT on this memory".into()).into());
        }
        let poison_supported = poison_supported && ioctls & raw::IOCTL_BIT_POISON != 0;
        let pagemap = if tracking == TrackingMode::AsyncWriteProtect {
            let pagemap = Pagemap::open(pid).map_err(RegionError::io("opening pagemap"))?;
            // Nothing is present yet: this only proves PAGEMAP_SCAN works on the range.
            let mut probe = Vec::new();
            pagemap
                .scan_written(base, base + map_len, true, &mut probe)
                .map_err(RegionError::io("PAGEMAP_SCAN (needs Linux 6.7+)"))?;
            Some(pagemap)
        } else {
            None
        };
        let chunks = layout.chunk_count();
        let (error_count, _) = watch::channel(0);
        Ok(Self {
            uffd,
            base,
            map_len,
            layout,
            page_size: page,
            backend,
            features,
            tracking,
            poison_supported,
            pagemap,
            pid,
            runtime,
            fetch_timeout: options.fetch_timeout,
            detect_zero: options.detect_zero_chunks,
            installed: AtomicBitmap::new(chunks),
            fault_pending: AtomicBitmap::new(chunks),
            poisoned: AtomicBitmap::new(chunks),
            known_zero: AtomicBitmap::new(chunks),
            extra_dirty: AtomicBitmap::new(chunks),
            sync_dirty: AtomicBitmap::new(chunks),
            zero_page: vec![0u8; page as usize].into_boxed_slice(),
            locks: ChunkLocks::new(),
            wp_lock: Mutex::new(()),
            scan_lock: Mutex::new(()),
            buffers: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            peer_closed: Mutex::new(false),
            peer_closed_cv: Condvar::new(),
            errors: Mutex::new(VecDeque::new()),
            error_count,
            faults: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            zero_chunks: AtomicU64::new(0),
            poisoned_count: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
        })
    }

    /// Address range of a chunk, rounded up to whole pages (the tail chunk may be short).
    fn chunk_span(&self, chunk: u64) -> (u64, u64) {
        let range = self.layout.chunk_range(chunk);
        let len = (range.end - range.start).div_ceil(self.page_size) * self.page_size;
        (self.base + range.start, len)
    }

    fn chunk_of_addr(&self, addr: u64) -> Option<u64> {
        if addr < self.base || addr >= self.base + self.map_len {
            return None;
        }
        Some(((addr - self.base) / self.layout.chunk_size()).min(self.layout.chunk_count() - 1))
    }

    fn chunks_of_span(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        let lo = start.max(self.base);
        let hi = end.min(self.base + self.map_len);
        if lo >= hi {
            return 0..0;
        }
        let first = (lo - self.base) / self.layout.chunk_size();
        let last = ((hi - 1 - self.base) / self.layout.chunk_size()).min(self.layout.chunk_count() - 1);
        first..last + 1
    }

    fn mark_peer_closed(&self) {
        *self.peer_closed.lock() = true;
        self.peer_closed_cv.notify_all();
    }

    fn handler_loop(self: &Arc<Self>, stop: &EventFd, pidfd: Option<OwnedFd>) {
        let mut events = Vec::new();
        loop {
            let mut fds = vec![self.uffd.as_fd(), stop.as_fd()];
            if let Some(pidfd) = &pidfd {
                fds.push(pidfd.as_fd());
            }
            let ready = match uffd::poll_readable(&fds, None) {
                Ok(ready) => ready,
                Err(err) => {
                    tracing::error!(%err, "poll on the userfaultfd failed; handler stops");
                    return;
                }
            };
            if ready[1] {
                return;
            }
            // Drain events even if the peer exited, then stop.
            events.clear();
            if let Err(err) = self.uffd.read_events(&mut events) {
                tracing::error!(%err, "reading userfaultfd events failed; handler stops");
                self.mark_peer_closed();
                return;
            }
            let mut unmapped = false;
            for event in events.drain(..) {
                unmapped |= self.handle_event(event);
            }
            if unmapped || ready.get(2).copied().unwrap_or(false) {
                self.closing.store(true, Ordering::Release);
                self.mark_peer_closed();
                return;
            }
        }
    }

    /// Handles one event; true when the region was unmapped.
    fn handle_event(self: &Arc<Self>, event: uffd::Event) -> bool {
        match event {
            uffd::Event::Pagefault { address, wp, .. } => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = self.chunk_of_addr(address) else {
                    tracing::warn!(address, "fault outside the region");
                    return false;
                };
                if wp {
                    self.resolve_write_protect(chunk);
                } else if self.installed.get(chunk) {
                    // The chunk was installed and this page dropped since (MADV_DONTNEED):
                    // like ordinary memory, it reads as zeros now.
                    let page = address & !(self.page_size - 1);
                    self.fill_zero(page, self.page_size);
                    self.wake(page, self.page_size);
                } else if !self.fault_pending.set(chunk) {
                    let inner = self.clone();
                    self.runtime.spawn(async move { inner.serve_fault(chunk).await });
                }
                false
            }
            uffd::Event::Remove { start, end } => {
                for chunk in self.chunks_of_span(start, end) {
                    let (cstart, clen) = self.chunk_span(chunk);
                    if start <= cstart && cstart + clen <= end && !self.installed.get(chunk) {
                        // Dropped before it was ever installed: it must read as zeros.
                        self.known_zero.set(chunk);
                    }
                    if self.tracking != TrackingMode::Off {
                        self.extra_dirty.set(chunk);
                    }
                }
                false
            }
            uffd::Event::Unmap { start, end } => start <= self.base && self.base + self.map_len <= end,
            uffd::Event::Remap { .. } | uffd::Event::Fork { .. } | uffd::Event::Unknown(_) => {
                tracing::warn!(?event, "unexpected userfaultfd event ignored");
                false
            }
        }
    }

    /// Sync write-protect: a write hit a protected chunk; record it and unprotect the chunk
    /// (which wakes the writer).
    fn resolve_write_protect(&self, chunk: u64) {
        let _guard = self.wp_lock.lock();
        self.sync_dirty.set(chunk);
        let (start, len) = self.chunk_span(chunk);
        if let Err(err) = self.uffd.writeprotect(start, len, false, false) {
            tracing::error!(%err, chunk, "un-write-protecting a chunk failed");
        }
    }

    async fn serve_fault(self: Arc<Self>, chunk: u64) {
        let result = self.ensure(chunk, true).await;
        self.fault_pending.clear(chunk);
        if let Err(err) = result {
            if !self.closing.load(Ordering::Acquire) {
                tracing::debug!(chunk, %err, "fault not served");
            }
        }
    }

    /// Makes `chunk` present. From a fault, a failed fetch poisons the chunk (SIGBUS for the
    /// faulting thread) and reports the error; from the puller it only returns the error.
    async fn ensure(&self, chunk: u64, from_fault: bool) -> Result<(), Error> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self.installed.get(chunk) {
            return self.installed_result(chunk);
        }
        let _guard = self.locks.lock(chunk).await;
        if self.installed.get(chunk) {
            return self.installed_result(chunk);
        }
        let (dst, len) = self.chunk_span(chunk);
        if self.known_zero.get(chunk) {
            self.install_zero(dst, len)?;
        } else {
            let mut buf = self.take_buffer(len as usize);
            let fetched = self.fetch(chunk, &mut buf).await;
            let result = match fetched {
                Ok(()) if self.detect_zero && is_zero(&buf) => self.install_zero(dst, len),
                Ok(()) => self.install_copy(dst, &buf),
                Err(err) => {
                    if from_fault && !self.closing.load(Ordering::Acquire) {
                        self.fail_chunk(chunk, err.clone());
                    }
                    Err(err)
                }
            };
            self.return_buffer(buf);
            result?;
        }
        // Installed without waking: the bit is set before any faulting thread runs again, so
        // a later fault on this chunk can only mean a dropped page.
        self.installed.set(chunk);
        self.wake(dst, len);
        Ok(())
    }

    fn wake(&self, start: u64, len: u64) {
        if let Err(err) = self.uffd.wake(start, len) {
            if !self.closing.load(Ordering::Acquire) {
                tracing::error!(%err, "UFFDIO_WAKE failed");
            }
        }
    }

    fn installed_result(&self, chunk: u64) -> Result<(), Error> {
        if self.poisoned.get(chunk) {
            Err(Error::Remote(format!(
                "chunk {chunk} could not be fetched earlier and is poisoned"
            )))
        } else {
            Ok(())
        }
    }

    async fn fetch(&self, chunk: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let range = self.layout.chunk_range(chunk);
        let data_len = (range.end - range.start) as usize;
        buf[data_len..].fill(0);
        let read = self.backend.read_at(range.start, &mut buf[..data_len]);
        match self.fetch_timeout {
            Some(limit) => tokio::time::timeout(limit, read)
                .await
                .map_err(|_| Error::Timeout(limit))?,
            None => read.await,
        }
    }

    /// Poisons a chunk whose fetch failed: threads waiting on it (and later ones) get SIGBUS.
    fn fail_chunk(&self, chunk: u64, error: Error) {
        tracing::error!(chunk, %error, "fetching a faulted chunk failed; poisoning it (SIGBUS)");
        let (start, len) = self.chunk_span(chunk);
        if self.poison_supported {
            if let Err(err) = self.fill(start, len, |at, n| self.uffd.poison(at, n)) {
                tracing::error!(%err, chunk, "UFFDIO_POISON failed");
            }
        }
        self.poisoned.set(chunk);
        self.installed.set(chunk);
        self.poisoned_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock();
        if errors.len() == MAX_KEPT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(FaultError { chunk, error });
        drop(errors);
        self.error_count.send_modify(|n| *n += 1);
    }

    fn install_copy(&self, dst: u64, buf: &[u8]) -> Result<(), Error> {
        let wp = self.tracking != TrackingMode::Off;
        self.fill(dst, buf.len() as u64, |at, n| {
            let from = (at - dst) as usize;
            self.uffd.copy(at, &buf[from..from + n as usize], wp, true)
        })
    }

    fn install_zero(&self, dst: u64, len: u64) -> Result<(), Error> {
        self.zero_chunks.fetch_add(1, Ordering::Relaxed);
        self.fill_zero(dst, len);
        Ok(())
    }

    /// Zero pages over a range, not waking anybody. With sync tracking they are
    /// write-protected too, so a write faults; async tracking needs nothing (PAGEMAP_SCAN
    /// never reports zero-page mappings, and a write replaces them with a written page).
    /// Pages refilled through COPY are installed write-protected.
    fn fill_zero(&self, dst: u64, len: u64) {
        let end = dst + len;
        let mut at = dst;
        let wp = self.tracking != TrackingMode::Off;
        while at < end {
            match self.uffd.zeropage(at, end - at, true) {
                Ok(_) => break,
                Err(FillError { errno, done }) => {
                    at += done;
                    match errno {
                        libc::EEXIST => {
                            // A real page, or the write-protect marker a discarded page leaves
                            // behind (which ZEROPAGE refuses but COPY fills).
                            match self.uffd.copy(at, &self.zero_page, wp, true) {
                                Ok(_) => {}
                                Err(FillError {
                                    errno: libc::EEXIST, ..
                                }) => {
                                    self.already_present.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => {
                                    self.log_fill_error(err, at);
                                    return;
                                }
                            }
                            at += self.page_size;
                        }
                        libc::EAGAIN => std::thread::yield_now(),
                        _ => {
                            self.log_fill_error(FillError { errno, done }, at);
                            return;
                        }
                    }
                }
            }
        }
        if self.tracking == TrackingMode::SyncWriteProtect {
            let _guard = self.wp_lock.lock();
            if let Err(err) = self.uffd.writeprotect(dst, len, true, false) {
                tracing::error!(%err, "write-protecting zero pages failed");
            }
        }
    }

    fn log_fill_error(&self, err: FillError, at: u64) {
        if !self.closing.load(Ordering::Acquire) {
            tracing::error!(%err, at, "installing zero pages failed");
        }
    }

    /// Runs a fill ioctl over `len` bytes at `dst`, skipping pages that are already there
    /// (EEXIST: somebody else installed them) and retrying while the mapping changes (EAGAIN).
    fn fill(&self, dst: u64, len: u64, op: impl Fn(u64, u64) -> Result<u64, FillError>) -> Result<(), Error> {
        let end = dst + len;
        let mut at = dst;
        while at < end {
            match op(at, end - at) {
                Ok(_) => return Ok(()),
                Err(FillError { errno, done }) => {
                    at += done;
                    match errno {
                        libc::EEXIST => {
                            self.already_present.fetch_add(1, Ordering::Relaxed);
                            // Wake anybody who faulted on the page that was already there.
                            let _ = self.uffd.wake(at, self.page_size);
                            at += self.page_size;
                        }
                        libc::EAGAIN => std::thread::yield_now(),
                        libc::ENOENT | libc::ESRCH if self.closing.load(Ordering::Acquire) => {
                            return Err(Error::Closed)
                        }
                        libc::ENOENT | libc::ESRCH => {
                            return Err(Error::Io(Arc::new(io::Error::other(
                                "the region is no longer mapped",
                            ))))
                        }
                        _ => return Err(Error::from(io::Error::from_raw_os_error(errno))),
                    }
                }
            }
        }
        Ok(())
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.buffers.lock();
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0u8; len],
        }
    }

    fn return_buffer(&self, buf: Vec<u8>) {
        let mut pool = self.buffers.lock();
        if pool.len() < MAX_POOLED_BUFFERS {
            pool.push(buf);
        }
    }

    fn take_dirty(&self) -> Result<Vec<u64>, RegionError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(RegionError::Closed);
        }
        let _scan = self.scan_lock.lock();
        let mut dirty = Vec::new();
        match self.tracking {
            TrackingMode::Off => {
                return Err(RegionError::InvalidConfig(
                    "write tracking is off for this region".into(),
                ))
            }
            TrackingMode::AsyncWriteProtect => {
                let pagemap = self.pagemap.as_ref().expect("async tracking has a pagemap");
                let mut ranges = Vec::new();
                pagemap
                    .scan_written(self.base, self.base + self.map_len, true, &mut ranges)
                    .map_err(RegionError::io("PAGEMAP_SCAN"))?;
                for (start, end) in ranges {
                    dirty.extend(self.chunks_of_span(start, end));
                }
            }
            TrackingMode::SyncWriteProtect => {
                let _guard = self.wp_lock.lock();
                for chunk in self.sync_dirty.ones() {
                    // Protect before clearing: a write before this point is in this round,
                    // a write after it faults and lands in the next.
                    let (start, len) = self.chunk_span(chunk);
                    self.uffd.writeprotect(start, len, true, false)?;
                    self.sync_dirty.clear(chunk);
                    dirty.push(chunk);
                }
            }
        }
        dirty.extend(self.extra_dirty.take());
        dirty.sort_unstable();
        dirty.dedup();
        Ok(dirty)
    }
}

fn is_zero(buf: &[u8]) -> bool {
    let (words, rest) = buf.split_at(buf.len() / 16 * 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
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
        self.inner.ensure(chunk, false).await
    }

    /// Starts a [`Puller`] that installs every chunk in the background (on the region's
    /// runtime). Progress: [`Puller::progress`] and [`Self::installed_count`].
    pub fn start_puller(&self, options: PullerOptions) -> Result<Puller, Error> {
        let _enter = self.inner.runtime.enter();
        Puller::start(Arc::new(self.clone()), options)
    }

    /// Chunks written since the previous call (ascending), and re-arms tracking for them: a
    /// write that happens after a chunk is reported shows up in a later call. Includes chunks
    /// whose pages were discarded.
    pub fn take_dirty(&self) -> Result<Vec<u64>, RegionError> {
        self.inner.take_dirty()
    }

    /// Marks chunks dirty again (e.g. after a failed write-back). Chunks past the end are
    /// ignored.
    pub fn mark_dirty(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.inner.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.inner.extra_dirty.set(chunk);
        }
    }

    /// Writes every dirty chunk back to the backend; returns the chunks written. On failure,
    /// the chunks not written are marked dirty again.
    pub async fn push_dirty(&self) -> Result<Vec<u64>, Error> {
        let dirty = self.take_dirty().map_err(|e| match e {
            RegionError::Closed => Error::Closed,
            other => Error::Io(Arc::new(io::Error::other(other.to_string()))),
        })?;
        let inner = &self.inner;
        let mut buf = Vec::new();
        for (i, &chunk) in dirty.iter().enumerate() {
            let range = inner.layout.chunk_range(chunk);
            buf.resize((range.end - range.start) as usize, 0);
            let result = match uffd::read_process_memory(inner.pid, inner.base + range.start, &mut buf) {
                Ok(()) => inner.backend.write_at(range.start, &buf).await,
                Err(err) => Err(Error::from(err)),
            };
            if let Err(err) = result {
                self.mark_dirty(dirty[i..].iter().copied());
                return Err(err);
            }
        }
        Ok(dirty)
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
