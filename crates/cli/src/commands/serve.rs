//! `r3map serve`: any backend as an NBD export, and with `--grpc` over gRPC too.

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
///
/// With `--grpc ADDR` the same exports are also served over gRPC (`grpc://ADDR/NAME`, or
/// `grpcs://` when --tls-cert is given: gRPC then always requires TLS), compatible with the Go
/// r3map's Backend service; --token-file makes gRPC clients send a bearer token. gRPC chunks
/// are sent lz4-compressed where that shrinks them and zero chunks without data; --no-compress
/// turns lz4 off for what this server sends (clients choose for theirs with ?compress=false).
/// The limits above hold for gRPC clients too (--max-request per chunk, at most 32 MiB), plus
/// 64 calls in flight per connection and 256 across all; a writable export served without TLS
/// and client authentication (a token or --tls-client-ca) is announced with a warning.
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
    /// Also serve the exports over gRPC at this address, e.g. 127.0.0.1:10811
    #[arg(long, value_name = "ADDR")]
    grpc: Option<String>,
    /// File holding the bearer token every gRPC client must send (NBD has no tokens)
    #[arg(long, requires = "grpc")]
    token_file: Option<PathBuf>,
    /// Send gRPC chunks uncompressed (zero chunks are still sent without data)
    #[arg(long, requires = "grpc")]
    no_compress: bool,
    /// Largest request payload accepted
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    max_request: u64,
    /// Memory the data of all clients' requests may take at once (server-wide)
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    memory_budget: u64,
    /// Clients served at once; more are refused (and logged)
    #[arg(long, default_value_t = 128)]
    max_connections: usize,
    /// Deadline of every request to a remote export (redis://, s3://, nbd://, grpc://), from its
    /// start: past it the request fails (EIO to the client) and the connection is made anew
    #[arg(long, default_value = "30s", value_parser = r3map_mount::parse_duration)]
    remote_timeout: std::time::Duration,
    #[command(flatten)]
    stores: crate::remote::StoreArgs,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    let metrics = args.metrics.start().await?;
    let mut exports = Vec::new();
    let remote = metrics.remote_options(r3map_mount::RemoteOptions {
        reconnect: r3map_core::stages::ReconnectOptions {
            request_timeout: args.remote_timeout,
            ..Default::default()
        },
        stores: args.stores.credentials()?,
        ..Default::default()
    });
    for text in &args.exports {
        let (name, spec) = match text.split_once('=') {
            Some((name, spec)) if !name.contains(':') => (name.to_string(), spec),
            _ => (format!("export{}", exports.len()), text.as_str()),
        };
        let backend = crate::remote::open(spec, None, &remote)
            .await
            .with_context(|| format!("cannot open export {name}"))?;
        let backend = metrics.meter(backend, crate::metrics::Role::export);
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
        Some(path) => Server::bind_unix(config.clone(), path).await,
        None => Server::bind_tcp(config.clone(), &args.listen).await,
    }
    .context("cannot start the NBD server")?;
    metrics.nbd_server(&server);
    let grpc = match &args.grpc {
        Some(addr) => Some(grpc_server(&args, addr, &exports, config.tls.clone()).await?),
        None => None,
    };
    for export in &exports {
        let access = if args.read_only { "read-only" } else { "read-write" };
        let size = format_bytes(export.backend.size());
        eprintln!("serving {} ({size}, {access})", server.uri(&export.name));
        if let Some((_, _, uri)) = &grpc {
            eprintln!("serving {uri}/{} ({size}, {access})", export.name);
        }
    }
    eprintln!("Ctrl-C or SIGTERM stops the server after flushing every export");
    // One signal stops both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        let _ = stop.send(true);
    });
    let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let nbd = server.serve(wait_stop(stopped.clone()));
    let grpc_done = async {
        match grpc {
            Some((grpc, listener, _)) => grpc.serve(listener, wait_stop(stopped)).await,
            None => Ok(()),
        }
    };
    let (nbd, grpc_result) = tokio::join!(nbd, grpc_done);
    nbd.context("the NBD server stopped with an error")?;
    grpc_result.context("the gRPC server stopped with an error")?;
    // gRPC writes may have landed after the NBD server's flush.
    for export in &exports {
        export
            .backend
            .sync()
            .await
            .with_context(|| format!("cannot flush export {}", export.name))?;
    }
    eprintln!("flushed every export; stopped");
    Ok(())
}

/// The gRPC server of the same exports, bound, with its URI prefix.
async fn grpc_server(
    args: &Args,
    addr: &str,
    exports: &[Export],
    tls: Option<ServerTls>,
) -> Result<(r3map_grpc::GrpcServer, tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {addr}"))?;
    let local = listener.local_addr()?;
    let grpc_exports = exports
        .iter()
        .map(|export| r3map_grpc::Export {
            name: export.name.clone(),
            backend: export.backend.clone(),
            read_only: args.read_only,
        })
        .collect();
    let limits = r3map_grpc::ServerLimits {
        max_chunk: args.max_request.min(r3map_grpc::limits::MAX_CHUNK),
        bytes_in_flight: args.memory_budget,
        connections: args.max_connections,
        ..r3map_grpc::ServerLimits::default()
    };
    let mut server = r3map_grpc::GrpcServer::new(grpc_exports)
        .limits(limits)
        .compress(!args.no_compress);
    let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
    if let Some(tls) = tls {
        server = server.tls(tls);
    }
    if let Some(path) = &args.token_file {
        let token = r3map_grpc::Token::from_file(path).map_err(anyhow::Error::msg)?;
        server = server.token(token);
    }
    // The server itself warns loudly when writes are open to anyone who reaches it.
    Ok((server, listener, format!("{scheme}://{local}")))
}
