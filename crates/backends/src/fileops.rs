//! File helpers shared by the file and directory backends.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use r3map_core::{Error, Extent, Result};

use crate::sys::{self, Seek};

/// Largest zero buffer the fallback allocates; bigger ranges are written in pieces.
const ZERO_PIECE: u64 = 1 << 20;

/// Most extents one query of a file returns; callers ask again for the rest.
const MAX_EXTENTS: usize = 1024;

/// The data and holes of `file` in `start..end` (a non-empty prefix of it, in order), found with
/// `SEEK_DATA`/`SEEK_HOLE`. Bytes past the end of the file are holes (they read as zeros).
/// Where the kernel cannot tell (a block device, an old filesystem), everything is data.
pub(crate) fn file_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut push = |extent: Extent| match extents.last_mut() {
        Some(last) if last.allocation == extent.allocation => last.len += extent.len,
        _ => extents.push(extent),
    };
    let mut at = start;
    let mut count = 0;
    while at < end && count < MAX_EXTENTS {
        let data = match sys::seek(file, at, Seek::Data) {
            Ok(found) => found.unwrap_or(end).min(end),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                push(Extent::data(end - at));
                break;
            }
            Err(err) => return Err(err),
        };
        if data > at {
            push(Extent::hole(data - at));
            at = data;
            count += 1;
            continue;
        }
        let hole = sys::seek(file, at, Seek::Hole)?.unwrap_or(end).clamp(at + 1, end);
        push(Extent::data(hole - at));
        at = hole;
        count += 1;
    }
    Ok(extents)
}

/// How a range is set to zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zeroing {
    /// The range is not needed any more: give its blocks back to the filesystem.
    Trim,
    /// The range must read as zeros: keep it allocated.
    WriteZeroes,
}

/// Zeroes `len` bytes of `file` at `offset` with `fallocate`, or by writing zeros where the
/// filesystem does not support the needed mode (tmpfs has no ZERO_RANGE, for example).
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, how: Zeroing) -> io::Result<()> {
    if len == 0 {
        return Ok(()); // fallocate rejects empty ranges
    }
    let mode = match how {
        Zeroing::Trim => sys::PUNCH_HOLE,
        Zeroing::WriteZeroes => sys::ZERO_RANGE,
    };
    match sys::fallocate(file, mode, offset, len) {
        Err(err) if is_unsupported(&err) => write_zeros(file, offset, len),
        result => result,
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_PIECE) as usize];
    let mut done = 0;
    while done < len {
        let piece = (len - done).min(ZERO_PIECE) as usize;
        file.write_all_at(&zeros[..piece], offset + done)?;
        done += piece as u64;
    }
    Ok(())
}

/// Fills `buf` from `file` at `offset`; bytes past the end of the file read as zeros (a chunk
/// file can be short if a crash came between creating it and setting its length).
pub(crate) fn read_or_zeros(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                break;
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Makes the entries of directory `dir` (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes the entry of `path` in its parent directory durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// An I/O error from setting a backend up, with what was being done and to which path.
pub(crate) fn setup_error(err: io::Error, action: &str, path: &Path) -> Error {
    Error::from(io::Error::new(
        err.kind(),
        format!("{action} {}: {err}", path.display()),
    ))
}

/// Runs blocking work (fsync) on tokio's blocking pool when inside a tokio runtime, inline
/// otherwise, so the backends also work under other executors.
pub(crate) async fn offload<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => match runtime.spawn_blocking(work).await {
            Ok(result) => Ok(result?),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(Error::Closed), // the runtime is shutting down
        },
        Err(_) => Ok(work()?),
    }
}
