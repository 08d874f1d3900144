//! How `r3map migrate` reaches the other host: the gRPC `Seeder` service (Go-compatible
//! messages) plus the r3map extension for sessions, rounds, commit, hashes and abort.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use r3map_grpc::{ClientOptions, GrpcSeederLink, GrpcServer, Token};
use r3map_migration::{MigrationError, Seeder, SeederLink};
use r3map_tls::{ClientTls, ServerTls};
use tokio::net::TcpListener;

/// How a seeder secures its listener.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TLS certificate chain (PEM) of the seeder; enables grpcs://
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required (mutual TLS)
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token a leecher must present
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// How a leecher (or `abort`) reaches a seeder (the same flags as `r3map mount`).
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// CA certificate (PEM) that signed the seeder's certificate, or the seeder's own (pinned)
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for seeders that require mutual TLS
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token the seeder expects
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `leech --then-seed`: how this host secures its listener as the next seeder.
#[derive(Debug, Clone, clap::Args)]
pub struct OnwardArgs {
    /// TLS certificate chain (PEM) for seeding onward; enables grpcs://
    #[arg(long, requires = "then_seed_tls_key")]
    pub then_seed_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for seeding onward
    #[arg(long, requires = "then_seed_tls_cert")]
    pub then_seed_tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates the next leecher must present (mutual TLS)
    #[arg(long, requires = "then_seed_tls_cert")]
    pub then_seed_tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token the next leecher must present
    #[arg(long)]
    pub then_seed_token_file: Option<PathBuf>,
}

impl From<&OnwardArgs> for ServeArgs {
    fn from(onward: &OnwardArgs) -> Self {
        ServeArgs {
            tls_cert: onward.then_seed_tls_cert.clone(),
            tls_key: onward.then_seed_tls_key.clone(),
            tls_client_ca: onward.then_seed_tls_client_ca.clone(),
            token_file: onward.then_seed_token_file.clone(),
        }
    }
}

/// A seeder reachable over the network until stopped.
pub struct Listening {
    uri: String,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Listening {
    /// The URI a leecher connects to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Stops accepting calls; calls in flight finish first.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("the seeder's server stopped with an error: {err}"),
            Err(err) => eprintln!("the seeder's server failed: {err}"),
        }
    }
}

/// Serves `seeder` over gRPC at `listen` (`HOST:PORT`).
pub async fn serve(seeder: Arc<Seeder>, listen: &str, args: &ServeArgs) -> Result<Listening> {
    let mut server = GrpcServer::new(Vec::new()).seeder(seeder);
    let tls = args.tls_cert.is_some();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        server = server.tls(
            ServerTls::from_pem_files(cert, key, args.tls_client_ca.as_deref())
                .context("cannot load the TLS certificate")?,
        );
    }
    if let Some(path) = &args.token_file {
        server = server.token(Token::from_file(path).map_err(|err| anyhow!("{err}"))?);
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let served = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let scheme = if tls { "grpcs" } else { "grpc" };
    Ok(Listening {
        uri: format!("{scheme}://{address}"),
        stop,
        served,
    })
}

/// `HOST:PORT` and whether TLS is asked for, from `grpc://HOST:PORT` or `grpcs://HOST:PORT`.
fn address_of(uri: &str) -> Result<(&str, bool)> {
    let (rest, tls) = if let Some(rest) = uri.strip_prefix("grpcs://") {
        (rest, true)
    } else if let Some(rest) = uri.strip_prefix("grpc://") {
        (rest, false)
    } else {
        bail!("a seeder is reached by grpc://HOST:PORT or grpcs://HOST:PORT, not {uri:?}");
    };
    Ok((rest.trim_end_matches('/'), tls))
}

fn options(uri: &str, args: &LinkArgs) -> Result<(String, ClientOptions)> {
    let (address, tls) = address_of(uri)?;
    let mut options = ClientOptions::default();
    match (&args.tls_ca, tls) {
        (Some(ca), _) => {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            options.tls = Some(ClientTls::from_pem_files(ca, identity).context("cannot load the TLS files")?);
        }
        (None, true) => bail!("grpcs:// needs --tls-ca (the CA that signed the seeder's certificate, or that certificate itself)"),
        (None, false) => {}
    }
    if let Some(path) = &args.token_file {
        options.token = Some(Token::from_file(path).map_err(|err| anyhow!("{err}"))?);
    }
    Ok((address.to_owned(), options))
}

async fn open(uri: &str, args: &LinkArgs) -> Result<GrpcSeederLink> {
    let (address, options) = options(uri, args)?;
    let plaintext = options.tls.is_none();
    GrpcSeederLink::connect(&address, options).await.with_context(|| {
        let hint = if plaintext {
            " (a seeder with TLS is reached by grpcs:// and --tls-ca)"
        } else {
            ""
        };
        format!("cannot reach the seeder at {uri}{hint}")
    })
}

/// Connects to the seeder at `uri`.
pub async fn connect(uri: &str, args: &LinkArgs) -> Result<Arc<dyn SeederLink>> {
    Ok(Arc::new(open(uri, args).await?))
}

/// Asks the seeder at `uri` to abort; returns the phase it was in.
pub async fn abort(uri: &str, args: &LinkArgs) -> Result<String> {
    open(uri, args)
        .await?
        .abort()
        .await
        .context("the seeder refused to abort")
}

/// [`abort`] from a leecher giving up, which must tell a refusal because the commit won
/// ([`MigrationError::HandedOff`]) from any other failure.
pub async fn abort_migration(uri: &str, args: &LinkArgs) -> Result<String, MigrationError> {
    let link = open(uri, args)
        .await
        .map_err(|err| MigrationError::InvalidConfig(format!("{err:#}")))?;
    link.abort().await
}
