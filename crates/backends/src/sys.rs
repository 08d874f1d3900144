//! The crate's only unsafe code: `fallocate(2)` and `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`,
//! which the standard library does not expose.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Deallocates the range; it reads back as zeros and the file keeps its size.
pub(crate) const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zeroes the range, keeping (or making) it allocated, and the file keeps its size.
pub(crate) const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Calls `fallocate(2)` on `file` with `mode`, retrying when a signal interrupts it.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "range exceeds off_t");
    let offset = libc::off_t::try_from(offset).map_err(|_| too_large())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_large())?;
    loop {
        // SAFETY: fallocate takes only integers; the descriptor stays open for the whole call
        // because `file` is borrowed, and no memory is passed to the kernel.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Where `lseek(2)` looks from `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seek {
    /// The next byte at or after `offset` that holds data (`SEEK_DATA`).
    Data,
    /// The next hole at or after `offset`; the end of the file counts as one (`SEEK_HOLE`).
    Hole,
}

/// Calls `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `Ok(None)` when there is no data at or
/// after `offset` (`ENXIO`). The descriptor's cursor moves, which no positional I/O minds.
pub(crate) fn seek(file: &File, offset: u64, whence: Seek) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset exceeds off_t"))?;
    let whence = match whence {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: lseek takes only integers; the descriptor stays open for the whole call because
    // `file` is borrowed, and no memory is passed to the kernel.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}
