//! Serving another process' memory: the socket protocol a client uses to hand over its
//! userfaultfd ([`RemoteRequest`]) and the server side ([`RemoteRegion`]).

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::SharedBackend;

use super::handler::Handler;
use super::region::RegionHandle;
use super::state::{fetch_runtime, Inner};
use super::{RegionError, RegionOptions};
use crate::uffd::{self, Mapping, Uffd};

/// What a client process sends with its userfaultfd: the range to serve and its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRequest {
    /// Start of the range in the client's address space (page-aligned).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The client's process id (for PAGEMAP_SCAN and reading its memory).
    pub pid: i32,
}

impl RemoteRequest {
    const WIRE_LEN: usize = 20;

    fn to_bytes(self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..].copy_from_slice(&self.pid.to_le_bytes());
        out
    }

    /// Client side: sends a fresh userfaultfd (no UFFDIO_API done yet) and this request.
    pub fn send(self, sock: &UnixStream, uffd: BorrowedFd<'_>) -> io::Result<()> {
        uffd::send_fd(sock, uffd, &self.to_bytes())
    }

    /// Server side: receives the userfaultfd and the request.
    pub fn receive(sock: &UnixStream) -> io::Result<(Self, OwnedFd)> {
        let mut buf = [0u8; Self::WIRE_LEN];
        let (fd, n) = uffd::recv_fd(sock, &mut buf)?;
        if n != Self::WIRE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("region request has {n} bytes, expected {}", Self::WIRE_LEN),
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8"));
        Ok((
            Self {
                addr: u64_at(0),
                len: u64_at(8),
                pid: i32::from_le_bytes(buf[16..20].try_into().expect("4")),
            },
            fd,
        ))
    }
}

/// Client side, in one step: maps `len` bytes of anonymous memory, connects to the page-fault
/// server at `socket`, hands it a fresh userfaultfd with a [`RemoteRequest`] for that memory
/// and waits for its answer, at most `timeout` (a server that accepted but never answers is
/// a `TimedOut` error). The memory is served once this returns. Keep the socket open while the
/// memory is in use: the server closes it when it stops serving.
pub fn hand_over(socket: &Path, len: usize, timeout: Duration) -> io::Result<(Mapping, UnixStream)> {
    let mut sock = UnixStream::connect(socket)?;
    sock.set_read_timeout(Some(timeout))?;
    let memory = Mapping::anonymous(len)?;
    let uffd = Uffd::create().map_err(io::Error::other)?;
    RemoteRequest {
        addr: memory.addr(),
        len: len as u64,
        pid: std::process::id() as i32,
    }
    .send(&sock, uffd.as_fd())?;
    // The server holds the userfaultfd now.
    drop(uffd);
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).map_err(|err| match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the server at {} did not answer within {timeout:?}",
                socket.display()
            ),
        ),
        _ => err,
    })?;
    sock.set_read_timeout(None)?;
    if answer[0] != 0 {
        return Err(io::Error::other(format!(
            "the server at {} refused to serve this memory",
            socket.display()
        )));
    }
    Ok((memory, sock))
}

/// Serves page faults for a range of another process' memory (r3map as its page-fault
/// server). The client creates a userfaultfd, sends it with a [`RemoteRequest`], and touches
/// its memory; this side does the API handshake, registers the range and serves it. Dirty
/// tracking reads the client's `/proc/<pid>/pagemap`.
pub struct RemoteRegion {
    handler: Handler,
    handle: RegionHandle,
    /// The fetch runtime (the region's own; see [`RegionOptions::fetch_threads`]).
    runtime: Option<tokio::runtime::Runtime>,
}

impl RemoteRegion {
    /// Starts serving `request.len` bytes at `request.addr` of process `request.pid` from
    /// `backend` (whose size must be at least `request.len`). `options.memory` is ignored: the
    /// client decides (anonymous or shmem mappings both work).
    pub fn serve(
        uffd_fd: OwnedFd,
        request: RemoteRequest,
        backend: SharedBackend,
        options: RegionOptions,
    ) -> Result<Self, RegionError> {
        let page = uffd::page_size();
        if !request.addr.is_multiple_of(page) || request.len == 0 || !request.len.is_multiple_of(page) {
            return Err(RegionError::InvalidConfig(format!(
                "remote range {:#x}+{} is not a non-empty whole number of pages",
                request.addr, request.len
            )));
        }
        if backend.size() < request.len {
            return Err(RegionError::InvalidConfig(format!(
                "the backend has {} bytes but the remote range is {} bytes",
                backend.size(),
                request.len
            )));
        }
        let uffd = Uffd::from_owned_fd(uffd_fd)?;
        let pidfd = uffd::pidfd_open(request.pid).map_err(RegionError::io("pidfd_open"))?;
        let runtime = fetch_runtime(options.fetch_threads)?;
        let runtime_handle = runtime.handle().clone();
        let inner = Arc::new(Inner::setup(
            uffd,
            request.addr,
            request.len,
            Some(request.pid),
            false,
            backend,
            &options,
            runtime_handle,
        )?);
        let handler = Handler::start(inner.clone(), Some(pidfd))?;
        Ok(Self {
            handler,
            handle: RegionHandle { inner },
            runtime: Some(runtime),
        })
    }

    /// A cloneable handle for the control side.
    pub fn handle(&self) -> RegionHandle {
        self.handle.clone()
    }

    /// Stops serving (once; dropping does it too). The client may live on without a server:
    /// once the range is unregistered, a page nobody fetched would read as zeros, so such pages
    /// are poisoned first (SIGBUS instead). Returns how many chunks were never fetched.
    pub fn stop_serving(&self) -> u64 {
        let inner = &self.handle.inner;
        if inner.closing.swap(true, Ordering::AcqRel) || *inner.peer_closed.lock() {
            return 0;
        }
        let pid = inner.pid.unwrap_or(0);
        let unfetched = inner.layout.chunk_count() - inner.installed.count_ones();
        if inner.poison_supported {
            match inner.poison_unfetched(&inner.uffd, std::thread::yield_now) {
                Ok(0) => {}
                Ok(chunks) => tracing::warn!(
                    pid,
                    chunks,
                    "stopped serving a process that still runs; its never-fetched chunks raise SIGBUS from now on"
                ),
                Err(err) => tracing::error!(pid, %err, "poisoning the never-fetched pages of a process failed"),
            }
        } else if unfetched > 0 {
            tracing::error!(
                pid,
                unfetched,
                "stopped serving a process that still runs, without UFFDIO_POISON: its never-fetched chunks read as zeros from now on"
            );
        }
        // Best effort: the client may already be gone.
        let _ = inner.uffd.unregister(inner.base, inner.map_len);
        unfetched
    }

    /// Waits until the client unmapped the range or exited; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let inner = &self.handle.inner;
        let mut closed = inner.peer_closed.lock();
        let deadline = std::time::Instant::now() + timeout;
        while !*closed {
            if inner.peer_closed_cv.wait_until(&mut closed, deadline).timed_out() {
                return *closed;
            }
        }
        true
    }
}

impl std::ops::Deref for RemoteRegion {
    type Target = RegionHandle;
    fn deref(&self) -> &RegionHandle {
        &self.handle
    }
}

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        self.stop_serving();
        self.handler.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
