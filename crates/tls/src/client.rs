//! The client side: the certificates the server is checked against, and optionally a client
//! certificate (mutual TLS).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;

use crate::pem::{parse_certs, parse_key, read_file, trusted};
use crate::verify::ServerVerifier;
use crate::{provider, TlsError};

/// The client side of TLS: the CA that the server certificate must chain to (or the server's
/// certificate itself, pinned), optionally a client certificate (mutual TLS), and the name to
/// verify the server certificate against.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Builds the client TLS configuration from PEM data: the certificate(s) to trust (CAs, or
    /// the server's own certificate to pin it) and an optional `(certificate chain, private key)`
    /// to present.
    pub fn from_pem(ca: &[u8], client_identity: Option<(&[u8], &[u8])>) -> Result<Self, TlsError> {
        let trusted = trusted("CA certificate", ca)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(trusted.roots), provider())
            .build()
            .map_err(|err| TlsError::Verifier(err.to_string()))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            // Not dangerous: webpki's checks, and pinning to certificates the user trusts (see
            // `verify`).
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                webpki,
                pinned: trusted.pinned,
            }));
        let config = match client_identity {
            Some((cert, key)) => builder.with_client_auth_cert(
                parse_certs("client certificate", cert)?,
                parse_key("client private key", key)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Like [`ClientTls::from_pem`], reading PEM files.
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        client_identity: Option<(&Path, &Path)>,
    ) -> Result<Self, TlsError> {
        let ca = read_file("CA certificate", ca.as_ref())?;
        let identity = client_identity
            .map(|(cert, key)| {
                Ok::<_, TlsError>((
                    read_file("client certificate", cert)?,
                    read_file("client private key", key)?,
                ))
            })
            .transpose()?;
        Self::from_pem(
            &ca,
            identity
                .as_ref()
                .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
        )
    }

    /// Verifies the server certificate against `name` instead of the host in the URI (needed
    /// for UNIX sockets, where the default is `localhost`).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The rustls configuration, for transports that build their own connector.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// A Tokio connector that runs the client side of the handshake on a stream.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }

    /// The name the server certificate is verified against: the one set with
    /// [`ClientTls::with_server_name`], else `default` (usually the host being connected to).
    pub fn server_name(&self, default: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(default);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
    }
}
