//! A TCP proxy that delays every byte by half the round-trip time in each direction and can cap
//! the throughput per direction: WAN conditions on loopback, for tests and benchmarks on kernels
//! without `netem`.
//!
//! Each direction is a reader task that timestamps what it reads and a writer task that releases
//! it at `read time + rtt/2` (and no faster than the rate), so delay does not depend on how the
//! peer paces its writes. Bytes in flight per direction are bounded (backpressure on the reader).

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest piece read at once.
const PIECE: usize = 64 << 10;
/// Pieces in flight per direction (bounds memory to `PIECE * IN_FLIGHT`).
const IN_FLIGHT: usize = 1024;

/// What to emulate.
#[derive(Debug, Clone)]
pub struct DelayConfig {
    /// Round-trip time added (half in each direction).
    pub rtt: Duration,
    /// Maximum bytes per second in each direction; `None` for unlimited.
    pub rate: Option<u64>,
}

/// A listening proxy; dropping it stops accepting (open connections finish on their own).
pub struct DelayProxy {
    local_addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on `listen` and forwards every connection to `upstream` with the given delay.
    pub async fn start(listen: SocketAddr, upstream: String, config: DelayConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let accept_task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, peer)) => {
                        let (upstream, config) = (upstream.clone(), config.clone());
                        tokio::spawn(async move {
                            if let Err(err) = proxy_connection(client, &upstream, config).await {
                                tracing::warn!(%peer, %err, "delayed connection ended with an error");
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%err, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self {
            local_addr,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn proxy_connection(client: TcpStream, upstream: &str, config: DelayConfig) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await.map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot connect to upstream {upstream}: {err}"),
        )
    })?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let one_way = config.rtt / 2;
    let upward = tokio::spawn(delayed_copy(client_read, server_write, one_way, config.rate));
    let downward = tokio::spawn(delayed_copy(server_read, client_write, one_way, config.rate));
    let (up, down) = (upward.await?, downward.await?);
    up.and(down)
}

/// Copies `from` to `to`, releasing each piece `delay` after it was read, at most `rate` bytes/s.
async fn delayed_copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
    rate: Option<u64>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = tokio::spawn(async move {
        loop {
            let mut piece = vec![0u8; PIECE];
            let n = from.read(&mut piece).await?;
            if n == 0 {
                return Ok::<_, io::Error>(()); // EOF: dropping `tx` tells the writer
            }
            piece.truncate(n);
            if tx.send((Instant::now() + delay, piece)).await.is_err() {
                return Ok(()); // the writer stopped (peer gone)
            }
        }
    });
    let mut next_free = Instant::now();
    while let Some((due, piece)) = rx.recv().await {
        let mut release = due;
        if let Some(rate) = rate {
            release = release.max(next_free);
            next_free = release + Duration::from_secs_f64(piece.len() as f64 / rate as f64);
        }
        tokio::time::sleep_until(release).await;
        if let Err(err) = to.write_all(&piece).await {
            reader.abort();
            return Err(err);
        }
    }
    let _ = to.shutdown().await; // pass the half-close on
    reader.await?
}
