//! The option phase of one connection (fixed newstyle): TLS, structured replies, extended
//! headers, metadata contexts, `LIST`, `INFO` and `GO`/`EXPORT_NAME`. Once the server shuts down, a client that
//! is still negotiating gets `NBD_REP_ERR_SHUTDOWN` for its next option and is disconnected.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{BoxStream, ConnectionError, Export, State};
use crate::codec::{self, CodecError, Framing, OptionFrame};
use crate::wire::{self, handshake_flags, opt, rep, transmission_flags};

/// Option data above this many bytes is skipped and answered with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// How long a negotiating client may still send an option once the server shuts down.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

/// What the handshake agreed on.
pub(super) struct Session {
    pub(super) export: Arc<Export>,
    pub(super) framing: Framing,
    pub(super) block_status: bool,
}

/// Reads until `decode` yields a frame; `Ok(None)` if the client closed cleanly, or sent
/// nothing within [`SHUTDOWN_LINGER`] after the server began to shut down.
async fn read_frame<T>(
    io: &mut BoxStream,
    buf: &mut BytesMut,
    shutdown: &mut watch::Receiver<bool>,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, CodecError>,
) -> Result<Option<T>, ConnectionError> {
    loop {
        if let Some(frame) = decode(buf)? {
            return Ok(Some(frame));
        }
        buf.reserve(4096);
        let read = if *shutdown.borrow() {
            // Shutting down: a client mid-negotiation gets a little time to send its next
            // option, so it can be told why (`NBD_REP_ERR_SHUTDOWN`), then it is dropped.
            match tokio::time::timeout(SHUTDOWN_LINGER, io.read_buf(buf)).await {
                Ok(read) => read?,
                Err(_) => return Ok(None),
            }
        } else {
            tokio::select! {
                read = io.read_buf(buf) => read?,
                _ = shutdown.wait_for(|down| *down) => continue,
            }
        };
        if read == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnectionError::Truncated)
            };
        }
    }
}

pub(super) fn transmission_flags_for(export: &Export, framing: Framing) -> u16 {
    use transmission_flags::*;
    let mut flags = HAS_FLAGS | SEND_FLUSH | SEND_CACHE;
    if export.read_only {
        flags |= READ_ONLY;
    } else {
        flags |= SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES;
    }
    if framing.chunked() {
        flags |= SEND_DF;
    }
    if export.multi_conn {
        flags |= CAN_MULTI_CONN;
    }
    flags
}

struct Handshake {
    io: BoxStream,
    out: BytesMut,
}

impl Handshake {
    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        codec::encode_option_reply(&mut self.out, option, reply, data);
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) {
        tracing::debug!(
            option = wire::option_name(option),
            reply = rep::name(reply),
            message
        );
        let message = codec::truncate_str(message, wire::MAX_STRING_LEN);
        codec::encode_option_reply(&mut self.out, option, reply, message.as_bytes());
    }

    async fn flush(&mut self) -> Result<(), ConnectionError> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }
}

/// Runs the fixed newstyle handshake. `Ok(None)` means the client left (or aborted) cleanly,
/// or the server shut down.
pub(super) async fn handshake(
    state: &State,
    io: BoxStream,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<(BoxStream, BytesMut, Session)>, ConnectionError> {
    let mut hs = Handshake {
        io,
        out: BytesMut::with_capacity(1024),
    };
    let mut buf = BytesMut::with_capacity(1024);
    codec::encode_greeting(
        &mut hs.out,
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    );
    hs.flush().await?;
    let Some(client_flags) = read_frame(&mut hs.io, &mut buf, &mut shutdown, |b| {
        Ok(codec::decode_client_flags(b))
    })
    .await?
    else {
        return Ok(None);
    };
    if client_flags & !wire::client_flags::KNOWN != 0 {
        return Err(ConnectionError::UnknownClientFlags(client_flags));
    }
    let fixed = client_flags & wire::client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & wire::client_flags::NO_ZEROES != 0;

    let mut decoder = codec::OptionDecoder::new(MAX_OPTION_LEN);
    let mut tls_active = false;
    // Structured replies, or extended headers (which imply them and take precedence).
    let mut framing = Framing::Simple;
    // Export name the last NBD_OPT_SET_META_CONTEXT selected `base:allocation` for.
    let mut meta_export: Option<String> = None;
    loop {
        let Some(frame) = read_frame(&mut hs.io, &mut buf, &mut shutdown, |b| decoder.decode(b)).await?
        else {
            return Ok(None);
        };
        let option = match &frame {
            OptionFrame::Option { option, .. } | OptionFrame::TooBig { option, .. } => *option,
        };
        if *shutdown.borrow() {
            if option != opt::EXPORT_NAME {
                hs.error(option, rep::ERR_SHUTDOWN, "the server is shutting down");
                let _ = hs.flush().await;
            }
            return Ok(None);
        }
        if !fixed && option != opt::EXPORT_NAME {
            return Err(ConnectionError::NotFixedNewstyle(option));
        }
        // TLS comes first: a client without it learns nothing else (not even size limits).
        if state.require_tls && !tls_active && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Err(ConnectionError::TlsRequired);
            }
            hs.error(
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            hs.flush().await?;
            continue;
        }
        let (option, data) = match frame {
            OptionFrame::Option { option, data } => (option, data),
            OptionFrame::TooBig { option, len } => {
                if option == opt::EXPORT_NAME {
                    return Err(ConnectionError::Codec(CodecError::TooLong {
                        what: "NBD_OPT_EXPORT_NAME data",
                        len: u64::from(len),
                        max: u64::from(MAX_OPTION_LEN),
                    }));
                }
                // The data is skipped by the decoder as it arrives; it cannot be read first
                // because replies must not wait for up to 4 GiB of junk.
                let message = format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}");
                hs.error(option, rep::ERR_TOO_BIG, &message);
                hs.flush().await?;
                continue;
            }
        };

        match option {
            opt::EXPORT_NAME => {
                let name = codec::parse_string("export name", &data)?;
                let Some(export) = state.find(&name).cloned() else {
                    return Err(ConnectionError::UnknownExport(name));
                };
                if framing.extended() {
                    // The protocol forbids EXPORT_NAME after extended headers: its reply
                    // cannot say which headers follow, and it cannot carry an error.
                    return Err(ConnectionError::ExportNameAfterExtendedHeaders);
                }
                let flags = transmission_flags_for(&export, framing);
                codec::encode_export_name_reply(&mut hs.out, export.backend.size(), flags, no_zeroes);
                hs.flush().await?;
                let block_status = framing.chunked() && meta_export.as_deref() == Some(name.as_str());
                return Ok(Some((
                    hs.io,
                    buf,
                    Session {
                        export,
                        framing,
                        block_status,
                    },
                )));
            }
            opt::ABORT => {
                hs.reply(option, rep::ACK, &[]);
                // The client may already have closed: a failed ACK is not an error.
                let _ = hs.flush().await;
                let _ = hs.io.shutdown().await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for export in &state.exports {
                        let reply = codec::server_reply_data(&export.name, &export.description);
                        hs.reply(option, rep::SERVER, &reply);
                    }
                    hs.reply(option, rep::ACK, &[]);
                }
                hs.flush().await?;
            }
            opt::STARTTLS => {
                let Some(tls) = &state.tls else {
                    hs.error(option, rep::ERR_POLICY, "TLS is not configured on this server");
                    hs.flush().await?;
                    continue;
                };
                if !data.is_empty() {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                    hs.flush().await?;
                    continue;
                }
                if tls_active {
                    hs.error(option, rep::ERR_INVALID, "TLS is already active");
                    hs.flush().await?;
                    continue;
                }
                if !buf.is_empty() || decoder.skipping() > 0 {
                    return Err(ConnectionError::DataBeforeTls);
                }
                hs.reply(option, rep::ACK, &[]);
                hs.flush().await?;
                let stream = tls
                    .acceptor()
                    .accept(hs.io)
                    .await
                    .map_err(ConnectionError::TlsHandshake)?;
                hs.io = Box::new(stream);
                tls_active = true;
                // Nothing negotiated before STARTTLS survives it.
                framing = Framing::Simple;
                meta_export = None;
            }
            opt::INFO | opt::GO => {
                let request = match codec::parse_export_request(&data) {
                    Ok(request) => request,
                    Err(err) => {
                        hs.error(option, rep::ERR_INVALID, &err.to_string());
                        hs.flush().await?;
                        continue;
                    }
                };
                let Some(export) = state.find(&request.name).cloned() else {
                    let message = format!("no export named {:?}", request.name);
                    hs.error(option, rep::ERR_UNKNOWN, &message);
                    hs.flush().await?;
                    continue;
                };
                let flags = transmission_flags_for(&export, framing);
                hs.reply(
                    option,
                    rep::INFO,
                    &codec::info_export_data(export.backend.size(), flags),
                );
                for info in &request.info_requests {
                    match *info {
                        wire::info::NAME => {
                            let data = codec::info_string_data(wire::info::NAME, &export.name);
                            hs.reply(option, rep::INFO, &data);
                        }
                        wire::info::DESCRIPTION if !export.description.is_empty() => {
                            let data = codec::info_string_data(wire::info::DESCRIPTION, &export.description);
                            hs.reply(option, rep::INFO, &data);
                        }
                        _ => {}
                    }
                }
                // Our constraints are the protocol defaults, so sending them unasked is safe.
                hs.reply(
                    option,
                    rep::INFO,
                    &codec::info_block_size_data(1, 4096, state.max_request),
                );
                hs.reply(option, rep::ACK, &[]);
                hs.flush().await?;
                if option == opt::GO {
                    let block_status =
                        framing.chunked() && meta_export.as_deref() == Some(request.name.as_str());
                    return Ok(Some((
                        hs.io,
                        buf,
                        Session {
                            export,
                            framing,
                            block_status,
                        },
                    )));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if framing.extended() {
                    // Extended headers take precedence; there is no way back to 32-bit ones.
                    hs.error(
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    framing = Framing::Structured;
                    hs.reply(option, rep::ACK, &[]);
                }
                hs.flush().await?;
            }
            opt::EXTENDED_HEADERS => {
                if data.is_empty() {
                    // Allowed with or without structured replies before it; they are implied.
                    framing = Framing::Extended;
                    hs.reply(option, rep::ACK, &[]);
                } else {
                    hs.error(option, rep::ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                }
                hs.flush().await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the previous selection even when it fails.
                    meta_export = None;
                }
                match meta_context(state, framing, &data) {
                    Ok((name, queries)) => {
                        let matched = queries
                            .iter()
                            .any(|q| q == wire::BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty())))
                            || (!set && queries.is_empty());
                        if matched {
                            let id = if set { wire::BASE_ALLOCATION_ID } else { 0 };
                            let data = codec::meta_context_data(id, wire::BASE_ALLOCATION);
                            hs.reply(option, rep::META_CONTEXT, &data);
                            if set {
                                meta_export = Some(name);
                            }
                        }
                        hs.reply(option, rep::ACK, &[]);
                    }
                    Err((reply, message)) => hs.error(option, reply, &message),
                }
                hs.flush().await?;
            }
            other => {
                let message = format!("option {other} is not supported by this server");
                hs.error(option, rep::ERR_UNSUP, &message);
                hs.flush().await?;
            }
        }
    }
}

/// Validates a meta context option; returns the export name and the queries.
fn meta_context(
    state: &State,
    framing: Framing,
    data: &[u8],
) -> Result<(String, Vec<String>), (u32, String)> {
    if !framing.chunked() {
        return Err((
            rep::ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS before metadata contexts".into(),
        ));
    }
    let request =
        codec::parse_meta_context_request(data).map_err(|err| (rep::ERR_INVALID, err.to_string()))?;
    if state.find(&request.export).is_none() {
        return Err((rep::ERR_UNKNOWN, format!("no export named {:?}", request.export)));
    }
    Ok((request.export, request.queries))
}
