//! A small NBD server over a memory backend, for trying clients and for interop tests.
//!
//! ```text
//! cargo run -p r3map-nbd --example serve -- [--size BYTES] [--tcp ADDR | --unix PATH]
//!     [--export NAME] [--read-only] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
//!     [--require-tls]
//! ```
//!
//! Prints the URI on the first line of standard output, serves until SIGINT/SIGTERM, then
//! flushes and exits.

use std::sync::Arc;

use r3map_core::MemoryBackend;
use r3map_nbd::{Export, Server, ServerConfig, ServerTls};

fn usage(message: &str) -> ! {
    eprintln!("serve: {message}");
    eprintln!(
        "usage: serve [--size BYTES] [--tcp ADDR | --unix PATH] [--export NAME] [--read-only] \
         [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--require-tls]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut size: u64 = 64 << 20;
    let mut tcp = "127.0.0.1:0".to_string();
    let mut unix = None;
    let mut name = String::new();
    let mut read_only = false;
    let (mut cert, mut key, mut client_ca) = (None, None, None);
    let mut require_tls = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--size" => size = value().parse().unwrap_or_else(|_| usage("bad --size")),
            "--tcp" => tcp = value(),
            "--unix" => unix = Some(value()),
            "--export" => name = value(),
            "--read-only" => read_only = true,
            "--tls-cert" => cert = Some(value()),
            "--tls-key" => key = Some(value()),
            "--tls-client-ca" => client_ca = Some(value()),
            "--require-tls" => require_tls = true,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(
            ServerTls::from_pem_files(cert, key, client_ca.as_deref().map(std::path::Path::new))
                .unwrap_or_else(|err| usage(&err.to_string())),
        ),
        (None, None) => None,
        _ => usage("--tls-cert and --tls-key go together"),
    };
    let backend = Arc::new(MemoryBackend::new(size));
    let mut config = ServerConfig::new(vec![Export::new(name.clone(), backend)
        .with_description("r3map memory export")
        .read_only(read_only)]);
    config.tls = tls;
    config.require_tls = require_tls;
    let server = match unix {
        Some(path) => Server::bind_unix(config, path).await,
        None => Server::bind_tcp(config, &tcp).await,
    }
    .unwrap_or_else(|err| usage(&err.to_string()));
    println!("{}", server.uri(&name));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    if let Err(err) = server.serve(shutdown).await {
        eprintln!("serve: {err}");
        std::process::exit(1);
    }
}
