//! The server side: its certificate and, for mutual TLS, the certificates clients are checked
//! against.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;

use crate::pem::{parse_certs, parse_key, read_file, trusted};
use crate::verify::ClientVerifier;
use crate::{provider, TlsError};

/// The server side of TLS: its certificate and, for mutual TLS, the CA that client
/// certificates must chain to (or the client certificates themselves, pinned).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Builds the server TLS configuration from PEM data: certificate chain, private key, and
    /// optionally the certificates client certificates are checked against (then every client
    /// must present one, signed by one of them or equal to one of them).
    pub fn from_pem(
        cert_chain: &[u8],
        private_key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let certs = parse_certs("server certificate", cert_chain)?;
        let key = parse_key("server private key", private_key)?;
        let builder =
            rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let trusted = trusted("client CA certificate", ca)?;
                let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(trusted.roots), provider())
                    .build()
                    .map_err(|err| TlsError::Verifier(err.to_string()))?;
                builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                    webpki,
                    pinned: trusted.pinned,
                }))
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key)?;
        Ok(Self {
            config: Arc::new(config),
            mutual: client_ca.is_some(),
        })
    }

    /// Like [`ServerTls::from_pem`], reading PEM files.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        private_key: impl AsRef<Path>,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let cert = read_file("server certificate", cert_chain.as_ref())?;
        let key = read_file("server private key", private_key.as_ref())?;
        let ca = client_ca
            .map(|path| read_file("client CA certificate", path))
            .transpose()?;
        Self::from_pem(&cert, &key, ca.as_deref())
    }

    /// Whether clients must present a trusted certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The rustls configuration, for transports that build their own acceptor.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// A Tokio acceptor that runs the server side of the handshake on a stream.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}
