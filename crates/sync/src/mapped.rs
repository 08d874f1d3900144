//! An advertised file the application maps itself: it writes through a `&mut [u8]`, and each
//! [`MappedSource::sync`] finds the pages written since the previous one from the page tables
//! (userfaultfd asynchronous write-protect and PAGEMAP_SCAN, the slice frontend's tracking,
//! through `r3map_frontends::uffd`), msyncs only their blocks and rehashes only those, instead
//! of a pass over the whole file per change event.
//!
//! Only writes through this mapping are seen: another process writing the file (or this one
//! with `write(2)`) is not tracked. The size is fixed while mapped.

use std::fs::OpenOptions;
use std::io;
use std::sync::Arc;

use r3map_frontends::uffd::{raw, Mapping, Pagemap, RegisterMode, Uffd, UffdError};

use crate::source::{Source, SourceConfig};
use crate::Log;

/// Why a file could not be mapped with write tracking, or a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum MappedError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("write tracking: {0}")]
    Tracking(#[from] UffdError),
}

/// What one [`MappedSource::sync`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Blocks holding a page written since the previous sync (ascending): exactly those were
    /// msynced and rehashed.
    pub blocks: Vec<u64>,
    /// Pages reported written.
    pub written_pages: u64,
    /// Pages that were written and then reclaimed by the kernel before this sync (they have no
    /// page-table entry left; counted as written).
    pub reclaimed_pages: u64,
    /// Whether the receivers were given a new version.
    pub new_version: bool,
}

/// A file mapped shared and read-write, with its writes tracked, advertised by a [`Source`].
pub struct MappedSource {
    source: Arc<Source>,
    mapping: Mapping,
    // Dropped after the mapping is gone: closing it unregisters the range.
    uffd: Uffd,
    pagemap: Pagemap,
    map_len: u64,
}

impl MappedSource {
    /// Maps `config.path` (which must exist and not be empty) whole, arms write tracking on it
    /// and hashes it. Serve it with [`Source::listen`] or [`Source::advertise`] on
    /// [`MappedSource::source`]; do not run [`Source::follow_changes`] on it as well.
    pub async fn open(config: SourceConfig, log: Log) -> Result<Self, MappedError> {
        let file = OpenOptions::new().read(true).write(true).open(&config.path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the file is too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map an empty file").into());
        }
        let available = Uffd::probe()?;
        if !available.has(raw::UFFD_FEATURE_WP_ASYNC) {
            return Err(UffdError::Unsupported(
                "asynchronous userfaultfd write-protect (UFFD_FEATURE_WP_ASYNC, Linux 6.7+)".into(),
            )
            .into());
        }
        let mut wanted = raw::UFFD_FEATURE_PAGEFAULT_FLAG_WP | raw::UFFD_FEATURE_WP_ASYNC;
        if available.has(raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) {
            // A file on tmpfs is shared memory.
            wanted |= raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        }
        let mapping = Mapping::shared_file(&file, len)?;
        drop(file);
        let page = r3map_frontends::uffd::page_size();
        let map_len = (len as u64).div_ceil(page) * page;
        let uffd = Uffd::create()?;
        uffd.api(u64::from(wanted))?;
        let ioctls = uffd.register(
            mapping.addr(),
            map_len,
            RegisterMode {
                missing: false,
                write_protect: true,
            },
        )?;
        if ioctls & raw::IOCTL_BIT_WRITEPROTECT == 0 {
            return Err(UffdError::Unsupported("UFFDIO_WRITEPROTECT on this file".into()).into());
        }
        // Protected before hashing: a write after this point is seen by the first sync.
        uffd.writeprotect(mapping.addr(), map_len, true, false)?;
        let pagemap = Pagemap::open(None)?;
        let source = Source::open(config, log).await?;
        Ok(Self {
            source,
            mapping,
            uffd,
            pagemap,
            map_len,
        })
    }

    /// The advertiser serving this file.
    pub fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// The file's bytes, to read and write.
    pub fn data(&mut self) -> &mut [u8] {
        self.mapping.as_mut_slice()
    }

    /// Finds the blocks written since the previous sync (re-arming tracking for them in the
    /// same page-table walk), msyncs them, rehashes only them and gives the receivers the new
    /// version. A write that races with the walk is either in this sync or the next.
    pub fn sync(&mut self) -> Result<SyncReport, MappedError> {
        let base = self.mapping.addr();
        let end = base + self.map_len;
        let mut written = Vec::new();
        self.pagemap.scan_written(base, end, true, &mut written)?;
        let mut reclaimed = Vec::new();
        self.pagemap.scan_unmapped(base, end, true, &mut reclaimed)?;
        let page = r3map_frontends::uffd::page_size();
        let pages = |ranges: &[(u64, u64)]| ranges.iter().map(|(s, e)| (e - s) / page).sum();
        let mut report = SyncReport {
            written_pages: pages(&written),
            reclaimed_pages: pages(&reclaimed),
            ..SyncReport::default()
        };
        let block_size = u64::from(self.source.version().block_size());
        let len = self.mapping.len() as u64;
        let mut blocks: Vec<u64> = written
            .iter()
            .chain(&reclaimed)
            .flat_map(|&(start, end)| {
                let first = (start - base) / block_size;
                let last = ((end - base).min(len).max(1) - 1) / block_size;
                first..=last
            })
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        for run in runs(&blocks) {
            let offset = run.start * block_size;
            let end = (run.end * block_size).min(len);
            self.mapping.msync(offset as usize, (end - offset) as usize)?;
        }
        report.new_version = self.source.update_blocks(&blocks, self.mapping.as_slice());
        report.blocks = blocks;
        Ok(report)
    }

    /// Writes everything back and lets the kernel reclaim the file's pages now (MADV_PAGEOUT),
    /// e.g. to give memory back; tracking is unaffected.
    pub fn page_out(&self) -> io::Result<()> {
        self.mapping.msync(0, self.mapping.len())?;
        self.mapping.page_out(0, self.mapping.len())
    }
}

impl Drop for MappedSource {
    fn drop(&mut self) {
        let _ = self.uffd.unregister(self.mapping.addr(), self.map_len);
    }
}

/// Consecutive indices of a sorted list as ranges.
fn runs(sorted: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for &index in sorted {
        match runs.last_mut() {
            Some(run) if run.end == index => run.end += 1,
            _ => runs.push(index..index + 1),
        }
    }
    runs
}
