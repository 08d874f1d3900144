//! Options shared by commands that reach a remote backend.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use r3map_core::stages::ReconnectOptions;
use r3map_core::SharedBackend;
use r3map_mount::{parse_duration, BackendSpec, RemoteOptions};
use r3map_nbd::ClientTls;

/// TLS, token and reconnection flags for `nbds://`, `grpc://`, `grpcs://` and other remotes.
#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// CA certificate (PEM) that signed the server's certificate (for nbds:// and grpcs:// URIs)
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the bearer token a gRPC server requires (grpc:// and grpcs:// URIs)
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Deadline of every remote request, from its start (waiting for a connection included):
    /// past it the request fails (EIO to the application) and the connection is made anew
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    remote_timeout: Duration,
}

impl RemoteArgs {
    /// The deadline of one remote request.
    pub fn timeout(&self) -> Duration {
        self.remote_timeout
    }

    pub fn options(&self) -> Result<RemoteOptions> {
        let tls = match &self.tls_ca {
            Some(ca) => {
                let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
                Some(ClientTls::from_pem_files(ca, identity).context("cannot load the TLS files")?)
            }
            None => None,
        };
        let reconnect = ReconnectOptions {
            request_timeout: self.remote_timeout,
            ..ReconnectOptions::default()
        };
        let token = self
            .token_file
            .as_deref()
            .map(r3map_grpc::Token::from_file)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(RemoteOptions {
            tls,
            token,
            reconnect,
        })
    }
}

/// Parses and opens a backend specification with user-facing error messages.
pub async fn open(text: &str, size_hint: Option<u64>, options: &RemoteOptions) -> Result<SharedBackend> {
    let spec: BackendSpec = text
        .parse()
        .map_err(|err| anyhow::anyhow!("invalid backend specification {text:?}: {err}"))?;
    spec.open_with(size_hint, options)
        .await
        .with_context(|| format!("cannot open {text}"))
}
