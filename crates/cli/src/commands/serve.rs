//! `r3map serve`: any backend as an NBD export.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use r3map_core::Backend;
use r3map_mount::{format_bytes, parse_size};
use r3map_nbd::{Export, Server, ServerConfig, ServerTls};

/// Serve backends as NBD exports (for qemu, nbdkit's tools, the kernel, or `r3map mount`)
///
/// Each EXPORT is `[NAME=]SPEC`, e.g. `disk=file:/var/tmp/disk.img?size=1GiB`; the first export
/// is also the default one (empty name). Listens on loopback unless told otherwise, prints the
/// `nbd://` URI to use, and on SIGINT/SIGTERM stops accepting, finishes requests in flight
/// (cutting connections still busy after 10 s) and flushes every export before exiting.
///
/// Limits against misbehaving clients: 30 s to finish the handshake, 10 min idle, 60 s for a
/// client to take a reply (one that stops reading is dropped), --max-connections at once
/// (more are refused and logged), and --memory-budget for the data of all requests in flight.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Exports as [NAME=]SPEC
    #[arg(default_value = "default=memory:1GiB")]
    exports: Vec<String>,
    /// TCP address to listen on
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "unix")]
    listen: String,
    /// Listen on a UNIX socket at this path instead of TCP
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Refuse writes to every export
    #[arg(long)]
    read_only: bool,
    /// Description shown to clients (NBD_INFO_DESCRIPTION)
    #[arg(long)]
    description: Option<String>,
    /// TLS certificate chain (PEM); enables STARTTLS
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required (mutual TLS)
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Refuse clients that do not start TLS
    #[arg(long, requires = "tls_cert")]
    require_tls: bool,
    /// Largest request payload accepted
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    max_request: u64,
    /// Memory the data of all clients' requests may take at once (server-wide)
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    memory_budget: u64,
    /// Clients served at once; more are refused (and logged)
    #[arg(long, default_value_t = 128)]
    max_connections: usize,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    let mut exports = Vec::new();
    for text in &args.exports {
        let (name, spec) = match text.split_once('=') {
            Some((name, spec)) if !name.contains(':') => (name.to_string(), spec),
            _ => (format!("export{}", exports.len()), text.as_str()),
        };
        let backend = crate::remote::open(spec, None, &Default::default())
            .await
            .with_context(|| format!("cannot open export {name}"))?;
        let mut export = Export::new(name, backend).read_only(args.read_only);
        if let Some(description) = &args.description {
            export = export.with_description(description.clone());
        }
        exports.push(export);
    }
    let mut config = ServerConfig::new(exports.clone());
    config.max_request = u32::try_from(args.max_request).context("--max-request must be below 4 GiB")?;
    config.max_in_flight_bytes = config.max_in_flight_bytes.max(config.max_request as usize);
    config.memory_budget = usize::try_from(args.memory_budget).context("--memory-budget is too large")?;
    if config.memory_budget < config.max_request as usize {
        bail!("--memory-budget must be at least --max-request");
    }
    config.max_connections = args.max_connections;
    config.require_tls = args.require_tls;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(
            ServerTls::from_pem_files(cert, key, args.tls_client_ca.as_deref())
                .context("cannot load the TLS certificate")?,
        );
    }
    if exports.is_empty() {
        bail!("name at least one export");
    }
    let server = match &args.unix {
        Some(path) => Server::bind_unix(config, path).await,
        None => Server::bind_tcp(config, &args.listen).await,
    }
    .context("cannot start the NBD server")?;
    for export in &exports {
        eprintln!(
            "serving {} ({}, {})",
            server.uri(&export.name),
            format_bytes(export.backend.size()),
            if args.read_only { "read-only" } else { "read-write" }
        );
    }
    eprintln!("Ctrl-C or SIGTERM stops the server after flushing every export");
    server
        .serve(async move { signals.recv().await })
        .await
        .context("the server stopped with an error")?;
    eprintln!("flushed every export; stopped");
    Ok(())
}
