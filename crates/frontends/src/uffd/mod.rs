//! Safe wrappers around the kernel interfaces the slice frontend needs: userfaultfd, the
//! PAGEMAP_SCAN ioctl, anonymous/memfd/file mappings, eventfd/pidfd/poll and SCM_RIGHTS fd
//! passing. `r3map-sync` uses them too, for an advertised file it maps itself.
//!
//! This module (with its submodules) is the only place in the crate with `unsafe`; every block
//! carries a `SAFETY:` note. Addresses cross the API as `u64`, never as raw pointers, so the
//! types here stay `Send + Sync` without `unsafe impl`.
//!
//! Raw numbers live in [`raw`]; nothing here needs libclang or the `userfaultfd` crate.

pub mod raw;

mod mapping;
mod pagemap;
mod sys;

pub use mapping::Mapping;
pub use pagemap::Pagemap;
pub use sys::{page_size, pidfd_open, poll_readable, read_process_memory, recv_fd, send_fd, EventFd};

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// What went wrong talking to userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel lacks a feature or ioctl this use needs.
    #[error("the kernel does not support {0}")]
    Unsupported(String),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// `read` returned a partial message.
    #[error("short read of {read} bytes from userfaultfd (messages are {expected} bytes)")]
    IncompleteMsg { read: usize, expected: usize },
}

impl UffdError {
    fn os(op: &'static str) -> Self {
        UffdError::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// The errno of an OS error, if it is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            UffdError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A fill ioctl (COPY, ZEROPAGE, POISON) that stopped early: `done` bytes from the start were
/// filled, then the kernel reported `errno` (EEXIST: a page is already there; EAGAIN: the
/// mapping is changing, retry; ENOENT/ESRCH: the range or process is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("userfaultfd fill stopped after {done} bytes with errno {errno}")]
pub struct FillError {
    pub errno: i32,
    pub done: u64,
}

/// Features and ioctls the kernel reports in the UFFDIO_API handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// `UFFD_FEATURE_*` bits.
    pub features: u64,
    /// Bits of the ioctls available on the fd (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

impl Features {
    /// Whether every bit of `feature` (a `UFFD_FEATURE_*` value) is present.
    pub fn has(&self, feature: u32) -> bool {
        self.features & u64::from(feature) == u64::from(feature)
    }
}

/// Registration modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegisterMode {
    /// Report faults on missing pages.
    pub missing: bool,
    /// Report (or, with WP_ASYNC, track) writes to write-protected pages.
    pub write_protect: bool,
}

/// One userfaultfd event, decoded from `struct uffd_msg`.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted at `address` (page-aligned unless EXACT_ADDRESS was requested).
    Pagefault {
        address: u64,
        /// The access was a write.
        write: bool,
        /// The fault is a write-protect fault (sync WP), not a missing page.
        wp: bool,
        /// Faulting thread, when UFFD_FEATURE_THREAD_ID was enabled (else 0).
        thread_id: u32,
    },
    /// The process forked; the child's userfaultfd.
    Fork { uffd: OwnedFd },
    /// `mremap` moved a registered range.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(DONTNEED/REMOVE)` dropped pages; they read as zeros (faults) afterwards.
    Remove { start: u64, end: u64 },
    /// `munmap` removed a registered range.
    Unmap { start: u64, end: u64 },
    /// An event this wrapper does not know.
    Unknown(u8),
}

/// An owned userfaultfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(uffd: Uffd) -> OwnedFd {
        uffd.fd
    }
}

impl Uffd {
    /// Opens a new userfaultfd. Kernel-mode faults (a `read(2)` into the region) are handled
    /// too; where that is not permitted for this user, falls back to user-mode-only faults.
    pub fn create() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        match sys::userfaultfd(flags) {
            Ok(fd) => Ok(Self { fd }),
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                sys::userfaultfd(flags | UFFD_USER_MODE_ONLY_FLAG)
                    .map(|fd| Self { fd })
                    .map_err(|source| UffdError::Os {
                        op: "userfaultfd (user-mode only; set vm.unprivileged_userfaultfd=1 or run with CAP_SYS_PTRACE)",
                        source,
                    })
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => {
                Err(UffdError::Unsupported("the userfaultfd system call (CONFIG_USERFAULTFD)".into()))
            }
            Err(source) => Err(UffdError::Os {
                op: "userfaultfd",
                source,
            }),
        }
    }

    /// Wraps a userfaultfd received from elsewhere (e.g. over a UNIX socket). It must be
    /// non-blocking for the handler loop; this sets O_NONBLOCK.
    pub fn from_owned_fd(fd: OwnedFd) -> Result<Self, UffdError> {
        sys::set_nonblocking(fd.as_raw_fd()).map_err(|source| UffdError::Os {
            op: "fcntl(O_NONBLOCK) on the received userfaultfd",
            source,
        })?;
        Ok(Self { fd })
    }

    /// Asks the kernel which features and ioctls exist (on a throw-away fd: the API handshake
    /// can be done once per fd).
    pub fn probe() -> Result<Features, UffdError> {
        Self::create()?.api(0)
    }

    /// The UFFDIO_API handshake, enabling `features`. Returns what the kernel reports.
    pub fn api(&self, features: u64) -> Result<Features, UffdError> {
        let mut api = raw::uffdio_api {
            api: u64::from(raw::UFFD_API),
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is;
        // the pointer is valid for the duration of the call.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_API as _, &mut api) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) && features != 0 {
                return Err(UffdError::Unsupported(format!(
                    "userfaultfd features {features:#x}"
                )));
            }
            return Err(UffdError::Os {
                op: "UFFDIO_API",
                source: err,
            });
        }
        Ok(Features {
            features: api.features,
            ioctls: api.ioctls,
        })
    }

    /// Registers `len` bytes at `start`; returns the ioctls available on the range.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<u64, UffdError> {
        let mut bits = 0u64;
        if mode.missing {
            bits |= u64::from(raw::UFFDIO_REGISTER_MODE_MISSING);
        }
        if mode.write_protect {
            bits |= u64::from(raw::UFFDIO_REGISTER_MODE_WP);
        }
        let mut reg = raw::uffdio_register {
            range: raw::uffdio_range { start, len },
            mode: bits,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; `reg` is one
        // and outlives the call. The kernel validates the range itself.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_REGISTER as _, &mut reg) };
        if rc != 0 {
            return Err(UffdError::os("UFFDIO_REGISTER"));
        }
        Ok(reg.ioctls)
    }

    /// Unregisters a range; threads blocked on faults in it are woken.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = raw::uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`; `range` is one.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_UNREGISTER as _, &mut range) };
        if rc != 0 {
            return Err(UffdError::os("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Atomically installs `src` (a whole number of pages) at `dst` in the registered range,
    /// write-protected when `write_protect`, waking waiters unless `dont_wake`.
    pub fn copy(&self, dst: u64, src: &[u8], write_protect: bool, dont_wake: bool) -> Result<u64, FillError> {
        let mut mode = 0u64;
        if write_protect {
            mode |= u64::from(raw::UFFDIO_COPY_MODE_WP);
        }
        if dont_wake {
            mode |= u64::from(raw::UFFDIO_COPY_MODE_DONTWAKE);
        }
        let mut arg = raw::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, which is a live slice of exactly that
        // length, and writes only into the registered destination range (memory the kernel
        // manages, never a Rust object of ours). `arg` is a valid `struct uffdio_copy`.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_COPY as _, &mut arg) };
        fill_result(rc, arg.copy)
    }

    /// Maps the zero page over `len` bytes at `dst` (missing pages only).
    pub fn zeropage(&self, dst: u64, len: u64, dont_wake: bool) -> Result<u64, FillError> {
        let mut arg = raw::uffdio_zeropage {
            range: raw::uffdio_range { start: dst, len },
            mode: if dont_wake {
                u64::from(raw::UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`; `arg` is one.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_ZEROPAGE as _, &mut arg) };
        fill_result(rc, arg.zeropage)
    }

    /// Marks missing pages as poisoned: touching them raises SIGBUS instead of a fault event.
    pub fn poison(&self, dst: u64, len: u64) -> Result<u64, FillError> {
        let mut arg = raw::uffdio_poison {
            range: raw::uffdio_range { start: dst, len },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes one `struct uffdio_poison`; `arg` is one.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_POISON as _, &mut arg) };
        fill_result(rc, arg.updated)
    }

    /// Sets (`protect`) or clears write protection on a range. Clearing wakes waiters unless
    /// `dont_wake`.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = 0;
        if protect {
            mode |= raw::UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= raw::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = raw::uffdio_writeprotect {
            range: raw::uffdio_range { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`; `arg` is one.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_WRITEPROTECT as _, &mut arg) };
        if rc != 0 {
            return Err(UffdError::os("UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = raw::uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`; `range` is one.
        let rc = unsafe { libc::ioctl(self.raw(), raw::UFFDIO_WAKE as _, &mut range) };
        if rc != 0 {
            return Err(UffdError::os("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Reads every event queued now (non-blocking) into `out`; returns how many were read.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        let msg_size = size_of::<raw::uffd_msg>();
        let mut buf = [0u8; BATCH * 32];
        let mut total = 0;
        loop {
            // SAFETY: `read` writes at most `buf.len()` bytes into `buf`, which is writable
            // for that length.
            let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(total),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Os {
                        op: "read(userfaultfd)",
                        source: err,
                    }),
                };
            }
            let n = n as usize;
            if n == 0 {
                return Ok(total);
            }
            if !n.is_multiple_of(msg_size) {
                return Err(UffdError::IncompleteMsg {
                    read: n,
                    expected: msg_size,
                });
            }
            for bytes in buf[..n].chunks_exact(msg_size) {
                out.push(decode(bytes));
                total += 1;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

const UFFD_USER_MODE_ONLY_FLAG: i32 = raw::UFFD_USER_MODE_ONLY as i32;

fn fill_result(rc: i32, field: i64) -> Result<u64, FillError> {
    if rc == 0 {
        return Ok(field.max(0) as u64);
    }
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // On failure the kernel stores the bytes done so far, or -errno when nothing was done.
    Err(FillError {
        errno,
        done: field.max(0) as u64,
    })
}

/// Decodes one `struct uffd_msg` from its 32 bytes (little-endian, packed layout).
fn decode(bytes: &[u8]) -> Event {
    let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    // Layout: event u8, reserved 7 bytes, then the union at offset 8.
    let event = bytes[0];
    match u32::from(event) {
        raw::UFFD_EVENT_PAGEFAULT => {
            let flags = u64_at(8);
            Event::Pagefault {
                address: u64_at(16),
                write: flags & u64::from(raw::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                wp: flags & u64::from(raw::UFFD_PAGEFAULT_FLAG_WP) != 0,
                thread_id: u32_at(24),
            }
        }
        raw::UFFD_EVENT_FORK => {
            let fd = u32_at(8) as RawFd;
            // SAFETY: for a FORK event the kernel installed a new fd in our table and hands
            // its ownership to the reader of the message; nobody else refers to it.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
            Event::Fork { uffd }
        }
        raw::UFFD_EVENT_REMAP => Event::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        raw::UFFD_EVENT_REMOVE => Event::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        raw::UFFD_EVENT_UNMAP => Event::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        _ => Event::Unknown(event),
    }
}
