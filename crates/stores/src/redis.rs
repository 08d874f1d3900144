//! [`RedisStore`]: chunks as Redis string values, on one server or a Redis Cluster.
//!
//! One key per chunk, named by the [`KeyLayout`] (by default the Go r3map's: `PREFIX-OFFSET`, or
//! the bare byte offset without a prefix). The connections are multiplexed: every command is written as
//! soon as it is issued, without waiting for earlier answers, so the many chunk commands of one
//! large request share round trips (pipelining). Standalone servers get a small pool of such
//! connections, each of which reconnects by itself after a failure; a cluster connection routes
//! each key to the master that owns its slot, so chunks are served by every master in parallel,
//! and follows slot moves and failovers.
//!
//! Durability is the server's: with `appendonly yes` and `appendfsync always`, Redis answers a
//! write only after it is in the fsynced append-only file, so every acknowledged chunk survives a
//! crash of the server. `sync` checks that the store still answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use r3map_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, RedisError, TlsCertificates};

use crate::keyed::{ChunkStore, KeyLayout};

/// Where and how to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// `HOST:PORT` of the server, or of some cluster nodes (the others are discovered).
    pub nodes: Vec<String>,
    /// Whether `nodes` are Redis Cluster nodes.
    pub cluster: bool,
    /// TLS (`rediss://`), verified against `tls_ca`, else the system's trusted roots.
    pub tls: bool,
    /// CA certificates (PEM file) to verify the server's certificate against instead of the
    /// system's trusted roots, for servers with a private CA (`rediss://…?tls-ca=PATH`).
    pub tls_ca: Option<PathBuf>,
    /// Prepended to every key; empty for the Go layout's bare offsets.
    pub prefix: String,
    /// How keys are formed from the prefix and the chunk's offset.
    pub layout: KeyLayout,
    /// Database number (standalone servers only; a cluster has only database 0).
    pub db: i64,
    /// ACL user name, if not `default`.
    pub username: Option<String>,
    /// Password (`AUTH`).
    pub password: Option<String>,
    /// Multiplexed connections to a standalone server.
    pub connections: usize,
    /// Time to connect and time one command may take.
    pub deadline: Duration,
}

impl RedisOptions {
    /// One standalone server at `HOST:PORT`, keys under `prefix`, defaults otherwise.
    pub fn standalone(node: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            nodes: vec![node.into()],
            cluster: false,
            tls: false,
            tls_ca: None,
            prefix: prefix.into(),
            layout: KeyLayout::Go,
            db: 0,
            username: None,
            password: None,
            connections: 4,
            deadline: Duration::from_secs(30),
        }
    }

    /// A cluster reached through `nodes` (`HOST:PORT` each), keys under `prefix`.
    pub fn cluster(nodes: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            nodes,
            cluster: true,
            ..Self::standalone(String::new(), prefix)
        }
    }

    /// `redis://H:P`, `rediss://H1:P1,H2:P2` (cluster): the endpoint as messages name it.
    pub fn endpoint(&self) -> String {
        let scheme = match (self.cluster, self.tls) {
            (false, false) => "redis",
            (false, true) => "rediss",
            (true, false) => "redis+cluster",
            (true, true) => "rediss+cluster",
        };
        format!("{scheme}://{}", self.nodes.join(","))
    }

    fn node_url(&self, node: &str) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{node}")
    }
}

enum Connections {
    Standalone {
        pool: Vec<ConnectionManager>,
        next: AtomicUsize,
    },
    Cluster(ClusterConnection),
}

/// Chunks stored in Redis; see the module documentation.
pub struct RedisStore {
    connections: Connections,
    prefix: String,
    layout: KeyLayout,
    endpoint: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects (within the deadline) and checks that the server answers and accepts the
    /// credentials; errors name the endpoint.
    pub async fn connect(options: &RedisOptions) -> Result<Self> {
        let endpoint = options.endpoint();
        if options.nodes.is_empty() || options.nodes.iter().any(|n| n.is_empty()) {
            return Err(Error::InvalidConfig(format!(
                "{endpoint}: no HOST:PORT to connect to"
            )));
        }
        let failed = |err: RedisError| plain_to_tls_hint(options, connect_error(options, &endpoint, err));
        let certificates = tls_certificates(options, &endpoint)?;
        let connections = if options.cluster {
            if options.db != 0 {
                return Err(Error::InvalidConfig(format!(
                    "{endpoint}: a Redis Cluster has only database 0"
                )));
            }
            let nodes: Vec<String> = options.nodes.iter().map(|n| options.node_url(n)).collect();
            let mut builder = ClusterClientBuilder::new(nodes)
                .connection_timeout(options.deadline)
                .response_timeout(options.deadline);
            if let Some(user) = &options.username {
                builder = builder.username(user);
            }
            if let Some(password) = &options.password {
                builder = builder.password(password);
            }
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder.build().map_err(failed)?;
            let connection = tokio::time::timeout(options.deadline, client.get_async_connection())
                .await
                .map_err(|_| Error::Timeout(options.deadline))?
                .map_err(failed)?;
            Connections::Cluster(connection)
        } else {
            if options.nodes.len() != 1 {
                return Err(Error::InvalidConfig(format!(
                    "{endpoint}: a standalone server has one address; use redis+cluster:// for a cluster"
                )));
            }
            let info = options
                .node_url(&options.nodes[0])
                .into_connection_info()
                .map_err(failed)?;
            let mut settings = info.redis_settings().clone().set_db(options.db);
            if let Some(user) = &options.username {
                settings = settings.set_username(user);
            }
            if let Some(password) = &options.password {
                settings = settings.set_password(password);
            }
            let info = info.set_redis_settings(settings);
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(info, certificates),
                None => redis::Client::open(info),
            }
            .map_err(failed)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.deadline))
                .set_response_timeout(Some(options.deadline))
                // Few quick attempts per (re)connection: a request waiting on a dead server
                // fails within its deadline instead of after a long backoff, and the next
                // request starts a fresh attempt.
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let mut pool = Vec::new();
            for _ in 0..options.connections.max(1) {
                let connect = ConnectionManager::new_with_config(client.clone(), config.clone());
                let manager = tokio::time::timeout(options.deadline, connect)
                    .await
                    .map_err(|_| Error::Timeout(options.deadline))?
                    .map_err(failed)?;
                pool.push(manager);
            }
            Connections::Standalone {
                pool,
                next: AtomicUsize::new(0),
            }
        };
        let store = Self {
            connections,
            prefix: options.prefix.clone(),
            layout: options.layout,
            endpoint,
        };
        // Connecting may succeed without a password (or, to a TLS port, without TLS); the first
        // command tells.
        store
            .query::<String>(&redis::cmd("PING"), "cannot use")
            .await
            .map_err(|err| plain_to_tls_hint(options, err))?;
        Ok(store)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd, what: &str) -> Result<T> {
        let result = match &self.connections {
            Connections::Standalone { pool, next } => {
                let index = next.fetch_add(1, Ordering::Relaxed) % pool.len();
                cmd.query_async(&mut pool[index].clone()).await
            }
            Connections::Cluster(connection) => cmd.query_async(&mut connection.clone()).await,
        };
        result.map_err(|err| redis_error(&self.endpoint, what, err))
    }

    fn key(&self, offset: u64) -> String {
        self.layout.key(&self.prefix, offset, true)
    }
}

#[async_trait]
impl ChunkStore for RedisStore {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn get(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let key = self.key(offset);
        let value: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(&key), "cannot read from")
            .await?;
        match value {
            None => buf.fill(0),
            Some(value) if value.len() == buf.len() => buf.copy_from_slice(&value),
            Some(value) => {
                return Err(Error::Remote(format!(
                    "{}: key {key:?} holds {} bytes, but chunks are {} bytes here; was it written \
                     with another chunk size?",
                    self.endpoint,
                    value.len(),
                    buf.len()
                )))
            }
        }
        Ok(())
    }

    async fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cmd = redis::cmd("SET").arg(self.key(offset)).arg(data).clone();
        self.query::<()>(&cmd, "cannot write to").await
    }

    async fn delete(&self, offset: u64) -> Result<()> {
        self.query::<()>(redis::cmd("DEL").arg(self.key(offset)), "cannot write to")
            .await
    }

    async fn sync(&self) -> Result<()> {
        self.query::<String>(&redis::cmd("PING"), "cannot sync").await?;
        Ok(())
    }
}

/// The CA file of `rediss://…?tls-ca=PATH`, read now so that a missing file is named.
fn tls_certificates(options: &RedisOptions, endpoint: &str) -> Result<Option<TlsCertificates>> {
    let Some(path) = &options.tls_ca else {
        return Ok(None);
    };
    if !options.tls {
        return Err(Error::InvalidConfig(format!(
            "{endpoint}: a TLS CA is given ({}) but the connection is not TLS; use rediss://",
            path.display()
        )));
    }
    let pem = std::fs::read(path).map_err(|err| {
        Error::InvalidConfig(format!(
            "{endpoint}: cannot read the TLS CA {}: {err}",
            path.display()
        ))
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A failure to connect; an untrusted server certificate says which CA option to give.
fn connect_error(options: &RedisOptions, endpoint: &str, err: RedisError) -> Error {
    let text = err.to_string();
    if options.tls && (text.contains("certificate") || text.contains("UnknownIssuer")) {
        let trusted = match &options.tls_ca {
            Some(path) => format!("the CA in {}", path.display()),
            None => "the system's trusted roots".to_string(),
        };
        return Error::Remote(format!(
            "cannot connect {endpoint}: its TLS certificate is not trusted by {trusted} ({err}); \
             give the CA that signed it (a PEM file) as tls-ca=PATH in the rediss:// URI's query"
        ));
    }
    redis_error(endpoint, "cannot connect", err)
}

/// A plain connection to a TLS port: the server resets it at the first command (redis-rs may
/// send one while connecting).
fn plain_to_tls_hint(options: &RedisOptions, err: Error) -> Error {
    match err {
        // Still a lost connection to the reconnecting stage (a restarting server resets too).
        Error::Io(io) if !options.tls && io.kind() == std::io::ErrorKind::ConnectionReset => {
            Error::from(std::io::Error::new(
                io.kind(),
                format!(
                    "{io}; the server reset the connection at the first command: if it speaks \
                     TLS, use rediss:// (with ?tls-ca=PATH for a private CA)"
                ),
            ))
        }
        other => other,
    }
}

/// A Redis failure as an r3map error naming the endpoint: lost or refused connections stay I/O
/// errors of their kind (so callers can tell connection loss), refused credentials say so.
fn redis_error(endpoint: &str, what: &str, err: RedisError) -> Error {
    let code = err.code().unwrap_or_default();
    if err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM")
    {
        return Error::Remote(format!(
            "{what} {endpoint}: the server refused the credentials ({err}); give the password in \
             R3MAP_REDIS_PASSWORD (and the user in the URL, redis://USER@HOST:PORT)"
        ));
    }
    if err.is_timeout() {
        return Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} {endpoint}: {err}"),
        ));
    }
    // A cluster between a master's failure and its replica's promotion, or a restarted server
    // still loading its append-only file: passing states, retried like a lost connection.
    let passing = matches!(code, "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "LOADING");
    if passing || err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
        let kind = if err.is_connection_refusal() {
            std::io::ErrorKind::ConnectionRefused
        } else {
            std::io::ErrorKind::ConnectionReset
        };
        return Error::from(std::io::Error::new(kind, format!("{what} {endpoint}: {err}")));
    }
    Error::Remote(format!("{what} {endpoint}: {err}"))
}
