//! The listener: binds TCP or a UNIX socket, accepts clients under the connection cap
//! (refusing and logging the rest), and on shutdown stops accepting, gives connections their
//! grace period, cuts what is left and flushes every export.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::ordering::PeerProbe;
use super::{BoxStream, ServerConfig, ServerError, Service};
use crate::uri::{NbdUri, Transport};

/// Refusals are logged at most this often (with a count), so a flood cannot flood the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

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
    /// The next client and a printable peer address.
    async fn accept(&self) -> std::io::Result<(BoxStream, PeerProbe, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                crate::keepalive::enable(&stream)?;
                let probe = PeerProbe::new(&stream)?;
                Ok((Box::new(stream), probe, peer.to_string()))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let probe = PeerProbe::new(&stream)?;
                Ok((Box::new(stream), probe, "a UNIX socket client".into()))
            }
        }
    }
}

/// Logs refused connections, at most once per [`REFUSAL_LOG_INTERVAL`].
struct Refusals {
    last: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, peer: &str, max_connections: usize) {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|last| last.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            peer,
            max_connections,
            refused = self.unlogged,
            "refusing NBD connections: the connection cap is reached"
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}

/// How many client connections a [`Server`] is serving right now: accepted under the cap and
/// not yet ended (handshake included). A handle that stays readable while the server runs.
#[derive(Debug, Clone, Default)]
pub struct OpenConnections(Arc<AtomicU64>);

impl OpenConnections {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one connection until the returned guard is dropped.
    fn open(&self) -> OpenGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.0.clone())
    }
}

struct OpenGuard(Arc<AtomicU64>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound NBD server.
pub struct Server {
    service: Service,
    listener: Listener,
    addr: ListenAddr,
    max_connections: usize,
    open: OpenConnections,
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
            open: OpenConnections::default(),
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
            open: OpenConnections::default(),
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

    /// The URI a client uses for `export` (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`),
    /// percent-encoded.
    pub fn uri(&self, export: &str) -> String {
        let transport = match &self.addr {
            ListenAddr::Tcp(addr) => Transport::Tcp {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            ListenAddr::Unix(path) => Transport::Unix { socket: path.clone() },
        };
        NbdUri {
            transport,
            export: export.to_string(),
            tls: self.service.state.tls.is_some(),
        }
        .to_string()
    }

    /// The connection handler behind this server.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The number of connections [`Server::serve`] is serving, readable while it runs.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// Accepts clients until `shutdown` completes; then stops accepting, lets every connection
    /// finish its requests in flight (within the shutdown grace; connections still running
    /// after it are cut), flushes every export and removes a UNIX socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        tokio::pin!(shutdown);
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        let mut refusals = Refusals {
            last: None,
            unlogged: 0,
        };
        let mut backoff = Duration::from_millis(1);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
            match accepted {
                Ok((stream, probe, peer)) => {
                    backoff = Duration::from_millis(1);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        // Closing at once tells the client more than a silent accept queue.
                        refusals.refused(&peer, self.max_connections);
                        drop(stream);
                        continue;
                    };
                    let service = self.service.clone();
                    // Dropped with the task, also when the shutdown cuts it.
                    let open = self.open.open();
                    connections.spawn(async move {
                        if let Err(err) = service.serve(stream, Some(probe)).await {
                            tracing::info!(peer, error = %err, "NBD connection ended with an error");
                        }
                        drop((slot, open));
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
        // Every connection ends itself within the grace; this bound only guards against a bug.
        let bound = self.service.state.shutdown_grace + Duration::from_secs(1);
        let drained =
            tokio::time::timeout(bound, async { while connections.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                connections = connections.len(),
                "NBD connections still running after the shutdown grace were cut"
            );
            connections.shutdown().await;
        }
        let flushed = self.service.flush_all().await;
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
        flushed
    }
}
