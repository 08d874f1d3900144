//! The state shared by the fault handler, fetch tasks and handles, and the feature
//! negotiation with the kernel that creates it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use r3map_core::{AtomicBitmap, ChunkLayout, ChunkLocks, SharedBackend};
use tokio::sync::watch;

use super::{FailedFetch, FaultError, RegionError, RegionOptions, TrackingMode, WriteTracking};
use crate::uffd::{self, raw, Features, Pagemap, RegisterMode, Uffd, UffdError};

pub(super) struct Inner {
    pub(super) uffd: Uffd,
    pub(super) base: u64,
    /// Mapped length: the size rounded up to whole pages.
    pub(super) map_len: u64,
    pub(super) layout: ChunkLayout,
    pub(super) page_size: u64,
    pub(super) backend: SharedBackend,
    pub(super) features: Features,
    pub(super) tracking: TrackingMode,
    pub(super) poison_supported: bool,
    pub(super) pagemap: Option<Pagemap>,
    /// Process whose memory this is (`None`: this process).
    pub(super) pid: Option<i32>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) fetch_timeout: Option<Duration>,
    pub(super) failed_fetch: FailedFetch,
    pub(super) detect_zero: bool,
    pub(super) fault_observer: Option<super::FaultObserver>,

    pub(super) installed: AtomicBitmap,
    pub(super) fault_pending: AtomicBitmap,
    pub(super) poisoned: AtomicBitmap,
    pub(super) known_zero: AtomicBitmap,
    /// Pages (not chunks) dropped while their chunk was not installed yet: they are installed
    /// as zeros, not with the backend's bytes.
    pub(super) discarded: AtomicBitmap,
    /// Orders installing against the events the handler reads. The handler holds it
    /// exclusively from reading events until it has recorded them; an install holds it shared
    /// from looking at `discarded` until its pages are in. So a REMOVE is either recorded
    /// before an install looks (its pages go in as zeros) or read after the install, and then
    /// the kernel drops the installed pages itself (it zaps only after the event is read).
    pub(super) event_gate: RwLock<()>,
    /// Set when the process moved part of the range with mremap: writes there cannot be
    /// tracked any more, so `take_dirty` fails from then on.
    pub(super) remapped: Mutex<Option<(u64, u64, u64)>>,
    /// Userfaultfds of forked children kept open where they could not be poisoned (their
    /// never-fetched pages then block instead of reading zeros).
    pub(super) child_uffds: Mutex<Vec<OwnedFd>>,
    /// Dirty by other means than page writes (discarded pages, failed pushes).
    pub(super) extra_dirty: AtomicBitmap,
    /// Sync write-protect mode: chunks written since the last `take_dirty`.
    pub(super) sync_dirty: AtomicBitmap,
    /// One page of zeros (source for refilling single discarded pages).
    pub(super) zero_page: Box<[u8]>,
    /// A chunk of zeros: the source for zero chunks under sync write-protect, which must go in
    /// write-protected in one step (allocated lazily by the kernel; untouched it costs nothing).
    pub(super) zero_chunk: Box<[u8]>,
    pub(super) locks: ChunkLocks,
    /// Orders un-protecting (fault handler) against re-protecting (`take_dirty`) in sync mode.
    pub(super) wp_lock: Mutex<()>,
    pub(super) scan_lock: Mutex<()>,
    pub(super) buffers: Mutex<Vec<Vec<u8>>>,

    pub(super) closing: AtomicBool,
    pub(super) peer_closed: Mutex<bool>,
    pub(super) peer_closed_cv: Condvar,
    pub(super) errors: Mutex<VecDeque<FaultError>>,
    pub(super) error_count: watch::Sender<u64>,

    pub(super) faults: AtomicU64,
    pub(super) fetches: AtomicU64,
    pub(super) zero_chunks: AtomicU64,
    pub(super) poisoned_count: AtomicU64,
    pub(super) already_present: AtomicU64,
}

/// The region's own fetch runtime: never the caller's, so application threads that are workers
/// of the caller's runtime can fault without starving the fetches that would wake them.
pub(super) fn fetch_runtime(threads: usize) -> Result<tokio::runtime::Runtime, RegionError> {
    if threads == 0 {
        return Err(RegionError::InvalidConfig(
            "a region needs at least one fetch thread".into(),
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("r3map-fetch")
        .enable_all()
        .build()
        .map_err(RegionError::io("starting the fetch runtime"))
}

/// Why a region that would deliver SIGBUS for failed fetches cannot be set up without poison.
const NO_POISON: &str = "UFFDIO_POISON (UFFD_FEATURE_POISON, Linux 6.6+), which makes a fault whose \
chunk cannot be fetched raise SIGBUS; without it that fault could only be answered with zeros. \
Use FailedFetch::Retry to keep such faults blocked and retried instead";

/// What the kernel offers a region with `options`: the probed features minus those the options
/// say to ignore (tests use that to play an older kernel).
fn available_features(options: &RegionOptions) -> Result<Features, UffdError> {
    let probed = Uffd::probe()?;
    Ok(Features {
        features: probed.features & !options.ignore_features,
        ..probed
    })
}

/// What a region asks the kernel for, decided from what the kernel offers.
struct Negotiated {
    /// `UFFD_FEATURE_*` bits for the UFFDIO_API handshake.
    wanted: u64,
    tracking: TrackingMode,
    /// UFFD_FEATURE_POISON is offered (the ioctl itself is checked after registering).
    poison_supported: bool,
}

/// Chooses the features and the tracking mode, or names the first missing feature that the
/// options cannot do without.
fn negotiate(available: Features, shmem: bool, options: &RegionOptions) -> Result<Negotiated, UffdError> {
    // FORK and REMAP are asked for so that a fork or mremap of the range is seen and
    // answered (see the handler) instead of silently unregistering the copy or the moved
    // part, whose never-fetched pages would then read as zeros.
    let mut wanted = u64::from(
        raw::UFFD_FEATURE_EVENT_REMOVE
            | raw::UFFD_FEATURE_EVENT_UNMAP
            | raw::UFFD_FEATURE_EVENT_FORK
            | raw::UFFD_FEATURE_EVENT_REMAP,
    );
    if shmem {
        if !available.has(raw::UFFD_FEATURE_MISSING_SHMEM) {
            return Err(UffdError::Unsupported(
                "userfaultfd on shared memory (UFFD_FEATURE_MISSING_SHMEM, Linux 4.11+)".into(),
            ));
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
        WriteTracking::Auto if available.has(raw::UFFD_FEATURE_WP_ASYNC) => TrackingMode::AsyncWriteProtect,
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
    } else if options.failed_fetch == FailedFetch::Sigbus {
        return Err(UffdError::Unsupported(NO_POISON.into()));
    }
    Ok(Negotiated {
        wanted,
        tracking,
        poison_supported,
    })
}

/// Whether this kernel can give a region with `options` what it asks for, without creating one:
/// the tracking mode it would run, or the same error naming the missing feature that creating
/// the region gives. For callers choosing a frontend, and for tests that must be counted as
/// skipped where the kernel lacks a feature. (The ioctls available on the memory itself, and
/// PAGEMAP_SCAN, are only checked when a region registers its range; UFFD_FEATURE_WP_ASYNC
/// and PAGEMAP_SCAN came with the same kernel, 6.7.)
pub fn probe(options: &RegionOptions, shared_memory: bool) -> Result<TrackingMode, RegionError> {
    Ok(negotiate(available_features(options)?, shared_memory, options)?.tracking)
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn setup(
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

        let Negotiated {
            wanted,
            tracking,
            poison_supported,
        } = negotiate(available_features(options)?, shmem, options)?;
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
        if !poison_supported && options.failed_fetch == FailedFetch::Sigbus {
            return Err(UffdError::Unsupported(format!("{NO_POISON} (on this memory)")).into());
        }
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
            failed_fetch: options.failed_fetch,
            detect_zero: options.detect_zero_chunks,
            fault_observer: options.fault_observer.clone(),
            installed: AtomicBitmap::new(chunks),
            fault_pending: AtomicBitmap::new(chunks),
            poisoned: AtomicBitmap::new(chunks),
            known_zero: AtomicBitmap::new(chunks),
            discarded: AtomicBitmap::new(map_len / page),
            event_gate: RwLock::new(()),
            remapped: Mutex::new(None),
            child_uffds: Mutex::new(Vec::new()),
            extra_dirty: AtomicBitmap::new(chunks),
            sync_dirty: AtomicBitmap::new(chunks),
            zero_page: vec![0u8; page as usize].into_boxed_slice(),
            zero_chunk: vec![0u8; layout.chunk_size() as usize].into_boxed_slice(),
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
    pub(super) fn chunk_span(&self, chunk: u64) -> (u64, u64) {
        let range = self.layout.chunk_range(chunk);
        let len = (range.end - range.start).div_ceil(self.page_size) * self.page_size;
        (self.base + range.start, len)
    }

    pub(super) fn chunk_of_addr(&self, addr: u64) -> Option<u64> {
        if addr < self.base || addr >= self.base + self.map_len {
            return None;
        }
        Some(((addr - self.base) / self.layout.chunk_size()).min(self.layout.chunk_count() - 1))
    }

    pub(super) fn chunks_of_span(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        let lo = start.max(self.base);
        let hi = end.min(self.base + self.map_len);
        if lo >= hi {
            return 0..0;
        }
        let first = (lo - self.base) / self.layout.chunk_size();
        let last = ((hi - 1 - self.base) / self.layout.chunk_size()).min(self.layout.chunk_count() - 1);
        first..last + 1
    }

    /// Page indexes (from the region's start) of `len` bytes at `start`.
    pub(super) fn pages_of(&self, start: u64, len: u64) -> std::ops::Range<u64> {
        let first = (start - self.base) / self.page_size;
        first..first + len / self.page_size
    }

    pub(super) fn mark_peer_closed(&self) {
        *self.peer_closed.lock() = true;
        self.peer_closed_cv.notify_all();
    }
}
