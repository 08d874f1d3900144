//! The gRPC server: the Go-compatible `Backend` service over named exports, optionally the
//! Go-compatible `Seeder` service over a migration seeder, and r3map's extension of each; TLS
//! (optionally mutual) with r3map-tls, bearer tokens, and bounded work.

mod backend;
mod seeder;
mod shared;
mod stream;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use r3map_migration::Seeder;
use r3map_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;

pub use shared::{Export, EXPORT_KEY};

use crate::auth::{Auth, Token};
use crate::limits::{ServerLimits, CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};
use crate::pb::{ext, migration, mount};

/// A peer that stops answering pings is dropped (its calls in flight fail instead of hanging).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A configured server; [`GrpcServer::serve`] runs it.
pub struct GrpcServer {
    exports: Vec<Export>,
    seeder: Option<Arc<Seeder>>,
    tls: Option<ServerTls>,
    token: Option<Token>,
    limits: ServerLimits,
    compress: bool,
    extension: bool,
}

impl GrpcServer {
    /// A server of `exports` (the first one is what a client naming no export, such as a Go
    /// peer, gets). Plaintext, no token, default limits, compression on.
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            exports,
            seeder: None,
            tls: None,
            token: None,
            limits: ServerLimits::default(),
            compress: true,
            extension: true,
        }
    }

    /// Also serves the `Seeder` services for this migration source.
    pub fn seeder(mut self, seeder: Arc<Seeder>) -> Self {
        self.seeder = Some(seeder);
        self
    }

    /// Requires TLS (and client certificates if `tls` is mutual).
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires this bearer token on every call.
    pub fn token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    pub fn limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether chunks are sent lz4-compressed where that shrinks them (zero chunks are always
    /// elided).
    pub fn compress(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Serves only the Go r3map's services, as a Go server does (for interoperability checks:
    /// r3map clients then fall back to the Go calls).
    pub fn without_extension(mut self) -> Self {
        self.extension = false;
        self
    }

    /// Warns loudly when writes are open to more than the holders of a credential: without
    /// TLS, without client authentication (a token or client certificates), or with a token
    /// that travels in plain text.
    fn warn_if_open(&self, addr: Option<SocketAddr>) {
        let writable = self.exports.iter().any(|e| !e.read_only) || self.seeder.is_some();
        if !writable {
            return;
        }
        let tls = self.tls.is_some();
        let mutual = self.tls.as_ref().is_some_and(|tls| tls.is_mutual());
        let authenticated = self.token.is_some() || mutual;
        let at = addr.map_or("?".into(), |a| a.to_string());
        let who = if addr.is_some_and(|a| a.ip().is_loopback()) {
            "every local user and process can change the data"
        } else {
            "ANYONE WHO REACHES THIS ADDRESS CAN CHANGE THE DATA"
        };
        match (tls, authenticated) {
            (false, false) => tracing::warn!(
                "WARNING: gRPC server on {at} accepts writes WITHOUT TLS AND WITHOUT A TOKEN: {who}; \
                 use --tls-cert/--tls-key and --token-file, or --read-only"
            ),
            (false, true) => tracing::warn!(
                "WARNING: gRPC server on {at} accepts writes WITHOUT TLS: the token travels in plain \
                 text, and whoever sees the traffic can use it and read the data; add --tls-cert/--tls-key"
            ),
            (true, false) => tracing::warn!(
                "WARNING: gRPC server on {at} accepts writes over TLS WITHOUT CLIENT AUTHENTICATION: \
                 {who}; add --token-file or --tls-client-ca, or --read-only"
            ),
            (true, true) => {}
        }
    }

    /// Serves connections from `listener` until `shutdown` completes; calls in flight are
    /// then finished (tonic's graceful shutdown) and new ones refused.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let addr = listener.local_addr().ok();
        self.warn_if_open(addr);
        if self.exports.is_empty() && self.seeder.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a gRPC server needs at least one export or a seeder",
            ));
        }
        let shared = Arc::new(shared::Shared::new(self.exports, self.limits, self.compress));
        let auth = Auth(self.token);
        // Cancelled when the drain time after shutdown is over, or when `serve` returns: then
        // every connection is cut, so nothing is served after this function returns.
        let cut = CancellationToken::new();
        let _cut_on_return = cut.clone().drop_guard();
        let (incoming, accept_loop) = accept(listener, self.tls, self.limits, cut.clone());
        let _stop_accepting = AbortOnDrop(accept_loop);
        let drain = self.limits.drain;
        let shutdown = async move {
            shutdown.await;
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                cut.cancel();
            });
        };

        // The message limits are raised to one maximal chunk on every service, deliberately:
        // tonic's 4 MiB default would refuse Go's 32 MiB chunks with an opaque error.
        macro_rules! limited {
            ($server:expr) => {
                InterceptedService::new(
                    $server
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE),
                    auth.clone(),
                )
            };
        }
        let backend = (!shared.exports.is_empty()).then(|| backend::BackendService {
            shared: shared.clone(),
        });
        let seeder = self.seeder.map(|seeder| seeder::SeederService {
            seeder,
            shared: shared.clone(),
        });
        let router = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(self.limits.per_connection)
            .max_concurrent_streams(self.limits.per_connection as u32)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_optional_service(
                backend
                    .clone()
                    .map(|s| limited!(mount::backend_server::BackendServer::new(s))),
            )
            .add_optional_service(
                backend
                    .filter(|_| self.extension)
                    .map(|s| limited!(ext::backend_extension_server::BackendExtensionServer::new(s))),
            )
            .add_optional_service(
                seeder
                    .clone()
                    .map(|s| limited!(migration::seeder_server::SeederServer::new(s))),
            )
            .add_optional_service(
                seeder
                    .filter(|_| self.extension)
                    .map(|s| limited!(ext::seeder_extension_server::SeederExtensionServer::new(s))),
            );
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(io::Error::other)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections within the connection cap, does the TLS handshake (bounded in time)
/// off the accept loop, and hands finished connections to tonic.
fn accept(
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: ServerLimits,
    cut: CancellationToken,
) -> (ReceiverStream<io::Result<Conn>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = tls.map(|tls| {
        let mut config = (*tls.config()).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        r3map_tls::tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!("gRPC accept failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "refusing a gRPC connection: {} connections are open", limits.connections);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            match &acceptor {
                None => {
                    let conn = Conn::new(Box::new(tcp), peer, slot, &cut);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx, cut) = (acceptor.clone(), tx.clone(), cut.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Ok(Conn::new(Box::new(stream), peer, slot, &cut))).await;
                            }
                            Ok(Err(err)) => tracing::warn!(
                                %peer,
                                "gRPC TLS handshake failed: {}",
                                r3map_tls::describe_handshake_error(&err)
                            ),
                            Err(_) => tracing::warn!(%peer, "gRPC TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One accepted connection (plaintext or TLS); it holds its place in the connection cap, and
/// fails every read and write once the server cuts its connections.
pub(crate) struct Conn {
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        stream: Box<dyn Stream>,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        cut: &CancellationToken,
    ) -> Self {
        Self {
            stream,
            peer,
            cut: Box::pin(cut.clone().cancelled_owned()),
            _slot: slot,
        }
    }

    /// Whether the server cut this connection (polling registers for the wake-up).
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server is shutting down",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = SocketAddr;
    fn connect_info(&self) -> SocketAddr {
        self.peer
    }
}

macro_rules! unless_cut {
    ($this:expr, $cx:expr) => {
        if let Poll::Ready(Err(err)) = $this.poll_cut($cx) {
            return Poll::Ready(Err(err));
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        unless_cut!(this, cx);
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        unless_cut!(this, cx);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        unless_cut!(this, cx);
        Pin::new(&mut this.stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        unless_cut!(this, cx);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
