//! r3map TLS: the rustls configurations every r3map transport uses (NBD's `NBD_OPT_STARTTLS`,
//! gRPC), with the `ring` provider and PEM files.
//!
//! - [`ServerTls`]: a server certificate and key, optionally requiring client certificates
//!   (mutual TLS).
//! - [`ClientTls`]: the certificates to trust and optionally a client identity.
//! - Trust is either a CA that signed the peer's certificate, or the peer's certificate itself
//!   (pinning): a self-signed certificate such as `openssl req -x509` makes is accepted when it
//!   is one of the trusted certificates, whatever its names and CA flag; the peer still proves
//!   it holds the key, and the validity dates are checked.
//! - [`generate()`]: a CA plus server and client certificates for given hosts (`r3map cert`).
//! - [`describe_handshake_error`]: what a failed handshake means, in plain words.

mod client;
pub mod generate;
mod pem;
mod server;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::ClientTls;
pub use generate::{generate, CertificateSet, Identity};
pub use server::ServerTls;
/// The rustls and tokio-rustls versions these configurations are built with, for transports
/// that need their types.
pub use {rustls, tokio_rustls};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// PEM data holds no usable item of the expected kind.
    #[error("{what} is not usable: {detail}")]
    Pem { what: &'static str, detail: String },
    /// rustls refused the configuration (for example a key that does not match the
    /// certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA file.
    #[error("cannot verify client certificates with the given CA: {0}")]
    Verifier(String),
    /// The server name for certificate verification is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}: give a DNS name or an IP address")]
    ServerName(String),
    /// Certificates could not be generated.
    #[error("cannot generate certificates: {0}")]
    Generate(String),
    /// A generated file could not be written (the reason is the source).
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The text of a failed TLS handshake (an I/O error from tokio-rustls), followed by what it
/// means and what to do when rustls rejected the peer's certificate for a common reason.
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    let advice = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(verify::advice);
    match advice {
        Some(advice) => format!("{err} ({advice})"),
        None => err.to_string(),
    }
}
