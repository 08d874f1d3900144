//! The FUSE operations of the file frontend: a root directory and one file whose bytes are the
//! backend's. Every backend call runs as a task on the mount's runtime, which replies.

use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use r3map_core::SharedBackend;
use tokio::runtime::Handle;

use super::{FileOptions, BLOCK_SIZE, FILE_INO, ROOT_INO, TTL};
/// The errno a FUSE reply carries for a backend error.
fn errno(err: &r3map_core::Error) -> Errno {
    Errno::from_i32(err.errno())
}

/// The filesystem served to the kernel: a root directory and one file.
pub(super) struct OneFile {
    backend: SharedBackend,
    runtime: Handle,
    name: OsString,
    options: FileOptions,
    uid: u32,
    gid: u32,
    created: SystemTime,
    /// Last modification and access times (they are the only attributes that change).
    times: Mutex<(SystemTime, SystemTime)>,
}

impl OneFile {
    pub(super) fn new(backend: SharedBackend, runtime: Handle, name: OsString, options: FileOptions) -> Self {
        let now = SystemTime::now();
        Self {
            backend,
            runtime,
            name,
            options,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            created: now,
            times: Mutex::new((now, now)),
        }
    }

    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
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

    /// Runs a backend call on the runtime; the task replies. If the runtime is gone, the
    /// dropped reply answers EIO.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(task));
    }

    /// Flushes the backend and replies (fsync).
    fn sync(&self, reply: ReplyEmpty) {
        let backend = self.backend.clone();
        self.spawn(async move {
            match backend.sync().await {
                Ok(()) => reply.ok(),
                Err(err) => {
                    tracing::warn!("flushing the backend failed: {err}");
                    reply.error(errno(&err));
                }
            }
        });
    }
}

impl Filesystem for OneFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each setter returns the nearest value the kernel accepts when ours is too large.
        if let Err(nearest) = config.set_max_write(self.options.max_request) {
            let _ = config.set_max_write(nearest);
        }
        // The kernel offers its current read-ahead (128 KiB) as the maximum here and only lets
        // a server lower it; the mount raises it in sysfs after INIT (see `tuning`).
        if let Err(nearest) = config.set_max_readahead(self.options.max_request) {
            let _ = config.set_max_readahead(nearest);
        }
        // fuser asks for `FUSE_MAX_PAGES` with max_pages = max(max_write, max_readahead) in
        // pages; the kernel clips it to `fs.fuse.max_pages_limit`.
        // Background requests are readahead and async direct I/O; allow many in flight.
        let _ = config.set_max_background(256);
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name == self.name {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT_INO || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO && ino != ROOT_INO {
            return reply.error(Errno::ENOENT);
        }
        // The size is the backend's and cannot change; truncating to the same size (O_TRUNC
        // of an empty file, `truncate -s <size>`) is accepted.
        if size.is_some_and(|size| ino != FILE_INO || size != self.size()) {
            tracing::debug!("refused to resize the r3map file to {size:?} bytes");
            return reply.error(Errno::EPERM);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        let resolve = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        {
            let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = mtime {
                times.0 = resolve(t);
            }
            if let Some(t) = atime {
                times.1 = resolve(t);
            }
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if writing && self.options.read_only {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let total = self.size();
        if offset >= total {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(total - offset) as usize;
        let backend = self.backend.clone();
        self.spawn(async move {
            let mut buf = vec![0u8; len];
            match backend.read_at(offset, &mut buf).await {
                Ok(()) => reply.data(&buf),
                Err(err) => {
                    tracing::warn!("read of {len} bytes at {offset} failed: {err}");
                    reply.error(errno(&err));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.options.read_only {
            return reply.error(Errno::EROFS);
        }
        let total = self.size();
        if offset >= total && !data.is_empty() {
            // A fixed-size file: like a block device, writing at the end has no room.
            return reply.error(Errno::ENOSPC);
        }
        // A write reaching past the end writes what fits and reports the short count.
        let len = (data.len() as u64).min(total.saturating_sub(offset)) as usize;
        let data = data[..len].to_vec();
        self.touch();
        let backend = self.backend.clone();
        self.spawn(async move {
            match backend.write_at(offset, &data).await {
                Ok(()) => reply.written(len as u32),
                Err(err) => {
                    tracing::warn!("write of {len} bytes at {offset} failed: {err}");
                    reply.error(errno(&err));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point (fsync is): writes already reached the backend
        // (no writeback cache), and a sync here would make every close wait for a remote —
        // including the implicit closes at exec() in any process that inherited the file.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.sync(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let action = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let total = self.size();
        let end = offset.saturating_add(length);
        if !keep_size && end > total {
            // Growing the file is impossible.
            return reply.error(Errno::EFBIG);
        }
        // With KEEP_SIZE, the part past the end is ignored, as on any file.
        let len = end.min(total).saturating_sub(offset);
        let punch = action == libc::FALLOC_FL_PUNCH_HOLE;
        let zero = action == libc::FALLOC_FL_ZERO_RANGE;
        if action == 0 || len == 0 {
            // Plain allocation: every byte of the backend already exists.
            return reply.ok();
        }
        if !punch && !zero {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if self.options.read_only {
            return reply.error(Errno::EROFS);
        }
        self.touch();
        let backend = self.backend.clone();
        self.spawn(async move {
            let result = if punch {
                backend.trim(offset, len).await
            } else {
                backend.write_zeroes(offset, len).await
            };
            match result {
                Ok(()) => reply.ok(),
                Err(err) => {
                    tracing::warn!("fallocate (mode {mode:#x}) of {len} bytes at {offset} failed: {err}");
                    reply.error(errno(&err));
                }
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, OsStr::new(".")),
            (ROOT_INO, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.name.as_os_str()),
        ];
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, index as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size().div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        // The filesystem holds exactly one file.
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }
}
