//! The fault-handler thread: reads userfaultfd events and hands missing chunks to fetch tasks.
//! It never does I/O itself, so a slow backend cannot stall the events of other chunks.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::state::Inner;
use super::{RegionError, TrackingMode};
use crate::uffd::{self, EventFd};

/// The handler thread and the eventfd that stops it.
pub(super) struct Handler {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Handler {
    pub(super) fn start(inner: Arc<Inner>, pidfd: Option<OwnedFd>) -> Result<Self, RegionError> {
        let stop = Arc::new(EventFd::new().map_err(RegionError::io("creating an eventfd"))?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("r3map-uffd".into())
            .spawn(move || inner.handler_loop(&thread_stop, pidfd))
            .map_err(RegionError::io("spawning the userfaultfd handler thread"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub(super) fn stop(&mut self) {
        if let Err(err) = self.stop.signal() {
            tracing::error!(%err, "cannot signal the userfaultfd handler to stop");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the userfaultfd handler thread panicked");
            }
        }
    }
}

impl Inner {
    fn handler_loop(self: &Arc<Self>, stop: &EventFd, pidfd: Option<OwnedFd>) {
        let mut events = Vec::new();
        loop {
            let mut fds = vec![self.uffd.as_fd(), stop.as_fd()];
            if let Some(pidfd) = &pidfd {
                fds.push(pidfd.as_fd());
            }
            let ready = match uffd::poll_readable(&fds, None) {
                Ok(ready) => ready,
                Err(err) => {
                    tracing::error!(%err, "poll on the userfaultfd failed; handler stops");
                    return;
                }
            };
            if ready[1] {
                return;
            }
            // Drain events even if the peer exited, then stop.
            events.clear();
            if let Err(err) = self.uffd.read_events(&mut events) {
                tracing::error!(%err, "reading userfaultfd events failed; handler stops");
                self.mark_peer_closed();
                return;
            }
            let mut unmapped = false;
            for event in events.drain(..) {
                unmapped |= self.handle_event(event);
            }
            if unmapped || ready.get(2).copied().unwrap_or(false) {
                self.closing.store(true, Ordering::Release);
                self.mark_peer_closed();
                return;
            }
        }
    }

    /// Handles one event; true when the region was unmapped.
    fn handle_event(self: &Arc<Self>, event: uffd::Event) -> bool {
        match event {
            uffd::Event::Pagefault { address, wp, .. } => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = self.chunk_of_addr(address) else {
                    tracing::warn!(address, "fault outside the region");
                    return false;
                };
                if wp {
                    self.resolve_write_protect(chunk);
                } else if self.installed.get(chunk) {
                    // The chunk was installed and this page dropped since (MADV_DONTNEED):
                    // like ordinary memory, it reads as zeros now.
                    let page = address & !(self.page_size - 1);
                    self.fill_zero(page, self.page_size);
                    self.wake(page, self.page_size);
                } else if !self.fault_pending.set(chunk) {
                    let inner = self.clone();
                    self.runtime.spawn(async move { inner.serve_fault(chunk).await });
                }
                false
            }
            uffd::Event::Remove { start, end } => {
                for chunk in self.chunks_of_span(start, end) {
                    let (cstart, clen) = self.chunk_span(chunk);
                    if start <= cstart && cstart + clen <= end && !self.installed.get(chunk) {
                        // Dropped before it was ever installed: it must read as zeros.
                        self.known_zero.set(chunk);
                    }
                    if self.tracking != TrackingMode::Off {
                        self.extra_dirty.set(chunk);
                    }
                }
                false
            }
            uffd::Event::Unmap { start, end } => start <= self.base && self.base + self.map_len <= end,
            uffd::Event::Remap { .. } | uffd::Event::Fork { .. } | uffd::Event::Unknown(_) => {
                tracing::warn!(?event, "unexpected userfaultfd event ignored");
                false
            }
        }
    }

    async fn serve_fault(self: Arc<Self>, chunk: u64) {
        let result = self.ensure(chunk, true).await;
        self.fault_pending.clear(chunk);
        if let Err(err) = result {
            if !self.closing.load(Ordering::Acquire) {
                tracing::debug!(chunk, %err, "fault not served");
            }
        }
    }
}
