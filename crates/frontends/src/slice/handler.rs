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
            // Drain events even if the peer exited, then stop. Reading and recording happen
            // under the event gate (see `Inner::event_gate`).
            let gate = self.event_gate.write();
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
            drop(gate);
            if unmapped || ready.get(2).copied().unwrap_or(false) {
                self.closing.store(true, Ordering::Release);
                self.mark_peer_closed();
                return;
            }
        }
    }

    /// Handles one event; true when the region was unmapped. Never blocks on I/O or on a fill
    /// (a fill can need this thread to read an event first): those go to fetch tasks.
    fn handle_event(self: &Arc<Self>, event: uffd::Event) -> bool {
        match event {
            uffd::Event::Pagefault { address, wp, .. } => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = self.chunk_of_addr(address) else {
                    self.fault_outside(address);
                    return false;
                };
                let page = address & !(self.page_size - 1);
                if wp {
                    self.resolve_write_protect(chunk);
                } else if self.installed.get(chunk) {
                    let inner = self.clone();
                    self.runtime
                        .spawn(async move { inner.refill_dropped_page(chunk, page).await });
                } else if !self.fault_pending.set(chunk) {
                    let inner = self.clone();
                    let started = std::time::Instant::now();
                    self.runtime
                        .spawn(async move { inner.serve_fault(chunk, started).await });
                }
                false
            }
            uffd::Event::Remove { start, end } => {
                for chunk in self.chunks_of_span(start, end) {
                    let (cstart, clen) = self.chunk_span(chunk);
                    if !self.installed.get(chunk) {
                        // Dropped before it was installed: these pages must read as zeros,
                        // whatever the backend holds (an install in flight consults this).
                        let lo = start.max(cstart);
                        let hi = end.min(cstart + clen);
                        for page in self.pages_of(lo, hi - lo) {
                            self.discarded.set(page);
                        }
                        if lo == cstart && hi == cstart + clen {
                            self.known_zero.set(chunk);
                        }
                    }
                    if self.tracking != TrackingMode::Off {
                        self.extra_dirty.set(chunk);
                    }
                }
                false
            }
            uffd::Event::Unmap { start, end } => start <= self.base && self.base + self.map_len <= end,
            uffd::Event::Remap { from, to, len } => {
                self.moved(from, to, len);
                false
            }
            uffd::Event::Fork { uffd } => {
                self.forked(uffd);
                false
            }
            uffd::Event::Unknown(_) => {
                tracing::warn!(?event, "unknown userfaultfd event ignored");
                false
            }
        }
    }

    /// The process moved part of the range (mremap). The moved pages keep their bytes, but the
    /// region can neither fetch into nor track the new place: faults there raise SIGBUS (where
    /// poison exists; else they stay blocked) and `take_dirty` fails from now on, so that
    /// nobody takes the missing writes for none.
    fn moved(&self, from: u64, to: u64, len: u64) {
        if from + len <= self.base || from >= self.base + self.map_len {
            return;
        }
        tracing::error!(
            from = format_args!("{from:#x}"),
            to = format_args!("{to:#x}"),
            len,
            "the process moved part of the served range with mremap; its never-fetched pages \
             there raise SIGBUS and its writes can no longer be tracked"
        );
        self.remapped.lock().get_or_insert((from, to, len));
    }

    /// A fault outside the range: only a part moved away by mremap can cause one.
    fn fault_outside(self: &Arc<Self>, address: u64) {
        let page = address & !(self.page_size - 1);
        let moved = self
            .remapped
            .lock()
            .is_some_and(|(_, to, len)| (to..to + len.max(self.map_len)).contains(&page));
        if !moved {
            tracing::warn!(address, "fault outside the region");
        }
        if self.poison_supported {
            let inner = self.clone();
            self.runtime.spawn(async move { inner.poison_page(page).await });
        } else {
            tracing::error!(
                address,
                "no UFFDIO_POISON: the thread faulting outside the region stays blocked"
            );
        }
    }

    /// The process forked. The child's copy of the range shares the installed pages but not
    /// this region: nobody fetches or tracks for it. So its never-fetched pages are poisoned
    /// (SIGBUS in the child instead of zeros) and its userfaultfd is closed; where poison is
    /// missing, the fd is kept open so those faults block instead.
    fn forked(&self, child: std::os::fd::OwnedFd) {
        let child = match uffd::Uffd::from_owned_fd(child) {
            Ok(child) => child,
            Err(err) => {
                tracing::error!(%err, "cannot use the forked child's userfaultfd");
                return;
            }
        };
        if !self.poison_supported {
            tracing::error!(
                "the process forked: its child's copy of the region is not served; without \
                 UFFDIO_POISON its never-fetched pages block until r3map stops serving"
            );
            self.child_uffds.lock().push(child.into());
            return;
        }
        // A child that changes its mapping queues events on its own fd; read them so a poison
        // that the change made wait (EAGAIN) can go on.
        let mut drained = Vec::new();
        match self.poison_unfetched(&child, || {
            drained.clear();
            let _ = child.read_events(&mut drained);
            std::thread::yield_now();
        }) {
            Ok(chunks) => tracing::warn!(
                chunks,
                "the process forked: its child's copy of the region is not served; its \
                 never-fetched chunks raise SIGBUS there, and its writes are not tracked"
            ),
            Err(err) => tracing::error!(%err, "poisoning the forked child's never-fetched pages failed"),
        }
    }
}
