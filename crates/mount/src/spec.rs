//! Backend specifications as users write them on the command line:
//!
//! - `memory:SIZE` — in-process memory (e.g. `memory:256MiB`)
//! - `file:PATH[?size=SIZE][&direct=true]` — a regular file or block device; created with SIZE
//!   if missing; an existing file of another size is refused, never resized
//! - `dir:PATH?size=SIZE[&chunk=SIZE][&open-files=N]` — a directory with one file per chunk
//! - `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH` (and `nbds…` for TLS) — an NBD
//!   server, reconnected with backoff when the connection drops

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use r3map_backends::{DirectoryBackend, DirectoryOptions, FileBackend, FileOptions};
use r3map_core::stages::{Connector, ReconnectOptions, Reconnecting};
use r3map_core::{Backend, Error, MemoryBackend, Result, SharedBackend};
use r3map_nbd::{Client, ClientOptions, ClientTls};

use crate::size::{format_bytes, parse_size};

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
}

/// How to reach remote backends.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// TLS settings for `nbds://` URIs.
    pub tls: Option<ClientTls>,
    /// Reconnection and the time one request may wait for the remote.
    pub reconnect: ReconnectOptions,
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
                    "unknown backend kind {other:?}; known kinds: memory, file, dir"
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
