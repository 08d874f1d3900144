//! Ordering of writes across connections, so a client that gave up a connection can reconnect
//! without a write of the old connection landing after newer ones (ARCHITECTURE.md, "Ordering
//! across reconnects"):
//!
//! - [`WriteBarrier`]: a FLUSH waits until every write the server took before it, on any
//!   connection, has finished. A client that flushes a new connection before its first write
//!   thereby waits out the writes of its old connections that were already running.
//! - [`PeerProbe`]: a write read from a connection whose peer has already closed it is not
//!   started. The client gave up that connection before it made the new one, so a write of
//!   the old connection that is not running when the new connection's FLUSH arrives never runs.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Writes (WRITE, TRIM, WRITE_ZEROES) running on any connection of the server.
#[derive(Default)]
pub(super) struct WriteBarrier {
    state: Mutex<Running>,
    finished: Notify,
}

#[derive(Default)]
struct Running {
    next: u64,
    writes: BTreeSet<u64>,
}

/// One running write; dropping it ends it.
pub(super) struct WriteTicket {
    barrier: Arc<WriteBarrier>,
    number: u64,
}

impl WriteBarrier {
    /// Registers a write that is about to start.
    pub(super) fn begin(self: &Arc<Self>) -> WriteTicket {
        let mut state = self.state.lock();
        let number = state.next;
        state.next += 1;
        state.writes.insert(number);
        WriteTicket {
            barrier: self.clone(),
            number,
        }
    }

    /// Waits until every write registered before this call has ended.
    pub(super) async fn wait_for_earlier(&self) {
        let horizon = self.state.lock().next;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self
                .state
                .lock()
                .writes
                .first()
                .is_none_or(|&oldest| oldest >= horizon)
            {
                return;
            }
            finished.await;
        }
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.barrier.state.lock().writes.remove(&self.number);
        self.barrier.finished.notify_waiters();
    }
}

/// Tells whether the client has closed (or reset) its end of a socket, without reading it:
/// data it sent before closing may still wait unread in the socket.
pub(super) struct PeerProbe(OwnedFd);

impl PeerProbe {
    /// A probe of `socket` (a second handle on the same socket).
    pub(super) fn new(socket: &impl AsFd) -> std::io::Result<Self> {
        Ok(Self(socket.as_fd().try_clone_to_owned()?))
    }

    /// Whether the peer has closed or reset the connection.
    pub(super) fn peer_gone(&self) -> bool {
        // nix does not name POLLRDHUP (set when the peer's FIN arrived, before it is read).
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let mut fds = [PollFd::new(self.0.as_fd(), rdhup)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|events| events.intersects(rdhup | PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }
}
