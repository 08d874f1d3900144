//! The NBD server: a listener (TCP or UNIX socket) with a connection cap, and per connection a
//! fixed-newstyle handshake followed by the transmission phase.
//!
//! # Layout
//!
//! - `listener`: [`Server`]: binding, accepting under the connection cap, shutdown.
//! - `handshake`: the option phase (TLS, structured replies, extended headers, metadata
//!   contexts, `GO`).
//! - `transmission`: reading and checking requests and running them against the backend.
//! - `reply_writer`: sending replies (vectored, with a write deadline).
//! - `ordering`: a FLUSH waits for the writes to its export running on every connection, and a
//!   write of a connection its client already reset is not started (ordering across
//!   reconnects).
//!
//! Transmission runs three kinds of work per connection: the connection task reads and
//! validates requests, each valid request runs as its own task against the backend (bounded by
//! one semaphore on the number and one on the bytes in flight, per connection, and one on the
//! bytes in flight of the whole server), and a single writer task sends replies. A reply is
//! built completely (a read's data is in memory) before its header is written, so a backend
//! error becomes an error reply and never desynchronises the stream.
//!
//! Reads and writes are the hot path, and both keep their data in buffers reused from a
//! server-wide pool (`pool`: no allocation, zeroing or page faults per request, memory within
//! the server's memory budget). For reads, the writer sends every ready header and data buffer
//! with one vectored write (no copy), and the reader stops taking requests while too much read
//! data waits for the socket (`Backlog`), so the data is still in the CPU caches when the
//! kernel copies it. For writes, the reader buffers only request headers; a write's data is
//! read from the socket straight into a pooled buffer of its size, and the write runs right
//! there on the reader's thread if the backend completes it without waiting (memory, page
//! cache), so the backend copies data that is still in this CPU's cache. A write that has to
//! wait (a remote backend) continues as its own task like every other request.
//!
//! Limits that hold against abusive clients: a handshake deadline, an idle deadline, a write
//! deadline (a client that stops reading replies), the connection cap (refusals are logged), the
//! per-connection and server-wide memory budgets, and a shutdown grace after which connections
//! are cut whatever their state.

mod handshake;
mod listener;
mod ordering;
mod reply_writer;
mod transmission;

use std::sync::Arc;
use std::time::Duration;

use r3map_core::SharedBackend;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

use crate::codec::CodecError;
use crate::pool::BufferPool;
use crate::tls::{ServerTls, TlsError};
use crate::wire;

pub use listener::{ListenAddr, OpenConnections, Server};

/// Largest `max_request`: a read's reply chunk must describe its length plus 8 bytes of offset
/// in 32 bits.
pub const MAX_REQUEST_LIMIT: u32 = u32::MAX - 8;
/// Default of [`ServerConfig::memory_budget`] (stated in `r3map serve --help`).
pub const DEFAULT_MEMORY_BUDGET: usize = 512 << 20;

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
    /// Payload bytes of all connections' requests (and idle pooled buffers) that may be in
    /// memory at the same time: what unauthenticated clients can make the server hold.
    pub memory_budget: usize,
    /// Connections served at the same time; further clients are refused (and logged).
    pub max_connections: usize,
    /// A client that has not finished the handshake in this time is disconnected.
    pub handshake_timeout: Duration,
    /// A client with no request in flight that sends nothing for this long is disconnected.
    pub idle_timeout: Duration,
    /// A reply write that makes no progress for this long (a client that stopped reading)
    /// disconnects the client.
    pub write_timeout: Duration,
    /// On shutdown, requests in flight get this long to finish; then connections are cut.
    pub shutdown_grace: Duration,
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
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_connections: 128,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
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
        if !(4096..=MAX_REQUEST_LIMIT).contains(&self.max_request) {
            return invalid(format!(
                "max_request of {} bytes must be between 4096 bytes and {MAX_REQUEST_LIMIT}",
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
        if self.memory_budget < self.max_request as usize || self.memory_budget > Semaphore::MAX_PERMITS {
            return invalid(format!(
                "memory_budget ({}) must be at least max_request ({})",
                self.memory_budget, self.max_request
            ));
        }
        let timeouts = [self.handshake_timeout, self.idle_timeout, self.write_timeout];
        if timeouts.iter().any(Duration::is_zero) {
            return invalid("handshake, idle and write timeouts must be above zero".into());
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
    #[error("client sent NBD_OPT_EXPORT_NAME after negotiating extended headers (the protocol requires NBD_OPT_GO)")]
    ExportNameAfterExtendedHeaders,
    #[error("client sent data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    #[error("TLS handshake failed: {}", r3map_tls::describe_handshake_error(.0))]
    TlsHandshake(std::io::Error),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("client sent nothing for {0:?}")]
    Idle(Duration),
    #[error("client read no reply for {0:?} (it stopped reading)")]
    WriteTimeout(Duration),
    #[error("the server shut down and the client did not finish within {0:?}")]
    ShutdownGrace(Duration),
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
    idle_timeout: Duration,
    write_timeout: Duration,
    shutdown_grace: Duration,
    /// Data buffers of every connection, at most `memory_budget` bytes.
    pool: Arc<BufferPool>,
    /// The server-wide memory budget in bytes; every request holds its buffer's class.
    memory: Arc<Semaphore>,
    memory_budget: usize,
    shutdown: watch::Sender<bool>,
    /// Per export (same order as `exports`): the writes running on every connection to it,
    /// which a FLUSH of that export waits for (and a FLUSH of another export does not).
    writes: Vec<Arc<ordering::WriteBarrier>>,
}

impl State {
    fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// The write barrier of `export` (one of `exports`).
    fn writes_of(&self, export: &Arc<Export>) -> Arc<ordering::WriteBarrier> {
        let index = self
            .exports
            .iter()
            .position(|e| Arc::ptr_eq(e, export))
            .expect("a session's export is one of the server's");
        self.writes[index].clone()
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
                writes: config.exports.iter().map(|_| Arc::default()).collect(),
                exports: config.exports.into_iter().map(Arc::new).collect(),
                tls: config.tls,
                require_tls: config.require_tls,
                max_request: config.max_request,
                max_in_flight: config.max_in_flight,
                max_in_flight_bytes: config.max_in_flight_bytes,
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
                write_timeout: config.write_timeout,
                shutdown_grace: config.shutdown_grace,
                pool: BufferPool::new(config.max_request as usize, config.memory_budget),
                memory: Arc::new(Semaphore::new(config.memory_budget)),
                memory_budget: config.memory_budget,
                shutdown,
            }),
        })
    }

    /// Serves one client over `stream` until it disconnects or the service shuts down.
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(Box::new(stream), None).await
    }

    /// Serves one client; `probe` tells whether the client has closed its socket.
    async fn serve(
        &self,
        stream: BoxStream,
        probe: Option<ordering::PeerProbe>,
    ) -> Result<(), ConnectionError> {
        let shutdown = self.state.shutdown.subscribe();
        let state = &self.state;
        let handshake = tokio::time::timeout(
            state.handshake_timeout,
            handshake::handshake(state, stream, shutdown.clone()),
        );
        let Some((io, buf, session)) = handshake
            .await
            .map_err(|_| ConnectionError::HandshakeTimeout(state.handshake_timeout))??
        else {
            return Ok(());
        };
        transmission::transmission(state.clone(), io, buf, session, shutdown, probe).await
    }

    /// Bytes of request data all connections hold right now (pooled buffers in use).
    pub fn memory_in_use(&self) -> usize {
        self.state.memory_budget - self.state.memory.available_permits()
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
