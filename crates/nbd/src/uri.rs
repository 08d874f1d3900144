//! NBD URIs as used by libnbd, nbdkit and qemu: `nbd://host[:port]/export`,
//! `nbds://…` (TLS), `nbd+unix:///export?socket=PATH` and `nbds+unix:///…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::wire::DEFAULT_PORT;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to `host:port` (`host` may be a name, an IPv4 or a bracketed IPv6 address).
    Tcp { host: String, port: u16 },
    /// A UNIX domain socket.
    Unix { socket: PathBuf },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// Export name (`""` is the server's default export).
    pub export: String,
    /// Whether the scheme asks for TLS (`nbds`).
    pub tls: bool,
}

/// Why a string is not a usable NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("unsupported URI scheme in {0:?}: use nbd://, nbds://, nbd+unix:// or nbds+unix://")]
    Scheme(String),
    #[error("invalid port in NBD URI {0:?}")]
    Port(String),
    #[error("NBD URI {0:?} uses a UNIX socket but has no ?socket=PATH")]
    MissingSocket(String),
    #[error("NBD URI {0:?} uses a UNIX socket and must not name a host")]
    UnixWithHost(String),
    #[error("invalid percent-encoding in NBD URI {0:?}")]
    Encoding(String),
}

fn percent_decode(text: &str, uri: &str) -> Result<String, UriError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriError::Encoding(uri.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Encoding(uri.to_string()))
}

fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || (keep_slash && byte == b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::Scheme(uri.to_string()))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::Scheme(uri.to_string())),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        // `user@host`: NBD has no user names (libnbd uses them only for SSH), so the user
        // part is dropped rather than taken for part of the host name.
        let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        let export = percent_decode(path, uri)?;
        let socket = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == "socket")
            .map(|(_, value)| percent_decode(value, uri))
            .transpose()?;
        let transport = if unix {
            if !authority.is_empty() && authority != "localhost" {
                return Err(UriError::UnixWithHost(uri.to_string()));
            }
            let socket = socket.ok_or_else(|| UriError::MissingSocket(uri.to_string()))?;
            Transport::Unix {
                socket: PathBuf::from(socket),
            }
        } else {
            let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| UriError::Port(uri.to_string()))?;
                (host, after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (authority, None),
                }
            };
            let port = match port {
                Some(port) => port.parse().map_err(|_| UriError::Port(uri.to_string()))?,
                None => DEFAULT_PORT,
            };
            let host = if host.is_empty() { "localhost" } else { host };
            Transport::Tcp {
                host: percent_decode(host, uri)?,
                port,
            }
        };
        Ok(Self {
            transport,
            export,
            tls,
        })
    }

    /// The host name used to verify the server certificate.
    pub fn host(&self) -> &str {
        match &self.transport {
            Transport::Tcp { host, .. } => host,
            Transport::Unix { .. } => "localhost",
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;
    fn from_str(uri: &str) -> Result<Self, UriError> {
        Self::parse(uri)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = percent_encode(&self.export, true);
        match &self.transport {
            Transport::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                write!(f, "nbd{s}://{host}:{port}/{export}")
            }
            Transport::Unix { socket } => {
                let socket = percent_encode(&socket.to_string_lossy(), true);
                write!(f, "nbd{s}+unix:///{export}?socket={socket}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_unix_and_tls_forms() {
        let uri = NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(
            uri.transport,
            Transport::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(uri.export, "disk");
        assert!(!uri.tls);
        let uri = NbdUri::parse("nbds://[::1]/").unwrap();
        assert_eq!(
            uri.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert!(uri.tls);
        assert_eq!(uri.export, "");
        let uri = NbdUri::parse("nbd+unix:///a%20b?socket=/tmp/x.sock").unwrap();
        assert_eq!(
            uri.transport,
            Transport::Unix {
                socket: "/tmp/x.sock".into()
            }
        );
        assert_eq!(uri.export, "a b");
        assert_eq!(NbdUri::parse(&uri.to_string()).unwrap(), uri);
    }

    #[test]
    fn rejects_bad_uris() {
        assert!(matches!(NbdUri::parse("http://x/"), Err(UriError::Scheme(_))));
        assert!(matches!(
            NbdUri::parse("nbd://x:notaport/"),
            Err(UriError::Port(_))
        ));
        assert!(matches!(
            NbdUri::parse("nbd+unix:///e"),
            Err(UriError::MissingSocket(_))
        ));
        assert!(matches!(NbdUri::parse("nbd://h/%zz"), Err(UriError::Encoding(_))));
    }

    #[test]
    fn user_info_is_not_part_of_the_host() {
        let uri = NbdUri::parse("nbd://alice@server.example:10811/disk").unwrap();
        assert_eq!(
            uri.transport,
            Transport::Tcp {
                host: "server.example".into(),
                port: 10811
            }
        );
        let uri = NbdUri::parse("nbds://bob@[::1]/").unwrap();
        assert_eq!(uri.host(), "::1");
        let uri = NbdUri::parse("nbd+unix://carol@/e?socket=/s").unwrap();
        assert_eq!(uri.export, "e");
    }

    #[test]
    fn display_percent_encodes_export_and_socket() {
        let uri = NbdUri {
            transport: Transport::Unix {
                socket: "/tmp/a b&c=d.sock".into(),
            },
            export: "my disk/?#%".into(),
            tls: false,
        };
        let text = uri.to_string();
        assert_eq!(
            text,
            "nbd+unix:///my%20disk/%3F%23%25?socket=/tmp/a%20b%26c%3Dd.sock"
        );
        assert_eq!(NbdUri::parse(&text).unwrap(), uri);
    }
}
