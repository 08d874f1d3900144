//! gRPC clients: a connection (plaintext or TLS through r3map-tls, optional bearer token, a
//! deadline on every call) and on top of it [`GrpcBackend`] (an r3map `Backend`) and
//! [`GrpcSeederLink`] (a migration `SeederLink`).

mod backend;
mod reads;
mod seeder;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use r3map_core::Error;
use r3map_tls::ClientTls;
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Request;

pub use backend::GrpcBackend;
pub use seeder::GrpcSeederLink;

use crate::auth::Token;
use crate::limits::{CONNECTION_WINDOW, MAX_CHUNK, STREAM_WINDOW};
use crate::server::EXPORT_KEY;

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TLS (`grpcs://`); `None` is plaintext.
    pub tls: Option<ClientTls>,
    /// Bearer token sent with every call.
    pub token: Option<Token>,
    /// Time to set up the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Deadline of every call.
    pub request_timeout: Duration,
    /// Ask for and send lz4-compressed chunks where that shrinks them.
    pub compress: bool,
    /// Bytes per chunk message of a streamed read or write (at most the server's maximum).
    pub piece: u64,
    /// The size, for a Go peer (which cannot report it); r3map servers report their own.
    pub size: Option<u64>,
    /// The chunk size of a Go seeder (its dirty list is in byte offsets of these chunks).
    pub chunk_size: Option<u64>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: None,
            token: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            compress: true,
            piece: 1 << 20,
            size: None,
            chunk_size: None,
        }
    }
}

/// One HTTP/2 connection to a server (tonic reconnects it when it breaks) and what every call
/// carries.
#[derive(Clone)]
pub(crate) struct Connection {
    pub channel: Channel,
    token: Option<Token>,
    export: Option<MetadataValue<tonic::metadata::Ascii>>,
    pub timeout: Duration,
}

/// Splits `HOST:PORT` (IPv6 in brackets) into the host and the whole address.
fn host_of(addr: &str) -> Result<&str, Error> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => return Err(Error::InvalidConfig(format!("{addr:?} is not HOST:PORT"))),
    };
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}

impl Connection {
    /// Connects to `addr` (`HOST:PORT`) for `export` (`""`: the server's first).
    pub async fn open(addr: &str, export: &str, options: &ClientOptions) -> Result<Self, Error> {
        let host = host_of(addr)?.to_owned();
        let tls = match &options.tls {
            Some(tls) => {
                let name = tls
                    .server_name(&host)
                    .map_err(|err| Error::InvalidConfig(err.to_string()))?;
                let mut config = (*tls.config()).clone();
                config.alpn_protocols = vec![b"h2".to_vec()];
                Some((
                    r3map_tls::tokio_rustls::TlsConnector::from(Arc::new(config)),
                    name,
                ))
            }
            None => None,
        };
        // TLS is done here with r3map-tls (pinning, plain-words errors), so tonic always sees
        // an http:// endpoint over a stream that may already be encrypted.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| Error::InvalidConfig(format!("{addr:?}: {err}")))?
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let target = addr.to_owned();
        let connect_timeout = options.connect_timeout;
        let connector = tower::service_fn(move |_: Uri| {
            let (target, tls) = (target.clone(), tls.clone());
            async move {
                let connect = async {
                    let tcp = TcpStream::connect(&target).await?;
                    tcp.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(match tls {
                        None => Box::new(tcp) as Box<dyn Stream>,
                        Some((connector, name)) => {
                            let stream = connector.connect(name, tcp).await.map_err(|err| {
                                std::io::Error::new(
                                    err.kind(),
                                    format!(
                                        "TLS handshake with {target} failed: {}",
                                        r3map_tls::describe_handshake_error(&err)
                                    ),
                                )
                            })?;
                            Box::new(stream)
                        }
                    })
                };
                let stream = tokio::time::timeout(connect_timeout, connect)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {target} took longer than {connect_timeout:?}"),
                        )
                    })??;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = endpoint.connect_with_connector(connector).await.map_err(|err| {
            Error::Io(Arc::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("cannot connect to gRPC server {addr}: {}", source_chain(&err)),
            )))
        })?;
        let export = match export {
            "" => None,
            name => Some(MetadataValue::try_from(name).map_err(|_| {
                Error::InvalidConfig(format!("export name {name:?} is not valid in gRPC metadata"))
            })?),
        };
        Ok(Self {
            channel,
            token: options.token.clone(),
            export,
            timeout: options.request_timeout,
        })
    }

    /// A request carrying the token and the export name.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            token.apply(&mut request);
        }
        if let Some(export) = &self.export {
            request.metadata_mut().insert(EXPORT_KEY, export.clone());
        }
        request
    }

    /// The backend error for a failed call.
    pub fn error(&self, status: &tonic::Status) -> Error {
        crate::status::to_core(status, self.timeout)
    }
}

/// The error and its causes in one line (tonic's transport errors hide the cause).
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// The piece size a client uses against a server whose maximum chunk is `server_max`.
pub(crate) fn piece_size(options: &ClientOptions, server_max: u64) -> u64 {
    options.piece.clamp(4096, server_max.clamp(4096, MAX_CHUNK))
}
