//! `r3map`: remote memory from the command line.

#![forbid(unsafe_code)]

mod commands;
mod demo;
mod frontend;
mod metrics;
mod progress;
mod pull_ranges;
mod remote;
mod shutdown;

use clap::{Parser, Subcommand};

/// r3map makes a remote resource usable as local memory, a file or a block device: bytes are
/// fetched when touched and ahead of time in the background, and writes are pushed back
/// asynchronously.
///
/// Backends are written as specifications:
///   memory:SIZE                         in-process memory, e.g. memory:256MiB
///   file:PATH[?size=SIZE][&direct=true]  a regular file (created with SIZE if missing)
///   dir:PATH?size=SIZE[&chunk=SIZE][&open-files=N]
///                                       a directory with one file per chunk (N chunk files
///                                       kept open at most)
///   nbd://HOST:PORT/EXPORT               an NBD server (nbds:// for TLS, nbd+unix:///EXPORT?socket=PATH)
///   grpc://HOST:PORT/EXPORT[?compress=false][&size=SIZE]
///                                       an r3map gRPC server (`r3map serve --grpc`; grpcs:// for
///                                       TLS) or a Go r3map one (give its size); lz4 per chunk
///                                       unless compress=false
///   redis://[USER@]HOST:PORT/PREFIX?size=SIZE[&chunk=SIZE][&db=N][&layout=go|folder]
///                                       one key per chunk in Redis (rediss:// for TLS, verified
///                                       against the system's roots or &tls-ca=PATH, a PEM CA file);
///                                       password from R3MAP_REDIS_PASSWORD or --redis-password-file
///   redis+cluster://H1:P1,H2:P2/PREFIX?size=SIZE[&chunk=SIZE][&layout=go|folder]
///                                       the same in a Redis Cluster (rediss+cluster:// for TLS)
///   s3://BUCKET/PREFIX?size=SIZE[&endpoint=URL][&chunk=SIZE][&region=R]
///       [&addressing=path|virtual][&layout=go|folder]
///                                       one object per chunk in an S3-compatible bucket (endpoint
///                                       default https://s3.REGION.amazonaws.com, region default
///                                       us-east-1; https:// endpoints for TLS); keys from AWS_ACCESS_KEY_ID and
///                                       AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or --s3-credentials
///   Store chunks default to 1MiB; layout=go (the default) names them PREFIX-OFFSET like the Go
///   r3map, layout=folder PREFIX/OFFSET.
#[derive(Debug, Parser)]
#[command(name = "r3map", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Mount(commands::mount::Args),
    Umount(commands::umount::Args),
    Mirror(commands::mirror::Args),
    Serve(commands::serve::Args),
    DelayProxy(commands::delay_proxy::Args),
    Cert(commands::cert::Args),
    Sync(commands::sync::Args),
    Migrate(commands::migrate::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("R3MAP_LOG")
                .unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Mount(args) => commands::mount::run(args).await,
            Command::Umount(args) => commands::umount::run(args).await,
            Command::Mirror(args) => commands::mirror::run(args).await,
            Command::Serve(args) => commands::serve::run(args).await,
            Command::DelayProxy(args) => commands::delay_proxy::run(args).await,
            Command::Cert(args) => commands::cert::run(args).await,
            Command::Sync(args) => commands::sync::run(args).await,
            Command::Migrate(args) => commands::migrate::run(args).await,
        }
    });
    // Tasks still waiting for a remote that gave up (e.g. a FUSE unmount blocked on it) must
    // not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM, caught from the moment this is created (so a signal that arrives while a
/// command is still starting up is not fatal but handled like any later one).
pub struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts catching both signals.
    pub fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
