//! [`FileBackend`]: a regular file (or block device) of fixed size.
//!
//! All I/O is positional (`pread`/`pwrite`), so concurrent requests never share a file cursor
//! and need no lock.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::{check_range, Backend, Extent, Result};

use crate::direct::DirectFile;
use crate::fileops::{file_extents, offload, setup_error, sync_parent, zero_range, Zeroing};

/// How a [`FileBackend`] accesses its file.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileOptions {
    direct_io: bool,
}

impl FileOptions {
    /// Buffered I/O through the page cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bypasses the page cache with O_DIRECT. Requests must then start on a
    /// [`crate::DIRECT_IO_ALIGNMENT`] boundary and be a multiple of it long (or end at the end
    /// of the file); others fail with `Error::Unaligned`.
    pub fn direct_io(mut self, enabled: bool) -> Self {
        self.direct_io = enabled;
        self
    }
}

/// A file used as a backend: its length is the backend's size.
#[derive(Debug)]
pub struct FileBackend {
    /// Buffered descriptor: every request without O_DIRECT; with it, the partial tail block,
    /// fallocate and sync. Shared so that sync can run on the blocking pool.
    file: Arc<File>,
    direct: Option<DirectFile>,
    size: u64,
}

impl FileBackend {
    /// Opens an existing file (or block device); its current length becomes the size.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|err| setup_error(err, "cannot open", path))?;
        Self::with_file(path, file, options)
    }

    /// Opens `path`, creating it if missing, and sets its length to `size` like `truncate -s`:
    /// content within `size` is kept, growth reads as zeros, shrinking drops the end.
    pub fn create(path: impl AsRef<Path>, size: u64, options: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|err| setup_error(err, "cannot create", path))?;
        file.set_len(size)
            .map_err(|err| setup_error(err, "cannot set the length of", path))?;
        sync_parent(path).map_err(|err| setup_error(err, "cannot sync the directory of", path))?;
        Self::with_file(path, file, options)
    }

    fn with_file(path: &Path, file: File, options: FileOptions) -> Result<Self> {
        // O_DIRECT first: a refusal is the clearest error this file can give.
        let direct_file = match options.direct_io {
            true => Some(DirectFile::open(path)?),
            false => None,
        };
        // Seeking finds the size of block devices too, whose metadata length is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|err| setup_error(err, "cannot find the size of", path))?;
        Ok(Self {
            file: Arc::new(file),
            direct: direct_file.map(|file| DirectFile::new(file, size)).transpose()?,
            size,
        })
    }

    /// Whether requests bypass the page cache (O_DIRECT).
    pub fn is_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// Checks bounds, then (with O_DIRECT) alignment, before anything touches the file.
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        match &self.direct {
            Some(direct) => direct.check_aligned(offset, len),
            None => Ok(()),
        }
    }

    fn zero(&self, offset: u64, len: u64, how: Zeroing) -> Result<()> {
        self.check(offset, len)?;
        // With O_DIRECT too, zeroing goes through the buffered descriptor: fallocate needs no
        // alignment, and the kernel keeps its fallback writes coherent with direct I/O.
        Ok(zero_range(&self.file, offset, len, how)?)
    }
}

#[async_trait]
impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_alignment(&self) -> Option<u64> {
        Some(match self.direct {
            Some(_) => crate::direct::DIRECT_IO_ALIGNMENT,
            None => 1,
        })
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        match &self.direct {
            Some(direct) => direct.read_at(&self.file, offset, buf)?,
            None => self.file.read_exact_at(buf, offset)?,
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        match &self.direct {
            Some(direct) => direct.write_at(&self.file, offset, data)?,
            None => self.file.write_all_at(data, offset)?,
        }
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        let file = self.file.clone();
        offload(move || file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, Zeroing::Trim)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, Zeroing::WriteZeroes)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(file_extents(&self.file, offset, offset + len)?)
    }
}
