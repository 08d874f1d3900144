//! Backend specifications as users write them on the command line:
//!
//! - `memory:SIZE` — in-process memory (e.g. `memory:256MiB`)
//! - `file:PATH[?size=SIZE][&direct=true]` — a regular file or block device; created with SIZE
//!   if missing; an existing file of another size is refused, never resized
//! - `dir:PATH?size=SIZE[&chunk=SIZE][&open-files=N]` — a directory with one file per chunk
//! - `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` (and `nbds…` for TLS) — an NBD
//!   server, reconnected with backoff when the connection drops
//! - `grpc://HOST[:PORT]/EXPORT[?size=SIZE][&compress=false]` (and `grpcs://` for TLS) — an r3map
//!   gRPC server, or a Go r3map one (which cannot report its size: give `size`); reconnected the
//!   same way
//! - `redis://[USER@]HOST[:PORT]/PREFIX?size=SIZE[&chunk=SIZE][&db=N][&layout=go|folder]`
//!   (`rediss://` for TLS, `&tls-ca=PATH` for a private CA), `redis+cluster://H1:P1,H2:P2/PREFIX?…`
//!   (`rediss+cluster://`) —
//!   one key per chunk in Redis or a Redis Cluster; see [`stores`]
//! - `s3://BUCKET/PREFIX?size=SIZE[&endpoint=URL][&region=R][&chunk=SIZE][&addressing=path|virtual][&layout=go|folder]`
//!   — one object per chunk in an S3-compatible bucket (`https://` endpoints use TLS)

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use r3map_backends::{DirectoryBackend, DirectoryOptions, FileBackend, FileOptions};
use r3map_core::stages::{Connector, ReconnectOptions, Reconnecting};
use r3map_core::{Backend, Error, MemoryBackend, Result, SharedBackend};
use r3map_nbd::{Client, ClientOptions, ClientTls};

use crate::size::{format_bytes, parse_size};

mod stores;

pub use stores::{RedisSpec, S3Spec, StoreCredentials, DEFAULT_REDIS_PORT, DEFAULT_STORE_CHUNK};

/// Chunk size of a directory backend when the specification names none.
pub const DEFAULT_DIRECTORY_CHUNK: u64 = 1 << 20;

/// A parsed backend specification; [`BackendSpec::open`] opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// In-process memory; `None` means "the size of the other side".
    Memory { size: Option<u64> },
    /// A file (or block device).
    File {
        path: PathBuf,
        size: Option<u64>,
        direct: bool,
    },
    /// One file per chunk in a directory.
    Directory {
        path: PathBuf,
        size: Option<u64>,
        chunk_size: u64,
        open_files: Option<usize>,
    },
    /// An NBD server.
    Nbd { uri: String },
    /// A gRPC server (r3map's or the Go r3map's).
    Grpc {
        /// `HOST:PORT`.
        addr: String,
        export: String,
        tls: bool,
        /// For a Go server, which cannot report it.
        size: Option<u64>,
        /// Ask for and send lz4-compressed chunks.
        compress: bool,
    },
    /// Redis or a Redis Cluster, one key per chunk.
    Redis(RedisSpec),
    /// An S3 bucket, one object per chunk.
    S3(S3Spec),
}

/// The port of `grpc://` and `grpcs://` URIs that name none (`r3map serve --grpc` listens where
/// it is told; 10809 is NBD's port and 10810 the delay proxy's default).
pub const DEFAULT_GRPC_PORT: u16 = 10811;

/// How to reach remote backends.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// TLS settings for `nbds://` and `grpcs://` URIs.
    pub tls: Option<ClientTls>,
    /// Bearer token for gRPC servers that require one.
    pub token: Option<r3map_grpc::Token>,
    /// Reconnection and the time one request may wait for the remote.
    pub reconnect: ReconnectOptions,
    /// Redis password and S3 credentials.
    pub stores: StoreCredentials,
}

impl FromStr for BackendSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.starts_with("nbd://")
            || text.starts_with("nbds://")
            || text.starts_with("nbd+unix://")
            || text.starts_with("nbds+unix://")
        {
            r3map_nbd::NbdUri::parse(text).map_err(|err| err.to_string())?;
            return Ok(BackendSpec::Nbd {
                uri: text.to_string(),
            });
        }
        if let Some(spec) = parse_grpc(text)? {
            return Ok(spec);
        }
        if let Some(spec) = stores::parse_redis(text)? {
            return Ok(spec);
        }
        if let Some(spec) = stores::parse_s3(text)? {
            return Ok(spec);
        }
        let (kind, rest) = text.split_once(':').ok_or_else(|| {
            format!("{text:?} has no kind; write memory:SIZE, file:PATH or dir:PATH?size=SIZE")
        })?;
        let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = Params::parse(query)?;
        let spec = match kind {
            "memory" | "mem" => {
                let size = if target.is_empty() {
                    params.size("size")?
                } else {
                    Some(parse_size(target)?)
                };
                BackendSpec::Memory { size }
            }
            "file" => BackendSpec::File {
                path: path(target, text)?,
                size: params.size("size")?,
                direct: params.flag("direct")?,
            },
            "dir" | "directory" => BackendSpec::Directory {
                path: path(target, text)?,
                size: params.size("size")?,
                chunk_size: params.size("chunk")?.unwrap_or(DEFAULT_DIRECTORY_CHUNK),
                open_files: params
                    .take("open-files")
                    .map(|v| v.parse().map_err(|_| format!("open-files={v:?} is not a number")))
                    .transpose()?,
            },
            other => {
                return Err(format!(
                    "unknown backend kind {other:?}; known kinds: memory, file, dir, nbd://, grpc://, redis://, redis+cluster://, s3://"
                ))
            }
        };
        params.reject_unused(text)?;
        Ok(spec)
    }
}

impl BackendSpec {
    /// Opens the backend. `size_hint` (the size of the other side of a mount) is used where the
    /// specification names no size.
    pub async fn open(&self, size_hint: Option<u64>) -> Result<SharedBackend> {
        self.open_with(size_hint, &RemoteOptions::default()).await
    }

    /// Like [`BackendSpec::open`], with settings for remote backends.
    pub async fn open_with(&self, size_hint: Option<u64>, remote: &RemoteOptions) -> Result<SharedBackend> {
        let missing_size = |what: &str| {
            Error::InvalidConfig(format!("{what} needs a size: add ?size=SIZE (e.g. ?size=1GiB)"))
        };
        let backend: SharedBackend = match self {
            BackendSpec::Memory { size } => Arc::new(MemoryBackend::new(
                size.or(size_hint).ok_or_else(|| missing_size("memory"))?,
            )),
            BackendSpec::File { path, size, direct } => {
                let options = FileOptions::new().direct_io(*direct);
                let wanted = size.or(size_hint);
                if path.exists() {
                    let file = FileBackend::open(path, options)?;
                    if let Some(wanted) = wanted.filter(|&w| w != file.size()) {
                        return Err(Error::InvalidConfig(format!(
                            "{} has {} but {} are needed; r3map never resizes an existing file",
                            path.display(),
                            format_bytes(file.size()),
                            format_bytes(wanted)
                        )));
                    }
                    Arc::new(file)
                } else {
                    let size = wanted.ok_or_else(|| missing_size("a new file"))?;
                    Arc::new(FileBackend::create(path, size, options)?)
                }
            }
            BackendSpec::Directory {
                path,
                size,
                chunk_size,
                open_files,
            } => {
                let size = size.or(size_hint).ok_or_else(|| missing_size("a directory"))?;
                let mut options = DirectoryOptions::new();
                if let Some(count) = open_files {
                    options = options.open_files(*count);
                }
                Arc::new(DirectoryBackend::open(path, size, *chunk_size, options)?)
            }
            BackendSpec::Nbd { uri } => {
                let options = ClientOptions {
                    tls: remote.tls.clone(),
                    ..ClientOptions::default()
                };
                let address = uri.clone();
                let uri = uri.clone();
                let connector: Connector = Arc::new(move || {
                    let (uri, options) = (uri.clone(), options.clone());
                    Box::pin(async move {
                        let client = Client::connect(&uri, options).await.map_err(client_error)?;
                        Ok(Arc::new(client) as SharedBackend)
                    })
                });
                let remote = Reconnecting::connect_to(address, connector, remote.reconnect.clone()).await?;
                if let Some(wanted) = size_hint.filter(|&w| w != remote.size()) {
                    return Err(Error::InvalidConfig(format!(
                        "the NBD export has {} but {} are needed",
                        format_bytes(remote.size()),
                        format_bytes(wanted)
                    )));
                }
                Arc::new(remote)
            }
            BackendSpec::Grpc {
                addr,
                export,
                tls,
                size,
                compress,
            } => {
                let tls = match (tls, &remote.tls) {
                    (false, _) => None,
                    (true, Some(tls)) => Some(tls.clone()),
                    (true, None) => {
                        return Err(Error::InvalidConfig(
                            "grpcs:// needs the CA (or the server's certificate) to trust: give --tls-ca"
                                .into(),
                        ))
                    }
                };
                let options = r3map_grpc::ClientOptions {
                    tls,
                    token: remote.token.clone(),
                    request_timeout: remote.reconnect.request_timeout,
                    compress: *compress,
                    size: size.or(size_hint),
                    ..r3map_grpc::ClientOptions::default()
                };
                let (addr, export) = (addr.clone(), export.clone());
                let connector: Connector = Arc::new(move || {
                    let (addr, export, options) = (addr.clone(), export.clone(), options.clone());
                    Box::pin(async move {
                        let client = r3map_grpc::GrpcBackend::connect(&addr, &export, options).await?;
                        Ok(Arc::new(client) as SharedBackend)
                    })
                });
                let remote = Reconnecting::connect(connector, remote.reconnect.clone()).await?;
                if let Some(wanted) = size_hint.filter(|&w| w != remote.size()) {
                    return Err(Error::InvalidConfig(format!(
                        "the gRPC export has {} but {} are needed",
                        format_bytes(remote.size()),
                        format_bytes(wanted)
                    )));
                }
                Arc::new(remote)
            }
            BackendSpec::Redis(spec) => spec.open(size_hint, remote).await?,
            BackendSpec::S3(spec) => spec.open(size_hint, remote).await?,
        };
        Ok(backend)
    }
}

/// A failed connection attempt: refused or unreachable servers count as connection loss (so
/// reconnecting retries them); anything else (wrong export, TLS refused) is final.
fn client_error(err: r3map_nbd::ClientError) -> Error {
    use r3map_nbd::ClientError;
    let kind = match &err {
        ClientError::Connect { source, .. } | ClientError::Io(source) => source.kind(),
        ClientError::Timeout(_) => std::io::ErrorKind::TimedOut,
        _ => return Error::Remote(err.to_string()),
    };
    Error::from(std::io::Error::new(kind, err.to_string()))
}

/// `grpc://HOST[:PORT]/EXPORT?…` and `grpcs://…`; `None` for other schemes.
fn parse_grpc(text: &str) -> std::result::Result<Option<BackendSpec>, String> {
    let (tls, rest) = if let Some(rest) = text.strip_prefix("grpc://") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("grpcs://") {
        (true, rest)
    } else {
        return Ok(None);
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(format!("{text:?} names no host; write grpc://HOST:PORT/EXPORT"));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let addr = if has_port {
        let (_, port) = authority.rsplit_once(':').expect("has a port");
        port.parse::<u16>()
            .map_err(|_| format!("port {port:?} in {text:?} is not a number"))?;
        authority.to_string()
    } else {
        format!("{authority}:{DEFAULT_GRPC_PORT}")
    };
    let mut params = Params::parse(query)?;
    let size = params.size("size")?;
    let compress = match params.take("compress").as_deref() {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(other) => return Err(format!("compress={other:?} must be true or false")),
    };
    params.reject_unused(text)?;
    Ok(Some(BackendSpec::Grpc {
        addr,
        export: export.to_string(),
        tls,
        size,
        compress,
    }))
}

fn path(target: &str, text: &str) -> std::result::Result<PathBuf, String> {
    if target.is_empty() {
        Err(format!("{text:?} names no path"))
    } else {
        Ok(PathBuf::from(target))
    }
}

/// `key=value&key=value` with every key used at most once and no unknown keys.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> std::result::Result<Self, String> {
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
            if pairs.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(format!("parameter {key:?} is given twice"));
            }
            pairs.push((key.to_string(), value.to_string()));
        }
        Ok(Self(pairs))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        let index = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(index).1)
    }

    fn size(&mut self, key: &str) -> std::result::Result<Option<u64>, String> {
        self.take(key).map(|v| parse_size(&v)).transpose()
    }

    fn flag(&mut self, key: &str) -> std::result::Result<bool, String> {
        match self.take(key).as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(other) => Err(format!("{key}={other:?} must be true or false")),
        }
    }

    fn reject_unused(&self, text: &str) -> std::result::Result<(), String> {
        match self.0.first() {
            Some((key, _)) => Err(format!("unknown parameter {key:?} in {text:?}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            "memory:1MiB".parse(),
            Ok(BackendSpec::Memory { size: Some(1 << 20) })
        );
        assert_eq!("memory:".parse(), Ok(BackendSpec::Memory { size: None }));
        assert_eq!(
            "file:/var/tmp/x?size=4k&direct=true".parse(),
            Ok(BackendSpec::File {
                path: "/var/tmp/x".into(),
                size: Some(4096),
                direct: true
            })
        );
        assert_eq!(
            "dir:/d?size=1G&chunk=64k".parse(),
            Ok(BackendSpec::Directory {
                path: "/d".into(),
                size: Some(1 << 30),
                chunk_size: 65536,
                open_files: None
            })
        );
    }

    #[test]
    fn parses_grpc_uris() {
        assert_eq!(
            "grpc://127.0.0.1:7000/disk".parse(),
            Ok(BackendSpec::Grpc {
                addr: "127.0.0.1:7000".into(),
                export: "disk".into(),
                tls: false,
                size: None,
                compress: true
            })
        );
        assert_eq!(
            "grpcs://[::1]/?size=1MiB&compress=false".parse(),
            Ok(BackendSpec::Grpc {
                addr: format!("[::1]:{DEFAULT_GRPC_PORT}"),
                export: "".into(),
                tls: true,
                size: Some(1 << 20),
                compress: false
            })
        );
        let err = |s: &str| s.parse::<BackendSpec>().unwrap_err();
        assert!(err("grpc:///x").contains("names no host"));
        assert!(err("grpc://h:port/x").contains("not a number"));
        assert!(err("grpc://h:1/x?colour=red").contains("unknown parameter"));
        assert!(err("grpc://h:1/x?compress=maybe").contains("true or false"));
    }

    #[test]
    fn explains_bad_specifications() {
        let err = |s: &str| s.parse::<BackendSpec>().unwrap_err();
        assert!(err("/just/a/path").contains("has no kind"));
        assert!(err("tape:/dev/st0").contains("unknown backend kind"));
        assert!(err("file:/x?colour=blue").contains("unknown parameter \"colour\""));
        assert!(err("file:/x?size=1k&size=2k").contains("given twice"));
        assert!(err("file:?size=1k").contains("names no path"));
        assert!(err("file:/x?direct=maybe").contains("true or false"));
    }

    #[tokio::test]
    async fn opens_files_and_refuses_to_resize_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let spec: BackendSpec = format!("file:{}?size=8KiB", path.display()).parse().unwrap();
        let backend = spec.open(None).await.unwrap();
        backend.write_at(100, b"kept").await.unwrap();
        drop(backend);
        let reopened = spec.open(None).await.unwrap();
        let mut buf = [0; 4];
        reopened.read_at(100, &mut buf).await.unwrap();
        assert_eq!(&buf, b"kept");
        let other: BackendSpec = format!("file:{}", path.display()).parse().unwrap();
        let err = other.open(Some(4096)).await.err().unwrap();
        assert!(err.to_string().contains("never resizes"), "{err}");
        let missing: BackendSpec = format!("file:{}", dir.path().join("new").display())
            .parse()
            .unwrap();
        assert!(missing
            .open(None)
            .await
            .err()
            .unwrap()
            .to_string()
            .contains("needs a size"));
    }
}
