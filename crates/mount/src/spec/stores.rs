//! `redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://` and `s3://` specifications:
//! a resource stored chunk by chunk in Redis or an S3 bucket (crate `r3map-stores`). TLS servers
//! are verified against the system's trusted roots, or the CA file of `rediss://…?tls-ca=PATH`.
//!
//! Secrets never appear in a specification (a command line is readable by every user of the
//! machine through `ps`): the Redis password and the S3 credentials come from
//! [`StoreCredentials`], which the CLI fills from files and the environment.

use std::path::PathBuf;
use std::sync::Arc;

use r3map_core::stages::{Connector, Reconnecting};
use r3map_core::{Error, Result, SharedBackend};
use r3map_stores::{open_backend, KeyLayout, KeyedOptions, RedisOptions, RedisStore, S3Options, S3Store};

use super::{BackendSpec, Params, RemoteOptions};
use crate::size::format_bytes;

/// Chunk size of a Redis or S3 resource when the specification names none: one key or object
/// per MiB keeps round trips few and values far below Redis' 512 MiB limit.
pub const DEFAULT_STORE_CHUNK: u64 = 1 << 20;

/// Port of `redis://` specifications that name none.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// Secrets for Redis and S3 remotes, from outside the specification.
#[derive(Debug, Clone, Default)]
pub struct StoreCredentials {
    /// Redis `AUTH` password.
    pub redis_password: Option<String>,
    /// An AWS-format credentials file to take the S3 keys from (instead of the environment and
    /// `~/.aws/credentials`).
    pub s3_credentials_file: Option<PathBuf>,
    /// The profile in that file (default: `AWS_PROFILE`, else `default`).
    pub s3_profile: Option<String>,
}

/// A resource in Redis (a server or a cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSpec {
    /// `HOST:PORT` of the server or of some cluster nodes.
    pub nodes: Vec<String>,
    pub cluster: bool,
    pub tls: bool,
    /// CA (PEM file) to verify a TLS server against instead of the system's roots (`tls-ca=`).
    pub tls_ca: Option<PathBuf>,
    /// ACL user (`redis://USER@HOST:PORT`).
    pub username: Option<String>,
    pub prefix: String,
    pub db: i64,
    pub size: Option<u64>,
    pub chunk_size: u64,
    pub layout: KeyLayout,
}

/// A resource in an S3 bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Spec {
    pub bucket: String,
    pub prefix: String,
    /// `http://` or `https://` URL of the service.
    pub endpoint: String,
    pub region: String,
    pub virtual_hosted: bool,
    pub size: Option<u64>,
    pub chunk_size: u64,
    pub layout: KeyLayout,
}

/// `redis://…` and friends; `None` for other schemes.
pub(super) fn parse_redis(text: &str) -> std::result::Result<Option<BackendSpec>, String> {
    let schemes = [
        ("redis://", false, false),
        ("rediss://", false, true),
        ("redis+cluster://", true, false),
        ("rediss+cluster://", true, true),
    ];
    let Some((rest, cluster, tls)) = schemes
        .iter()
        .find_map(|&(scheme, cluster, tls)| text.strip_prefix(scheme).map(|rest| (rest, cluster, tls)))
    else {
        return Ok(None);
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let (username, hosts) = match authority.rsplit_once('@') {
        Some((user, _)) if user.contains(':') => {
            return Err(format!(
                "{}: never put a password in the specification (every user can read command \
                 lines); give it in R3MAP_REDIS_PASSWORD or --redis-password-file",
                redact(text)
            ))
        }
        Some((user, hosts)) => (Some(user.to_string()).filter(|u| !u.is_empty()), hosts),
        None => (None, authority),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(format!(
                "{text:?} names no host; write redis://HOST:PORT/PREFIX or redis+cluster://H1:P1,H2:P2/PREFIX"
            ));
        }
        nodes.push(with_port(host, DEFAULT_REDIS_PORT, text)?);
    }
    if !cluster && nodes.len() > 1 {
        return Err(format!(
            "{text:?} names several servers; a cluster is redis+cluster://H1:P1,H2:P2/PREFIX"
        ));
    }
    let mut params = Params::parse(query)?;
    let db = match params.take("db") {
        None => 0,
        Some(_) if cluster => return Err(format!("{text:?}: a Redis Cluster has only database 0")),
        Some(db) => db.parse().map_err(|_| format!("db={db:?} is not a number"))?,
    };
    let tls_ca = params.take("tls-ca").map(PathBuf::from);
    if tls_ca.is_some() && !tls {
        return Err(format!(
            "{text:?}: tls-ca= is for TLS connections; use rediss:// (or rediss+cluster://)"
        ));
    }
    let spec = RedisSpec {
        nodes,
        cluster,
        tls,
        tls_ca,
        username,
        prefix: prefix.to_string(),
        db,
        size: params.size("size")?,
        chunk_size: chunk(&mut params)?,
        layout: layout(&mut params)?,
    };
    params.reject_unused(text)?;
    Ok(Some(BackendSpec::Redis(spec)))
}

/// `s3://BUCKET/PREFIX?endpoint=URL&…`; `None` for other schemes.
pub(super) fn parse_s3(text: &str) -> std::result::Result<Option<BackendSpec>, String> {
    let Some(rest) = text.strip_prefix("s3://") else {
        return Ok(None);
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "{text:?} names no bucket; write s3://BUCKET/PREFIX?endpoint=URL&size=SIZE"
        ));
    }
    let mut params = Params::parse(query)?;
    let region = params.take("region").unwrap_or_else(|| "us-east-1".into());
    let endpoint = params
        .take("endpoint")
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!(
            "endpoint={endpoint:?} must be an http:// or https:// URL"
        ));
    }
    let virtual_hosted = match params.take("addressing").as_deref() {
        None | Some("path") => false,
        Some("virtual") => true,
        Some(other) => return Err(format!("addressing={other:?} must be path or virtual")),
    };
    let spec = S3Spec {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint,
        region,
        virtual_hosted,
        size: params.size("size")?,
        chunk_size: chunk(&mut params)?,
        layout: layout(&mut params)?,
    };
    params.reject_unused(text)?;
    Ok(Some(BackendSpec::S3(spec)))
}

fn chunk(params: &mut Params) -> std::result::Result<u64, String> {
    match params.size("chunk")? {
        Some(0) => Err("chunk=0: a chunk needs at least one byte".into()),
        Some(size) => Ok(size),
        None => Ok(DEFAULT_STORE_CHUNK),
    }
}

fn layout(params: &mut Params) -> std::result::Result<KeyLayout, String> {
    match params.take("layout") {
        None => Ok(KeyLayout::Go),
        Some(name) => KeyLayout::parse(&name).ok_or_else(|| {
            format!("layout={name:?} must be go (PREFIX-OFFSET, the Go r3map's) or folder (PREFIX/OFFSET)")
        }),
    }
}

/// `host:port`, `[v6]:port`, or either without a port (then `default`).
fn with_port(host: &str, default: u16, text: &str) -> std::result::Result<String, String> {
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    if !has_port {
        return Ok(format!("{host}:{default}"));
    }
    let (_, port) = host.rsplit_once(':').expect("has a port");
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} in {text:?} is not a number"))?;
    Ok(host.to_string())
}

/// The specification with anything between `://` and `@` replaced, for messages.
fn redact(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(start), Some(end)) if start + 3 < end => format!("{}***{}", &text[..start + 3], &text[end..]),
        _ => text.to_string(),
    }
}

/// The resource's size: the specification's, else the other side's; both must agree.
fn resolve_size(what: &str, size: Option<u64>, size_hint: Option<u64>) -> Result<u64> {
    match (size, size_hint) {
        (Some(size), Some(hint)) if size != hint => Err(Error::InvalidConfig(format!(
            "{what} is given as {} but {} are needed",
            format_bytes(size),
            format_bytes(hint)
        ))),
        (Some(size), _) | (None, Some(size)) => Ok(size),
        (None, None) => Err(Error::InvalidConfig(format!(
            "{what} needs a size (a store does not record one): add ?size=SIZE (e.g. ?size=1GiB)"
        ))),
    }
}

impl RedisSpec {
    /// Connects (the first connection must succeed, so a store that is down or refuses the
    /// credentials fails at once, naming its endpoint), then reconnects after connection loss.
    pub(super) async fn open(&self, size_hint: Option<u64>, remote: &RemoteOptions) -> Result<SharedBackend> {
        let size = resolve_size("a Redis resource", self.size, size_hint)?;
        let deadline = remote.reconnect.request_timeout;
        let options = RedisOptions {
            nodes: self.nodes.clone(),
            cluster: self.cluster,
            tls: self.tls,
            tls_ca: self.tls_ca.clone(),
            prefix: self.prefix.clone(),
            layout: self.layout,
            db: self.db,
            username: self.username.clone(),
            password: remote.stores.redis_password.clone(),
            deadline,
            ..RedisOptions::standalone(String::new(), String::new())
        };
        let endpoint = options.endpoint();
        let chunk_size = self.chunk_size;
        let connector: Connector = Arc::new(move || {
            let options = options.clone();
            Box::pin(async move {
                let store = RedisStore::connect(&options).await?;
                Ok(Arc::new(open_backend(store, size, chunk_size, keyed(deadline))?) as SharedBackend)
            })
        });
        reconnecting(endpoint, connector, remote).await
    }
}

impl S3Spec {
    /// Like [`RedisSpec::open`]: credentials from [`StoreCredentials`], the environment or the
    /// shared credentials file.
    pub(super) async fn open(&self, size_hint: Option<u64>, remote: &RemoteOptions) -> Result<SharedBackend> {
        let size = resolve_size("an S3 resource", self.size, size_hint)?;
        let endpoint = self.endpoint.parse().map_err(|err| {
            Error::InvalidConfig(format!("endpoint {:?} is not a URL: {err}", self.endpoint))
        })?;
        let credentials = r3map_stores::s3::credentials::resolve(
            remote.stores.s3_credentials_file.as_deref(),
            remote.stores.s3_profile.as_deref(),
        )?;
        let deadline = remote.reconnect.request_timeout;
        let mut options = S3Options::new(endpoint, &self.bucket, &self.prefix, credentials.credentials);
        options.region = self.region.clone();
        options.virtual_hosted = self.virtual_hosted;
        options.layout = self.layout;
        options.deadline = deadline;
        let address = format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint);
        let chunk_size = self.chunk_size;
        let connector: Connector = Arc::new(move || {
            let options = options.clone();
            Box::pin(async move {
                let store = S3Store::connect(&options).await?;
                Ok(Arc::new(open_backend(store, size, chunk_size, keyed(deadline))?) as SharedBackend)
            })
        });
        reconnecting(address, connector, remote).await
    }
}

/// Chunk requests in flight per backend request, each with the remote deadline.
fn keyed(deadline: std::time::Duration) -> KeyedOptions {
    KeyedOptions {
        deadline,
        ..KeyedOptions::default()
    }
}

async fn reconnecting(
    address: String,
    connector: Connector,
    remote: &RemoteOptions,
) -> Result<SharedBackend> {
    let backend = Reconnecting::connect_to(address, connector, remote.reconnect.clone()).await?;
    Ok(Arc::new(backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(text: &str) -> RedisSpec {
        match text.parse() {
            Ok(BackendSpec::Redis(spec)) => spec,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn s3(text: &str) -> S3Spec {
        match text.parse() {
            Ok(BackendSpec::S3(spec)) => spec,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn parses_redis_specifications() {
        assert_eq!(
            redis("redis://127.0.0.1:7000/vm1?size=1GiB&chunk=64KiB"),
            RedisSpec {
                nodes: vec!["127.0.0.1:7000".into()],
                cluster: false,
                tls: false,
                tls_ca: None,
                username: None,
                prefix: "vm1".into(),
                db: 0,
                size: Some(1 << 30),
                chunk_size: 65536,
                layout: KeyLayout::Go,
            }
        );
        let spec = redis("rediss://alice@cache.example:6380/a/b?db=3&layout=folder");
        assert_eq!(spec.nodes, ["cache.example:6380"]);
        assert!(spec.tls && !spec.cluster);
        assert_eq!(spec.username.as_deref(), Some("alice"));
        assert_eq!((spec.prefix.as_str(), spec.db), ("a/b", 3));
        assert_eq!(spec.layout, KeyLayout::Folder);
        assert_eq!(spec.chunk_size, DEFAULT_STORE_CHUNK);
        let spec = redis("redis+cluster://h1:7001,h2,[::1]:7003/");
        assert!(spec.cluster && !spec.tls);
        assert_eq!(spec.nodes, ["h1:7001", "h2:6379", "[::1]:7003"]);
        assert_eq!(spec.prefix, "");
        assert!(redis("rediss+cluster://h:1").tls);
        let spec = redis("rediss://h:1/x?tls-ca=/etc/r3map/ca.pem");
        assert_eq!(
            spec.tls_ca.as_deref(),
            Some(std::path::Path::new("/etc/r3map/ca.pem"))
        );
    }

    #[test]
    fn parses_s3_specifications() {
        assert_eq!(
            s3("s3://disks/vm1?endpoint=http://127.0.0.1:8333&size=1GiB&addressing=virtual"),
            S3Spec {
                bucket: "disks".into(),
                prefix: "vm1".into(),
                endpoint: "http://127.0.0.1:8333".into(),
                region: "us-east-1".into(),
                virtual_hosted: true,
                size: Some(1 << 30),
                chunk_size: DEFAULT_STORE_CHUNK,
                layout: KeyLayout::Go,
            }
        );
        let spec = s3("s3://b?region=eu-west-1&chunk=4MiB&layout=folder");
        assert_eq!(spec.endpoint, "https://s3.eu-west-1.amazonaws.com");
        assert_eq!((spec.prefix.as_str(), spec.chunk_size), ("", 4 << 20));
        assert_eq!(spec.layout, KeyLayout::Folder);
    }

    #[test]
    fn explains_bad_store_specifications() {
        let err = |s: &str| s.parse::<BackendSpec>().unwrap_err();
        let message = err("redis://user:hunter2@h:1/x");
        assert!(message.contains("never put a password"), "{message}");
        assert!(
            !message.contains("hunter2"),
            "the password is not repeated: {message}"
        );
        assert!(err("redis://h1:1,h2:2/x").contains("redis+cluster://"));
        assert!(err("redis+cluster://h:1/x?db=2").contains("only database 0"));
        assert!(err("redis:///x").contains("names no host"));
        assert!(err("redis://h:port/x").contains("not a number"));
        assert!(err("redis://h/x?layout=java").contains("must be go"));
        assert!(err("redis://h/x?chunk=0").contains("at least one byte"));
        assert!(err("redis://h/x?colour=red").contains("unknown parameter"));
        assert!(err("redis://h/x?tls-ca=/ca.pem").contains("use rediss://"));
        assert!(err("s3:///x").contains("names no bucket"));
        assert!(err("s3://b/x?endpoint=ftp://h").contains("http://"));
        assert!(err("s3://b/x?addressing=dns").contains("path or virtual"));
    }

    #[tokio::test]
    async fn a_store_needs_a_size_and_keeps_to_it() {
        let err = |spec: &str, hint| {
            let spec: BackendSpec = spec.parse().unwrap();
            async move { spec.open(hint).await.err().unwrap().to_string() }
        };
        // Both fail before any connection is tried.
        assert!(err("redis://127.0.0.1:1/x", None).await.contains("needs a size"));
        let message = err("redis://127.0.0.1:1/x?size=1MiB", Some(4096)).await;
        assert!(
            message.contains("1.00 MiB") && message.contains("4.00 KiB"),
            "{message}"
        );
    }
}
