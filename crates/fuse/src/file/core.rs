//! What the file frontend answers, whichever way requests arrive: through fuser's `/dev/fuse`
//! loop (`ops`) or through the io_uring queues (`ring`). A root directory and one file whose
//! bytes are the backend's; every backend call is an async function the transport runs.

use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo, TimeOrNow};
use r3map_core::SharedBackend;

use super::{FileOptions, BLOCK_SIZE, FILE_INO, ROOT_INO};

/// The errno a reply carries for a backend error.
pub(super) fn errno(err: &r3map_core::Error) -> Errno {
    Errno::from_i32(err.errno())
}

/// What a fallocate request asks of the backend once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fallocate {
    /// Plain allocation (every byte exists) or an empty range: nothing to do.
    Nothing,
    /// `FALLOC_FL_PUNCH_HOLE` of `len` bytes at `offset`.
    Punch { offset: u64, len: u64 },
    /// `FALLOC_FL_ZERO_RANGE` of `len` bytes at `offset`.
    Zero { offset: u64, len: u64 },
}

/// The requested attribute changes of a SETATTR.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct AttrChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// The filesystem: a root directory and one file.
pub(super) struct FileCore {
    backend: SharedBackend,
    name: OsString,
    options: FileOptions,
    uid: u32,
    gid: u32,
    created: SystemTime,
    /// Last modification and access times (they are the only attributes that change).
    times: Mutex<(SystemTime, SystemTime)>,
}

impl FileCore {
    pub(super) fn new(backend: SharedBackend, name: OsString, options: FileOptions) -> Self {
        let now = SystemTime::now();
        Self {
            backend,
            name,
            options,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            created: now,
            times: Mutex::new((now, now)),
        }
    }

    pub(super) fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    pub(super) fn options(&self) -> &FileOptions {
        &self.options
    }

    /// The user that mounted the filesystem (the only one the kernel lets in).
    pub(super) fn owner(&self) -> u32 {
        self.uid
    }

    fn size(&self) -> u64 {
        self.backend.size()
    }

    pub(super) fn attr(&self, ino: INodeNo) -> FileAttr {
        let (mtime, atime) = *self.times.lock().unwrap_or_else(|e| e.into_inner());
        let (kind, perm, size, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 0o700 | (self.options.mode & 0o055), 0, 2)
        } else {
            (FileType::RegularFile, self.options.mode, self.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime,
            mtime,
            ctime: mtime,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn touch(&self) {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.0 = SystemTime::now();
    }

    pub(super) fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        if parent == ROOT_INO && name == self.name {
            Ok(self.attr(FILE_INO))
        } else {
            Err(Errno::ENOENT)
        }
    }

    pub(super) fn getattr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        if ino == ROOT_INO || ino == FILE_INO {
            Ok(self.attr(ino))
        } else {
            Err(Errno::ENOENT)
        }
    }

    pub(super) fn setattr(&self, ino: INodeNo, changes: AttrChanges) -> Result<FileAttr, Errno> {
        if ino != FILE_INO && ino != ROOT_INO {
            return Err(Errno::ENOENT);
        }
        // The size is the backend's and cannot change; truncating to the same size (O_TRUNC
        // of an empty file, `truncate -s <size>`) is accepted.
        let size = changes.size;
        if size.is_some_and(|size| ino != FILE_INO || size != self.size()) {
            tracing::debug!("refused to resize the r3map file to {size:?} bytes");
            return Err(Errno::EPERM);
        }
        if changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() {
            return Err(Errno::EPERM);
        }
        let resolve = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        {
            let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = changes.mtime {
                times.0 = resolve(t);
            }
            if let Some(t) = changes.atime {
                times.1 = resolve(t);
            }
        }
        Ok(self.attr(ino))
    }

    /// Checks an OPEN (`flags` as given to open(2)) and returns the open flags of the reply.
    pub(super) fn open(&self, ino: INodeNo, flags: i32) -> Result<FopenFlags, Errno> {
        if ino != FILE_INO {
            return Err(Errno::EISDIR);
        }
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writing && self.options.read_only {
            return Err(Errno::EROFS);
        }
        Ok(FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Checks a READ; returns how many bytes to read at `offset` (0 at the end of the file).
    pub(super) fn read_len(&self, ino: INodeNo, offset: u64, size: u32) -> Result<usize, Errno> {
        if ino != FILE_INO {
            return Err(Errno::EISDIR);
        }
        let total = self.size();
        if offset >= total {
            return Ok(0);
        }
        Ok(u64::from(size).min(total - offset) as usize)
    }

    /// Checks a WRITE of `len` bytes at `offset`; returns how many of them fit the file (a
    /// write reaching past the end writes what fits and reports the short count).
    pub(super) fn write_len(&self, ino: INodeNo, offset: u64, len: usize) -> Result<usize, Errno> {
        if ino != FILE_INO {
            return Err(Errno::EISDIR);
        }
        if self.options.read_only {
            return Err(Errno::EROFS);
        }
        let total = self.size();
        if offset >= total && len > 0 {
            // A fixed-size file: like a block device, writing at the end has no room.
            return Err(Errno::ENOSPC);
        }
        self.touch();
        Ok((len as u64).min(total.saturating_sub(offset)) as usize)
    }

    /// Checks a FALLOCATE and says what it asks of the backend.
    pub(super) fn fallocate(
        &self,
        ino: INodeNo,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<Fallocate, Errno> {
        if ino != FILE_INO {
            return Err(Errno::EISDIR);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let action = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let total = self.size();
        let end = offset.saturating_add(length);
        if !keep_size && end > total {
            // Growing the file is impossible.
            return Err(Errno::EFBIG);
        }
        // With KEEP_SIZE, the part past the end is ignored, as on any file.
        let len = end.min(total).saturating_sub(offset);
        let punch = action == libc::FALLOC_FL_PUNCH_HOLE;
        let zero = action == libc::FALLOC_FL_ZERO_RANGE;
        if action == 0 || len == 0 {
            // Plain allocation: every byte of the backend already exists.
            return Ok(Fallocate::Nothing);
        }
        if !punch && !zero {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.options.read_only {
            return Err(Errno::EROFS);
        }
        self.touch();
        Ok(if punch {
            Fallocate::Punch { offset, len }
        } else {
            Fallocate::Zero { offset, len }
        })
    }

    /// The entries of the root directory, in READDIR order.
    pub(super) fn entries(&self, ino: INodeNo) -> Result<[(INodeNo, FileType, &OsStr); 3], Errno> {
        if ino != ROOT_INO {
            return Err(Errno::ENOTDIR);
        }
        Ok([
            (ROOT_INO, FileType::Directory, OsStr::new(".")),
            (ROOT_INO, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.name.as_os_str()),
        ])
    }

    /// Blocks of the filesystem for STATFS (of `BLOCK_SIZE` bytes; none free).
    pub(super) fn blocks(&self) -> u64 {
        self.size().div_ceil(u64::from(BLOCK_SIZE))
    }
}

/// Reads `buf.len()` bytes at `offset` from the backend into `buf`.
pub(super) async fn read_into(backend: &SharedBackend, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
    backend.read_at(offset, buf).await.map_err(|err| {
        tracing::warn!("read of {} bytes at {offset} failed: {err}", buf.len());
        errno(&err)
    })
}

/// Reads `len` bytes at `offset` from the backend into a new buffer.
pub(super) async fn read(backend: SharedBackend, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    read_into(&backend, offset, &mut buf).await.map(|()| buf)
}

/// Writes `data` at `offset` to the backend.
pub(super) async fn write_from(backend: &SharedBackend, offset: u64, data: &[u8]) -> Result<(), Errno> {
    backend.write_at(offset, data).await.map_err(|err| {
        tracing::warn!("write of {} bytes at {offset} failed: {err}", data.len());
        errno(&err)
    })
}

/// Writes `data` at `offset` to the backend; returns the byte count.
pub(super) async fn write(backend: SharedBackend, offset: u64, data: Vec<u8>) -> Result<u32, Errno> {
    write_from(&backend, offset, &data)
        .await
        .map(|()| data.len() as u32)
}

/// Flushes the backend (fsync).
pub(super) async fn sync(backend: SharedBackend) -> Result<(), Errno> {
    backend.sync().await.map_err(|err| {
        tracing::warn!("flushing the backend failed: {err}");
        errno(&err)
    })
}

/// Carries out a checked fallocate.
pub(super) async fn fallocate(backend: SharedBackend, action: Fallocate) -> Result<(), Errno> {
    let result = match action {
        Fallocate::Nothing => return Ok(()),
        Fallocate::Punch { offset, len } => backend.trim(offset, len).await,
        Fallocate::Zero { offset, len } => backend.write_zeroes(offset, len).await,
    };
    result.map_err(|err| {
        tracing::warn!("fallocate ({action:?}) failed: {err}");
        errno(&err)
    })
}
