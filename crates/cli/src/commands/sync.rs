//! `r3map sync`: delta file sync, directly or through a hub.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use r3map_mount::{parse_duration, parse_size};
use r3map_sync::conn::Counters;
use r3map_sync::receiver::{receive, ReceiverConfig};
use r3map_sync::replica::Replica;
use r3map_sync::source::{Source, SourceConfig};
use r3map_sync::{hub::Hub, transport, Log};
use r3map_tls::{ClientTls, ServerTls};

/// Keep a file in sync between hosts: block hashes are compared and only changed blocks sent
///
/// The receiver sends the xxh3 of each block of its copy; the advertiser answers with the
/// blocks that differ (and the new size), as soon as its file changes (inotify events, not
/// polling); the receiver checks the whole version's blake3 digest and publishes it by rename,
/// so readers never see a file that mixes two versions. One advertiser feeds many receivers.
///
///   through a hub:  r3map sync hub
///                   r3map sync advertise FILE --hub 127.0.0.1:10810
///                   r3map sync receive COPY --from 127.0.0.1:10810 --name FILE-NAME
///   peer to peer:   r3map sync advertise FILE --listen 127.0.0.1:10810
///                   r3map sync receive COPY --from 127.0.0.1:10810 --name FILE-NAME
///
/// With mutual TLS, the common name of a peer's client certificate is its sync id: a hub only
/// pairs receivers with advertisers of the same sync id, and --allow-id limits who may connect.
/// Everything listens on loopback unless told otherwise. SIGINT/SIGTERM stop at once (a hash
/// pass already running finishes first); a receiver keeps what it staged and resumes from it.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, clap::Subcommand)]
enum Role {
    Hub(HubArgs),
    Advertise(AdvertiseArgs),
    Receive(ReceiveArgs),
}

/// Relay receivers to the advertisers of the files they ask for
#[derive(Debug, clap::Args)]
struct HubArgs {
    /// TCP address to listen on
    #[arg(long, default_value = "127.0.0.1:10810")]
    listen: String,
    #[command(flatten)]
    server_tls: ServerTlsArgs,
    #[command(flatten)]
    common: CommonArgs,
}

/// Offer a file to receivers (through a hub, or listening for them directly)
#[derive(Debug, clap::Args)]
struct AdvertiseArgs {
    /// The file to offer
    file: PathBuf,
    /// Name receivers ask for (default: the file's name)
    #[arg(long)]
    name: Option<String>,
    /// Hub to register with (address HOST:PORT)
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    hub: Option<String>,
    /// Listen for receivers directly on this TCP address (peer to peer, no hub)
    #[arg(long)]
    listen: Option<String>,
    /// Block size: the unit of comparison and transfer
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    block_size: u64,
    /// Threads for a hash pass over the file
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// With --listen: server certificate, and client certificates required
    #[command(flatten)]
    server_tls: ServerTlsArgs,
    /// With --hub: CA of the hub's certificate (enables TLS)
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Keep a replica of an advertised file
#[derive(Debug, clap::Args)]
struct ReceiveArgs {
    /// Where the replica lives (created if missing; published by rename)
    file: PathBuf,
    /// Hub or advertiser to connect to (HOST:PORT)
    #[arg(long)]
    from: String,
    /// Name of the advertised file (default: the replica's file name)
    #[arg(long)]
    name: Option<String>,
    /// CA (PEM) of the hub's or advertiser's certificate (enables TLS)
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM): its common name is the sync id
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Exit after publishing the first version (default: follow changes)
    #[arg(long)]
    once: bool,
    /// Refuse versions larger than this
    #[arg(long, default_value = "1TiB", value_parser = parse_size)]
    max_size: u64,
    /// Give up after this many failed connections in a row (0: retry forever)
    #[arg(long, default_value_t = 0)]
    attempts: u32,
    /// Threads for hashing the replica at start
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, clap::Args)]
struct ServerTlsArgs {
    /// TLS certificate chain (PEM) of this server (hub, or advertiser with --listen)
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required (mutual TLS; their common names are
    /// the sync ids)
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Accept only peers whose certificate has this common name (repeat for several)
    #[arg(long = "allow-id", requires = "tls_client_ca")]
    allow_ids: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// Deadline of every network read and write (keep-alives go out at a third of it)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

impl ServerTlsArgs {
    fn load(&self) -> Result<Option<ServerTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(
                ServerTls::from_pem_files(cert, key, self.tls_client_ca.as_deref())
                    .context("cannot load the TLS certificate")?,
            )),
            _ => Ok(None),
        }
    }
}

fn client_tls(
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<Option<ClientTls>> {
    let Some(ca) = ca else { return Ok(None) };
    let identity = cert.as_deref().zip(key.as_deref());
    Ok(Some(
        ClientTls::from_pem_files(ca, identity).context("cannot load the TLS files")?,
    ))
}

fn log() -> Log {
    Arc::new(|line| eprintln!("{line}"))
}

fn warn_plain(what: &str, tls: &Option<ServerTls>) {
    match tls {
        None => eprintln!(
            "WARNING: {what} runs without TLS: anyone who can reach it can read the synced files (add --tls-cert/--tls-key/--tls-client-ca)"
        ),
        Some(tls) if !tls.is_mutual() => eprintln!(
            "WARNING: {what} does not require client certificates: every peer shares one sync id (add --tls-client-ca)"
        ),
        Some(_) => {}
    }
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    match args.role {
        Role::Hub(args) => {
            let metrics = args.common.metrics.start().await?;
            let tls = args.server_tls.load()?;
            let listener = transport::bind(&args.listen).await?;
            warn_plain("the hub", &tls);
            eprintln!("hub listening on {}", listener.local_addr()?);
            let hub = Hub::new(args.common.timeout, args.server_tls.allow_ids.clone(), log());
            metrics.sync_counters(&hub.counters);
            tokio::select! {
                result = hub.serve(listener, tls) => result.context("the hub stopped")?,
                _ = signals.recv() => eprintln!("stopped: open relays were cut; receivers resume when a hub is back"),
            }
            Ok(())
        }
        Role::Advertise(args) => advertise(args, &mut signals).await,
        Role::Receive(args) => receive_command(args, &mut signals).await,
    }
}

async fn advertise(args: AdvertiseArgs, signals: &mut crate::ShutdownSignals) -> Result<()> {
    let metrics = args.common.metrics.start().await?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => file_name(&args.file)?,
    };
    let block_size = u32::try_from(args.block_size).context("--block-size is too large")?;
    let config = SourceConfig {
        path: args.file.clone(),
        name: name.clone(),
        block_size,
        threads: args.threads.max(1),
        timeout: args.common.timeout,
    };
    let source = Source::open(config, log())
        .await
        .context("cannot advertise the file")?;
    metrics.sync_counters(&source.counters);
    let version = source.version();
    eprintln!(
        "hashed {} ({} bytes, {} blocks, version {})",
        args.file.display(),
        version.size(),
        version.blocks(),
        r3map_sync::source::hex8(&version.digest())
    );
    let serving = async {
        if let Some(hub) = &args.hub {
            let tls = client_tls(&args.tls_ca, &args.server_tls.tls_cert, &args.server_tls.tls_key)?;
            if tls.is_none() {
                eprintln!("WARNING: talking to the hub without TLS (add --tls-ca, --tls-cert, --tls-key)");
            }
            source.clone().advertise(hub.clone(), tls).await;
            Ok(())
        } else {
            let listen = args.listen.as_deref().unwrap_or("127.0.0.1:10810");
            let tls = args.server_tls.load()?;
            let listener = transport::bind(listen).await?;
            warn_plain("the advertiser", &tls);
            eprintln!(
                "listening on {} for receivers of {name:?}",
                listener.local_addr()?
            );
            source
                .clone()
                .listen(listener, tls, args.server_tls.allow_ids.clone())
                .await
                .context("the listener failed")
        }
    };
    tokio::select! {
        result = serving => result,
        result = source.follow_changes() => Err(anyhow::Error::from(result.unwrap_err()).context("cannot follow changes of the file")),
        _ = signals.recv() => {
            eprintln!("stopped: receivers in the middle of a transfer keep what arrived and resume later");
            Ok(())
        }
    }
}

async fn receive_command(args: ReceiveArgs, signals: &mut crate::ShutdownSignals) -> Result<()> {
    let metrics = args.common.metrics.start().await?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => file_name(&args.file)?,
    };
    let tls = client_tls(&args.tls_ca, &args.tls_cert, &args.tls_key)?;
    if tls.is_none() {
        eprintln!(
            "WARNING: receiving without TLS: the replica takes whatever the peer at {} sends",
            args.from
        );
    }
    let config = ReceiverConfig {
        addr: args.from.clone(),
        name,
        tls,
        timeout: args.common.timeout,
        max_size: args.max_size,
        once: args.once,
        attempts: args.attempts,
    };
    let mut replica = Replica::open(&args.file, 64 * 1024, args.threads.max(1))
        .with_context(|| format!("cannot open the replica {}", args.file.display()))?;
    if replica.resuming() {
        eprintln!(
            "resuming from {} (kept from an interrupted transfer)",
            replica.staging_path().display()
        );
    }
    let counters = Arc::new(Counters::default());
    metrics.sync_counters(&counters);
    let log = log();
    let result = tokio::select! {
        result = receive(&config, &mut replica, counters.clone(), &log) => Some(result),
        _ = signals.recv() => None,
    };
    eprintln!("received {} bytes on the wire in total", counters.received());
    match result {
        Some(result) => result.with_context(|| format!("cannot receive {}", config.name)),
        None if replica.resuming() => {
            eprintln!(
                "stopped in the middle of a transfer: {} is unchanged; what arrived is kept in {} and the next run resumes from it",
                args.file.display(),
                replica.staging_path().display()
            );
            Ok(())
        }
        None => {
            eprintln!("stopped");
            Ok(())
        }
    }
}

fn file_name(path: &std::path::Path) -> Result<String> {
    match path.file_name().and_then(|name| name.to_str()) {
        Some(name) => Ok(name.to_string()),
        None => bail!("{} has no file name; give --name", path.display()),
    }
}
