//! Write tracking: dirty chunks collected with PAGEMAP_SCAN (async write-protect) or from
//! write-protect faults (the sync fallback), and written back to the backend.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use r3map_core::Error;

use super::region::RegionHandle;
use super::state::Inner;
use super::{RegionError, TrackingMode};
use crate::uffd;

impl Inner {
    /// Sync write-protect: a write hit a protected chunk; record it and unprotect the chunk
    /// (which wakes the writer).
    pub(super) fn resolve_write_protect(self: &Arc<Self>, chunk: u64) {
        if self.unprotect(chunk) {
            return;
        }
        // The mapping is changing: an event this thread has yet to read holds the ioctl back,
        // so a task retries while the handler goes on reading.
        let inner = self.clone();
        self.runtime.spawn(async move {
            while !inner.unprotect(chunk) {
                tokio::task::yield_now().await;
            }
        });
    }

    /// Records a write to `chunk` and unprotects it (waking the writer); false on EAGAIN.
    fn unprotect(&self, chunk: u64) -> bool {
        let _guard = self.wp_lock.lock();
        self.sync_dirty.set(chunk);
        let (start, len) = self.chunk_span(chunk);
        match self.uffd.writeprotect(start, len, false, false) {
            Ok(()) => true,
            Err(err) if err.errno() == Some(libc::EAGAIN) => false,
            Err(err) => {
                if !self.closing.load(Ordering::Acquire) {
                    tracing::error!(%err, chunk, "un-write-protecting a chunk failed");
                }
                true
            }
        }
    }

    pub(super) fn take_dirty(&self) -> Result<Vec<u64>, RegionError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(RegionError::Closed);
        }
        let _scan = self.scan_lock.lock();
        if let Some((from, to, len)) = *self.remapped.lock() {
            return Err(RegionError::Remapped { from, to, len });
        }
        let mut dirty = Vec::new();
        match self.tracking {
            TrackingMode::Off => {
                return Err(RegionError::InvalidConfig(
                    "write tracking is off for this region".into(),
                ))
            }
            TrackingMode::AsyncWriteProtect => {
                let pagemap = self.pagemap.as_ref().expect("async tracking has a pagemap");
                let mut ranges = Vec::new();
                pagemap
                    .scan_written(self.base, self.base + self.map_len, true, &mut ranges)
                    .map_err(RegionError::io("PAGEMAP_SCAN"))?;
                for (start, end) in ranges {
                    dirty.extend(self.chunks_of_span(start, end));
                }
            }
            TrackingMode::SyncWriteProtect => {
                let _guard = self.wp_lock.lock();
                for chunk in self.sync_dirty.ones() {
                    // Protect before clearing: a write before this point is in this round,
                    // a write after it faults and lands in the next.
                    let (start, len) = self.chunk_span(chunk);
                    loop {
                        match self.uffd.writeprotect(start, len, true, false) {
                            // An event is queued; the handler reads it soon.
                            Err(err) if err.errno() == Some(libc::EAGAIN) => std::thread::yield_now(),
                            other => break other?,
                        }
                    }
                    self.sync_dirty.clear(chunk);
                    dirty.push(chunk);
                }
            }
        }
        dirty.extend(self.extra_dirty.take());
        dirty.sort_unstable();
        dirty.dedup();
        Ok(dirty)
    }
}

impl RegionHandle {
    /// Chunks written since the previous call (ascending), and re-arms tracking for them: a
    /// write that happens after a chunk is reported shows up in a later call. Includes chunks
    /// whose pages were discarded.
    pub fn take_dirty(&self) -> Result<Vec<u64>, RegionError> {
        self.inner.take_dirty()
    }

    /// Marks chunks dirty again (e.g. after a failed write-back). Chunks past the end are
    /// ignored.
    pub fn mark_dirty(&self, chunks: impl IntoIterator<Item = u64>) {
        let count = self.inner.layout.chunk_count();
        for chunk in chunks.into_iter().filter(|&c| c < count) {
            self.inner.extra_dirty.set(chunk);
        }
    }

    /// Writes every dirty chunk back to the backend; returns the chunks written. On failure,
    /// the chunks not written are marked dirty again.
    pub async fn push_dirty(&self) -> Result<Vec<u64>, Error> {
        let dirty = self.take_dirty().map_err(|e| match e {
            RegionError::Closed => Error::Closed,
            other => Error::Io(Arc::new(io::Error::other(other.to_string()))),
        })?;
        let inner = &self.inner;
        let mut buf = Vec::new();
        for (i, &chunk) in dirty.iter().enumerate() {
            let range = inner.layout.chunk_range(chunk);
            buf.resize((range.end - range.start) as usize, 0);
            let result = match uffd::read_process_memory(inner.pid, inner.base + range.start, &mut buf) {
                Ok(()) => inner.backend.write_at(range.start, &buf).await,
                Err(err) => Err(Error::from(err)),
            };
            if let Err(err) = result {
                self.mark_dirty(dirty[i..].iter().copied());
                return Err(err);
            }
        }
        Ok(dirty)
    }
}
