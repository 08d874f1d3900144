//! Fetching chunks from the backend and installing them: one UFFDIO_COPY per chunk, the zero
//! page for chunks of zeros, UFFDIO_POISON for chunks that cannot be fetched.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use r3map_core::Error;

use super::state::Inner;
use super::{FaultError, TrackingMode};
use crate::uffd::FillError;

/// Kept fault errors (older ones are dropped; the count keeps growing).
const MAX_KEPT_ERRORS: usize = 64;

/// Buffers kept for reuse by fetch tasks.
const MAX_POOLED_BUFFERS: usize = 64;

impl Inner {
    /// Makes `chunk` present. From a fault, a failed fetch poisons the chunk (SIGBUS for the
    /// faulting thread) and reports the error; from the puller it only returns the error.
    pub(super) async fn ensure(&self, chunk: u64, from_fault: bool) -> Result<(), Error> {
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
            self.install_zero(dst, len)?;
        } else {
            let mut buf = self.take_buffer(len as usize);
            let fetched = self.fetch(chunk, &mut buf).await;
            let result = match fetched {
                Ok(()) if self.detect_zero && is_zero(&buf) => self.install_zero(dst, len),
                Ok(()) => self.install_copy(dst, &buf),
                Err(err) => {
                    if from_fault && !self.closing.load(Ordering::Acquire) {
                        self.fail_chunk(chunk, err.clone());
                    }
                    Err(err)
                }
            };
            self.return_buffer(buf);
            result?;
        }
        // Installed without waking: the bit is set before any faulting thread runs again, so
        // a later fault on this chunk can only mean a dropped page.
        self.installed.set(chunk);
        self.wake(dst, len);
        Ok(())
    }

    pub(super) fn wake(&self, start: u64, len: u64) {
        if let Err(err) = self.uffd.wake(start, len) {
            if !self.closing.load(Ordering::Acquire) {
                tracing::error!(%err, "UFFDIO_WAKE failed");
            }
        }
    }

    pub(super) fn installed_result(&self, chunk: u64) -> Result<(), Error> {
        if self.poisoned.get(chunk) {
            Err(Error::Remote(format!(
                "chunk {chunk} could not be fetched earlier and is poisoned"
            )))
        } else {
            Ok(())
        }
    }

    pub(super) async fn fetch(&self, chunk: u64, buf: &mut [u8]) -> Result<(), Error> {
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
    pub(super) fn fail_chunk(&self, chunk: u64, error: Error) {
        tracing::error!(chunk, %error, "fetching a faulted chunk failed; poisoning it (SIGBUS)");
        let (start, len) = self.chunk_span(chunk);
        if self.poison_supported {
            if let Err(err) = self.fill(start, len, |at, n| self.uffd.poison(at, n)) {
                tracing::error!(%err, chunk, "UFFDIO_POISON failed");
            }
        }
        self.poisoned.set(chunk);
        self.installed.set(chunk);
        self.poisoned_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock();
        if errors.len() == MAX_KEPT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(FaultError { chunk, error });
        drop(errors);
        self.error_count.send_modify(|n| *n += 1);
    }

    pub(super) fn install_copy(&self, dst: u64, buf: &[u8]) -> Result<(), Error> {
        let wp = self.tracking != TrackingMode::Off;
        self.fill(dst, buf.len() as u64, |at, n| {
            let from = (at - dst) as usize;
            self.uffd.copy(at, &buf[from..from + n as usize], wp, true)
        })
    }

    pub(super) fn install_zero(&self, dst: u64, len: u64) -> Result<(), Error> {
        self.zero_chunks.fetch_add(1, Ordering::Relaxed);
        self.fill_zero(dst, len);
        Ok(())
    }

    /// Zero pages over a range, not waking anybody. With sync tracking they are
    /// write-protected too, so a write faults; async tracking needs nothing (PAGEMAP_SCAN
    /// never reports zero-page mappings, and a write replaces them with a written page).
    /// Pages refilled through COPY are installed write-protected.
    pub(super) fn fill_zero(&self, dst: u64, len: u64) {
        let end = dst + len;
        let mut at = dst;
        let wp = self.tracking != TrackingMode::Off;
        while at < end {
            match self.uffd.zeropage(at, end - at, true) {
                Ok(_) => break,
                Err(FillError { errno, done }) => {
                    at += done;
                    match errno {
                        libc::EEXIST => {
                            // A real page, or the write-protect marker a discarded page leaves
                            // behind (which ZEROPAGE refuses but COPY fills).
                            match self.uffd.copy(at, &self.zero_page, wp, true) {
                                Ok(_) => {}
                                Err(FillError {
                                    errno: libc::EEXIST, ..
                                }) => {
                                    self.already_present.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => {
                                    self.log_fill_error(err, at);
                                    return;
                                }
                            }
                            at += self.page_size;
                        }
                        libc::EAGAIN => std::thread::yield_now(),
                        _ => {
                            self.log_fill_error(FillError { errno, done }, at);
                            return;
                        }
                    }
                }
            }
        }
        if self.tracking == TrackingMode::SyncWriteProtect {
            let _guard = self.wp_lock.lock();
            if let Err(err) = self.uffd.writeprotect(dst, len, true, false) {
                tracing::error!(%err, "write-protecting zero pages failed");
            }
        }
    }

    pub(super) fn log_fill_error(&self, err: FillError, at: u64) {
        if !self.closing.load(Ordering::Acquire) {
            tracing::error!(%err, at, "installing zero pages failed");
        }
    }

    /// Runs a fill ioctl over `len` bytes at `dst`, skipping pages that are already there
    /// (EEXIST: somebody else installed them) and retrying while the mapping changes (EAGAIN).
    pub(super) fn fill(
        &self,
        dst: u64,
        len: u64,
        op: impl Fn(u64, u64) -> Result<u64, FillError>,
    ) -> Result<(), Error> {
        let end = dst + len;
        let mut at = dst;
        while at < end {
            match op(at, end - at) {
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
                        libc::EAGAIN => std::thread::yield_now(),
                        libc::ENOENT | libc::ESRCH if self.closing.load(Ordering::Acquire) => {
                            return Err(Error::Closed)
                        }
                        libc::ENOENT | libc::ESRCH => {
                            return Err(Error::Io(Arc::new(io::Error::other(
                                "the region is no longer mapped",
                            ))))
                        }
                        _ => return Err(Error::from(io::Error::from_raw_os_error(errno))),
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.buffers.lock();
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0u8; len],
        }
    }

    pub(super) fn return_buffer(&self, buf: Vec<u8>) {
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
