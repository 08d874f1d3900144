//! Bitmap words kept in a memory-mapped file (`MAP_SHARED`), so chunk state written by this
//! process is in the kernel's page cache the moment it is set: it survives the process being
//! killed, and a restarted process maps the same words again.
//!
//! This is the one module of the core crate with `unsafe` code: `mmap`/`munmap` and the view of
//! mapped bytes as atomic words.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;

use crate::{Error, Result};

/// A whole file mapped read-write and shared; unmapped on drop.
#[derive(Debug)]
pub struct MappedFile {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access to it goes through
// atomics (`words`), which are safe to use from any thread.
unsafe impl Send for MappedFile {}
// SAFETY: as above — `&MappedFile` only hands out `&[AtomicU64]`.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps all of `file` (which must be non-empty, opened read-write).
    pub fn map(file: &File) -> Result<Self> {
        let len = file.metadata()?.len();
        if len == 0 || len % 8 != 0 {
            return Err(Error::InvalidConfig(format!(
                "a state file must hold whole 64-bit words, not {len} bytes"
            )));
        }
        let len = usize::try_from(len).map_err(|_| Error::InvalidConfig("state file too large".into()))?;
        // SAFETY: a fresh mapping at an address the kernel chooses; the fd is valid for the call
        // and the mapping stays valid after it is closed. Failure is reported as MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        Ok(Self { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses empty files).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes `byte_offset..byte_offset + 8 * count` as atomic words.
    pub fn words(&self, byte_offset: usize, count: usize) -> &[AtomicU64] {
        assert!(byte_offset.is_multiple_of(8), "word offset must be 8-aligned");
        assert!(
            byte_offset + count * 8 <= self.len,
            "words past the end of the mapping"
        );
        // SAFETY: the range lies within the mapping (checked above), which is page-aligned so
        // every 8-aligned offset is aligned for AtomicU64; the mapping lives as long as `self`,
        // to which the slice's lifetime is tied; AtomicU64 has the layout of u64, and every byte
        // pattern is a valid u64.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(byte_offset).cast::<AtomicU64>(), count) }
    }

    /// Writes the mapped pages back to the file (msync), for durability across a machine crash;
    /// a process crash loses nothing even without it.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: `ptr`/`len` describe exactly the mapping this value owns.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no slice from `words` can outlive
        // `self`, so nothing refers to it afterwards.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
