//! An async NBD client that implements [`r3map_core::Backend`].
//!
//! After the handshake ([`negotiate`]), a writer task sends requests and a reader task matches
//! replies to pending requests by handle ([`replies`]), so any number of callers can keep
//! requests in flight on one connection. When the connection fails, breaks the protocol or a
//! request outlives [`ClientOptions::request_timeout`], every pending request and every later
//! one gets an error and the connection is closed; nothing waits forever. Reconnecting is the
//! job of the core `Reconnecting` stage, not of this client.

mod extents;
mod negotiate;
mod replies;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use r3map_core::{check_range, Backend, Error, Extent, Result};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::codec::{self, CodecError, Framing, StatusDescriptor};
use crate::server::AsyncStream;
use crate::tls::{ClientTls, TlsError};
use crate::uri::{NbdUri, UriError};
use crate::wire::{self, cmd, cmd_flags, transmission_flags};
use negotiate::Negotiation;
use replies::{Coverage, Outgoing, Pending, Reply, Shared};

type BoxStream = Box<dyn AsyncStream>;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TLS settings; required for `nbds://` URIs.
    pub tls: Option<ClientTls>,
    /// Ask for structured replies (recommended: read errors then carry messages).
    pub structured_replies: bool,
    /// Ask for extended headers first (64-bit lengths: trims, zeroes and block status over
    /// more than 4 GiB in one request), falling back to structured replies on servers without
    /// them. Only with `structured_replies`.
    pub extended_headers: bool,
    /// Requests that may be in flight on the connection at once.
    pub max_in_flight: usize,
    /// Time allowed for connecting and the handshake.
    pub connect_timeout: Duration,
    /// Time a sent request may wait for its reply. When one waits longer, the server (or the
    /// link) is taken as frozen: every pending request fails and the connection is closed.
    /// `None` waits forever (TCP keepalive still notices a vanished peer).
    pub request_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: None,
            structured_replies: true,
            extended_headers: true,
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    /// Transmission flags (`wire::transmission_flags`); 0 when the server did not set
    /// `NBD_FLAG_HAS_FLAGS`.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// Largest payload the client sends or asks for in one request.
    pub max_payload: u32,
    /// Whether structured replies (or extended headers, which imply them) were negotiated.
    pub structured_replies: bool,
    /// Whether extended headers were negotiated.
    pub extended_headers: bool,
    /// Context id of `base:allocation`, if the server offers it for this export.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & transmission_flags::READ_ONLY != 0
    }
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("cannot connect to NBD server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("I/O error during the NBD handshake: {}", r3map_tls::describe_handshake_error(.0))]
    Io(#[from] std::io::Error),
    #[error("the NBD server broke the protocol: {0}")]
    Codec(#[from] CodecError),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the server does not speak fixed newstyle NBD (too old or not an NBD server)")]
    NotFixedNewstyle,
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("the URI asks for TLS (nbds://) but no TLS settings (CA certificate) were given")]
    TlsNotConfigured,
    #[error("TLS handshake with the NBD server failed: {}", r3map_tls::describe_handshake_error(.0))]
    TlsHandshake(std::io::Error),
    #[error("the NBD server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        option: &'static str,
        reply: &'static str,
        message: String,
    },
}

/// A connected NBD export, usable as an r3map [`Backend`].
pub struct Client {
    info: ExportInfo,
    shared: Arc<Shared>,
    requests: mpsc::Sender<Outgoing>,
    slots: Semaphore,
    next_handle: AtomicU64,
    request_timeout: Option<Duration>,
    /// The TCP socket, for [`Backend::abort_connection`].
    socket: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

async fn start(uri: &NbdUri, options: &ClientOptions) -> Result<(Negotiation, Option<OwnedFd>), ClientError> {
    let tls = match (uri.tls, &options.tls) {
        (true, None) => return Err(ClientError::TlsNotConfigured),
        (true, Some(tls)) => Some((tls, uri.host())),
        (false, _) => None,
    };
    let (io, socket) = negotiate::open_transport(uri).await?;
    Ok((Negotiation::start(io, tls).await?, socket))
}

impl Client {
    /// Connects to the export named by an NBD URI.
    pub async fn connect(uri: &str, options: ClientOptions) -> Result<Self, ClientError> {
        Self::connect_uri(&NbdUri::parse(uri)?, options).await
    }

    /// Connects to the export named by a parsed NBD URI.
    pub async fn connect_uri(uri: &NbdUri, options: ClientOptions) -> Result<Self, ClientError> {
        let timeout = options.connect_timeout;
        let connecting = async {
            let (negotiation, socket) = start(uri, &options).await?;
            Self::handshake(negotiation, &uri.export, &options, socket).await
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout(uri.to_string()))?
    }

    /// Runs the handshake for `export` over an already connected stream (no TLS): for
    /// transports this crate does not open itself, and for tests that script the server.
    pub async fn connect_stream<S: AsyncStream + 'static>(
        stream: S,
        export: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let timeout = options.connect_timeout;
        let connecting = async {
            let negotiation = Negotiation::start(Box::new(stream), None).await?;
            Self::handshake(negotiation, export, &options, None).await
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout(format!("export {export:?} over a stream")))?
    }

    /// Runs only the handshake for `export` over `stream`, agreeing on what the Linux kernel's
    /// NBD client speaks in the transmission phase: compact requests and simple replies (no
    /// structured replies, extended headers or metadata contexts are asked for). For callers
    /// that hand the connection to such a peer. The replies get the same checks as with
    /// [`connect_stream`](Self::connect_stream); a server that sends anything after the
    /// handshake is refused (the peer would take it for a reply).
    pub async fn negotiate_simple<S: AsyncStream + 'static>(
        stream: S,
        export: &str,
        timeout: Duration,
    ) -> Result<ExportInfo, ClientError> {
        let negotiating = async {
            let mut negotiation = Negotiation::start(Box::new(stream), None).await?;
            let info = negotiation.go(export, Framing::Simple).await?;
            let (_, rest) = negotiation.into_parts();
            if !rest.is_empty() {
                return Err(ClientError::Protocol(format!(
                    "{} bytes after the end of the handshake",
                    rest.len()
                )));
            }
            Ok(info)
        };
        tokio::time::timeout(timeout, negotiating)
            .await
            .map_err(|_| ClientError::Timeout(format!("export {export:?} over a stream")))?
    }

    async fn handshake(
        mut negotiation: Negotiation,
        export: &str,
        options: &ClientOptions,
        socket: Option<OwnedFd>,
    ) -> Result<Self, ClientError> {
        let framing = if !options.structured_replies {
            Framing::Simple
        } else if options.extended_headers && negotiation.extended_headers().await? {
            Framing::Extended
        } else if negotiation.structured_replies().await? {
            Framing::Structured
        } else {
            Framing::Simple
        };
        let base_allocation = if framing.chunked() {
            negotiation.base_allocation(export).await?
        } else {
            None
        };
        let mut info = negotiation.go(export, framing).await?;
        info.base_allocation = base_allocation;
        let (io, buf) = negotiation.into_parts();
        let (reader, writer) = tokio::io::split(io);
        let shared = Arc::new(Shared::new(framing, info.size));
        let max_in_flight = options.max_in_flight.max(1);
        let (requests, outgoing) = mpsc::channel(max_in_flight);
        tokio::spawn(replies::write_requests(writer, outgoing, shared.clone()));
        tokio::spawn(replies::read_replies(reader, buf, shared.clone()));
        Ok(Self {
            info,
            shared,
            requests,
            slots: Semaphore::new(max_in_flight),
            next_handle: AtomicU64::new(1),
            request_timeout: options.request_timeout,
            socket: Mutex::new(socket),
        })
    }

    /// Lists the exports of the server a URI points at (the export part is ignored).
    pub async fn list_exports(
        uri: &str,
        options: ClientOptions,
    ) -> Result<Vec<(String, String)>, ClientError> {
        let uri = NbdUri::parse(uri)?;
        let timeout = options.connect_timeout;
        tokio::time::timeout(timeout, async {
            let (mut negotiation, _) = start(&uri, &options).await?;
            let exports = negotiation.list().await?;
            negotiation.abort().await;
            Ok(exports)
        })
        .await
        .map_err(|_| ClientError::Timeout(uri.to_string()))?
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Sends one request and waits for its reply (a read's data for reads, the descriptors for
    /// block status). `length` fits 32 bits unless extended headers are in use.
    async fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
    ) -> Result<Reply> {
        let _slot = self.slots.acquire().await.map_err(|_| Error::Closed)?;
        // Reserve channel space first: everything after it is synchronous, so a cancelled
        // caller never leaves a request registered but unsent.
        let permit = match self.requests.reserve().await {
            Ok(permit) => permit,
            Err(_) => return Err(self.closed_error().await),
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (done, result) = oneshot::channel();
        {
            let mut table = self.shared.table.lock();
            if let Some(err) = &table.closed {
                return Err(err.clone());
            }
            let data = if command == cmd::READ {
                vec![0u8; length as usize]
            } else {
                Vec::new()
            };
            table.pending.insert(
                handle,
                Pending {
                    command,
                    offset,
                    length,
                    data,
                    status: Vec::new(),
                    context: self.info.base_allocation.unwrap_or(0),
                    coverage: Coverage::default(),
                    chunked: false,
                    error: None,
                    done,
                },
            );
        }
        let mut head = BytesMut::with_capacity(wire::EXTENDED_HEADER_LEN);
        if self.info.extended_headers {
            // With extended headers a payload is announced by a flag, not by the command.
            let flags = if payload.is_some() {
                flags | cmd_flags::PAYLOAD_LEN
            } else {
                flags
            };
            codec::encode_extended_request(&mut head, flags, command, handle, offset, length);
        } else {
            debug_assert!(length <= u64::from(u32::MAX), "split by the callers");
            codec::encode_request(&mut head, flags, command, handle, offset, length as u32);
        }
        permit.send(Outgoing { head, payload });
        let reply = match self.request_timeout {
            None => result.await,
            Some(limit) => match tokio::time::timeout(limit, result).await {
                Ok(reply) => reply,
                Err(_) => {
                    // A frozen server's connection cannot be trusted any more.
                    self.shared.close(Error::Timeout(limit));
                    return Err(Error::Timeout(limit));
                }
            },
        };
        match reply {
            Ok(result) => result,
            Err(_) => Err(self.closed_error().await),
        }
    }

    /// The error the connection was closed with (the tasks record it right after they stop).
    async fn closed_error(&self) -> Error {
        self.shared.closed().await;
        self.shared
            .table
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| replies::connection_lost("the connection tasks stopped"))
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        check_range(offset, len, self.info.size)?;
        if write && self.info.read_only() {
            return Err(Error::ReadOnly);
        }
        let min = u64::from(self.info.min_block);
        if min > 1 && (!offset.is_multiple_of(min) || !len.is_multiple_of(min)) {
            return Err(Error::Unaligned {
                offset,
                len,
                alignment: min,
            });
        }
        Ok(())
    }

    /// Pieces of at most the negotiated payload (already a multiple of the minimum block).
    fn piece_len(&self) -> usize {
        self.info.max_payload as usize
    }

    /// Asks the server to prefetch a range (`NBD_CMD_CACHE`), if it supports that.
    pub async fn cache(&self, offset: u64, len: u32) -> Result<()> {
        check_range(offset, u64::from(len), self.info.size)?;
        if !self.info.has(transmission_flags::SEND_CACHE) {
            return Ok(());
        }
        self.call(cmd::CACHE, 0, offset, u64::from(len), None)
            .await
            .map(drop)
    }

    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation` over `len` bytes at `offset` (a hint: the
    /// server may describe less or, in the last descriptor, more). Without extended headers
    /// the length is cut to 32 bits. Fails with [`Error::InvalidConfig`] when the server does
    /// not offer `base:allocation` for this export.
    pub async fn block_status(&self, offset: u64, len: u64, flags: u16) -> Result<Vec<StatusDescriptor>> {
        check_range(offset, len, self.info.size)?;
        if self.info.base_allocation.is_none() {
            return Err(Error::InvalidConfig(format!(
                "the NBD server does not offer {} for export {:?}",
                wire::BASE_ALLOCATION,
                self.info.name
            )));
        }
        let min = u64::from(self.info.min_block.max(1));
        let max = if self.info.extended_headers {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        let len = len.min(max / min * min);
        Ok(self
            .call(cmd::BLOCK_STATUS, flags, offset, len, None)
            .await?
            .status)
    }

    /// Ranged commands without payload (trim, zeroes): one request with extended headers
    /// (64-bit effect length), otherwise split into `u32` lengths.
    async fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        if self.info.extended_headers {
            return self.call(command, flags, offset, len, None).await.map(drop);
        }
        let step = u64::from(u32::MAX) / 65536 * 65536;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.call(command, flags, offset + done, n, None).await?;
            done += n;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Client {
    fn size(&self) -> u64 {
        self.info.size
    }

    /// The server's preferred block size (4096 when it names none), never below its minimum.
    fn read_alignment(&self) -> Option<u64> {
        Some(u64::from(
            self.info.preferred_block.max(self.info.min_block).max(1),
        ))
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        let piece = self.piece_len();
        let reads = buf.chunks_mut(piece).enumerate().map(|(i, part)| async move {
            let at = offset + (i * piece) as u64;
            let reply = self.call(cmd::READ, 0, at, part.len() as u64, None).await?;
            part.copy_from_slice(&reply.data);
            Ok::<_, Error>(())
        });
        futures::future::try_join_all(reads).await?;
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64, true)?;
        let piece = self.piece_len();
        let writes = data.chunks(piece).enumerate().map(|(i, part)| {
            let at = offset + (i * piece) as u64;
            let payload = Bytes::copy_from_slice(part);
            async move {
                self.call(cmd::WRITE, 0, at, payload.len() as u64, Some(payload))
                    .await
                    .map(drop)
            }
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }

    /// `base:allocation` block status, when the server offers it (otherwise, or without
    /// structured replies, the whole range is data). One query in whole minimum blocks, cut to
    /// the range; the server may describe only a prefix. Descriptors that break the protocol
    /// fail the query and close the connection, like any other violation.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.info.size)?;
        if self.info.base_allocation.is_none() || len == 0 {
            return Ok(vec![Extent::data(len)]);
        }
        let min = u64::from(self.info.min_block.max(1));
        let start = offset / min * min;
        let end = (offset + len)
            .div_ceil(min)
            .saturating_mul(min)
            .min(self.info.size);
        let descriptors = self.block_status(start, end - start, 0).await?;
        Ok(extents::within(&descriptors, start, offset..offset + len))
    }

    /// Resets the connection (SO_LINGER 0: data still queued is dropped, the server sees a
    /// reset at once) and fails every pending and later request.
    fn abort_connection(&self) {
        if let Some(socket) = self.socket.lock().take() {
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
        }
        // The tasks drop their halves of the stream: the last close resets it.
        self.shared
            .close(replies::connection_lost("given up by the client"));
    }

    async fn sync(&self) -> Result<()> {
        if self.info.has(transmission_flags::SEND_FLUSH) {
            self.call(cmd::FLUSH, 0, 0, 0, None).await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)?;
        // r3map backends read trimmed ranges as zeros; NBD_CMD_TRIM does not promise that.
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)?;
        if self.info.has(transmission_flags::SEND_WRITE_ZEROES) {
            return self.ranged(cmd::WRITE_ZEROES, 0, offset, len).await;
        }
        let zeros = Bytes::from(vec![0u8; (len as usize).min(self.piece_len())]);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            let payload = zeros.slice(..n);
            self.call(cmd::WRITE, 0, offset + done, n as u64, Some(payload))
                .await?;
            done += n as u64;
        }
        Ok(())
    }
}
