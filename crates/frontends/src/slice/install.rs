//! Fetching chunks from the backend and installing them: one UFFDIO_COPY per chunk, the zero
//! page for chunks of zeros, UFFDIO_POISON for chunks that cannot be fetched.
//!
//! Rules that keep zeros from standing in for data:
//! - a chunk counts as installed only once its bytes are in place (or it is poisoned, which
//!   raises SIGBUS);
//! - pages dropped (MADV_DONTNEED/REMOVE) before their chunk was installed go in as zeros, and
//!   the record of that drop is consulted under the event gate (see [`Inner::event_gate`]);
//! - with sync write-protect, zeros go in write-protected in the same ioctl (UFFDIO_COPY with
//!   MODE_WP), so no write can slip in between filling and protecting.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::Error;

use super::state::Inner;
use super::{FailedFetch, FaultError, TrackingMode};
use crate::uffd::{FillError, Uffd};

/// Kept fault errors (older ones are dropped; the count keeps growing).
const MAX_KEPT_ERRORS: usize = 64;

/// Buffers kept for reuse by fetch tasks.
const MAX_POOLED_BUFFERS: usize = 64;

/// Back-off between attempts of a failed fetch ([`FailedFetch::Retry`]).
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Why a fill stopped before the end of its range.
enum FillStop {
    /// The mapping is changing (an event is queued that the handler has not read yet): retry
    /// after letting the handler run. `done` bytes from the start were filled.
    Again { done: u64 },
    /// It cannot be filled.
    Failed(Error),
}

impl Inner {
    /// Serves a missing fault on a chunk that is not installed: fetches and installs it. When
    /// that fails, the chunk is poisoned (SIGBUS) or the fetch is retried until it works, as
    /// [`FailedFetch`] says; the faulting threads are never woken to zeros.
    /// `started` is when the fault's event was read (for the fault observer).
    pub(super) async fn serve_fault(self: Arc<Self>, chunk: u64, started: std::time::Instant) {
        let mut pause = RETRY_FIRST;
        loop {
            let result = self.ensure(chunk).await;
            if self.closing.load(Ordering::Acquire) {
                break;
            }
            let Err(err) = result else {
                if let Some(observer) = &self.fault_observer {
                    (observer.0)(started.elapsed());
                }
                break;
            };
            match self.failed_fetch {
                FailedFetch::Sigbus => {
                    self.fail_chunk(chunk, err);
                    break;
                }
                FailedFetch::Retry => {
                    tracing::warn!(chunk, %err, retry_in = ?pause, "fetching a faulted chunk failed; its faults stay blocked");
                    self.report(chunk, err);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        self.fault_pending.clear(chunk);
    }

    /// Makes `chunk` present (fetching it unless it is known to be zeros) and wakes its
    /// waiters. Errors are returned, not acted on: the caller decides (poison, retry, report).
    pub(super) async fn ensure(&self, chunk: u64) -> Result<(), Error> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self.installed.get(chunk) {
            return self.installed_result(chunk);
        }
        let _guard = self.locks.lock(chunk).await;
        if self.installed.get(chunk) {
            return self.installed_result(chunk);
        }
        let (dst, len) = self.chunk_span(chunk);
        if self.known_zero.get(chunk) {
            return self.install(chunk, dst, len, None).await;
        }
        let mut buf = self.take_buffer(len as usize);
        let result = match self.fetch(chunk, &mut buf).await {
            Ok(()) if self.detect_zero && is_zero(&buf) => self.install(chunk, dst, len, None).await,
            Ok(()) => self.install(chunk, dst, len, Some(&mut buf)).await,
            Err(err) => Err(err),
        };
        self.return_buffer(buf);
        result
    }

    /// Installs a chunk's bytes (`None`: zeros) and marks it installed, under the event gate so
    /// that pages dropped meanwhile go in as zeros (see [`Inner::event_gate`]).
    async fn install(
        &self,
        chunk: u64,
        dst: u64,
        len: u64,
        mut data: Option<&mut [u8]>,
    ) -> Result<(), Error> {
        if data.is_none() {
            self.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
        let mut done = 0;
        loop {
            let gate = self.event_gate.read();
            let (at, rest) = (dst + done, len - done);
            if let Some(data) = data.as_deref_mut() {
                for page in self.pages_of(at, rest) {
                    if self.discarded.get(page) {
                        let from = (page * self.page_size - (dst - self.base)) as usize;
                        data[from..from + self.page_size as usize].fill(0);
                    }
                }
            }
            let filled = match data.as_deref() {
                Some(data) => self.fill_copy(at, &data[done as usize..]),
                None => self.fill_zeros(at, rest),
            };
            match filled {
                Ok(()) => {
                    self.installed.set(chunk);
                    drop(gate);
                    for page in self.pages_of(dst, len) {
                        self.discarded.clear(page);
                    }
                    self.wake(dst, len);
                    return Ok(());
                }
                Err(FillStop::Again { done: more }) => {
                    drop(gate);
                    done += more;
                    tokio::task::yield_now().await;
                }
                Err(FillStop::Failed(err)) => return Err(err),
            }
        }
    }

    /// Answers a missing fault on one page of an installed chunk: the page was dropped since
    /// (MADV_DONTNEED), so, like ordinary memory, it reads as zeros now; in a poisoned chunk it
    /// is poisoned again.
    pub(super) async fn refill_dropped_page(self: Arc<Self>, chunk: u64, page: u64) {
        let poisoned = self.poisoned.get(chunk);
        let mut done = 0;
        while done < self.page_size {
            let filled = if poisoned {
                self.fill_poison(&self.uffd, page + done, self.page_size - done)
            } else {
                self.fill_zeros(page + done, self.page_size - done)
            };
            match filled {
                Ok(()) => break,
                Err(FillStop::Again { done: more }) => {
                    done += more;
                    tokio::task::yield_now().await;
                }
                Err(FillStop::Failed(err)) => {
                    if !self.closing.load(Ordering::Acquire) {
                        tracing::error!(%err, page, "refilling a dropped page failed");
                    }
                    return;
                }
            }
        }
        self.wake(page, self.page_size);
    }

    /// Poisons one page (a fault this region cannot serve) and wakes its thread into SIGBUS.
    pub(super) async fn poison_page(self: Arc<Self>, page: u64) {
        loop {
            match self.fill_poison(&self.uffd, page, self.page_size) {
                Ok(()) => break,
                Err(FillStop::Again { .. }) => tokio::task::yield_now().await,
                Err(FillStop::Failed(err)) => {
                    tracing::error!(%err, page, "UFFDIO_POISON failed");
                    return;
                }
            }
        }
        self.wake(page, self.page_size);
    }

    pub(super) fn wake(&self, start: u64, len: u64) {
        if let Err(err) = self.uffd.wake(start, len) {
            if !self.closing.load(Ordering::Acquire) {
                tracing::error!(%err, "UFFDIO_WAKE failed");
            }
        }
    }

    fn installed_result(&self, chunk: u64) -> Result<(), Error> {
        if self.poisoned.get(chunk) {
            Err(Error::Remote(format!(
                "chunk {chunk} could not be fetched earlier and is poisoned"
            )))
        } else {
            Ok(())
        }
    }

    async fn fetch(&self, chunk: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let range = self.layout.chunk_range(chunk);
        let data_len = (range.end - range.start) as usize;
        buf[data_len..].fill(0);
        let read = self.backend.read_at(range.start, &mut buf[..data_len]);
        match self.fetch_timeout {
            Some(limit) => tokio::time::timeout(limit, read)
                .await
                .map_err(|_| Error::Timeout(limit))?,
            None => read.await,
        }
    }

    /// Poisons a chunk whose fetch failed: threads waiting on it (and later ones) get SIGBUS.
    async fn fail_chunk_async(&self, chunk: u64) {
        let (start, len) = self.chunk_span(chunk);
        let mut done = 0;
        while done < len {
            match self.fill_poison(&self.uffd, start + done, len - done) {
                Ok(()) => break,
                Err(FillStop::Again { done: more }) => {
                    done += more;
                    tokio::task::yield_now().await;
                }
                Err(FillStop::Failed(err)) => {
                    tracing::error!(%err, chunk, "UFFDIO_POISON failed");
                    break;
                }
            }
        }
    }

    /// Poisons a chunk whose fetch failed (SIGBUS for its threads) and reports the error.
    fn fail_chunk(self: &Arc<Self>, chunk: u64, error: Error) {
        tracing::error!(chunk, %error, "fetching a faulted chunk failed; poisoning it (SIGBUS)");
        self.poisoned.set(chunk);
        self.installed.set(chunk);
        self.poisoned_count.fetch_add(1, Ordering::Relaxed);
        self.report(chunk, error);
        let inner = self.clone();
        self.runtime
            .spawn(async move { inner.fail_chunk_async(chunk).await });
    }

    /// Records an error for [`RegionHandle::errors`](super::RegionHandle::errors).
    fn report(&self, chunk: u64, error: Error) {
        let mut errors = self.errors.lock();
        if errors.len() == MAX_KEPT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(FaultError { chunk, error });
        drop(errors);
        self.error_count.send_modify(|n| *n += 1);
    }

    /// Poisons every page of `uffd`'s copy of the range whose chunk is not installed (except
    /// pages dropped before, which read as zeros), so that once nobody serves that copy its
    /// never-fetched pages raise SIGBUS instead of reading as zeros. Returns how many chunks
    /// were poisoned; stops at the first failure.
    pub(super) fn poison_unfetched(&self, uffd: &Uffd, mut on_again: impl FnMut()) -> Result<u64, Error> {
        let mut count = 0;
        for chunk in 0..self.layout.chunk_count() {
            if self.installed.get(chunk) {
                continue;
            }
            // Runs of pages that were not dropped, one ioctl each.
            let (start, len) = self.chunk_span(chunk);
            let pages = self.pages_of(start, len);
            let mut page = pages.start;
            while page < pages.end {
                if self.discarded.get(page) {
                    page += 1;
                    continue;
                }
                let run_start = page;
                while page < pages.end && !self.discarded.get(page) {
                    page += 1;
                }
                let (at, run) = (
                    self.base + run_start * self.page_size,
                    (page - run_start) * self.page_size,
                );
                let mut done = 0;
                while done < run {
                    match self.fill_poison(uffd, at + done, run - done) {
                        Ok(()) => break,
                        Err(FillStop::Again { done: more }) => {
                            done += more;
                            on_again();
                        }
                        Err(FillStop::Failed(err)) => return Err(err),
                    }
                }
            }
            count += 1;
        }
        Ok(count)
    }

    /// Copies `src` to `dst`, write-protected when tracking writes, not waking anybody.
    fn fill_copy(&self, dst: u64, src: &[u8]) -> Result<(), FillStop> {
        let wp = self.tracking != TrackingMode::Off;
        self.fill(dst, src.len() as u64, |at, n| {
            let from = (at - dst) as usize;
            self.uffd.copy(at, &src[from..from + n as usize], wp, true)
        })
    }

    /// Zeros over a range, not waking anybody. Sync write-protect copies zeros in
    /// write-protected (the zero page cannot be mapped protected in one step, and a write
    /// between two steps would go unseen). Otherwise the zero page is mapped: async tracking
    /// needs nothing more (PAGEMAP_SCAN never reports zero-page mappings, and a write replaces
    /// them with a written page). A write-protect marker that a dropped page left behind, which
    /// ZEROPAGE refuses, is filled by copying.
    fn fill_zeros(&self, dst: u64, len: u64) -> Result<(), FillStop> {
        let wp = self.tracking != TrackingMode::Off;
        if self.tracking == TrackingMode::SyncWriteProtect {
            return self.fill(dst, len, |at, n| {
                let n = n.min(self.zero_chunk.len() as u64) as usize;
                self.uffd.copy(at, &self.zero_chunk[..n], true, true)
            });
        }
        self.fill(dst, len, |at, n| match self.uffd.zeropage(at, n, true) {
            // Progress up to the refused page; the next call starts at it.
            Err(FillError {
                errno: libc::EEXIST,
                done,
            }) if done > 0 => Ok(done),
            Err(FillError {
                errno: libc::EEXIST, ..
            }) => self.uffd.copy(at, &self.zero_page, wp, true),
            other => other,
        })
    }

    fn fill_poison(&self, uffd: &Uffd, dst: u64, len: u64) -> Result<(), FillStop> {
        self.fill(dst, len, |at, n| uffd.poison(at, n))
    }

    /// Runs a fill ioctl over `len` bytes at `dst` until done, skipping pages that are already
    /// there (EEXIST: somebody else installed them). EAGAIN (the mapping is changing) stops
    /// with how far it got: the caller must let the handler read events before retrying.
    fn fill(
        &self,
        dst: u64,
        len: u64,
        op: impl Fn(u64, u64) -> Result<u64, FillError>,
    ) -> Result<(), FillStop> {
        let end = dst + len;
        let mut at = dst;
        while at < end {
            match op(at, end - at) {
                Ok(n) if n > 0 && at + n < end => at += n,
                Ok(_) => return Ok(()),
                Err(FillError { errno, done }) => {
                    at += done;
                    match errno {
                        libc::EEXIST => {
                            self.already_present.fetch_add(1, Ordering::Relaxed);
                            // Wake anybody who faulted on the page that was already there.
                            let _ = self.uffd.wake(at, self.page_size);
                            at += self.page_size;
                        }
                        libc::EAGAIN => return Err(FillStop::Again { done: at - dst }),
                        libc::ENOENT | libc::ESRCH if self.closing.load(Ordering::Acquire) => {
                            return Err(FillStop::Failed(Error::Closed))
                        }
                        libc::ENOENT | libc::ESRCH => {
                            return Err(FillStop::Failed(Error::Io(Arc::new(io::Error::other(
                                "the region is no longer mapped",
                            )))))
                        }
                        _ => return Err(FillStop::Failed(Error::from(io::Error::from_raw_os_error(errno)))),
                    }
                }
            }
        }
        Ok(())
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.buffers.lock();
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0u8; len],
        }
    }

    fn return_buffer(&self, buf: Vec<u8>) {
        let mut pool = self.buffers.lock();
        if pool.len() < MAX_POOLED_BUFFERS {
            pool.push(buf);
        }
    }
}

fn is_zero(buf: &[u8]) -> bool {
    let (words, rest) = buf.split_at(buf.len() / 16 * 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
}
