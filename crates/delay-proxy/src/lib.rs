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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    downstream: Arc<AtomicU64>,
}

impl DelayProxy {
    /// Listens on `listen` and forwards every connection to `upstream` with the given delay.
    pub async fn start(listen: SocketAddr, upstream: String, config: DelayConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let downstream = Arc::new(AtomicU64::new(0));
        let counter = downstream.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, peer)) => {
                        let (upstream, config, counter) = (upstream.clone(), config.clone(), counter.clone());
                        tokio::spawn(async move {
                            if let Err(err) = proxy_connection(client, &upstream, config, counter).await {
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
            downstream,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Bytes released from the upstream to clients so far, over all connections (what a client
    /// of a server behind the proxy has fetched, protocol overhead included).
    pub fn bytes_downstream(&self) -> u64 {
        self.downstream.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn proxy_connection(
    client: TcpStream,
    upstream: &str,
    config: DelayConfig,
    downstream: Arc<AtomicU64>,
) -> io::Result<()> {
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
    let upward = tokio::spawn(delayed_copy(
        client_read,
        server_write,
        one_way,
        config.rate,
        None,
    ));
    let downward = tokio::spawn(delayed_copy(
        server_read,
        client_write,
        one_way,
        config.rate,
        Some(downstream),
    ));
    let (up, down) = (upward.await?, downward.await?);
    up.and(down)
}

/// Copies `from` to `to`, releasing each piece `delay` after it was read, at most `rate` bytes/s;
/// adds what it releases to `delivered`.
async fn delayed_copy<R, W>(
    mut from: R,
    mut to: W,
    delay: Duration,
    rate: Option<u64>,
    delivered: Option<Arc<AtomicU64>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
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
        // Counted before the write, so a client that has read a byte finds it counted.
        if let Some(delivered) = &delivered {
            delivered.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        if let Err(err) = to.write_all(&piece).await {
            reader.abort();
            return Err(err);
        }
    }
    let _ = to.shutdown().await; // pass the half-close on
    reader.await?
}

#[cfg(test)]
mod tests {
    //! The timing rules on Tokio's paused clock over in-memory pipes: exact, whatever the load on
    //! the machine (the TCP tests in tests/ check real sockets, without upper time bounds).

    use super::*;

    /// Runs `data` through one delayed direction; returns what came out and the (virtual) time
    /// from the first write to the last byte out.
    async fn through(data: Vec<u8>, delay: Duration, rate: Option<u64>) -> (Vec<u8>, Duration) {
        let (mut client, proxy_in) = tokio::io::duplex(1 << 20);
        let (proxy_out, mut server) = tokio::io::duplex(1 << 20);
        let copy = tokio::spawn(delayed_copy(proxy_in, proxy_out, delay, rate, None));
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        let elapsed = started.elapsed();
        drop(writer.await.unwrap());
        copy.await.unwrap().unwrap();
        (out, elapsed)
    }

    #[tokio::test(start_paused = true)]
    async fn a_piece_arrives_exactly_the_delay_later() {
        let (out, elapsed) = through(b"ping".to_vec(), Duration::from_millis(30), None).await;
        assert_eq!(out, b"ping");
        assert_eq!(elapsed, Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn many_pieces_pay_the_delay_once_not_once_each() {
        // 128 pieces and more: pipelined, the last byte is out one delay after the first write.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
        let (out, elapsed) = through(data.clone(), Duration::from_millis(30), None).await;
        assert!(out == data, "the data changed on the way");
        assert_eq!(elapsed, Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_spaces_the_pieces() {
        // 2 MiB at 4 MiB/s: piece k leaves k piece-times after the first, so the last byte is
        // out half a second (less the last piece's own share) after the first write.
        let data = vec![7u8; 2 << 20];
        let (out, elapsed) = through(data, Duration::ZERO, Some(4 << 20)).await;
        assert_eq!(out.len(), 2 << 20);
        let pieces = out.len().div_ceil(PIECE) as u32;
        let per_piece = Duration::from_secs_f64(PIECE as f64 / (4u64 << 20) as f64);
        assert!(
            elapsed >= per_piece * (pieces - 1) && elapsed <= per_piece * pieces,
            "{elapsed:?} for {pieces} pieces of {per_piece:?}"
        );
    }
}
