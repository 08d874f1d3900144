//! The NBD server: a listener (TCP or UNIX socket) with a connection cap, and per connection a
//! fixed-newstyle handshake followed by the transmission phase.
//!
//! Transmission runs three kinds of work per connection: the connection task reads and
//! validates requests, each valid request runs as its own task against the backend (bounded by
//! one semaphore on the number and one on the bytes in flight), and a single writer task sends
//! replies. A reply is built completely (a read's data is in memory) before its header is
//! written, so a backend error becomes an error reply and never desynchronises the stream.
//!
//! Reads and writes are the hot path, and both keep their data in buffers reused from a
//! per-connection pool (`pool`: no allocation, zeroing or page faults per request, memory
//! within the in-flight byte budget). For reads, the writer sends every ready header and data
//! buffer with one vectored write (no copy), and the reader stops taking requests while too
//! much read data waits for the socket ([`Backlog`]), so the data is still in the CPU caches
//! when the kernel copies it. For writes, the reader buffers only request headers; a write's
//! data is read from the socket straight into a pooled buffer of its size, and the write runs
//! right there on the reader's thread if the backend completes it without waiting (memory,
//! page cache), so the backend copies data that is still in this CPU's cache. A write that has
//! to wait (a remote backend) continues as its own task like every other request.

use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use r3map_core::SharedBackend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::codec::{self, CodecError, OptionFrame, Payload, Request, RequestDecoder};
use crate::pool::{BufferPool, PooledBuf};
use crate::tls::{ServerTls, TlsError};
use crate::wire::{self, cmd, cmd_flags, errno, handshake_flags, opt, rep, transmission_flags};

/// Option data above this many bytes is skipped and answered with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest piece a `NBD_CMD_CACHE` reads at once.
const CACHE_PIECE: usize = 1 << 20;
/// Buffer gathering small replies on streams without vectored writes; larger pieces bypass it.
const WRITE_BUFFER: usize = 256 << 10;
/// Read data waiting for the writer above which a connection takes no new requests.
const BACKLOG_HIGH: usize = 2 << 20;
/// Replies sent with one write at most.
const WRITE_BATCH: usize = 64;
/// Read from the socket for request headers. A write's data goes straight into its own
/// buffer; only the part that arrived with its header is copied out of this one.
const READ_CHUNK: usize = 16 << 10;

/// A byte stream a connection runs over (TCP, UNIX socket, TLS, or an in-memory pipe in tests).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}
type BoxStream = Box<dyn AsyncStream>;

/// One named export: a backend and how it is offered.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for (`""` selects the first export).
    pub name: String,
    /// Human-readable description (shown by `nbdinfo --list`).
    pub description: String,
    /// The storage behind the export.
    pub backend: SharedBackend,
    /// Refuse writes, trims and zeroing with `EPERM`, and say so in the transmission flags.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes completed
    /// on every connection. True for every backend that is one shared object (all r3map
    /// backends); turn it off for a backend whose `sync` only covers its caller's writes.
    pub multi_conn: bool,
}

impl Export {
    /// A writable export named `name` over `backend`.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            backend,
            read_only: false,
            multi_conn: true,
        }
    }

    /// Sets the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Makes the export read-only (or writable again).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .field("read_only", &self.read_only)
            .field("multi_conn", &self.multi_conn)
            .finish()
    }
}

/// Everything a server needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The exports; the first one is the default export (empty name).
    pub exports: Vec<Export>,
    /// TLS certificate (and client CA for mutual TLS); `None` refuses `NBD_OPT_STARTTLS`.
    pub tls: Option<ServerTls>,
    /// Refuse every option but `STARTTLS` and `ABORT` until TLS is up (needs `tls`).
    pub require_tls: bool,
    /// Largest read or write payload one request may carry (advertised as the maximum block
    /// size); larger writes are discarded and answered with `EINVAL`.
    pub max_request: u32,
    /// Requests of one connection that may run at the same time.
    pub max_in_flight: usize,
    /// Payload bytes of one connection's requests that may be in memory at the same time
    /// (at least `max_request`).
    pub max_in_flight_bytes: usize,
    /// Connections served at the same time; further clients wait in the accept queue.
    pub max_connections: usize,
    /// A client that has not finished the handshake in this time is disconnected.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            exports: Vec::new(),
            tls: None,
            require_tls: false,
            max_request: wire::DEFAULT_MAX_PAYLOAD,
            max_in_flight: 128,
            max_in_flight_bytes: 128 << 20,
            max_connections: 128,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// A configuration with these exports and default limits.
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            exports,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), ServerError> {
        let invalid = |msg: String| Err(ServerError::Config(msg));
        if self.exports.is_empty() {
            return invalid("at least one export is needed".into());
        }
        for (i, export) in self.exports.iter().enumerate() {
            if export.name.len() > wire::MAX_STRING_LEN || export.name.contains('\0') {
                return invalid(format!(
                    "export name {:?} must be at most {} bytes without NUL",
                    export.name,
                    wire::MAX_STRING_LEN
                ));
            }
            if export.description.len() > wire::MAX_STRING_LEN {
                return invalid(format!(
                    "description of export {:?} is longer than {} bytes",
                    export.name,
                    wire::MAX_STRING_LEN
                ));
            }
            if self.exports[..i].iter().any(|e| e.name == export.name) {
                return invalid(format!("export name {:?} is used twice", export.name));
            }
        }
        if self.require_tls && self.tls.is_none() {
            return invalid("require_tls needs a TLS certificate and key".into());
        }
        if self.max_request < 4096 {
            return invalid(format!(
                "max_request of {} bytes is below the 4096-byte minimum",
                self.max_request
            ));
        }
        if self.max_in_flight == 0 || self.max_connections == 0 {
            return invalid("max_in_flight and max_connections must be at least 1".into());
        }
        if self.max_in_flight_bytes < self.max_request as usize
            || self.max_in_flight_bytes > u32::MAX as usize
        {
            return invalid(format!(
                "max_in_flight_bytes ({}) must be between max_request ({}) and 4 GiB",
                self.max_in_flight_bytes, self.max_request
            ));
        }
        Ok(())
    }
}

/// Why a server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Flushing an export on shutdown failed: recent writes may not be durable.
    #[error("flushing export {export:?} on shutdown failed: {source}")]
    Flush {
        export: String,
        #[source]
        source: r3map_core::Error,
    },
}

/// Why one connection ended abnormally (logged by the server; never fatal to it).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Codec(#[from] CodecError),
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client sent option {0} without fixed newstyle negotiation")]
    NotFixedNewstyle(u32),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client tried to enter transmission without TLS, which this server requires")]
    TlsRequired,
    #[error("client sent data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    #[error("TLS handshake failed: {}", r3map_tls::describe_handshake_error(.0))]
    TlsHandshake(std::io::Error),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Exports and limits shared by every connection of one server.
struct State {
    exports: Vec<Arc<Export>>,
    tls: Option<ServerTls>,
    require_tls: bool,
    max_request: u32,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    handshake_timeout: Duration,
    shutdown: watch::Sender<bool>,
}

impl State {
    fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }
}

/// The connection handler, usable without a listener (for in-memory streams in tests and fuzz
/// targets). Cheap to clone.
#[derive(Clone)]
pub struct Service {
    state: Arc<State>,
}

impl Service {
    /// Checks the configuration and builds the handler.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            state: Arc::new(State {
                exports: config.exports.into_iter().map(Arc::new).collect(),
                tls: config.tls,
                require_tls: config.require_tls,
                max_request: config.max_request,
                max_in_flight: config.max_in_flight,
                max_in_flight_bytes: config.max_in_flight_bytes,
                handshake_timeout: config.handshake_timeout,
                shutdown,
            }),
        })
    }

    /// Serves one client over `stream` until it disconnects or the service shuts down.
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutdown = self.state.shutdown.subscribe();
        if *shutdown.borrow_and_update() {
            return Ok(());
        }
        let state = &self.state;
        let handshake = tokio::time::timeout(
            state.handshake_timeout,
            handshake(state, Box::new(stream) as BoxStream),
        );
        let outcome = tokio::select! {
            outcome = handshake => outcome,
            _ = shutdown.changed() => return Ok(()),
        };
        let Some((io, buf, session)) =
            outcome.map_err(|_| ConnectionError::HandshakeTimeout(state.handshake_timeout))??
        else {
            return Ok(());
        };
        transmission(state.clone(), io, buf, session, shutdown).await
    }

    /// Tells every connection to stop reading requests, finish the ones in flight and close.
    pub fn shutdown(&self) {
        self.state.shutdown.send_replace(true);
    }

    /// Flushes every export's backend; the first failure is returned after all were tried.
    pub async fn flush_all(&self) -> Result<(), ServerError> {
        let mut first = None;
        for export in &self.state.exports {
            if let Err(source) = export.backend.sync().await {
                tracing::error!(export = %export.name, error = %source, "flush on shutdown failed");
                first.get_or_insert(ServerError::Flush {
                    export: export.name.clone(),
                    source,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<BoxStream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// A bound NBD server.
pub struct Server {
    service: Service,
    listener: Listener,
    addr: ListenAddr,
    max_connections: usize,
}

impl Server {
    /// Listens on a TCP address (use a loopback address unless remote clients must connect).
    pub async fn bind_tcp(config: ServerConfig, addr: &str) -> Result<Self, ServerError> {
        let max_connections = config.max_connections;
        let service = Service::new(config)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let server = Self {
            service,
            listener: Listener::Tcp(listener),
            addr: ListenAddr::Tcp(local),
            max_connections,
        };
        server.warn_if_exposed();
        Ok(server)
    }

    /// Listens on a UNIX socket at `path` (which must not exist yet).
    pub async fn bind_unix(config: ServerConfig, path: impl AsRef<Path>) -> Result<Self, ServerError> {
        let max_connections = config.max_connections;
        let service = Service::new(config)?;
        let path = path.as_ref();
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            addr: format!(
                "{} (if no server uses it any more, delete the file)",
                path.display()
            ),
            source,
        })?;
        let server = Self {
            service,
            listener: Listener::Unix(listener),
            addr: ListenAddr::Unix(path.to_path_buf()),
            max_connections,
        };
        server.warn_if_exposed();
        Ok(server)
    }

    fn warn_if_exposed(&self) {
        let state = &self.service.state;
        let writable: Vec<&str> = state
            .exports
            .iter()
            .filter(|e| !e.read_only)
            .map(|e| e.name.as_str())
            .collect();
        if !state.require_tls && !writable.is_empty() {
            tracing::warn!(
                addr = %self.addr,
                exports = ?writable,
                "serving WRITABLE NBD exports without required TLS: anyone who can reach this \
                 address can read and change the data"
            );
        }
        if let ListenAddr::Tcp(addr) = &self.addr {
            if !addr.ip().is_loopback() && state.tls.is_none() {
                tracing::warn!(%addr, "NBD server listens beyond loopback without TLS");
            }
        }
    }

    /// The address actually bound (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The URI a client uses for `export` (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`).
    pub fn uri(&self, export: &str) -> String {
        let tls = self.service.state.tls.is_some();
        match &self.addr {
            ListenAddr::Tcp(addr) => {
                format!("{}://{addr}/{export}", if tls { "nbds" } else { "nbd" })
            }
            ListenAddr::Unix(path) => format!(
                "{}:///{export}?socket={}",
                if tls { "nbds+unix" } else { "nbd+unix" },
                path.display()
            ),
        }
    }

    /// The connection handler behind this server.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Accepts clients until `shutdown` completes; then stops accepting, lets every connection
    /// finish its requests in flight, flushes every export and removes a UNIX socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        tokio::pin!(shutdown);
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        let mut backoff = Duration::from_millis(1);
        loop {
            let slot = tokio::select! {
                _ = &mut shutdown => break,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
            match accepted {
                Ok(stream) => {
                    backoff = Duration::from_millis(1);
                    let service = self.service.clone();
                    connections.spawn(async move {
                        if let Err(err) = service.serve_stream(stream).await {
                            tracing::info!(error = %err, "NBD connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, ?backoff, "accepting an NBD client failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        tracing::info!(addr = %self.addr, "NBD server shutting down");
        self.service.shutdown();
        while connections.join_next().await.is_some() {}
        let flushed = self.service.flush_all().await;
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
        flushed
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake.
// ---------------------------------------------------------------------------------------------

/// What the handshake agreed on.
struct Session {
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
}

async fn read_frame<T>(
    io: &mut BoxStream,
    buf: &mut BytesMut,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, CodecError>,
) -> Result<Option<T>, ConnectionError> {
    loop {
        if let Some(frame) = decode(buf)? {
            return Ok(Some(frame));
        }
        buf.reserve(4096);
        if io.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnectionError::Truncated)
            };
        }
    }
}

fn transmission_flags_for(export: &Export, structured: bool) -> u16 {
    use transmission_flags::*;
    let mut flags = HAS_FLAGS | SEND_FLUSH | SEND_CACHE;
    if export.read_only {
        flags |= READ_ONLY;
    } else {
        flags |= SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= SEND_DF;
    }
    if export.multi_conn {
        flags |= CAN_MULTI_CONN;
    }
    flags
}

struct Handshake {
    io: BoxStream,
    out: BytesMut,
}

impl Handshake {
    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        codec::encode_option_reply(&mut self.out, option, reply, data);
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) {
        tracing::debug!(
            option = wire::option_name(option),
            reply = rep::name(reply),
            message
        );
        let message = codec::truncate_str(message, wire::MAX_STRING_LEN);
        codec::encode_option_reply(&mut self.out, option, reply, message.as_bytes());
    }

    async fn flush(&mut self) -> Result<(), ConnectionError> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }
}

/// Runs the fixed newstyle handshake. `Ok(None)` means the client left (or aborted) cleanly.
async fn handshake(
    state: &State,
    io: BoxStream,
) -> Result<Option<(BoxStream, BytesMut, Session)>, ConnectionError> {
    let mut hs = Handshake {
        io,
        out: BytesMut::with_capacity(1024),
    };
    let mut buf = BytesMut::with_capacity(1024);
    codec::encode_greeting(
        &mut hs.out,
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    );
    hs.flush().await?;
    let Some(client_flags) = read_frame(&mut hs.io, &mut buf, |b| Ok(codec::decode_client_flags(b))).await?
    else {
        return Ok(None);
    };
    if client_flags & !wire::client_flags::KNOWN != 0 {
        return Err(ConnectionError::UnknownClientFlags(client_flags));
    }
    let fixed = client_flags & wire::client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & wire::client_flags::NO_ZEROES != 0;

    let mut decoder = codec::OptionDecoder::new(MAX_OPTION_LEN);
    let mut tls_active = false;
    let mut structured = false;
    // Export name the last NBD_OPT_SET_META_CONTEXT selected `base:allocation` for.
    let mut meta_export: Option<String> = None;
    loop {
        let Some(frame) = read_frame(&mut hs.io, &mut buf, |b| decoder.decode(b)).await? else {
            return Ok(None);
        };
        let (option, data) = match frame {
            OptionFrame::Option { option, data } => (option, data),
            OptionFrame::TooBig { option, len } => {
                if option == opt::EXPORT_NAME {
                    return Err(ConnectionError::Codec(CodecError::TooLong {
                        what: "NBD_OPT_EXPORT_NAME data",
                        len: u64::from(len),
                        max: u64::from(MAX_OPTION_LEN),
                    }));
                }
                // The data is skipped by the decoder as it arrives; it cannot be read first
                // because replies must not wait for up to 4 GiB of junk.
                let message = format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}");
                hs.error(option, rep::ERR_TOO_BIG, &message);
                hs.flush().await?;
                continue;
            }
        };
        if !fixed && option != opt::EXPORT_NAME {
            return Err(ConnectionError::NotFixedNewstyle(option));
        }
        if state.require_tls && !tls_active && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Err(ConnectionError::TlsRequired);
            }
            hs.error(
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            hs.flush().await?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = codec::parse_string("export name", &data)?;
                let Some(export) = state.find(&name).cloned() else {
                    return Err(ConnectionError::UnknownExport(name));
                };
                let flags = transmission_flags_for(&export, structured);
                codec::encode_export_name_reply(&mut hs.out, export.backend.size(), flags, no_zeroes);
                hs.flush().await?;
                let block_status = structured && meta_export.as_deref() == Some(name.as_str());
                return Ok(Some((
                    hs.io,
                    buf,
                    Session {
                        export,
                        structured,
                        block_status,
                    },
                )));
            }
            opt::ABORT => {
                hs.reply(option, rep::ACK, &[]);
                // The client may already have closed: a failed ACK is not an error.
                let _ = hs.flush().await;
                let _ = hs.io.shutdown().await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for export in &state.exports {
                        let reply = codec::server_reply_data(&export.name, &export.description);
                        hs.reply(option, rep::SERVER, &reply);
                    }
                    hs.reply(option, rep::ACK, &[]);
                }
                hs.flush().await?;
            }
            opt::STARTTLS => {
                let Some(tls) = &state.tls else {
                    hs.error(option, rep::ERR_POLICY, "TLS is not configured on this server");
                    hs.flush().await?;
                    continue;
                };
                if !data.is_empty() {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                    hs.flush().await?;
                    continue;
                }
                if tls_active {
                    hs.error(option, rep::ERR_INVALID, "TLS is already active");
                    hs.flush().await?;
                    continue;
                }
                if !buf.is_empty() || decoder.skipping() > 0 {
                    return Err(ConnectionError::DataBeforeTls);
                }
                hs.reply(option, rep::ACK, &[]);
                hs.flush().await?;
                let stream = tls
                    .acceptor()
                    .accept(hs.io)
                    .await
                    .map_err(ConnectionError::TlsHandshake)?;
                hs.io = Box::new(stream);
                tls_active = true;
                // Nothing negotiated before STARTTLS survives it.
                structured = false;
                meta_export = None;
            }
            opt::INFO | opt::GO => {
                let request = match codec::parse_export_request(&data) {
                    Ok(request) => request,
                    Err(err) => {
                        hs.error(option, rep::ERR_INVALID, &err.to_string());
                        hs.flush().await?;
                        continue;
                    }
                };
                let Some(export) = state.find(&request.name).cloned() else {
                    let message = format!("no export named {:?}", request.name);
                    hs.error(option, rep::ERR_UNKNOWN, &message);
                    hs.flush().await?;
                    continue;
                };
                let flags = transmission_flags_for(&export, structured);
                hs.reply(
                    option,
                    rep::INFO,
                    &codec::info_export_data(export.backend.size(), flags),
                );
                for info in &request.info_requests {
                    match *info {
                        wire::info::NAME => {
                            let data = codec::info_string_data(wire::info::NAME, &export.name);
                            hs.reply(option, rep::INFO, &data);
                        }
                        wire::info::DESCRIPTION if !export.description.is_empty() => {
                            let data = codec::info_string_data(wire::info::DESCRIPTION, &export.description);
                            hs.reply(option, rep::INFO, &data);
                        }
                        _ => {}
                    }
                }
                // Our constraints are the protocol defaults, so sending them unasked is safe.
                hs.reply(
                    option,
                    rep::INFO,
                    &codec::info_block_size_data(1, 4096, state.max_request),
                );
                hs.reply(option, rep::ACK, &[]);
                hs.flush().await?;
                if option == opt::GO {
                    let block_status = structured && meta_export.as_deref() == Some(request.name.as_str());
                    return Ok(Some((
                        hs.io,
                        buf,
                        Session {
                            export,
                            structured,
                            block_status,
                        },
                    )));
                }
            }
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    hs.reply(option, rep::ACK, &[]);
                } else {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                hs.flush().await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the previous selection even when it fails.
                    meta_export = None;
                }
                match meta_context(state, structured, &data) {
                    Ok((name, queries)) => {
                        let matched = queries
                            .iter()
                            .any(|q| q == wire::BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty())))
                            || (!set && queries.is_empty());
                        if matched {
                            let id = if set { wire::BASE_ALLOCATION_ID } else { 0 };
                            let data = codec::meta_context_data(id, wire::BASE_ALLOCATION);
                            hs.reply(option, rep::META_CONTEXT, &data);
                            if set {
                                meta_export = Some(name);
                            }
                        }
                        hs.reply(option, rep::ACK, &[]);
                    }
                    Err((reply, message)) => hs.error(option, reply, &message),
                }
                hs.flush().await?;
            }
            other => {
                let message = format!("option {other} is not supported by this server");
                hs.error(option, rep::ERR_UNSUP, &message);
                hs.flush().await?;
            }
        }
    }
}

/// Validates a meta context option; returns the export name and the queries.
fn meta_context(
    state: &State,
    structured: bool,
    data: &[u8],
) -> Result<(String, Vec<String>), (u32, String)> {
    if !structured {
        return Err((
            rep::ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts".into(),
        ));
    }
    let request =
        codec::parse_meta_context_request(data).map_err(|err| (rep::ERR_INVALID, err.to_string()))?;
    if state.find(&request.export).is_none() {
        return Err((rep::ERR_UNKNOWN, format!("no export named {:?}", request.export)));
    }
    Ok((request.export, request.queries))
}

// ---------------------------------------------------------------------------------------------
// Transmission.
// ---------------------------------------------------------------------------------------------

/// Read data of one connection on its way out, shared by the reader, the request tasks and
/// the writer.
///
/// When the client reads replies more slowly than the backend produces them (a fast local
/// backend), data read from the backend now would only wait in memory and fall out of the CPU
/// caches before the kernel copies it into the socket, making both copies memory-bound. So the
/// reader takes no new request while more than [`BACKLOG_HIGH`] bytes of read data wait for the
/// writer. Reads still running at the backend are not limited by this (a slow remote backend
/// keeps up to `max_in_flight` requests busy); they only make the reader yield once, so tasks
/// it just spawned get to run and show whether their data is waiting.
#[derive(Default)]
struct Backlog {
    /// Bytes of reads handed to tasks that have not finished yet.
    reading: AtomicUsize,
    /// Bytes of read data finished and not yet written.
    waiting: AtomicUsize,
    /// Signalled by the writer when `waiting` drops to `BACKLOG_HIGH` or below.
    drained: Notify,
}

impl Backlog {
    /// Waits until the connection may take another request.
    async fn admit(&self) {
        if self.reading.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire) > BACKLOG_HIGH {
            tokio::task::yield_now().await;
        }
        while self.waiting.load(Ordering::Acquire) > BACKLOG_HIGH {
            self.drained.notified().await;
        }
    }

    /// A read of `len` bytes finished; `produced` bytes of it go to the writer.
    fn finished(&self, len: usize, produced: usize) {
        self.waiting.fetch_add(produced, Ordering::AcqRel);
        self.reading.fetch_sub(len, Ordering::AcqRel);
    }

    /// The writer sent `len` bytes of read data.
    fn sent(&self, len: usize) {
        if len > 0 && self.waiting.fetch_sub(len, Ordering::AcqRel) - len <= BACKLOG_HIGH {
            // A stored permit if the reader is not waiting yet: it then re-checks and goes on.
            self.drained.notify_one();
        }
    }
}

/// A reply ready to be written, with the permits that account for its memory.
struct Outgoing {
    head: Bytes,
    /// A read's data, sent right after `head` (one vectored write, no copy).
    data: Option<PooledBuf>,
    // Fields drop in order: the buffer is back in the pool before its bytes are released.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A request refused before it reached the backend.
struct Refusal {
    error: u32,
    message: String,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        error,
        message: message.into(),
    }
}

/// Checks a request against the command, its flags, the export and the session.
fn check_request(request: &Request, session: &Session, max_request: u32) -> Result<(), Refusal> {
    let export = &session.export;
    let name = wire::command_name(request.command);
    let allowed = cmd_flags::FUA
        | match request.command {
            cmd::READ if session.structured => cmd_flags::DF,
            cmd::WRITE_ZEROES => cmd_flags::NO_HOLE,
            cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
            _ => 0,
        };
    if !matches!(
        request.command,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
    ) {
        return Err(refuse(
            errno::EINVAL,
            format!("unknown command {}", request.command),
        ));
    }
    if request.payload == Payload::Oversized {
        return Err(refuse(
            errno::EINVAL,
            format!(
                "write of {} bytes exceeds the maximum payload of {max_request} bytes",
                request.length
            ),
        ));
    }
    if request.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} are not valid for {name}", request.flags & !allowed),
        ));
    }
    let writes = matches!(request.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && export.read_only {
        return Err(refuse(
            errno::EPERM,
            format!("export {:?} is read-only", export.name),
        ));
    }
    if request.command == cmd::FLUSH {
        return Ok(());
    }
    let size = export.backend.size();
    let end = request.offset.checked_add(u64::from(request.length));
    if end.is_none_or(|end| end > size) {
        let error = if matches!(request.command, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(
            error,
            format!(
                "{name} of {} bytes at offset {} reaches past the end of the {size}-byte export",
                request.length, request.offset
            ),
        ));
    }
    if request.command == cmd::READ && request.length > max_request {
        let error = if session.structured {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return Err(refuse(
            error,
            format!(
                "read of {} bytes exceeds the maximum payload of {max_request} bytes",
                request.length
            ),
        ));
    }
    if request.command == cmd::BLOCK_STATUS {
        if !session.block_status {
            return Err(refuse(
                errno::EINVAL,
                "BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT",
            ));
        }
        if request.length == 0 {
            return Err(refuse(errno::EINVAL, "BLOCK_STATUS of 0 bytes"));
        }
    }
    Ok(())
}

fn error_reply(handle: u64, structured: bool, error: u32, message: &str) -> Bytes {
    let mut head = BytesMut::with_capacity(32 + message.len());
    if structured {
        codec::encode_error_chunk(&mut head, handle, error, message);
    } else {
        codec::encode_simple_reply(&mut head, handle, error);
    }
    head.freeze()
}

fn ok_reply(handle: u64, structured: bool) -> Bytes {
    let mut head = BytesMut::with_capacity(20);
    if structured {
        codec::encode_done_chunk(&mut head, handle);
    } else {
        codec::encode_simple_reply(&mut head, handle, 0);
    }
    head.freeze()
}

/// Runs one validated request against the backend and builds its reply. A read's data goes
/// into a buffer from `pool`, whose class the caller holds in its byte permit; a write's data
/// is `payload` (`None` for an empty write).
async fn execute(
    request: Request,
    payload: Option<PooledBuf>,
    session: &Session,
    pool: &Arc<BufferPool>,
) -> (Bytes, Option<PooledBuf>) {
    let backend = &session.export.backend;
    let structured = session.structured;
    let fua = request.flags & cmd_flags::FUA != 0;
    let handle = request.handle;
    let offset = request.offset;
    let length = u64::from(request.length);
    let result = match request.command {
        cmd::READ => {
            let mut data = (request.length > 0).then(|| pool.take(request.length as usize));
            let read = match &mut data {
                Some(data) => backend.read_at(offset, data.as_mut_slice()).await,
                None => backend.read_at(offset, &mut []).await,
            };
            match read {
                Ok(()) => {
                    let mut head = BytesMut::with_capacity(32);
                    if !structured {
                        codec::encode_simple_reply(&mut head, handle, 0);
                    } else if request.length == 0 {
                        codec::encode_done_chunk(&mut head, handle);
                    } else {
                        codec::encode_offset_data_header(&mut head, handle, offset, request.length);
                    }
                    return (head.freeze(), data);
                }
                Err(err) => Err(err),
            }
        }
        cmd::WRITE => {
            let data = payload.as_ref().map_or(&[][..], |data| data.as_ref());
            let written = backend.write_at(offset, data).await;
            // Back to the pool before the (possibly slow) sync.
            drop(payload);
            match written {
                Ok(()) if fua => backend.sync().await,
                other => other,
            }
        }
        cmd::FLUSH => backend.sync().await,
        cmd::TRIM => match backend.trim(offset, length).await {
            Ok(()) if fua => backend.sync().await,
            other => other,
        },
        cmd::WRITE_ZEROES => match backend.write_zeroes(offset, length).await {
            Ok(()) if fua => backend.sync().await,
            other => other,
        },
        cmd::CACHE => cache(backend, offset, length).await,
        cmd::BLOCK_STATUS => {
            // Backends do not report holes: the whole range is "allocated, contents unknown",
            // which the protocol allows for any block.
            let available = backend.size() - offset;
            let mut extent = length.min(available) as u32;
            if request.flags & cmd_flags::REQ_ONE == 0 {
                extent = available.min(u64::from(u32::MAX) & !511).max(u64::from(extent)) as u32;
            }
            let mut head = BytesMut::with_capacity(40);
            codec::encode_block_status_chunk(&mut head, handle, wire::BASE_ALLOCATION_ID, &[(extent, 0)]);
            return (head.freeze(), None);
        }
        _ => unreachable!("checked by check_request"),
    };
    match result {
        Ok(()) => (ok_reply(handle, structured), None),
        Err(err) => {
            let error = errno::from_os(err.errno());
            let message = format!("{} failed: {err}", wire::command_name(request.command));
            tracing::debug!(handle, %message, "request failed");
            (error_reply(handle, structured, error, &message), None)
        }
    }
}

/// `NBD_CMD_CACHE`: reads the range in bounded pieces, so caching stages fetch it.
async fn cache(backend: &SharedBackend, offset: u64, length: u64) -> r3map_core::Result<()> {
    let mut piece = vec![0u8; (length as usize).min(CACHE_PIECE)];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(piece.len() as u64) as usize;
        backend.read_at(offset + done, &mut piece[..n]).await?;
        done += n as u64;
    }
    Ok(())
}

async fn transmission(
    state: Arc<State>,
    io: BoxStream,
    mut buf: BytesMut,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    tracing::debug!(
        export = %session.export.name,
        structured = session.structured,
        "client entered transmission"
    );
    let session = Arc::new(session);
    let (mut reader, writer) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Outgoing>(state.max_in_flight);
    let backlog = Arc::new(Backlog::default());
    let writer = tokio::spawn(write_replies(writer, rx, backlog.clone()));
    let count = Arc::new(Semaphore::new(state.max_in_flight));
    let bytes = Arc::new(Semaphore::new(state.max_in_flight_bytes));
    let pool = BufferPool::new(state.max_request as usize, state.max_in_flight_bytes);
    let mut decoder = RequestDecoder::new(state.max_request);
    let mut result = Ok(());
    'read: loop {
        loop {
            let request = match decoder.decode_header(&mut buf) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(err) => {
                    result = Err(err.into());
                    break 'read;
                }
            };
            if request.command == cmd::DISC {
                break 'read;
            }
            let follows = request.payload == Payload::Follows;
            if let Err(refusal) = check_request(&request, &session, state.max_request) {
                if follows {
                    decoder.discard(u64::from(request.length));
                }
                tracing::debug!(handle = request.handle, message = %refusal.message, "request refused");
                let head = error_reply(
                    request.handle,
                    session.structured,
                    refusal.error,
                    &refusal.message,
                );
                let out = Outgoing {
                    head,
                    data: None,
                    _permits: None,
                };
                if tx.send(out).await.is_err() {
                    break 'read;
                }
                continue;
            }
            tokio::select! {
                () = backlog.admit() => {}
                _ = shutdown.changed() => break 'read,
                _ = tx.closed() => break 'read,
            }
            // A read or write holds the whole class of its pooled buffer (at most
            // `max_request`).
            let cost = match request.command {
                cmd::READ | cmd::WRITE if request.length > 0 => pool.class_of(request.length as usize) as u32,
                _ => 1,
            };
            let count_permit = count.clone().acquire_owned().await.expect("never closed");
            let byte_permit = bytes
                .clone()
                .acquire_many_owned(cost)
                .await
                .expect("never closed");
            let payload = if follows && request.length > 0 {
                let mut data = pool.take(request.length as usize);
                let target = data.as_mut_slice();
                let buffered = buf.len().min(target.len());
                target[..buffered].copy_from_slice(&buf[..buffered]);
                buf.advance(buffered);
                let read = tokio::select! {
                    read = reader.read_exact(&mut target[buffered..]) => read,
                    _ = shutdown.changed() => break 'read,
                    _ = tx.closed() => break 'read,
                };
                if let Err(err) = read {
                    result = Err(if err.kind() == std::io::ErrorKind::UnexpectedEof {
                        ConnectionError::Truncated
                    } else {
                        err.into()
                    });
                    break 'read;
                }
                Some(data)
            } else {
                None
            };
            let session = session.clone();
            let pool = pool.clone();
            let backlog = backlog.clone();
            let tx = tx.clone();
            let reading = if request.command == cmd::READ {
                request.length as usize
            } else {
                0
            };
            backlog.reading.fetch_add(reading, Ordering::AcqRel);
            let is_write = request.command == cmd::WRITE;
            let mut task = Box::pin(async move {
                let (head, data) = execute(request, payload, &session, &pool).await;
                backlog.finished(reading, data.as_ref().map_or(0, |d| d.as_ref().len()));
                let _ = tx
                    .send(Outgoing {
                        head,
                        data,
                        _permits: Some((count_permit, byte_permit)),
                    })
                    .await;
            });
            // A write's data was just received on this thread and is in its cache: a backend
            // that completes at once (local memory or page cache) copies it here. One that
            // must wait (a remote backend) continues as its own task, as every other request.
            if !is_write || poll_once(task.as_mut()).await.is_pending() {
                tokio::spawn(task);
            }
        }
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            _ = shutdown.changed() => break 'read,
            _ = tx.closed() => break 'read,
        };
        match read {
            Ok(0) => {
                if !buf.is_empty() || decoder.skipping() > 0 {
                    result = Err(ConnectionError::Truncated);
                }
                break;
            }
            Ok(_) => {}
            Err(err) => {
                result = Err(err.into());
                break;
            }
        }
    }
    // Requests in flight hold their own senders: the writer ends after their replies.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            if result.is_ok() {
                result = Err(err.into());
            }
        }
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
    result
}

/// Polls `future` once from the calling task.
async fn poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}

/// Writes replies as they complete. Whatever is ready is sent together: with a vectored
/// stream (TCP, UNIX socket) as one `writev` of every header and data buffer, without copying;
/// otherwise small pieces are gathered in a buffer and large data is written directly.
async fn write_replies(
    mut writer: tokio::io::WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<Outgoing>,
    backlog: Arc<Backlog>,
) -> std::io::Result<()> {
    let vectored = writer.is_write_vectored();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut staging = BytesMut::new();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        if vectored {
            write_vectored_batch(&mut writer, &batch).await?;
        } else {
            write_staged_batch(&mut writer, &batch, &mut staging).await?;
        }
        let sent = batch
            .iter()
            .filter_map(|out| out.data.as_ref())
            .map(|data| data.as_ref().len())
            .sum();
        // Frees the buffers and the permits of the sent replies.
        batch.clear();
        backlog.sent(sent);
    }
    writer.flush().await?;
    writer.shutdown().await
}

async fn write_vectored_batch(
    writer: &mut tokio::io::WriteHalf<BoxStream>,
    batch: &[Outgoing],
) -> std::io::Result<()> {
    let mut slices = Vec::with_capacity(2 * batch.len());
    for out in batch {
        slices.push(IoSlice::new(&out.head));
        if let Some(data) = &out.data {
            slices.push(IoSlice::new(data.as_ref()));
        }
    }
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = writer.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    writer.flush().await
}

async fn write_staged_batch(
    writer: &mut tokio::io::WriteHalf<BoxStream>,
    batch: &[Outgoing],
    staging: &mut BytesMut,
) -> std::io::Result<()> {
    let pieces = batch
        .iter()
        .flat_map(|out| [&out.head[..], out.data.as_ref().map_or(&[][..], |d| d.as_ref())]);
    for piece in pieces {
        if staging.len() + piece.len() > WRITE_BUFFER && !staging.is_empty() {
            writer.write_all(staging).await?;
            staging.clear();
        }
        if piece.len() >= WRITE_BUFFER {
            writer.write_all(piece).await?;
        } else {
            staging.extend_from_slice(piece);
        }
    }
    if !staging.is_empty() {
        writer.write_all(staging).await?;
        staging.clear();
    }
    writer.flush().await
}
