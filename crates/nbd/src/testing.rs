//! Test harness for NBD clients: a hostile server whose every byte a test scripts.
//!
//! [`HostileServer::pair`] gives the client end of an in-memory pipe and the server end wrapped
//! in helpers: the test reads what the client sent ([`recv_option`](HostileServer::recv_option),
//! [`recv_request`](HostileServer::recv_request)) and answers with exactly the bytes it wants,
//! valid ([`handshake`](HostileServer::handshake), [`data_chunk`]) or not. [`feed_client`] runs a
//! client against a fixed byte stream (used by the property test and the fuzz target).

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::codec;
use crate::wire::{self, opt, rep};
use crate::{Client, ClientOptions};

/// One request as the scripted server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u64,
    /// A write's data (with extended headers: any request's `NBD_CMD_FLAG_PAYLOAD_LEN` data).
    pub payload: Vec<u8>,
}

/// What the scripted server advertises in [`HostileServer::handshake`].
#[derive(Debug, Clone)]
pub struct Advertised {
    pub size: u64,
    /// Transmission flags, sent as they are (include `HAS_FLAGS` for a valid server).
    pub flags: u16,
    /// `(minimum, preferred, maximum)` sent as `NBD_INFO_BLOCK_SIZE`, if any.
    pub block_size: Option<(u32, u32, u32)>,
    /// Acknowledge structured replies.
    pub structured: bool,
    /// Acknowledge extended headers (then requests and replies use 32-byte headers).
    pub extended: bool,
    /// Offer `base:allocation` as context 1 (with structured replies or extended headers);
    /// otherwise `NBD_OPT_SET_META_CONTEXT` is acknowledged with no context.
    pub base_allocation: bool,
}

impl Default for Advertised {
    fn default() -> Self {
        use wire::transmission_flags::*;
        Self {
            size: 1 << 20,
            flags: HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES | SEND_TRIM,
            block_size: None,
            structured: true,
            extended: false,
            base_allocation: true,
        }
    }
}

/// The server end of a pipe to a client under test.
pub struct HostileServer {
    io: DuplexStream,
    buf: BytesMut,
    /// Whether [`handshake`](Self::handshake) agreed on extended headers.
    extended: bool,
}

impl HostileServer {
    /// A pipe: the client end (pass it to [`Client::connect_stream`]) and the scripted server.
    pub fn pair() -> (DuplexStream, Self) {
        let (client, server) = tokio::io::duplex(1 << 20);
        (
            client,
            Self {
                io: server,
                buf: BytesMut::new(),
                extended: false,
            },
        )
    }

    /// The same server, reading extended request headers from now on (for tests that script
    /// the handshake themselves and acknowledge `NBD_OPT_EXTENDED_HEADERS`).
    pub fn into_extended(mut self) -> Self {
        self.extended = true;
        self
    }

    /// Sends exactly `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        // The client may have closed already; the test then sees it on the next receive.
        let _ = self.io.write_all(bytes).await;
    }

    /// Receives exactly `n` bytes; `None` if the client closed first.
    pub async fn recv(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        Some(self.buf.split_to(n).to_vec())
    }

    /// Waits until the client closes the connection; returns the bytes it sent meanwhile.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        let mut rest = self.buf.split().to_vec();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = self.io.read(&mut chunk).await {
            rest.extend_from_slice(&chunk[..n]);
        }
        rest
    }

    /// Sends the fixed-newstyle greeting (with `NO_ZEROES`) and reads the client's flags.
    pub async fn greet(&mut self) -> u32 {
        let mut out = BytesMut::new();
        codec::encode_greeting(
            &mut out,
            wire::handshake_flags::FIXED_NEWSTYLE | wire::handshake_flags::NO_ZEROES,
        );
        self.send(&out).await;
        let flags = self.recv(4).await.expect("client flags");
        u32::from_be_bytes(flags.try_into().expect("4 bytes"))
    }

    /// Receives one option: its number and data.
    pub async fn recv_option(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut head = &self.recv(wire::OPTION_HEADER_LEN).await?[..];
        assert_eq!(head.get_u64(), wire::IHAVEOPT, "option magic");
        let option = head.get_u32();
        let len = head.get_u32() as usize;
        Some((option, self.recv(len).await?))
    }

    /// Sends one option reply.
    pub async fn reply_option(&mut self, option: u32, reply: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        codec::encode_option_reply(&mut out, option, reply, data);
        self.send(&out).await;
    }

    /// Answers a normal client handshake (extended headers or structured replies,
    /// `base:allocation`, `GO`) with what `advertised` says.
    pub async fn handshake(&mut self, advertised: &Advertised) {
        self.greet().await;
        loop {
            let (option, _) = self.recv_option().await.expect("an option");
            match option {
                opt::EXTENDED_HEADERS if advertised.extended => {
                    self.extended = true;
                    self.reply_option(option, rep::ACK, &[]).await
                }
                opt::STRUCTURED_REPLY if advertised.structured => {
                    self.reply_option(option, rep::ACK, &[]).await
                }
                opt::SET_META_CONTEXT if advertised.structured || advertised.extended => {
                    if advertised.base_allocation {
                        let data = codec::meta_context_data(1, wire::BASE_ALLOCATION);
                        self.reply_option(option, rep::META_CONTEXT, &data).await;
                    }
                    self.reply_option(option, rep::ACK, &[]).await;
                }
                opt::GO => {
                    let data = codec::info_export_data(advertised.size, advertised.flags);
                    self.reply_option(option, rep::INFO, &data).await;
                    if let Some((min, preferred, max)) = advertised.block_size {
                        let data = codec::info_block_size_data(min, preferred, max);
                        self.reply_option(option, rep::INFO, &data).await;
                    }
                    self.reply_option(option, rep::ACK, &[]).await;
                    return;
                }
                other => self.reply_option(other, rep::ERR_UNSUP, &[]).await,
            }
        }
    }

    /// Receives one request (and its payload), compact or extended as the handshake agreed;
    /// `None` once the client closed.
    pub async fn recv_request(&mut self) -> Option<ReceivedRequest> {
        let (header_len, magic) = if self.extended {
            (wire::EXTENDED_HEADER_LEN, wire::EXTENDED_REQUEST_MAGIC)
        } else {
            (wire::REQUEST_HEADER_LEN, wire::REQUEST_MAGIC)
        };
        let mut head = &self.recv(header_len).await?[..];
        assert_eq!(head.get_u32(), magic, "request magic");
        let flags = head.get_u16();
        let command = head.get_u16();
        let handle = head.get_u64();
        let offset = head.get_u64();
        let (length, has_payload) = if self.extended {
            (head.get_u64(), flags & wire::cmd_flags::PAYLOAD_LEN != 0)
        } else {
            (u64::from(head.get_u32()), command == wire::cmd::WRITE)
        };
        let payload = if has_payload {
            self.recv(length as usize).await?
        } else {
            Vec::new()
        };
        Some(ReceivedRequest {
            flags,
            command,
            handle,
            offset,
            length,
            payload,
        })
    }
}

/// A simple reply (a successful read's data must follow it).
pub fn simple_reply(handle: u64, error: u32) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_simple_reply(&mut out, handle, error);
    out.to_vec()
}

/// A structured chunk with any header fields and payload.
pub fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_chunk_header(&mut out, flags, kind, handle, payload.len() as u32);
    out.put_slice(payload);
    out.to_vec()
}

/// An `OFFSET_DATA` chunk.
pub fn data_chunk(done: bool, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    chunk(done_flag(done), wire::reply_type::OFFSET_DATA, handle, &payload)
}

/// An `OFFSET_HOLE` chunk.
pub fn hole_chunk(done: bool, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(&len.to_be_bytes());
    chunk(done_flag(done), wire::reply_type::OFFSET_HOLE, handle, &payload)
}

/// A final `NONE` chunk.
pub fn done_chunk(handle: u64) -> Vec<u8> {
    chunk(wire::reply_flags::DONE, wire::reply_type::NONE, handle, &[])
}

/// An extended chunk with any header fields (`offset` is the request's) and payload.
pub fn extended_chunk(flags: u16, kind: u16, handle: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_extended_chunk_header(&mut out, flags, kind, handle, offset, payload.len() as u64);
    out.put_slice(payload);
    out.to_vec()
}

/// An extended `OFFSET_DATA` chunk answering a request at `request_offset`, carrying `data`
/// from `offset`.
pub fn extended_data_chunk(
    done: bool,
    handle: u64,
    request_offset: u64,
    offset: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    extended_chunk(
        done_flag(done),
        wire::reply_type::OFFSET_DATA,
        handle,
        request_offset,
        &payload,
    )
}

/// A compact `BLOCK_STATUS` chunk for `context` with `(length, status)` descriptors of 32 bits
/// each.
pub fn status_chunk(done: bool, handle: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut payload = BytesMut::new();
    payload.put_u32(context);
    for &(length, status) in descriptors {
        payload.put_u32(length);
        payload.put_u32(status);
    }
    chunk(done_flag(done), wire::reply_type::BLOCK_STATUS, handle, &payload)
}

/// The payload of an extended block status chunk: context id, descriptor count and
/// `(length, status)` descriptors of 64 bits each.
pub fn extended_status_payload(context: u32, descriptors: &[(u64, u64)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32(context);
    out.put_u32(descriptors.len() as u32);
    for &(length, status) in descriptors {
        out.put_u64(length);
        out.put_u64(status);
    }
    out.to_vec()
}

fn done_flag(done: bool) -> u16 {
    if done {
        wire::reply_flags::DONE
    } else {
        0
    }
}

/// How a client fared against a fixed server byte stream.
#[derive(Debug)]
pub enum Fed {
    /// The handshake failed with this message.
    Refused(String),
    /// The handshake succeeded; one result per read of `(offset, len)`.
    Served(Vec<r3map_core::Result<Vec<u8>>>),
}

/// Connects a client to a server that sends exactly `server_bytes` (then closes, or with
/// `freeze` stays silent forever), reads every `(offset, len)` at once, and returns the
/// outcome. Everything the client sends is drained. Timeouts are the client's own
/// (`connect_timeout`, `request_timeout`); run it on a paused clock so they pass instantly.
pub async fn feed_client(
    server_bytes: &[u8],
    freeze: bool,
    reads: &[(u64, usize)],
    options: ClientOptions,
) -> Fed {
    use r3map_core::Backend;
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let (mut rx, mut tx) = tokio::io::split(server_end);
    let bytes = server_bytes.to_vec();
    let feeder = tokio::spawn(async move {
        let _ = tx.write_all(&bytes).await;
        if freeze {
            std::future::pending::<()>().await;
        }
        let _ = tx.shutdown().await;
        tx
    });
    let drain = tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let fed = match Client::connect_stream(client_end, "", options).await {
        Err(err) => Fed::Refused(err.to_string()),
        Ok(client) => {
            let results = futures::future::join_all(reads.iter().map(|&(offset, len)| {
                let client = &client;
                async move {
                    let mut buf = vec![0u8; len];
                    client.read_at(offset, &mut buf).await.map(|()| buf)
                }
            }))
            .await;
            Fed::Served(results)
        }
    };
    feeder.abort();
    drain.abort();
    fed
}

/// The bytes of a valid server session: a handshake advertising `size` bytes with extended
/// headers (`extended`) or, after refusing them, structured replies, then a reply in two
/// chunks for each read of `(offset, len)` of `content`, in order, for handles 1, 2, … (the
/// order in which [`feed_client`] issues them).
pub fn valid_transcript(content: &[u8], reads: &[(u64, usize)], extended: bool) -> Vec<u8> {
    use wire::transmission_flags::*;
    let mut out = BytesMut::new();
    codec::encode_greeting(
        &mut out,
        wire::handshake_flags::FIXED_NEWSTYLE | wire::handshake_flags::NO_ZEROES,
    );
    if extended {
        codec::encode_option_reply(&mut out, opt::EXTENDED_HEADERS, rep::ACK, &[]);
    } else {
        codec::encode_option_reply(&mut out, opt::EXTENDED_HEADERS, rep::ERR_UNSUP, &[]);
        codec::encode_option_reply(&mut out, opt::STRUCTURED_REPLY, rep::ACK, &[]);
    }
    let meta = codec::meta_context_data(1, wire::BASE_ALLOCATION);
    codec::encode_option_reply(&mut out, opt::SET_META_CONTEXT, rep::META_CONTEXT, &meta);
    codec::encode_option_reply(&mut out, opt::SET_META_CONTEXT, rep::ACK, &[]);
    let info = codec::info_export_data(content.len() as u64, HAS_FLAGS | SEND_FLUSH);
    codec::encode_option_reply(&mut out, opt::GO, rep::INFO, &info);
    codec::encode_option_reply(&mut out, opt::GO, rep::ACK, &[]);
    for (i, &(offset, len)) in reads.iter().enumerate() {
        let handle = i as u64 + 1;
        let data = &content[offset as usize..offset as usize + len];
        // Split in two chunks to exercise reassembly: second half first.
        let half = len / 2;
        let piece = |done: bool, at: usize, data: &[u8]| {
            let from = offset + at as u64;
            if extended {
                extended_data_chunk(done, handle, offset, from, data)
            } else {
                data_chunk(done, handle, from, data)
            }
        };
        if half > 0 {
            out.put_slice(&piece(false, half, &data[half..]));
            out.put_slice(&piece(true, 0, &data[..half]));
        } else {
            out.put_slice(&piece(true, 0, data));
        }
    }
    out.to_vec()
}

/// Client options for hostile tests: short deadlines (on a paused clock they cost nothing).
pub fn hostile_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(5)),
        ..ClientOptions::default()
    }
}
