//! The PAGEMAP_SCAN ioctl on `/proc/<pid>/pagemap`: report pages written since they were last
//! write-protected (UFFD_FEATURE_WP_ASYNC) and write-protect them again, in one call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::raw;

/// Regions returned per ioctl call; a scan loops until the whole range is walked.
const REGIONS_PER_CALL: usize = 512;

/// Which pages a scan reports: those whose category bits, after flipping `inverted`, include
/// all of `mask` and (unless it is 0) one of `anyof`.
#[derive(Debug, Clone, Copy)]
struct Categories {
    inverted: u32,
    mask: u32,
    anyof: u32,
    /// Bits reported per region (neighbours that agree on them are merged).
    ret: u32,
}

/// An open pagemap file of one process.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens the pagemap of `pid` (this process when `None`).
    pub fn open(pid: Option<i32>) -> io::Result<Self> {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/pagemap"),
            None => "/proc/self/pagemap".to_string(),
        };
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// Appends the `[start, end)` address ranges of pages in `start..end` that were written
    /// since they were last write-protected, present or swapped out (zero-page mappings are
    /// never reported); with `reprotect`, write-protects exactly those pages again in the same
    /// walk (so a write after it shows up in the next scan). Fails
    /// with EPERM if a page in the range is not registered for async write-protect.
    pub fn scan_written(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> io::Result<()> {
        // Written, not the shared zero page, and present or swapped out. A written page
        // that went to swap keeps its cleared write-protect bit in the swap entry
        // (PAGE_IS_SWAPPED | PAGE_IS_WRITTEN); requiring PAGE_IS_PRESENT would miss it.
        // Holes are neither present nor swapped: leaving them out keeps the walk from
        // write-protecting them, which would leave markers there that ZEROPAGE and
        // POISON refuse (EEXIST). Write-protect markers are swap entries, but count as
        // protected (not written). Zero-page mappings (UFFDIO_ZEROPAGE) carry no
        // write-protect bit but were never written (a write replaces them).
        self.scan(
            start,
            end,
            reprotect,
            Categories {
                inverted: raw::PAGE_IS_PFNZERO,
                mask: raw::PAGE_IS_WRITTEN | raw::PAGE_IS_PFNZERO,
                anyof: raw::PAGE_IS_PRESENT | raw::PAGE_IS_SWAPPED,
                ret: raw::PAGE_IS_WRITTEN,
            },
            out,
        )
    }

    /// Appends the ranges of pages in `start..end` that have no page-table entry at all: neither
    /// present, nor swapped out, nor a write-protect marker. In a shared file mapping that was
    /// write-protected whole, such a page was written and then reclaimed (the kernel keeps a
    /// marker only for protected pages), so it counts as written. With `reprotect`, puts a
    /// write-protect marker there in the same walk.
    pub fn scan_unmapped(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> io::Result<()> {
        self.scan(
            start,
            end,
            reprotect,
            Categories {
                inverted: raw::PAGE_IS_PRESENT | raw::PAGE_IS_SWAPPED,
                mask: raw::PAGE_IS_PRESENT | raw::PAGE_IS_SWAPPED,
                anyof: 0,
                ret: raw::PAGE_IS_PRESENT,
            },
            out,
        )
    }

    fn scan(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        categories: Categories,
        out: &mut Vec<(u64, u64)>,
    ) -> io::Result<()> {
        let empty = raw::page_region {
            start: 0,
            end: 0,
            categories: 0,
        };
        let mut regions = vec![empty; REGIONS_PER_CALL];
        let mut flags = u64::from(raw::PM_SCAN_CHECK_WPASYNC);
        if reprotect {
            flags |= u64::from(raw::PM_SCAN_WP_MATCHING);
        }
        let mut at = start;
        while at < end {
            let mut arg = raw::pm_scan_arg {
                size: size_of::<raw::pm_scan_arg>() as u64,
                flags,
                start: at,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: u64::from(categories.inverted),
                category_mask: u64::from(categories.mask),
                category_anyof_mask: u64::from(categories.anyof),
                return_mask: u64::from(categories.ret),
            };
            // SAFETY: PAGEMAP_SCAN reads one `struct pm_scan_arg` and writes up to `vec_len`
            // `struct page_region`s to `vec`, which points at `regions` of exactly that length
            // and outlives the call. It changes only page-table bits of the target process.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), raw::PAGEMAP_SCAN as _, &mut arg) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            let filled = rc as usize;
            out.extend(regions[..filled].iter().map(|r| (r.start, r.end)));
            if arg.walk_end <= at {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}
