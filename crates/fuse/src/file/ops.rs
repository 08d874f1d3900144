//! The classic transport: fuser's threads read requests from `/dev/fuse` and call this
//! [`Filesystem`], which answers from [`FileCore`]; every backend call runs as a task on the
//! mount's runtime, which replies. With FUSE over io_uring the ring queues (`ring`) take over
//! all requests except INIT, FORGET and INTERRUPT once they are registered.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, Filesystem, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use super::core::{self, AttrChanges, FileCore};
use super::{BLOCK_SIZE, TTL};

/// The fuser filesystem of a mount.
pub(super) struct OneFile {
    core: Arc<FileCore>,
    runtime: Handle,
    /// Set at INIT when the kernel offered FUSE over io_uring and the mount asked for it.
    uring: Arc<AtomicBool>,
}

impl OneFile {
    pub(super) fn new(core: Arc<FileCore>, runtime: Handle, uring: Arc<AtomicBool>) -> Self {
        Self { core, runtime, uring }
    }

    /// Runs a backend call on the runtime; the task replies. If the runtime is gone, the
    /// dropped reply answers EIO.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(task));
    }
}

impl Filesystem for OneFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let options = self.core.options();
        // Each setter returns the nearest value the kernel accepts when ours is too large.
        if let Err(nearest) = config.set_max_write(options.max_request) {
            let _ = config.set_max_write(nearest);
        }
        // The kernel offers its current read-ahead (128 KiB) as the maximum here and only lets
        // a server lower it; the mount raises it in sysfs after INIT (see `tuning`).
        if let Err(nearest) = config.set_max_readahead(options.max_request) {
            let _ = config.set_max_readahead(nearest);
        }
        // fuser asks for `FUSE_MAX_PAGES` with max_pages = max(max_write, max_readahead) in
        // pages; the kernel clips it to `fs.fuse.max_pages_limit`.
        // Background requests are readahead and async direct I/O; allow many in flight.
        let _ = config.set_max_background(256);
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        // Only offered while the `enable_uring` module parameter is on. Once accepted, the
        // kernel holds every request until each queue has registered an entry (or a
        // registration failed, which falls back to `/dev/fuse`).
        if options.io_uring && config.add_capabilities(InitFlags::FUSE_OVER_IO_URING).is_ok() {
            self.uring.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
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
        let changes = AttrChanges {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.core.setattr(ino, changes) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.core.open(ino, flags.0) {
            Ok(open_flags) => reply.opened(FileHandle(0), open_flags),
            Err(errno) => reply.error(errno),
        }
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
        let len = match self.core.read_len(ino, offset, size) {
            Ok(0) => return reply.data(&[]),
            Ok(len) => len,
            Err(errno) => return reply.error(errno),
        };
        let backend = self.core.backend().clone();
        self.spawn(async move {
            match core::read(backend, offset, len).await {
                Ok(data) => reply.data(&data),
                Err(errno) => reply.error(errno),
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
        let len = match self.core.write_len(ino, offset, data.len()) {
            Ok(len) => len,
            Err(errno) => return reply.error(errno),
        };
        let data = data[..len].to_vec();
        let backend = self.core.backend().clone();
        self.spawn(async move {
            match core::write(backend, offset, data).await {
                Ok(written) => reply.written(written),
                Err(errno) => reply.error(errno),
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
        let backend = self.core.backend().clone();
        self.spawn(async move {
            match core::sync(backend).await {
                Ok(()) => reply.ok(),
                Err(errno) => reply.error(errno),
            }
        });
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
        let action = match self.core.fallocate(ino, offset, length, mode) {
            Ok(core::Fallocate::Nothing) => return reply.ok(),
            Ok(action) => action,
            Err(errno) => return reply.error(errno),
        };
        let backend = self.core.backend().clone();
        self.spawn(async move {
            match core::fallocate(backend, action).await {
                Ok(()) => reply.ok(),
                Err(errno) => reply.error(errno),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.core.entries(ino) {
            Ok(entries) => entries,
            Err(errno) => return reply.error(errno),
        };
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, index as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.core.blocks(), 0, 0, 1, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
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
