//! Ordering of writes across connections, so a client that gave up a connection can reconnect
//! without a write of the old connection landing after newer ones (ARCHITECTURE.md, "Ordering
//! across reconnects"):
//!
//! - [`WriteBarrier`]: a FLUSH waits until every write the server took before it, on any
//!   connection, has finished. A client that flushes a new connection before its first write
//!   thereby waits out the writes of its old connections that were already running.
//! - [`PeerProbe`]: a write read from a connection whose peer has already reset it is not
//!   started. The client gave up that connection (with a reset) before it made the new one, so
//!   a write of the old connection that is not running when the new connection's FLUSH
//!   arrives never runs.

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

/// Tells whether the client has reset (or fully closed) its end of a socket, without reading
/// it: data it sent before that may still wait unread in the socket.
pub(super) struct PeerProbe(OwnedFd);

impl PeerProbe {
    /// A probe of `socket` (a second handle on the same socket).
    pub(super) fn new(socket: &impl AsFd) -> std::io::Result<Self> {
        Ok(Self(socket.as_fd().try_clone_to_owned()?))
    }

    /// Whether the peer has reset the connection (or closed it with replies unread, which the
    /// kernel also turns into a reset). An orderly half-close (FIN, POLLRDHUP alone) does not
    /// count: a client may send writes, NBD_CMD_DISC and shut its write side, and the spec
    /// requires those writes to be handled. The reconnect stage gives connections up with a
    /// reset (SO_LINGER 0), which is what this must see.
    pub(super) fn peer_gone(&self) -> bool {
        // POLLERR and POLLHUP are reported whatever is asked for.
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|events| events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use super::PeerProbe;

    /// A connected loopback pair: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Polls until `probe` says the peer is gone, for at most a minute (a reset on loopback
    /// arrives at once; the bound only keeps a broken probe from hanging the test).
    fn becomes_gone(probe: &PeerProbe) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if probe.peer_gone() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn a_reset_counts_as_gone_even_with_data_unread() {
        let (mut client, server) = pair();
        let probe = PeerProbe::new(&server).unwrap();
        assert!(!probe.peer_gone(), "an open connection");
        client.write_all(&[1; 4096]).unwrap();
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        assert!(becomes_gone(&probe), "a reset was never seen");
    }

    #[test]
    fn an_orderly_half_close_does_not_count_as_gone() {
        let (mut client, server) = pair();
        let probe = PeerProbe::new(&server).unwrap();
        client.write_all(&[1; 4096]).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        // The FIN is on the server's socket once a read sees the end of the data.
        let mut reader = server.try_clone().unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
        assert_eq!(data.len(), 4096);
        assert!(!probe.peer_gone(), "a half-close taken for a reset");
    }
}
