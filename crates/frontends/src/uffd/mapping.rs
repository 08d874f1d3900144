//! An owned memory mapping (anonymous private, a shared memfd, or a shared mapping of a file)
//! that unmaps on drop.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

/// `len` bytes of memory mapped read-write at a fixed address until dropped.
#[derive(Debug)]
pub struct Mapping {
    /// Start address; stored as an integer so the type is `Send + Sync` without `unsafe impl`.
    addr: u64,
    len: usize,
    memfd: Option<OwnedFd>,
}

impl Mapping {
    /// Private anonymous memory; pages are allocated on first touch (or by userfaultfd).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Self::map(len, flags, None)
    }

    /// Shared memory backed by a new memfd named `name`, so other mappings (or processes,
    /// given the fd) can share the pages.
    pub fn shared_memfd(len: usize, name: &str) -> io::Result<Self> {
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name contains a NUL byte"))?;
        // SAFETY: memfd_create reads a NUL-terminated string that `cname` provides.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created for us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(len as u64)?;
        Self::map(len, libc::MAP_SHARED, Some(OwnedFd::from(file)))
    }

    /// The first `len` bytes of `file`, shared: writes go to the file's page cache (and reach
    /// the disk at writeback or [`Mapping::msync`]). The mapping keeps its own reference to the
    /// file. Touching it past the file's end raises SIGBUS, so the file must not shrink.
    pub fn shared_file(file: &std::fs::File, len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        Self::map_fd(len, libc::MAP_SHARED, file.as_raw_fd(), None)
    }

    fn map(len: usize, flags: i32, memfd: Option<OwnedFd>) -> io::Result<Self> {
        let fd = memfd.as_ref().map_or(-1, |fd| {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        });
        Self::map_fd(len, flags, fd, memfd)
    }

    fn map_fd(len: usize, flags: i32, fd: i32, memfd: Option<OwnedFd>) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map zero bytes",
            ));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses (NULL hint, no MAP_FIXED)
        // cannot overlap any existing Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: ptr as u64,
            len,
            memfd,
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the start, for FFI.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as usize as *mut u8
    }

    /// The memfd behind a shared mapping.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|fd| fd.as_fd())
    }

    /// The memory as a shared slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is readable for `len` bytes and stays mapped while `self` lives;
        // Rust-level mutation goes only through `as_mut_slice(&mut self)`, so no `&mut` alias
        // exists while this borrow lives. Pages the kernel fills in (userfaultfd) were never
        // observable before, so the contents seen through this slice never change under it.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The memory as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` guarantees this is the only Rust borrow.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }

    /// Leaves the mapping out of children this process forks (MADV_DONTFORK): they get no
    /// copy of it at all, so touching it there faults (SIGSEGV) instead of reading pages
    /// nobody serves.
    pub fn exclude_from_fork(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our mapping; MADV_DONTFORK changes only what fork
        // copies, never the contents or the mapping of this process.
        let rc = unsafe { libc::madvise(self.as_ptr().cast(), self.len, libc::MADV_DONTFORK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes the pages of `len` bytes at `offset` (widened to whole pages) back to the file
    /// of a shared file mapping and waits for it (`msync(MS_SYNC)`).
    pub fn msync(&self, offset: usize, len: usize) -> io::Result<()> {
        let (start, len) = self.pages_of(offset, len)?;
        // SAFETY: the page-aligned range lies inside our mapping (checked); msync only writes
        // the pages back, it changes neither the contents nor the mapping.
        let rc = unsafe { libc::msync(self.as_ptr().add(start).cast(), len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Asks the kernel to reclaim the pages of a range now (`MADV_PAGEOUT`): clean pages of a
    /// file mapping leave memory and are read from the file again when touched; the contents
    /// seen through the mapping do not change.
    pub fn page_out(&self, offset: usize, len: usize) -> io::Result<()> {
        let (start, len) = self.pages_of(offset, len)?;
        // SAFETY: the range lies inside our mapping (checked); MADV_PAGEOUT is only a hint
        // about residency and never changes what the memory reads as.
        let rc = unsafe { libc::madvise(self.as_ptr().add(start).cast(), len, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `len` bytes at `offset`, widened to whole pages, checked to lie inside the mapping.
    fn pages_of(&self, offset: usize, len: usize) -> io::Result<(usize, usize)> {
        let page = super::page_size() as usize;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside the mapping"))?;
        let start = offset / page * page;
        Ok((start, end.div_ceil(page) * page - start))
    }

    /// Drops the pages of a range (`MADV_DONTNEED` for private, `MADV_REMOVE` for shared
    /// memory): they read as zeros afterwards (through userfaultfd, a REMOVE event).
    pub fn discard(&mut self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the mapping",
            ));
        }
        let advice = if self.memfd.is_some() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: the range lies inside our mapping (checked) and `&mut self` means no Rust
        // borrow of its contents exists while the pages are dropped.
        let rc = unsafe { libc::madvise(self.as_ptr().add(offset).cast(), len, advice) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping with exactly this address and length, and every
        // borrow of it is tied to `self`, which is going away.
        let rc = unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(err = %io::Error::last_os_error(), "munmap failed");
        }
    }
}
