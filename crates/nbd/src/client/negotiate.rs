//! The handshake from the client side: greeting, optional STARTTLS, extended headers (falling
//! back to structured replies), the `base:allocation` metadata context and `NBD_OPT_GO`
//! (falling back to `NBD_OPT_EXPORT_NAME`, unless extended headers were agreed).
//! Every reply is checked against the option it must answer and every advertised constraint
//! against the protocol's rules before the client relies on it.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{BoxStream, ClientError, ExportInfo};
use crate::codec::{self, Framing, Info};
use crate::tls::ClientTls;
use crate::uri::{NbdUri, Transport};
use crate::wire::{self, opt, rep, transmission_flags};

/// Largest option reply the client accepts.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Largest minimum block size the protocol allows.
const MAX_MIN_BLOCK: u32 = 1 << 16;

/// Opens the stream to the server, with a second handle on its TCP socket (for
/// [`Client`](super::Client)'s abort; `None` for a UNIX socket, whose close is seen at once).
pub(super) async fn open_transport(uri: &NbdUri) -> Result<(BoxStream, Option<OwnedFd>), ClientError> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let addr = format!("{host}:{port}");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = TcpStream::connect((host, *port))
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            stream.set_nodelay(true)?;
            crate::keepalive::enable(&stream)?;
            let socket = stream.as_fd().try_clone_to_owned()?;
            Ok((Box::new(stream), Some(socket)))
        }
        Transport::Unix { socket } => {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: socket.display().to_string(),
                    source,
                })?;
            Ok((Box::new(stream), None))
        }
    }
}

fn refused(option: u32, reply: u32, data: &[u8]) -> ClientError {
    ClientError::Refused {
        option: wire::option_name(option),
        reply: rep::name(reply),
        message: String::from_utf8_lossy(codec::truncate_bytes(data)).into_owned(),
    }
}

fn violation(detail: impl Into<String>) -> ClientError {
    ClientError::Protocol(detail.into())
}

/// The transmission flags as the client may use them: without `NBD_FLAG_HAS_FLAGS` the other
/// bits carry no meaning (old servers), so none of them is honoured.
pub(super) fn effective_flags(flags: u16) -> u16 {
    if flags & transmission_flags::HAS_FLAGS == 0 {
        tracing::warn!(
            flags,
            "the NBD server did not set NBD_FLAG_HAS_FLAGS: ignoring its transmission flags"
        );
        return 0;
    }
    flags
}

/// Checks `NBD_INFO_BLOCK_SIZE` against the protocol and returns the payload limit the client
/// uses: the server's maximum, at most 32 MiB, a multiple of the minimum.
pub(super) fn check_block_sizes(minimum: u32, preferred: u32, maximum: u32) -> Result<u32, ClientError> {
    if !minimum.is_power_of_two() || minimum > MAX_MIN_BLOCK {
        return Err(violation(format!(
            "minimum block size {minimum} is not a power of two of at most 64 KiB"
        )));
    }
    if !preferred.is_power_of_two() || preferred < minimum {
        return Err(violation(format!(
            "preferred block size {preferred} is not a power of two at least the minimum {minimum}"
        )));
    }
    if maximum < preferred {
        return Err(violation(format!(
            "maximum payload {maximum} is below the preferred block size {preferred}"
        )));
    }
    let limited = maximum.min(wire::DEFAULT_MAX_PAYLOAD);
    Ok((limited / minimum * minimum).max(minimum))
}

/// The handshake phase from the client side.
pub(super) struct Negotiation {
    io: BoxStream,
    buf: BytesMut,
    no_zeroes: bool,
}

impl Negotiation {
    /// Reads the greeting, answers it and, with `tls`, upgrades the stream (`host` names the
    /// server for certificate checks).
    pub(super) async fn start(io: BoxStream, tls: Option<(&ClientTls, &str)>) -> Result<Self, ClientError> {
        let mut this = Self {
            io,
            buf: BytesMut::with_capacity(4096),
            no_zeroes: false,
        };
        let flags = loop {
            if let Some(flags) = codec::decode_greeting(&mut this.buf)? {
                break flags;
            }
            this.fill().await?;
        };
        if flags & wire::handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotFixedNewstyle);
        }
        this.no_zeroes = flags & wire::handshake_flags::NO_ZEROES != 0;
        let mut client_flags = wire::client_flags::FIXED_NEWSTYLE;
        if this.no_zeroes {
            client_flags |= wire::client_flags::NO_ZEROES;
        }
        this.io.write_all(&client_flags.to_be_bytes()).await?;
        if let Some((tls, host)) = tls {
            this.send(opt::STARTTLS, &[]).await?;
            let reply = this.reply(opt::STARTTLS).await?;
            if reply.reply != rep::ACK {
                return Err(refused(opt::STARTTLS, reply.reply, &reply.data));
            }
            if !this.buf.is_empty() {
                return Err(violation("data after the STARTTLS acknowledgement"));
            }
            let name = tls.server_name(host)?;
            let stream = tls
                .connector()
                .connect(name, this.io)
                .await
                .map_err(ClientError::TlsHandshake)?;
            this.io = Box::new(stream);
        }
        Ok(this)
    }

    /// The stream and whatever the server sent beyond the handshake.
    pub(super) fn into_parts(self) -> (BoxStream, BytesMut) {
        (self.io, self.buf)
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        self.buf.reserve(4096);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the NBD server closed the connection during the handshake",
            )));
        }
        Ok(())
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut out = BytesMut::with_capacity(16 + data.len());
        codec::encode_option(&mut out, option, data);
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next option reply, which must answer `option`.
    async fn reply(&mut self, option: u32) -> Result<codec::OptionReply, ClientError> {
        let reply = loop {
            if let Some(reply) = codec::decode_option_reply(&mut self.buf, MAX_OPTION_REPLY)? {
                break reply;
            }
            self.fill().await?;
        };
        if reply.option != option {
            return Err(violation(format!(
                "option reply for {} ({}) while waiting for the reply to {} ({option})",
                wire::option_name(reply.option),
                reply.option,
                wire::option_name(option)
            )));
        }
        Ok(reply)
    }

    /// Asks for `option` (one without data); whether the server acknowledged it. Any error
    /// reply (servers that predate it answer `NBD_REP_ERR_UNSUP`) means "not agreed".
    async fn agree(&mut self, option: u32) -> Result<bool, ClientError> {
        self.send(option, &[]).await?;
        let reply = self.reply(option).await?;
        match reply.reply {
            rep::ACK => Ok(true),
            error if error & rep::ERROR_BIT != 0 => Ok(false),
            other => Err(violation(format!(
                "reply {} to NBD_OPT_{}",
                rep::name(other),
                wire::option_name(option)
            ))),
        }
    }

    pub(super) async fn structured_replies(&mut self) -> Result<bool, ClientError> {
        self.agree(opt::STRUCTURED_REPLY).await
    }

    /// `NBD_OPT_EXTENDED_HEADERS` (structured replies are implied when agreed).
    pub(super) async fn extended_headers(&mut self) -> Result<bool, ClientError> {
        self.agree(opt::EXTENDED_HEADERS).await
    }

    /// Selects `base:allocation` for `export`; its context id if the server offers it.
    pub(super) async fn base_allocation(&mut self, export: &str) -> Result<Option<u32>, ClientError> {
        let mut data = BytesMut::new();
        codec::encode_meta_context_request(&mut data, export, &[wire::BASE_ALLOCATION]);
        self.send(opt::SET_META_CONTEXT, &data).await?;
        let mut id = None;
        loop {
            let reply = self.reply(opt::SET_META_CONTEXT).await?;
            match reply.reply {
                rep::META_CONTEXT => {
                    let (context, name) = codec::parse_meta_context(&reply.data)?;
                    if name != wire::BASE_ALLOCATION || id.is_some() {
                        return Err(violation(format!(
                            "unexpected metadata context {name:?} for a request of base:allocation"
                        )));
                    }
                    id = Some(context);
                }
                rep::ACK => return Ok(id),
                error if error & rep::ERROR_BIT != 0 => return Ok(None),
                other => {
                    return Err(violation(format!(
                        "reply {} to NBD_OPT_SET_META_CONTEXT",
                        rep::name(other)
                    )))
                }
            }
        }
    }

    pub(super) async fn list(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        self.send(opt::LIST, &[]).await?;
        let mut exports = Vec::new();
        loop {
            let reply = self.reply(opt::LIST).await?;
            match reply.reply {
                rep::SERVER => exports.push(codec::parse_server_reply(&reply.data)?),
                rep::ACK => return Ok(exports),
                other => return Err(refused(opt::LIST, other, &reply.data)),
            }
        }
    }

    pub(super) async fn abort(mut self) {
        if self.send(opt::ABORT, &[]).await.is_ok() {
            // Servers may close without acknowledging; either is fine.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.reply(opt::ABORT)).await;
        }
        let _ = self.io.shutdown().await;
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` on old servers).
    pub(super) async fn go(&mut self, export: &str, framing: Framing) -> Result<ExportInfo, ClientError> {
        let mut data = BytesMut::new();
        codec::encode_export_request(
            &mut data,
            export,
            &[wire::info::NAME, wire::info::DESCRIPTION, wire::info::BLOCK_SIZE],
        );
        self.send(opt::GO, &data).await?;
        let mut info = ExportInfo {
            name: export.to_string(),
            description: None,
            size: 0,
            flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            structured_replies: framing.chunked(),
            extended_headers: framing.extended(),
            base_allocation: None,
        };
        let mut have_export = false;
        loop {
            let reply = self.reply(opt::GO).await?;
            match reply.reply {
                rep::INFO => match codec::parse_info(&reply.data)? {
                    Info::Export { size, flags } => {
                        info.size = size;
                        info.flags = effective_flags(flags);
                        have_export = true;
                    }
                    Info::Name(name) => info.name = name,
                    Info::Description(text) => info.description = Some(text),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        info.max_payload = check_block_sizes(minimum, preferred, maximum)?;
                        info.min_block = minimum;
                        info.preferred_block = preferred;
                    }
                    Info::Unknown(_) => {}
                },
                rep::ACK if have_export => return Ok(info),
                rep::ACK => return Err(violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")),
                rep::ERR_UNSUP if framing.extended() => {
                    // The protocol forbids both: this answer, and EXPORT_NAME after extended
                    // headers.
                    return Err(violation(
                        "NBD_OPT_GO answered ERR_UNSUP after extended headers were agreed",
                    ));
                }
                rep::ERR_UNSUP => {
                    self.send(opt::EXPORT_NAME, export.as_bytes()).await?;
                    let (size, flags) = loop {
                        if let Some(found) = codec::decode_export_name_reply(&mut self.buf, self.no_zeroes) {
                            break found;
                        }
                        self.fill().await?;
                    };
                    info.size = size;
                    info.flags = effective_flags(flags);
                    return Ok(info);
                }
                other => return Err(refused(opt::GO, other, &reply.data)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_follow_the_protocol() {
        assert_eq!(check_block_sizes(1, 4096, 32 << 20).unwrap(), 32 << 20);
        // No limit is allowed; the client stays at 32 MiB, a multiple of the minimum.
        assert_eq!(check_block_sizes(1, 4096, u32::MAX).unwrap(), 32 << 20);
        assert_eq!(check_block_sizes(4096, 4096, 10_000).unwrap(), 8192);
        assert_eq!(check_block_sizes(1 << 16, 1 << 16, 1 << 16).unwrap(), 1 << 16);
        for (min, pref, max) in [
            (64 << 20, 64 << 20, u32::MAX), // minimum above 64 KiB
            (3, 4096, 1 << 20),             // not a power of two
            (0, 4096, 1 << 20),
            (4096, 512, 1 << 20), // preferred below minimum
            (512, 3000, 1 << 20), // preferred not a power of two
            (512, 4096, 1024),    // maximum below preferred
        ] {
            assert!(check_block_sizes(min, pref, max).is_err(), "{min} {pref} {max}");
        }
    }

    #[test]
    fn flags_without_has_flags_mean_nothing() {
        use transmission_flags::*;
        assert_eq!(effective_flags(READ_ONLY | SEND_FLUSH), 0);
        assert_eq!(effective_flags(HAS_FLAGS | SEND_FLUSH), HAS_FLAGS | SEND_FLUSH);
    }
}
