//! Options shared by commands that reach a remote backend.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use r3map_core::stages::ReconnectOptions;
use r3map_core::SharedBackend;
use r3map_mount::spec::StoreCredentials;
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
    #[command(flatten)]
    stores: StoreArgs,
}

/// Where the secrets of redis:// and s3:// backends come from: files and the environment, never
/// the command line (every user of the machine can read it).
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// AWS-format credentials file for s3:// backends [default: AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, else AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials]
    #[arg(long, value_name = "FILE")]
    s3_credentials: Option<PathBuf>,
    /// Profile to use in the S3 credentials file [default: AWS_PROFILE, else default]
    #[arg(long, value_name = "NAME")]
    s3_profile: Option<String>,
    /// File holding the password of redis:// backends (first line) [default: the environment
    /// variable R3MAP_REDIS_PASSWORD]
    #[arg(long, value_name = "FILE")]
    redis_password_file: Option<PathBuf>,
}

impl StoreArgs {
    pub fn credentials(&self) -> Result<StoreCredentials> {
        let redis_password = match &self.redis_password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the Redis password from {}", path.display()))?;
                Some(text.lines().next().unwrap_or_default().to_string())
            }
            None => std::env::var("R3MAP_REDIS_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
        };
        Ok(StoreCredentials {
            redis_password,
            s3_credentials_file: self.s3_credentials.clone(),
            s3_profile: self.s3_profile.clone(),
        })
    }
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
            stores: self.stores.credentials()?,
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
