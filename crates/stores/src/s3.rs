//! [`S3Store`]: chunks as objects in a bucket of any S3-compatible service.
//!
//! One object per chunk, named by the [`KeyLayout`] (by default the Go r3map's: `PREFIX-OFFSET`);
//! a missing object reads as zeros. Requests are presigned by `rusty-s3` (SigV4 in the query string) and sent by a pooled
//! `reqwest` client, many at once ([`crate::KeyedBackend`] keeps several chunk requests of one
//! backend request in flight). Path-style (`http://host/bucket/key`) and virtual-hosted
//! (`http://bucket.host/key`) addressing are both supported; path-style is the default because
//! it works with IP-address endpoints.
//!
//! Answers are read with bounds: an object longer than its chunk, or an error body longer than
//! a few KiB, is cut off, never buffered whole.

pub mod credentials;

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use r3map_core::{Error, Result};
use reqwest::StatusCode;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use url::Url;

use crate::keyed::{ChunkStore, KeyLayout};

/// Most bytes of an error answer read to find its `<Code>`.
const MAX_ERROR_BODY: usize = 4096;

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// `http://` or `https://` URL of the service.
    pub endpoint: Url,
    /// Bucket name.
    pub bucket: String,
    /// Object names start with this.
    pub prefix: String,
    /// How object names are formed from the prefix and the chunk's offset.
    pub layout: KeyLayout,
    /// Region for request signing (most S3-compatible servers accept any).
    pub region: String,
    /// Virtual-hosted (`bucket.host`) instead of path-style addressing.
    pub virtual_hosted: bool,
    /// Access key and secret (see [`credentials::resolve`]).
    pub credentials: Credentials,
    /// Time to connect plus time one request may take.
    pub deadline: Duration,
    /// Host names resolved to fixed addresses instead of through DNS (like `curl --resolve`),
    /// e.g. a virtual-hosted bucket name on a test server.
    pub resolve: Vec<(String, SocketAddr)>,
}

impl S3Options {
    /// Path-style addressing of `bucket` at `endpoint`, region `us-east-1`.
    pub fn new(
        endpoint: Url,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        credentials: Credentials,
    ) -> Self {
        Self {
            endpoint,
            bucket: bucket.into(),
            prefix: prefix.into(),
            layout: KeyLayout::Go,
            region: "us-east-1".into(),
            virtual_hosted: false,
            credentials,
            deadline: Duration::from_secs(30),
            resolve: Vec::new(),
        }
    }
}

/// Chunks stored as S3 objects; see the module documentation.
#[derive(Debug)]
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
    client: reqwest::Client,
    prefix: String,
    layout: KeyLayout,
    /// How long a presigned URL stays valid: the deadline, at least a minute (clock skew).
    validity: Duration,
    endpoint: String,
}

impl S3Store {
    /// Checks that the bucket exists and the credentials are accepted (a `HEAD` of the bucket,
    /// within the deadline); errors name the endpoint and the bucket.
    pub async fn connect(options: &S3Options) -> Result<Self> {
        let endpoint = format!(
            "s3://{}/{} at {}",
            options.bucket, options.prefix, options.endpoint
        );
        let style = if options.virtual_hosted {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let bucket = Bucket::new(
            options.endpoint.clone(),
            style,
            options.bucket.clone(),
            options.region.clone(),
        )
        .map_err(|err| Error::InvalidConfig(format!("{endpoint}: unusable bucket address: {err:?}")))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.deadline)
            .timeout(options.deadline)
            // Only the named endpoint is ever contacted: no proxy from the environment.
            .no_proxy()
            .pool_max_idle_per_host(64);
        for (host, addr) in &options.resolve {
            builder = builder.resolve(host, *addr);
        }
        let client = builder
            .build()
            .map_err(|err| Error::InvalidConfig(format!("{endpoint}: cannot set up HTTP: {err}")))?;
        let store = Self {
            bucket,
            credentials: options.credentials.clone(),
            client,
            prefix: options.prefix.clone(),
            layout: options.layout,
            validity: options.deadline.max(Duration::from_secs(60)),
            endpoint,
        };
        let url = store
            .bucket
            .head_bucket(Some(&store.credentials))
            .sign(store.validity);
        let response = store.send(store.client.head(url), "cannot open").await?;
        match response.status() {
            status if status.is_success() => Ok(store),
            // A HEAD answer has no body: name the likely causes by status.
            StatusCode::NOT_FOUND => Err(Error::Remote(format!(
                "cannot open {}: the bucket does not exist; create it first",
                store.endpoint
            ))),
            StatusCode::FORBIDDEN => Err(store.refused("cannot open", "AccessDenied")),
            status => Err(Error::Remote(format!(
                "cannot open {}: the service answered {status}",
                store.endpoint
            ))),
        }
    }

    fn key(&self, offset: u64) -> String {
        // The Go r3map's S3 layout is PREFIX-OFFSET even with an empty prefix.
        self.layout.key(&self.prefix, offset, false)
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        request.send().await.map_err(|err| self.http_error(what, err))
    }

    fn http_error(&self, what: &str, err: reqwest::Error) -> Error {
        let message = format!("{what} {}: {err}", self.endpoint);
        let kind = if err.is_timeout() {
            std::io::ErrorKind::TimedOut
        } else if err.is_connect() {
            std::io::ErrorKind::ConnectionRefused
        } else if err.is_request() || err.is_body() {
            std::io::ErrorKind::ConnectionReset
        } else {
            return Error::Remote(message);
        };
        Error::from(std::io::Error::new(kind, message))
    }

    fn refused(&self, what: &str, code: &str) -> Error {
        Error::Remote(format!(
            "{what} {}: the service refused the credentials ({code}); check AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, the shared credentials file, or --s3-credentials",
            self.endpoint
        ))
    }

    /// The error for an unsuccessful answer, from its status and `<Code>`.
    async fn failure(&self, what: &str, key: &str, response: reqwest::Response) -> Error {
        let status = response.status();
        let code = error_code(response).await;
        match code.as_deref() {
            Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken") => {
                self.refused(what, code.as_deref().unwrap_or_default())
            }
            Some("NoSuchBucket") => Error::Remote(format!(
                "{what} {}: the bucket does not exist (any more)",
                self.endpoint
            )),
            _ if status.is_server_error() => Error::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!(
                    "{what} {}: object {key:?}: the service answered {status} {code:?}",
                    self.endpoint
                ),
            )),
            _ => Error::Remote(format!(
                "{what} {}: object {key:?}: the service answered {status} {code:?}",
                self.endpoint
            )),
        }
    }
}

/// The `<Code>` of an S3 error answer, reading at most [`MAX_ERROR_BODY`] bytes.
async fn error_code(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while let Ok(Some(piece)) = response.chunk().await {
        body.extend_from_slice(&piece[..piece.len().min(MAX_ERROR_BODY - body.len())]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let start = text.find("<Code>")? + "<Code>".len();
    let end = start + text[start..].find("</Code>")?;
    Some(text[start..end].to_string())
}

#[async_trait]
impl ChunkStore for S3Store {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn get(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let key = self.key(offset);
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &key)
            .sign(self.validity);
        let mut response = self.send(self.client.get(url), "cannot read from").await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            let code = error_code(response).await;
            // NoSuchKey (or a bare 404): never written. A missing bucket is an error.
            if code.as_deref() == Some("NoSuchBucket") {
                return Err(Error::Remote(format!(
                    "cannot read from {}: the bucket does not exist (any more)",
                    self.endpoint
                )));
            }
            buf.fill(0);
            return Ok(());
        }
        if !status.is_success() {
            return Err(self.failure("cannot read from", &key, response).await);
        }
        let mut filled = 0;
        loop {
            let piece = match response.chunk().await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(err) => return Err(self.http_error("cannot read from", err)),
            };
            if filled + piece.len() > buf.len() {
                return Err(self.wrong_length(&key, "more than", buf.len()));
            }
            buf[filled..filled + piece.len()].copy_from_slice(&piece);
            filled += piece.len();
        }
        if filled != buf.len() {
            return Err(self.wrong_length(&key, &format!("{filled} bytes instead of"), buf.len()));
        }
        Ok(())
    }

    async fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        let key = self.key(offset);
        let url = self
            .bucket
            .put_object(Some(&self.credentials), &key)
            .sign(self.validity);
        let response = self
            .send(self.client.put(url).body(data.to_vec()), "cannot write to")
            .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.failure("cannot write to", &key, response).await)
        }
    }

    async fn delete(&self, offset: u64) -> Result<()> {
        let key = self.key(offset);
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), &key)
            .sign(self.validity);
        let response = self.send(self.client.delete(url), "cannot write to").await?;
        // Deleting a missing object succeeds (204) on S3; some servers say 404.
        if response.status().is_success() || response.status() == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.failure("cannot write to", &key, response).await)
        }
    }

    /// An acknowledged PUT is stored: nothing is pending.
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

impl S3Store {
    fn wrong_length(&self, key: &str, what: &str, chunk: usize) -> Error {
        Error::Remote(format!(
            "{}: object {key:?} holds {what} the {chunk}-byte chunk; was it written with another \
             chunk size?",
            self.endpoint
        ))
    }
}
