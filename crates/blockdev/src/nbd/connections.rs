//! The connections the kernel gets. The kernel only speaks the transmission phase, with simple
//! replies and compact requests, so each socket is negotiated here first, with the r3map-nbd
//! client's handshake (`NBD_OPT_GO` with its checks of every reply and advertised limit,
//! falling back to `NBD_OPT_EXPORT_NAME`; neither structured replies nor extended headers),
//! and then handed over as a blocking socket.
//!
//! Several connections are opened only when the server advertises `NBD_FLAG_CAN_MULTI_CONN`.
//! Without it the protocol says clients SHOULD NOT spread requests over connections: the
//! server's caches need not be shared, so a flush on one connection need not cover writes
//! that went over another.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use r3map_nbd::server::AsyncStream;
use r3map_nbd::wire::transmission_flags;
use r3map_nbd::Client;

use super::NbdError;

/// How long the handshake of one connection may take.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    /// Transmission flags (0 when the server did not set `NBD_FLAG_HAS_FLAGS`).
    pub transmission_flags: u16,
}

/// Negotiates `export` on `stream` and returns a blocking duplicate of its socket, positioned
/// at the start of the transmission phase.
async fn negotiate<S: AsyncStream + AsFd + 'static>(
    stream: S,
    export: &str,
) -> Result<(OwnedFd, Negotiated), r3map_nbd::ClientError> {
    // The handshake consumes the async stream; the kernel gets a second descriptor of the
    // same socket, which stays open when the stream is dropped.
    let kernel = stream.as_fd().try_clone_to_owned()?;
    let info = Client::negotiate_simple(stream, export, HANDSHAKE_TIMEOUT).await?;
    // O_NONBLOCK belongs to the socket, not the descriptor: clear what Tokio set (FIONBIO
    // works on any socket, TCP or UNIX).
    let socket = UnixStream::from(kernel);
    socket.set_nonblocking(false)?;
    Ok((
        socket.into(),
        Negotiated {
            size: info.size,
            transmission_flags: info.flags,
        },
    ))
}

/// Opens and negotiates up to `wanted` connections with `open`: one unless the first
/// handshake shows `NBD_FLAG_CAN_MULTI_CONN`. Every further connection must describe the same
/// export.
pub(super) async fn open_connections<S, F, Fut>(
    wanted: usize,
    export: &str,
    mut open: F,
) -> Result<(Vec<OwnedFd>, Negotiated), NbdError>
where
    S: AsyncStream + AsFd + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, NbdError>>,
{
    let handshake = |connection| move |source| NbdError::Handshake { connection, source };
    let (socket, negotiated) = negotiate(open().await?, export).await.map_err(handshake(0))?;
    let count = if negotiated.transmission_flags & transmission_flags::CAN_MULTI_CONN != 0 {
        wanted
    } else {
        if wanted > 1 {
            tracing::info!(
                wanted,
                "the NBD server does not advertise NBD_FLAG_CAN_MULTI_CONN: using one connection"
            );
        }
        1
    };
    let mut sockets = Vec::with_capacity(count);
    sockets.push(socket);
    for connection in 1..count {
        let (socket, again) = negotiate(open().await?, export)
            .await
            .map_err(handshake(connection))?;
        if again != negotiated {
            return Err(NbdError::Inconsistent {
                connection,
                first: negotiated,
                again,
            });
        }
        sockets.push(socket);
    }
    Ok((sockets, negotiated))
}

/// Connects to `addr` (`host:port`) over TCP, within the handshake deadline.
pub(super) async fn connect_tcp(addr: &str) -> Result<tokio::net::TcpStream, NbdError> {
    let failed = |source| NbdError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| failed(io::ErrorKind::TimedOut.into()))?
        .map_err(failed)?;
    stream.set_nodelay(true).map_err(super::kernel("TCP_NODELAY"))?;
    Ok(stream)
}
