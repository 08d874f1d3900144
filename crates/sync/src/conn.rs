//! A framed connection: one buffer in, one out, a deadline on every read and write, and byte
//! counters taken below TLS (what crosses the socket).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::delta::DeltaError;
use crate::wire::{Message, WireError, MAX_FRAME};

/// Anything a connection can run over (TCP, TLS over TCP, an in-memory pipe).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A boxed stream.
pub type Stream = Box<dyn AsyncStream>;

/// Bytes read from and written to sockets, shared by all connections that count into it, and
/// what those bytes achieved (versions and blocks; counted by receivers and advertisers).
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Versions published (receiver), or confirmed published by a receiver (advertiser).
    pub versions: AtomicU64,
    /// Changed blocks received (receiver) or sent in versions a receiver published (advertiser).
    pub blocks: AtomicU64,
}

impl Counters {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn versions(&self) -> u64 {
        self.versions.load(Ordering::Relaxed)
    }
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }
}

/// A stream that adds what passes through it to [`Counters`].
pub struct Counting<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S> Counting<S> {
    pub fn new(inner: S, counters: Arc<Counters>) -> Self {
        Self { inner, counters }
    }
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a conversation with a peer ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent nothing for {0:?} (deadline)")]
    Timeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error("malformed frame from the peer: {0}")]
    Wire(#[from] WireError),
    #[error("the peer broke the protocol: {0}")]
    Protocol(#[from] DeltaError),
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// One framed connection.
pub struct Conn {
    stream: Stream,
    input: BytesMut,
    output: BytesMut,
    timeout: Duration,
    max_frame: usize,
}

impl Conn {
    /// `timeout` bounds every read and every flush.
    pub fn new(stream: Stream, timeout: Duration) -> Self {
        Self {
            stream,
            input: BytesMut::with_capacity(64 * 1024),
            output: BytesMut::with_capacity(64 * 1024),
            timeout,
            max_frame: MAX_FRAME,
        }
    }

    /// Lowers the largest frame accepted (a hub reading only `Hello` needs little).
    pub fn with_max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The next message, waiting at most the deadline for each piece of it. A `Refused` from
    /// the peer becomes [`ConnError::Refused`].
    pub async fn recv(&mut self) -> Result<Message, ConnError> {
        loop {
            if let Some(message) = Message::decode(&mut self.input, self.max_frame)? {
                if let Message::Refused { reason } = message {
                    return Err(ConnError::Refused(reason));
                }
                return Ok(message);
            }
            let read = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.input)).await;
            match read {
                Err(_) => return Err(ConnError::Timeout(self.timeout)),
                Ok(Ok(0)) => return Err(ConnError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(err.into()),
            }
        }
    }

    /// Like [`Conn::recv`], skipping keep-alives.
    pub async fn recv_skip_idle(&mut self) -> Result<Message, ConnError> {
        loop {
            match self.recv().await? {
                Message::Idle => continue,
                message => return Ok(message),
            }
        }
    }

    /// Adds a message to the output buffer.
    pub fn queue(&mut self, message: &Message) {
        message.encode(&mut self.output);
    }

    /// Writes the output buffer out, within the deadline.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Err(_) => Err(ConnError::Timeout(self.timeout)),
            Ok(result) => {
                self.output.clear();
                Ok(result?)
            }
        }
    }

    /// Queues and flushes one message.
    pub async fn send(&mut self, message: &Message) -> Result<(), ConnError> {
        self.queue(message);
        self.flush().await
    }

    /// Bytes queued but not flushed.
    pub fn queued(&self) -> usize {
        self.output.len()
    }

    /// Tells the peer why it is refused (best effort) and closes.
    pub async fn refuse(mut self, reason: &str) {
        let reason: String = reason.chars().take(crate::wire::MAX_REASON / 4).collect();
        let _ = self.send(&Message::Refused { reason }).await;
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
    }

    /// The stream and any bytes read past the last message (for the hub's relay).
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.stream, self.input)
    }
}
