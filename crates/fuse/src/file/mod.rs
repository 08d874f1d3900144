//! The *file* frontend: a FUSE filesystem with one regular file whose bytes are a backend's.
//!
//! The mount is a directory holding exactly one file, `<mountpoint>/<name>`, of the backend's
//! size. Applications open, read, write, `mmap(MAP_SHARED)` and `fallocate` it like any file;
//! `fsync` and `msync` flush the backend (`close` does not: it is no durability point).
//!
//! # Request handling
//!
//! The answers are transport-independent (`core`). Two transports carry the requests:
//!
//! - *io_uring* (`ring`), where the kernel offers FUSE over io_uring (Linux 6.14+ with the
//!   `fuse` module parameter `enable_uring` on; [`FileOptions::io_uring`]): one queue per CPU,
//!   each a thread pinned to that CPU with its own ring of [`ring::DEPTH`] entries. A request is
//!   answered in its entry's buffers, inline when the backend answers at once (a cache hit) and
//!   it moves at most 64 KiB, else by a task on the runtime (so one reader's readahead requests,
//!   which all land on its CPU's queue, are served in parallel). No `read(2)`/`write(2)` per
//!   request.
//! - *classic* (`ops`): a few fuser threads read requests from `/dev/fuse` (each with its own
//!   cloned fd) and hand every read, write, fsync and fallocate to a task on the shared Tokio
//!   runtime, which replies (fuser's `Reply*` objects are `Send`). It is the fallback, and it
//!   carries FORGET, INTERRUPT and notifications in io_uring mode too.
//!
//! Either way a thread never waits for the backend, so many requests are in flight at once
//! however slow the backend is. [`FileMount::transport`] says which one a mount uses.
//!
//! # Caching choices
//!
//! - No `FUSE_WRITEBACK_CACHE`: every `write(2)` reaches the backend before it returns
//!   (write-through), so write errors are reported to the writer and a crash of this process
//!   loses no acknowledged write. Shared writable mappings still work: the kernel writes dirty
//!   mapped pages back with ordinary WRITE requests, and `msync` ends with an FSYNC.
//! - No `FOPEN_DIRECT_IO`: reads go through the page cache (readahead, and `mmap` needs it).
//!   Writes through the mount update the cache, so it stays coherent and the file is opened
//!   with `FOPEN_KEEP_CACHE`: a new `open` keeps the cached pages. Whoever changes the backend
//!   behind the mount (a re-pull after a migration, a remote writer) calls
//!   [`FileMount::invalidate`] for the stale range. Applications (and the loop device) that
//!   open the file with `O_DIRECT` bypass the cache per request.
//! - `FUSE_ASYNC_DIO`: direct I/O from the loop device is split into requests that are all
//!   sent at once instead of one after another.
//! - `max_write`/`max_pages` as large as the kernel allows (`fs.fuse.max_pages_limit`, 1 MiB by
//!   default; see [`max_request_limit`]), so a 1 MiB `O_DIRECT` read or write costs one round
//!   trip to the backend.
//! - Read-ahead: at INIT the kernel only lets a FUSE server *lower* the connection's read-ahead
//!   from its default (128 KiB), so buffered sequential reads would arrive as 128 KiB requests.
//!   After INIT the mount raises the connection's `read_ahead_kb` in sysfs to
//!   [`FileOptions::read_ahead`] (see `tuning`), and buffered reads arrive as requests of up to
//!   `max_request`.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, INodeNo, MountOption, SessionACL};
use r3map_core::SharedBackend;
use tokio::runtime::Handle;

use crate::error::{FuseError, Result};

mod core;
mod ops;
mod ring;
mod tuning;
mod wire;

use self::core::FileCore;
use ops::OneFile;
use ring::{RingStats, Rings};
pub use tuning::max_request_limit;

/// The filesystem type is `fuse.r3map`: how `r3map umount` recognises our mounts.
pub const SUBTYPE: &str = "r3map";

/// The mount source is `r3map-<pid of the serving process>`, so a mount whose server died can
/// be told from a live one.
pub const SOURCE_PREFIX: &str = "r3map-";

/// Default read-ahead of the connection (bytes): one default chunk.
pub const DEFAULT_READ_AHEAD: u32 = 1 << 20;

const ROOT_INO: INodeNo = INodeNo::ROOT;
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes and entries never change behind the kernel's back (the size is fixed).
const TTL: Duration = Duration::from_secs(3600);
const BLOCK_SIZE: u32 = 4096;

/// How the file frontend is mounted.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Largest read or write request the kernel sends, in bytes. The default is the largest the
    /// kernel allows ([`max_request_limit`]); the kernel lowers larger values to that.
    pub max_request: u32,
    /// Read-ahead of the FUSE connection in bytes (its bdi's `read_ahead_kb`), set right after
    /// the mount: the size of the requests buffered sequential reads arrive in (at most
    /// `max_request` each). `None` keeps the kernel's default (128 KiB). Setting it needs write
    /// access to sysfs (root); if that fails the mount works with the default and logs why.
    pub read_ahead: Option<u32>,
    /// Threads reading requests from `/dev/fuse`. They only decode and dispatch, so two keep
    /// up with many in-flight requests.
    pub threads: usize,
    /// Permission bits of the file.
    pub mode: u16,
    /// Refuse writes (`EROFS`).
    pub read_only: bool,
    /// Use FUSE over io_uring when the kernel offers it (see [`uring_status`]); otherwise, or
    /// if setting up the queues fails, requests go through `/dev/fuse` reads and writes.
    pub io_uring: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            max_request: max_request_limit(),
            read_ahead: Some(DEFAULT_READ_AHEAD),
            threads: 2,
            mode: 0o600,
            read_only: false,
            io_uring: true,
        }
    }
}

/// How the kernel and a mount exchange FUSE requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// FUSE over io_uring: `queues` rings (one per CPU) of `depth` entries each.
    IoUring { queues: usize, depth: u16 },
    /// `read(2)` and `write(2)` on `/dev/fuse`; `reason` says why not io_uring.
    Classic { reason: String },
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::IoUring { queues, depth } => {
                write!(f, "FUSE over io_uring ({queues} queues of {depth} entries)")
            }
            Transport::Classic { reason } => write!(f, "classic /dev/fuse ({reason})"),
        }
    }
}

/// Whether this kernel lets FUSE servers use io_uring now: `Ok(true)` when the `fuse` module's
/// `enable_uring` parameter is on, `Ok(false)` when it is off, `Err` when the kernel lacks it.
pub fn uring_status() -> std::result::Result<bool, String> {
    crate::sys::uring::uring_enabled()
}

/// What [`enable_uring`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UringSwitch {
    /// The parameter was already on; nothing changed.
    AlreadyOn,
    /// This call turned it on (a change for every FUSE filesystem mounted from now on).
    TurnedOn,
}

/// Turns on FUSE over io_uring for the whole kernel by writing `Y` to the `fuse` module
/// parameter `enable_uring` (root only). The error says why not and which command would.
pub fn enable_uring() -> std::result::Result<UringSwitch, String> {
    let path = crate::sys::uring::ENABLE_URING;
    if uring_status()? {
        return Ok(UringSwitch::AlreadyOn);
    }
    std::fs::write(path, "Y\n")
        .map_err(|err| format!("cannot write {path}: {err}; as root run `echo Y > {path}`"))?;
    match uring_status()? {
        true => Ok(UringSwitch::TurnedOn),
        false => Err(format!("{path} still reads N after writing Y")),
    }
}

/// Why a mount that asked for io_uring uses the classic transport, before trying.
fn classic_reason(options: &FileOptions) -> Option<String> {
    if !options.io_uring {
        return Some("io_uring not requested".into());
    }
    match uring_status() {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{} is N: FUSE over io_uring is off in this kernel (`r3map mount --fuse-uring` turns it on)",
            crate::sys::uring::ENABLE_URING
        )),
        Err(reason) => Some(reason),
    }
}

/// The payload buffer an io_uring entry needs: the kernel's largest request.
fn ring_payload(options: &FileOptions) -> usize {
    let page = crate::sys::page_size() as usize;
    (options.max_request.max(4096) as usize)
        .next_multiple_of(page)
        .max(8192)
}

/// A running FUSE session: fuser's thread(s) and, in io_uring mode, the queue threads.
struct Session {
    classic: fuser::BackgroundSession,
    rings: Option<Rings>,
}

impl Session {
    /// Waits for every thread; they end once the filesystem is unmounted.
    fn join(self) -> std::io::Result<()> {
        let joined = self.classic.join();
        if let Some(rings) = self.rings {
            rings.join();
        }
        joined
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
    /// The connection's read-ahead in bytes, as the kernel reports it after the mount.
    read_ahead: Option<u32>,
    transport: Transport,
    ring_stats: Arc<RingStats>,
    session: Option<Session>,
}

impl std::fmt::Debug for FileMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMount")
            .field("path", &self.path)
            .field("mounted", &self.session.is_some())
            .field("read_ahead", &self.read_ahead)
            .field("transport", &self.transport)
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
            // ENOTCONN; ECONNABORTED when the dead server used io_uring (its queues' teardown
            // aborts the connection), or ECANCELED for a request the kernel was handing to the
            // dying server's ring.
            if matches!(
                err.raw_os_error(),
                Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
            ) {
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

        let mut options = options.clone();
        let mut reason = classic_reason(&options);
        options.io_uring = reason.is_none();
        let core = Arc::new(FileCore::new(
            backend.clone(),
            OsString::from(name),
            options.clone(),
        ));
        let negotiated = Arc::new(AtomicBool::new(false));
        let fs = OneFile::new(core.clone(), runtime.clone(), negotiated.clone());
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
        let mount_error = |source| FuseError::Mount {
            mountpoint: mountpoint.clone(),
            source,
        };
        // `Session::new` mounts and answers INIT; with io_uring accepted there, the kernel holds
        // every request until each queue has registered (or a registration failed).
        let session = fuser::Session::new(fs, &mountpoint, &config).map_err(mount_error)?;
        let ring_stats = Arc::new(RingStats::default());
        let mut rings = None;
        if reason.is_none() && !negotiated.load(Ordering::SeqCst) {
            reason = Some("the kernel did not offer FUSE_OVER_IO_URING at INIT".into());
        }
        if reason.is_none() {
            let started = Rings::start(
                core,
                runtime.clone(),
                session.as_fd(),
                ring_payload(&options),
                ring_stats.clone(),
            );
            match started {
                Ok(started) => rings = Some(started),
                Err(err) => {
                    tracing::warn!("FUSE over io_uring failed, using /dev/fuse: {err}");
                    reason = Some(format!("setting up the io_uring queues failed: {err}"));
                }
            }
        }
        let transport = match reason {
            None => Transport::IoUring {
                queues: crate::sys::uring::possible_cpus().unwrap_or(1),
                depth: ring::DEPTH,
            },
            Some(reason) => Transport::Classic { reason },
        };
        let classic = session.spawn().map_err(mount_error)?;
        let session = Session { classic, rings };
        let path = mountpoint.join(name);
        let read_ahead = tuning::apply_read_ahead(&mountpoint, options.read_ahead);
        tracing::info!(
            "mounted {} ({} bytes, read-ahead {}, {transport})",
            path.display(),
            backend.size(),
            read_ahead.map_or("unknown".into(), |bytes| format!("{} KiB", bytes / 1024))
        );
        Ok(Self {
            mountpoint,
            path,
            backend,
            runtime,
            read_ahead,
            transport,
            ring_stats,
            session: Some(session),
        })
    }

    /// How requests reach this mount: io_uring queues or `/dev/fuse` (with the reason).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Requests the io_uring queues have answered (0 in classic mode).
    pub fn ring_requests(&self) -> u64 {
        self.ring_stats.requests.load(Ordering::Relaxed)
    }

    /// The read-ahead of the connection in bytes (the size buffered sequential reads are
    /// requested in), read back from sysfs after the mount; `None` if it could not be read.
    pub fn read_ahead(&self) -> Option<u32> {
        self.read_ahead
    }

    /// Drops the kernel's cached pages of `len` bytes at `offset` of the file
    /// (`FUSE_NOTIFY_INVAL_INODE`), so the next read of them — through any open file or
    /// mapping — asks the backend again. Call it when the backend's bytes changed other than
    /// through this mount (chunks re-pulled after a migration, a remote writer); the page cache
    /// is kept across opens (`FOPEN_KEEP_CACHE`), so nothing else drops them. Dirty mapped pages
    /// in the range are written back first. A range past the end is clipped.
    pub fn invalidate(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.backend.size();
        let len = len.min(size.saturating_sub(offset));
        let Some(session) = self.session.as_ref() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let error = |source| FuseError::Invalidate {
            path: self.path.clone(),
            offset,
            len,
            source,
        };
        // Both fit: the backend's size is below 2^63.
        let (start, count) = (i64::try_from(offset), i64::try_from(len));
        let (Ok(start), Ok(count)) = (start, count) else {
            return Err(error(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        };
        match session.classic.notifier().inval_inode(FILE_INO, start, count) {
            // The kernel has not looked the file up (or forgot it): nothing of it is cached.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            result => result.map_err(error),
        }
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
                drop(session.classic);
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
