//! The *file* frontend: a FUSE filesystem with one regular file whose bytes are a backend's.
//!
//! The mount is a directory holding exactly one file, `<mountpoint>/<name>`, of the backend's
//! size. Applications open, read, write, `mmap(MAP_SHARED)` and `fallocate` it like any file;
//! `fsync` and `msync` flush the backend (`close` does not: it is no durability point).
//!
//! # Request handling
//!
//! A few fuser threads read requests from `/dev/fuse` (each with its own cloned fd). A thread
//! never waits for the backend: it hands every read, write, flush and fallocate to a task on
//! the shared Tokio runtime, and the task replies (fuser's `Reply*` objects are `Send`), so many
//! requests are in flight at once however slow the backend is.
//!
//! # Caching choices
//!
//! - No `FUSE_WRITEBACK_CACHE`: every `write(2)` reaches the backend before it returns
//!   (write-through), so write errors are reported to the writer and a crash of this process
//!   loses no acknowledged write. Shared writable mappings still work: the kernel writes dirty
//!   mapped pages back with ordinary WRITE requests, and `msync` ends with an FSYNC.
//! - No `FOPEN_DIRECT_IO`: reads go through the page cache (readahead, and `mmap` needs it).
//!   Only this mount changes the backend while it is mounted, so the cache stays coherent and
//!   the file is opened with `FOPEN_KEEP_CACHE`. Applications (and the loop device) that open
//!   the file with `O_DIRECT` bypass the cache per request.
//! - `FUSE_ASYNC_DIO`: direct I/O from the loop device is split into requests that are all
//!   sent at once instead of one after another.
//! - `max_write`/`max_readahead` (default 1 MiB, with `FUSE_MAX_PAGES`): large requests, so a
//!   1 MiB `O_DIRECT` read or write costs one round trip to the backend.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use r3map_core::SharedBackend;
use tokio::runtime::Handle;

use crate::error::{FuseError, Result};

/// The filesystem type is `fuse.r3map`: how `r3map umount` recognises our mounts.
pub const SUBTYPE: &str = "r3map";

/// The mount source is `r3map-<pid of the serving process>`, so a mount whose server died can
/// be told from a live one.
pub const SOURCE_PREFIX: &str = "r3map-";

/// Default largest read/write request (bytes).
pub const DEFAULT_MAX_REQUEST: u32 = 1 << 20;

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes and entries never change behind the kernel's back (the size is fixed).
const TTL: Duration = Duration::from_secs(3600);
const BLOCK_SIZE: u32 = 4096;

/// How the file frontend is mounted.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Largest read or write request the kernel sends, in bytes (at most 16 MiB).
    pub max_request: u32,
    /// Threads reading requests from `/dev/fuse`. They only decode and dispatch, so two keep
    /// up with many in-flight requests.
    pub threads: usize,
    /// Permission bits of the file.
    pub mode: u16,
    /// Refuse writes (`EROFS`).
    pub read_only: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            max_request: DEFAULT_MAX_REQUEST,
            threads: 2,
            mode: 0o600,
            read_only: false,
        }
    }
}

/// The errno a FUSE reply carries for a backend error.
fn errno(err: &r3map_core::Error) -> Errno {
    Errno::from_i32(err.errno())
}

/// The filesystem served to the kernel: a root directory and one file.
struct OneFile {
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
        if let Err(nearest) = config.set_max_readahead(self.options.max_request) {
            let _ = config.set_max_readahead(nearest);
        }
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

/// Checks that `name` is one ordinary path component.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FuseError::InvalidName { name: name.into() });
    }
    Ok(())
}

/// A mounted file frontend. Unmount it with [`FileMount::unmount`] (or
/// [`FileMount::unmount_blocking`]); dropping it unmounts too, lazily if the file is busy,
/// without reporting errors and without syncing the backend — unmount for durability.
pub struct FileMount {
    mountpoint: PathBuf,
    path: PathBuf,
    backend: SharedBackend,
    runtime: Handle,
    session: Option<fuser::BackgroundSession>,
}

impl std::fmt::Debug for FileMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMount")
            .field("path", &self.path)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl FileMount {
    /// Mounts a filesystem at `mountpoint` (an existing directory) holding one file, `name`,
    /// whose bytes are `backend`'s. Requests are served by tasks on `runtime`.
    pub fn mount(
        backend: SharedBackend,
        mountpoint: impl AsRef<Path>,
        name: &str,
        runtime: Handle,
    ) -> Result<Self> {
        Self::mount_with(backend, mountpoint, name, runtime, &FileOptions::default())
    }

    /// [`FileMount::mount`] with explicit options.
    pub fn mount_with(
        backend: SharedBackend,
        mountpoint: impl AsRef<Path>,
        name: &str,
        runtime: Handle,
        options: &FileOptions,
    ) -> Result<Self> {
        check_name(name)?;
        let given = mountpoint.as_ref();
        let mountpoint_error = |reason: String| FuseError::Mountpoint {
            mountpoint: given.to_path_buf(),
            reason,
        };
        let mountpoint = given.canonicalize().map_err(|err| {
            if err.raw_os_error() == Some(libc::ENOTCONN) {
                mountpoint_error(format!(
                    "{err}: a FUSE filesystem whose server died is mounted there; run `r3map umount` to clean it"
                ))
            } else {
                mountpoint_error(format!("{err}; create the directory first (mkdir -p)"))
            }
        })?;
        if !mountpoint.is_dir() {
            return Err(mountpoint_error("it is not a directory".into()));
        }
        if crate::stale::r3map_mounts()
            .unwrap_or_default()
            .iter()
            .any(|m| m.mountpoint == mountpoint)
        {
            return Err(mountpoint_error(
                "an r3map filesystem is already mounted there; run `r3map umount` to remove it".into(),
            ));
        }
        if options.threads == 0 {
            return Err(mountpoint_error("at least one FUSE thread is needed".into()));
        }

        let now = SystemTime::now();
        let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let fs = OneFile {
            backend: backend.clone(),
            runtime: runtime.clone(),
            name: OsString::from(name),
            options: options.clone(),
            uid,
            gid,
            created: now,
            times: Mutex::new((now, now)),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("{SOURCE_PREFIX}{}", std::process::id())),
            // As a kernel option (fuser passes `Subtype` only to fusermount), so that
            // mountinfo shows the type `fuse.r3map` however the mount was made.
            MountOption::CUSTOM(format!("subtype={SUBTYPE}")),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        if options.read_only {
            config.mount_options.push(MountOption::RO);
        }
        config.acl = SessionACL::Owner;
        config.n_threads = Some(options.threads);
        config.clone_fd = true;
        let session = fuser::Session::new(fs, &mountpoint, &config)
            .and_then(fuser::Session::spawn)
            .map_err(|source| FuseError::Mount {
                mountpoint: mountpoint.clone(),
                source,
            })?;
        let path = mountpoint.join(name);
        tracing::info!("mounted {} ({} bytes)", path.display(), backend.size());
        Ok(Self {
            mountpoint,
            path,
            backend,
            runtime,
            session: Some(session),
        })
    }

    /// The file applications open: `<mountpoint>/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the filesystem is mounted on.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backend behind the file.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// The runtime serving the requests.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// Whether the filesystem is still mounted by this value.
    pub fn is_mounted(&self) -> bool {
        self.session.is_some()
    }

    /// Flushes the backend, unmounts and flushes again. If the file is still open or mapped
    /// (or a loop device uses it), fails with [`FuseError::Busy`] and stays mounted: nothing
    /// is lost, and unmount can be called again. Calling it after success does nothing.
    pub async fn unmount(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        self.sync().await?;
        let mountpoint = self.mountpoint.clone();
        let path = self.path.clone();
        let unmounted = self
            .runtime
            .spawn_blocking(move || umount(&mountpoint, &path))
            .await;
        match unmounted {
            Ok(result) => result?,
            Err(_) => return Err(self.runtime_gone()),
        }
        if let Some(session) = self.session.take() {
            let joined = self.runtime.spawn_blocking(move || session.join()).await;
            if let Ok(Err(err)) = joined {
                tracing::warn!("the FUSE session of {} ended with {err}", self.path.display());
            }
        }
        // Nothing can write any more; this makes the last requests durable.
        self.sync().await
    }

    /// [`FileMount::unmount`] for code outside async contexts. It blocks the calling thread,
    /// so do not call it on a current-thread runtime.
    pub fn unmount_blocking(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        self.sync_blocking()?;
        umount(&self.mountpoint, &self.path)?;
        if let Some(session) = self.session.take() {
            if let Err(err) = session.join() {
                tracing::warn!("the FUSE session of {} ended with {err}", self.path.display());
            }
        }
        self.sync_blocking()
    }

    /// Flushes the backend (on the mount's runtime).
    pub async fn sync(&self) -> Result<()> {
        let backend = self.backend.clone();
        match self.runtime.spawn(async move { backend.sync().await }).await {
            Ok(result) => result.map_err(|source| FuseError::Sync {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
            Err(_) => Err(self.runtime_gone()),
        }
    }

    /// [`FileMount::sync`] for code outside async contexts.
    pub fn sync_blocking(&self) -> Result<()> {
        let backend = self.backend.clone();
        let (done, wait) = std::sync::mpsc::channel();
        drop(self.runtime.spawn(async move {
            let _ = done.send(backend.sync().await);
        }));
        match wait.recv() {
            Ok(result) => result.map_err(|source| FuseError::Sync {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
            Err(_) => Err(self.runtime_gone()),
        }
    }

    fn runtime_gone(&self) -> FuseError {
        FuseError::RuntimeGone {
            mountpoint: self.mountpoint.clone(),
        }
    }
}

impl Drop for FileMount {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        match umount(&self.mountpoint, &self.path) {
            Ok(()) => {
                if let Err(err) = session.join() {
                    tracing::warn!("the FUSE session of {} ended with {err}", self.path.display());
                }
            }
            Err(err) => {
                // Detach it from the tree; the threads keep serving whoever still holds the
                // file until they close it.
                tracing::warn!("{err}; detaching it lazily instead");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                drop(session);
            }
        }
    }
}

/// `umount(2)` that reports "busy" as [`FuseError::Busy`] naming the file.
pub(crate) fn umount(mountpoint: &Path, file: &Path) -> Result<()> {
    match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(FuseError::Busy {
            path: file.to_path_buf(),
            holder: "a process still has it open or mapped, or a loop device is attached to it \
                     (`fuser -vm` lists the processes)"
                .into(),
        }),
        Err(errno) => Err(FuseError::Unmount {
            mountpoint: mountpoint.to_path_buf(),
            source: std::io::Error::from(errno),
        }),
    }
}
