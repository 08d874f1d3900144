//! r3map TLS: the rustls configurations every r3map transport uses (NBD's `NBD_OPT_STARTTLS`,
//! gRPC): the `ring` provider, certificates and keys from PEM, optional client-certificate
//! verification (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

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
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            what,
            detail: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn parse_key(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| TlsError::Pem {
        what,
        detail: format!("no private key found ({err})"),
    })
}

fn roots(what: &'static str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in parse_certs(what, pem)? {
        store.add(cert).map_err(|err| TlsError::Pem {
            what,
            detail: err.to_string(),
        })?;
    }
    Ok(store)
}

/// The server side of TLS: its certificate and, for mutual TLS, the CA that client
/// certificates must chain to.
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
    /// optionally the CA of client certificates (then every client must present one).
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
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("client CA certificate", ca)?),
                    provider(),
                )
                .build()
                .map_err(|err| TlsError::Verifier(err.to_string()))?;
                builder.with_client_cert_verifier(verifier)
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

    /// Whether clients must present a certificate signed by the client CA.
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

/// The client side of TLS: the CA that the server certificate must chain to, optionally a
/// client certificate (mutual TLS), and the name to verify the server certificate against.
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
    /// Builds the client TLS configuration from PEM data: the CA certificate(s) to trust and an
    /// optional `(certificate chain, private key)` to present.
    pub fn from_pem(ca: &[u8], client_identity: Option<(&[u8], &[u8])>) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots("CA certificate", ca)?);
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
