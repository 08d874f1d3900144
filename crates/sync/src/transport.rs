//! TCP with optional TLS (r3map-tls): connecting, accepting, and the peer's identity (the
//! common name of its client certificate, which is its sync id).

use std::sync::Arc;
use std::time::Duration;

use r3map_tls::{ClientTls, ServerTls};
use tokio::net::{TcpListener, TcpStream};

use crate::conn::{Counters, Counting, Stream};

/// A peer's identity: the common name of its verified client certificate, or none without
/// mutual TLS (every such peer shares the empty sync id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(pub Option<String>);

impl Identity {
    /// The sync id that groups peers: the common name, or "" without a client certificate.
    pub fn sync_id(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(name) => write!(f, "{name:?}"),
            None => write!(f, "anonymous (no client certificate)"),
        }
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("no connection to {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("TLS handshake with {peer} failed: {detail}")]
    Handshake { peer: String, detail: String },
    #[error(transparent)]
    Tls(#[from] r3map_tls::TlsError),
}

fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    }
}

/// Connects to `addr`, with TLS if `tls` is given; counts socket bytes into `counters`.
pub async fn connect(
    addr: &str,
    tls: Option<&ClientTls>,
    timeout: Duration,
    counters: Arc<Counters>,
) -> Result<Stream, TransportError> {
    let connected = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::ConnectTimeout {
            addr: addr.into(),
            timeout,
        })?
        .map_err(|source| TransportError::Connect {
            addr: addr.into(),
            source,
        })?;
    let _ = connected.set_nodelay(true);
    let tcp = Counting::new(connected, counters);
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = tls.server_name(host_of(addr))?;
    let handshake = tokio::time::timeout(timeout, tls.connector().connect(name, tcp)).await;
    match handshake {
        Err(_) => Err(TransportError::Handshake {
            peer: addr.into(),
            detail: format!("no answer within {timeout:?}"),
        }),
        Ok(Err(err)) => Err(TransportError::Handshake {
            peer: addr.into(),
            detail: r3map_tls::describe_handshake_error(&err),
        }),
        Ok(Ok(stream)) => Ok(Box::new(stream)),
    }
}

/// Accepts the TLS handshake (if `tls`) of a connection `listener` accepted; returns the stream
/// and the peer's identity.
pub async fn handshake(
    tcp: TcpStream,
    peer: &str,
    tls: Option<&ServerTls>,
    timeout: Duration,
    counters: Arc<Counters>,
) -> Result<(Stream, Identity), TransportError> {
    let _ = tcp.set_nodelay(true);
    let tcp = Counting::new(tcp, counters);
    let Some(tls) = tls else {
        return Ok((Box::new(tcp), Identity(None)));
    };
    let accepted = tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await;
    let stream = match accepted {
        Err(_) => {
            return Err(TransportError::Handshake {
                peer: peer.into(),
                detail: format!("no handshake within {timeout:?}"),
            })
        }
        Ok(Err(err)) => {
            return Err(TransportError::Handshake {
                peer: peer.into(),
                detail: r3map_tls::describe_handshake_error(&err),
            })
        }
        Ok(Ok(stream)) => stream,
    };
    let name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| common_name(cert.as_ref()));
    Ok((Box::new(stream), Identity(name)))
}

/// The first common name in a DER certificate's subject.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// Binds a TCP listener, saying which address could not be bound.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}
