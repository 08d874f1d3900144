//! `r3map cert`: a CA plus server and client certificates, for TLS without an existing PKI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

/// Create a CA and the server and client certificates it signs, for TLS and mutual TLS
///
/// Writes into DIR: ca-cert.pem and ca-key.pem (keep the key private; it can sign more),
/// server-cert.pem and server-key.pem (valid for every --host), client-cert.pem and
/// client-key.pem. The layout is the one libnbd (tls-certificates=DIR) and QEMU
/// (tls-creds-x509,dir=DIR) read. Keys are readable by their owner only. Then:
///
///   server:  r3map serve ... --tls-cert DIR/server-cert.pem --tls-key DIR/server-key.pem
///              [--tls-client-ca DIR/ca-cert.pem] [--require-tls]
///   client:  r3map mount nbds://HOST:10809/EXPORT ... --tls-ca DIR/ca-cert.pem
///              [--tls-cert DIR/client-cert.pem --tls-key DIR/client-key.pem]
///
/// A self-signed certificate made otherwise (openssl req -x509 ...) also works: give the same
/// certificate file to --tls-ca, which then pins exactly that certificate.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Directory to write the certificates and keys into (created if missing)
    dir: PathBuf,
    /// DNS name or IP address clients use to reach the server; repeat for several
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
    hosts: Vec<String>,
    /// How many days the certificates are valid
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
    /// Replace certificates and keys already in DIR
    #[arg(long)]
    force: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let valid_for = Duration::from_secs(u64::from(args.days) * 24 * 3600);
    let set = r3map_tls::generate(&args.hosts, valid_for)?;
    let written = set
        .write_to(&args.dir, args.force)
        .context("cannot write the certificates")?;
    let dir = args.dir.display();
    eprintln!(
        "wrote a CA and server and client certificates (valid {} days for {}) into {dir}:",
        args.days,
        args.hosts.join(", ")
    );
    for path in &written {
        eprintln!("  {}", path.display());
    }
    let host = args.hosts[0].trim_start_matches('[').trim_end_matches(']');
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    eprintln!(
        "\nserve:   r3map serve EXPORT --tls-cert {dir}/server-cert.pem --tls-key {dir}/server-key.pem \
         [--tls-client-ca {dir}/ca-cert.pem --require-tls]\n\
         mount:   r3map mount nbds://{host}:10809/EXPORT TARGET --tls-ca {dir}/ca-cert.pem \
         [--tls-cert {dir}/client-cert.pem --tls-key {dir}/client-key.pem]\n\
         libnbd:  nbdinfo 'nbds://{host}:10809/EXPORT?tls-certificates={dir}'\n\
         Copy only what each side needs; ca-key.pem stays with whoever issues certificates."
    );
    Ok(())
}
