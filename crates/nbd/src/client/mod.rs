//! An async NBD client that implements [`r3map_core::Backend`].
//!
//! After the handshake, a writer task sends requests and a reader task matches replies to
//! pending requests by handle, so any number of callers can keep requests in flight on one
//! connection. When the connection fails, every pending request and every later one gets an
//! error; nothing waits forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use r3map_core::{check_range, Backend, Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::codec::{self, CodecError, Info, ReplyHeader};
use crate::server::AsyncStream;
use crate::tls::{ClientTls, TlsError};
use crate::uri::{NbdUri, Transport, UriError};
use crate::wire::{self, cmd, errno, opt, rep, reply_type, transmission_flags};

type BoxStream = Box<dyn AsyncStream>;

/// Largest option reply the client accepts.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest non-data structured chunk the client accepts.
const MAX_CHUNK: u32 = 1 << 20;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TLS settings; required for `nbds://` URIs.
    pub tls: Option<ClientTls>,
    /// Ask for structured replies (recommended: read errors then carry messages).
    pub structured_replies: bool,
    /// Requests that may be in flight on the connection at once.
    pub max_in_flight: usize,
    /// Time allowed for connecting and the handshake.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: None,
            structured_replies: true,
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    /// Transmission flags (`wire::transmission_flags`).
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
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

fn refused(option: u32, reply: u32, data: &[u8]) -> ClientError {
    ClientError::Refused {
        option: wire::option_name(option),
        reply: rep::name(reply),
        message: String::from_utf8_lossy(codec::truncate_bytes(data)).into_owned(),
    }
}

async fn open_transport(uri: &NbdUri) -> Result<BoxStream, ClientError> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let addr = format!("{host}:{port}");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = TcpStream::connect((host, *port))
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        Transport::Unix { socket } => {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: socket.display().to_string(),
                    source,
                })?;
            Ok(Box::new(stream))
        }
    }
}

/// The handshake phase from the client side.
struct Negotiation {
    io: BoxStream,
    buf: BytesMut,
    no_zeroes: bool,
}

impl Negotiation {
    async fn start(uri: &NbdUri, options: &ClientOptions) -> Result<Self, ClientError> {
        let tls = match (uri.tls, &options.tls) {
            (true, None) => return Err(ClientError::TlsNotConfigured),
            (true, Some(tls)) => Some(tls),
            (false, _) => None,
        };
        let io = open_transport(uri).await?;
        let mut this = Self {
            io,
            buf: BytesMut::with_capacity(4096),
            no_zeroes: false,
        };
        let flags = loop {
            if let Some(flags) = codec::decode_greeting(&mut this.buf)? {
                break flags;
            }
            this.fill().await?;
        };
        if flags & wire::handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotFixedNewstyle);
        }
        this.no_zeroes = flags & wire::handshake_flags::NO_ZEROES != 0;
        let mut client_flags = wire::client_flags::FIXED_NEWSTYLE;
        if this.no_zeroes {
            client_flags |= wire::client_flags::NO_ZEROES;
        }
        this.io.write_all(&client_flags.to_be_bytes()).await?;
        if let Some(tls) = tls {
            this.send(opt::STARTTLS, &[]).await?;
            let reply = this.reply().await?;
            if reply.reply != rep::ACK {
                return Err(refused(opt::STARTTLS, reply.reply, &reply.data));
            }
            if !this.buf.is_empty() {
                return Err(ClientError::Protocol(
                    "data after the STARTTLS acknowledgement".into(),
                ));
            }
            let name = tls.server_name(uri.host())?;
            let stream = tls
                .connector()
                .connect(name, this.io)
                .await
                .map_err(ClientError::TlsHandshake)?;
            this.io = Box::new(stream);
        }
        Ok(this)
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        self.buf.reserve(4096);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the NBD server closed the connection during the handshake",
            )));
        }
        Ok(())
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut out = BytesMut::with_capacity(16 + data.len());
        codec::encode_option(&mut out, option, data);
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn reply(&mut self) -> Result<codec::OptionReply, ClientError> {
        loop {
            if let Some(reply) = codec::decode_option_reply(&mut self.buf, MAX_OPTION_REPLY)? {
                return Ok(reply);
            }
            self.fill().await?;
        }
    }

    async fn structured_replies(&mut self) -> Result<bool, ClientError> {
        self.send(opt::STRUCTURED_REPLY, &[]).await?;
        let reply = self.reply().await?;
        Ok(reply.reply == rep::ACK)
    }

    async fn list(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        self.send(opt::LIST, &[]).await?;
        let mut exports = Vec::new();
        loop {
            let reply = self.reply().await?;
            match reply.reply {
                rep::SERVER => exports.push(codec::parse_server_reply(&reply.data)?),
                rep::ACK => return Ok(exports),
                other => return Err(refused(opt::LIST, other, &reply.data)),
            }
        }
    }

    async fn abort(mut self) {
        if self.send(opt::ABORT, &[]).await.is_ok() {
            // Servers may close without acknowledging; either is fine.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.reply()).await;
        }
        let _ = self.io.shutdown().await;
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` on old servers).
    async fn go(&mut self, export: &str, structured: bool) -> Result<ExportInfo, ClientError> {
        let mut data = BytesMut::new();
        codec::encode_export_request(
            &mut data,
            export,
            &[wire::info::NAME, wire::info::DESCRIPTION, wire::info::BLOCK_SIZE],
        );
        self.send(opt::GO, &data).await?;
        let mut info = ExportInfo {
            name: export.to_string(),
            description: None,
            size: 0,
            flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            structured_replies: structured,
        };
        let mut have_export = false;
        loop {
            let reply = self.reply().await?;
            match reply.reply {
                rep::INFO => match codec::parse_info(&reply.data)? {
                    Info::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        have_export = true;
                    }
                    Info::Name(name) => info.name = name,
                    Info::Description(text) => info.description = Some(text),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        info.min_block = minimum.max(1);
                        info.preferred_block = preferred.max(1);
                        info.max_payload = maximum.clamp(minimum.max(512), wire::DEFAULT_MAX_PAYLOAD);
                    }
                    Info::Unknown(_) => {}
                },
                rep::ACK if have_export => return Ok(info),
                rep::ACK => {
                    return Err(ClientError::Protocol(
                        "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
                    ))
                }
                rep::ERR_UNSUP => {
                    self.send(opt::EXPORT_NAME, export.as_bytes()).await?;
                    let (size, flags) = loop {
                        if let Some(found) = codec::decode_export_name_reply(&mut self.buf, self.no_zeroes) {
                            break found;
                        }
                        self.fill().await?;
                    };
                    info.size = size;
                    info.flags = flags;
                    return Ok(info);
                }
                other => return Err(refused(opt::GO, other, &reply.data)),
            }
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    command: u16,
    offset: u64,
    length: u32,
    /// Data of a read, filled by the reader task.
    data: Vec<u8>,
    /// Bytes of a structured read covered so far.
    covered: u64,
    error: Option<Error>,
    done: oneshot::Sender<Result<Vec<u8>>>,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is gone; every later request fails with it.
    closed: Option<Error>,
}

struct Shared {
    table: Mutex<Table>,
}

impl Shared {
    /// Fails every pending request and every later one with `error`.
    fn close(&self, error: Error) {
        let pending = {
            let mut table = self.table.lock();
            if table.closed.is_none() {
                table.closed = Some(error.clone());
            }
            std::mem::take(&mut table.pending)
        };
        for (_, request) in pending {
            let _ = request.done.send(Err(error.clone()));
        }
    }
}

fn connection_lost(detail: impl std::fmt::Display) -> Error {
    Error::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("NBD connection lost: {detail}"),
    ))
}

struct Outgoing {
    head: BytesMut,
    payload: Option<Bytes>,
}

/// A connected NBD export, usable as an r3map [`Backend`].
pub struct Client {
    info: ExportInfo,
    shared: Arc<Shared>,
    requests: mpsc::Sender<Outgoing>,
    slots: Semaphore,
    next_handle: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the export named by an NBD URI.
    pub async fn connect(uri: &str, options: ClientOptions) -> Result<Self, ClientError> {
        Self::connect_uri(&NbdUri::parse(uri)?, options).await
    }

    /// Connects to the export named by a parsed NBD URI.
    pub async fn connect_uri(uri: &NbdUri, options: ClientOptions) -> Result<Self, ClientError> {
        let timeout = options.connect_timeout;
        tokio::time::timeout(timeout, Self::connect_inner(uri, options))
            .await
            .map_err(|_| ClientError::Timeout(uri.to_string()))?
    }

    async fn connect_inner(uri: &NbdUri, options: ClientOptions) -> Result<Self, ClientError> {
        let mut negotiation = Negotiation::start(uri, &options).await?;
        let structured = options.structured_replies && negotiation.structured_replies().await?;
        let info = negotiation.go(&uri.export, structured).await?;
        let Negotiation { io, buf, .. } = negotiation;
        let (reader, writer) = tokio::io::split(io);
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
        });
        let max_in_flight = options.max_in_flight.max(1);
        let (requests, outgoing) = mpsc::channel(max_in_flight);
        tokio::spawn(write_requests(writer, outgoing, shared.clone()));
        tokio::spawn(read_replies(reader, buf, shared.clone()));
        Ok(Self {
            info,
            shared,
            requests,
            slots: Semaphore::new(max_in_flight),
            next_handle: AtomicU64::new(1),
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
            let mut negotiation = Negotiation::start(&uri, &options).await?;
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

    /// Sends one request and waits for its reply (a read's data for reads).
    async fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Vec<u8>> {
        let _slot = self.slots.acquire().await.map_err(|_| Error::Closed)?;
        // Reserve channel space first: everything after it is synchronous, so a cancelled
        // caller never leaves a request registered but unsent.
        let permit = match self.requests.reserve().await {
            Ok(permit) => permit,
            Err(_) => return Err(self.closed_error()),
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
                    covered: 0,
                    error: None,
                    done,
                },
            );
        }
        let mut head = BytesMut::with_capacity(wire::REQUEST_HEADER_LEN);
        codec::encode_request(&mut head, flags, command, handle, offset, length);
        permit.send(Outgoing { head, payload });
        match result.await {
            Ok(result) => result,
            Err(_) => Err(self.closed_error()),
        }
    }

    fn closed_error(&self) -> Error {
        self.shared
            .table
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| connection_lost("the connection tasks stopped"))
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

    /// Pieces of at most the server's maximum payload, aligned to its minimum block size.
    fn piece_len(&self) -> usize {
        let min = self.info.min_block.max(1);
        (self.info.max_payload / min * min).max(min) as usize
    }

    /// Asks the server to prefetch a range (`NBD_CMD_CACHE`), if it supports that.
    pub async fn cache(&self, offset: u64, len: u32) -> Result<()> {
        check_range(offset, u64::from(len), self.info.size)?;
        if !self.info.has(transmission_flags::SEND_CACHE) {
            return Ok(());
        }
        self.call(cmd::CACHE, 0, offset, len, None).await.map(drop)
    }

    /// Ranged commands without payload (trim, zeroes), split into `u32` lengths.
    async fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let step = u64::from(u32::MAX) / 4096 * 4096;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.call(command, flags, offset + done, n as u32, None).await?;
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

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        let piece = self.piece_len();
        let reads = buf.chunks_mut(piece).enumerate().map(|(i, part)| async move {
            let at = offset + (i * piece) as u64;
            let data = self.call(cmd::READ, 0, at, part.len() as u32, None).await?;
            part.copy_from_slice(&data);
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
                self.call(cmd::WRITE, 0, at, payload.len() as u32, Some(payload))
                    .await
                    .map(drop)
            }
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
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
            self.call(cmd::WRITE, 0, offset + done, n as u32, Some(payload))
                .await?;
            done += n as u64;
        }
        Ok(())
    }
}

async fn write_requests(
    writer: WriteHalf<BoxStream>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    let result: std::io::Result<()> = async {
        while let Some(out) = outgoing.recv().await {
            writer.write_all(&out.head).await?;
            if let Some(payload) = &out.payload {
                writer.write_all(payload).await?;
            }
            if outgoing.is_empty() {
                writer.flush().await?;
            }
        }
        // The client was dropped: disconnect softly.
        let mut disc = BytesMut::new();
        codec::encode_request(&mut disc, 0, cmd::DISC, 0, 0, 0);
        writer.write_all(&disc).await?;
        writer.flush().await?;
        writer.shutdown().await
    }
    .await;
    if let Err(err) = result {
        shared.close(connection_lost(err));
    }
}

async fn read_replies(reader: ReadHalf<BoxStream>, buf: BytesMut, shared: Arc<Shared>) {
    let mut replies = ReplyReader { reader, buf };
    let error = loop {
        match replies.next(&shared).await {
            Ok(true) => {}
            Ok(false) => break connection_lost("the server closed the connection"),
            Err(err) => break connection_lost(err),
        }
    };
    tracing::debug!(%error, "NBD client connection ended");
    shared.close(error);
}

struct ReplyReader {
    reader: ReadHalf<BoxStream>,
    buf: BytesMut,
}

fn protocol(detail: impl std::fmt::Display) -> Error {
    Error::Remote(format!("the server broke the protocol: {detail}"))
}

fn server_error(pending: &Pending, error: u32, message: &str) -> Error {
    let what = format!(
        "{} of {} bytes at offset {}",
        wire::command_name(pending.command),
        pending.length,
        pending.offset
    );
    let text = if message.is_empty() {
        format!("NBD server replied {} to {what}", errno::name(error))
    } else {
        format!("NBD server replied {} to {what}: {message}", errno::name(error))
    };
    match error {
        errno::EPERM if pending.command != cmd::READ => Error::ReadOnly,
        _ => Error::Remote(text),
    }
}

impl ReplyReader {
    async fn fill(&mut self) -> Result<bool> {
        self.buf.reserve(64 << 10);
        Ok(self.reader.read_buf(&mut self.buf).await? != 0)
    }

    /// Reads exactly `out.len()` bytes, first from the buffer, then from the socket.
    async fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let buffered = self.buf.len().min(out.len());
        out[..buffered].copy_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        if buffered < out.len() {
            self.reader.read_exact(&mut out[buffered..]).await?;
        }
        Ok(())
    }

    async fn skip(&mut self, mut len: usize) -> Result<()> {
        let mut scratch = [0u8; 4096];
        while len > 0 {
            let n = len.min(scratch.len());
            self.read_exact(&mut scratch[..n]).await?;
            len -= n;
        }
        Ok(())
    }

    /// Handles one reply message; `Ok(false)` on a clean end of stream.
    async fn next(&mut self, shared: &Shared) -> Result<bool> {
        let header = loop {
            match codec::decode_reply_header(&mut self.buf).map_err(protocol)? {
                Some(header) => break header,
                None => {
                    if !self.fill().await? {
                        return if self.buf.is_empty() {
                            Ok(false)
                        } else {
                            Err(protocol("connection closed in the middle of a reply"))
                        };
                    }
                }
            }
        };
        let handle = header.handle();
        let Some(mut pending) = shared.table.lock().pending.remove(&handle) else {
            return Err(protocol(format!("reply for unknown handle {handle}")));
        };
        match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    let err = server_error(&pending, error, "");
                    let _ = pending.done.send(Err(err));
                } else {
                    let mut data = std::mem::take(&mut pending.data);
                    if pending.command == cmd::READ {
                        self.read_exact(&mut data).await?;
                    }
                    let _ = pending.done.send(Ok(data));
                }
            }
            ReplyHeader::Chunk {
                flags, kind, length, ..
            } => {
                self.chunk(&mut pending, kind, length).await?;
                if flags & wire::reply_flags::DONE != 0 {
                    let result = match pending.error.take() {
                        Some(err) => Err(err),
                        None if pending.command == cmd::READ
                            && pending.covered < u64::from(pending.length) =>
                        {
                            Err(protocol("a read reply did not cover the whole request"))
                        }
                        None => Ok(std::mem::take(&mut pending.data)),
                    };
                    let _ = pending.done.send(result);
                } else {
                    shared.table.lock().pending.insert(handle, pending);
                }
            }
        }
        Ok(true)
    }

    async fn chunk(&mut self, pending: &mut Pending, kind: u16, length: u32) -> Result<()> {
        let is_read = pending.command == cmd::READ;
        match kind {
            reply_type::NONE => {
                if length != 0 {
                    return Err(protocol("NBD_REPLY_TYPE_NONE with a payload"));
                }
            }
            reply_type::OFFSET_DATA if is_read => {
                if length < 8 || length - 8 > pending.length {
                    return Err(protocol(format!("data chunk of {length} bytes")));
                }
                let mut offset = [0u8; 8];
                self.read_exact(&mut offset).await?;
                let offset = u64::from_be_bytes(offset);
                let len = u64::from(length - 8);
                let start = offset
                    .checked_sub(pending.offset)
                    .filter(|start| start + len <= u64::from(pending.length))
                    .ok_or_else(|| protocol("data chunk outside the requested range"))?;
                let range = start as usize..(start + len) as usize;
                self.read_exact(&mut pending.data[range]).await?;
                pending.covered += len;
            }
            reply_type::OFFSET_HOLE if is_read => {
                if length != 12 {
                    return Err(protocol("hole chunk must be 12 bytes"));
                }
                let mut raw = [0u8; 12];
                self.read_exact(&mut raw).await?;
                let offset = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
                let len = u64::from(u32::from_be_bytes(raw[8..].try_into().expect("4 bytes")));
                let start = offset
                    .checked_sub(pending.offset)
                    .filter(|start| start + len <= u64::from(pending.length))
                    .ok_or_else(|| protocol("hole chunk outside the requested range"))?;
                pending.data[start as usize..(start + len) as usize].fill(0);
                pending.covered += len;
            }
            kind if kind & reply_type::ERROR_BIT != 0 => {
                if length > MAX_CHUNK {
                    return Err(protocol(format!("error chunk of {length} bytes")));
                }
                let mut payload = vec![0u8; length as usize];
                self.read_exact(&mut payload).await?;
                let (error, message) = codec::parse_error_chunk(&payload).map_err(protocol)?;
                let error = if error == 0 { errno::EINVAL } else { error };
                pending
                    .error
                    .get_or_insert(server_error(pending, error, &message));
            }
            reply_type::BLOCK_STATUS if pending.command == cmd::BLOCK_STATUS => {
                if length > MAX_CHUNK {
                    return Err(protocol(format!("block status chunk of {length} bytes")));
                }
                self.skip(length as usize).await?;
            }
            other => {
                return Err(protocol(format!(
                    "unexpected chunk type {other} for {}",
                    wire::command_name(pending.command)
                )))
            }
        }
        Ok(())
    }
}
