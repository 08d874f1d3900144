//! Sans-IO encoding and decoding of NBD frames.
//!
//! Every decoder first checks that a whole frame is buffered (without allocating), then parses
//! it; `Ok(None)` means "not enough bytes yet" and is the normal outcome of a short read. Lengths
//! announced by the peer are capped before anything is allocated: a payload above the cap is
//! reported (and, for requests, skipped as it arrives) rather than buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::{self, cmd, reply_type};

/// A frame that breaks the protocol. The connection cannot continue after one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame started with the wrong magic number (the peer is not speaking NBD, or the stream
    /// lost synchronisation).
    #[error("wrong magic in {what}: expected {expected:#x}, got {found:#x}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// A length field is larger than this side accepts.
    #[error("{what} of {len} bytes exceeds the maximum of {max} bytes")]
    TooLong { what: &'static str, len: u64, max: u64 },
    /// The content of a frame does not parse.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> CodecError {
    CodecError::Malformed {
        what,
        detail: detail.into(),
    }
}

fn peek_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn peek_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn peek_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a protocol string: at most [`wire::MAX_STRING_LEN`] bytes of UTF-8 without NUL.
pub fn parse_string(what: &'static str, bytes: &[u8]) -> Result<String, CodecError> {
    if bytes.len() > wire::MAX_STRING_LEN {
        return Err(CodecError::TooLong {
            what,
            len: bytes.len() as u64,
            max: wire::MAX_STRING_LEN as u64,
        });
    }
    if bytes.contains(&0) {
        return Err(malformed(what, "contains a NUL byte"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed(what, "is not valid UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// Handshake, server side.
// ---------------------------------------------------------------------------------------------

/// Writes the server greeting (NBDMAGIC, IHAVEOPT, handshake flags).
pub fn encode_greeting(buf: &mut BytesMut, handshake_flags: u16) {
    buf.put_u64(wire::NBD_MAGIC);
    buf.put_u64(wire::IHAVEOPT);
    buf.put_u16(handshake_flags);
}

/// Decodes the client's 32-bit flags.
pub fn decode_client_flags(buf: &mut BytesMut) -> Option<u32> {
    (buf.len() >= 4).then(|| buf.get_u32())
}

/// One option as the server receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionFrame {
    /// An option whose data fits the cap.
    Option { option: u32, data: Bytes },
    /// An option whose data exceeded the cap; the data is skipped as it arrives, and the server
    /// answers with an error.
    TooBig { option: u32, len: u32 },
}

/// Decodes client options, capping the option data length.
#[derive(Debug, Clone)]
pub struct OptionDecoder {
    max_len: u32,
    skip: u64,
}

impl OptionDecoder {
    /// A decoder that accepts option data up to `max_len` bytes.
    pub fn new(max_len: u32) -> Self {
        Self { max_len, skip: 0 }
    }

    /// Bytes still to be discarded from an oversized option.
    pub fn skipping(&self) -> u64 {
        self.skip
    }

    /// Decodes one option, or `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<OptionFrame>, CodecError> {
        if !skip(&mut self.skip, buf) {
            return Ok(None);
        }
        if buf.len() < wire::OPTION_HEADER_LEN {
            return Ok(None);
        }
        let magic = peek_u64(buf, 0);
        if magic != wire::IHAVEOPT {
            return Err(CodecError::BadMagic {
                what: "option header",
                expected: wire::IHAVEOPT,
                found: magic,
            });
        }
        let option = peek_u32(buf, 8);
        let len = peek_u32(buf, 12);
        if len > self.max_len {
            buf.advance(wire::OPTION_HEADER_LEN);
            self.skip = u64::from(len);
            skip(&mut self.skip, buf);
            return Ok(Some(OptionFrame::TooBig { option, len }));
        }
        if buf.len() < wire::OPTION_HEADER_LEN + len as usize {
            buf.reserve(wire::OPTION_HEADER_LEN + len as usize - buf.len());
            return Ok(None);
        }
        buf.advance(wire::OPTION_HEADER_LEN);
        let data = buf.split_to(len as usize).freeze();
        Ok(Some(OptionFrame::Option { option, data }))
    }
}

/// Discards up to `*remaining` bytes from `buf`; true once nothing is left to skip.
fn skip(remaining: &mut u64, buf: &mut BytesMut) -> bool {
    if *remaining > 0 {
        let n = (*remaining).min(buf.len() as u64) as usize;
        buf.advance(n);
        *remaining -= n as u64;
    }
    *remaining == 0
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_export_request(mut data: &[u8]) -> Result<ExportRequest, CodecError> {
    const WHAT: &str = "INFO/GO option";
    if data.len() < 6 {
        return Err(malformed(WHAT, format!("{} bytes is too short", data.len())));
    }
    let name_len = data.get_u32() as usize;
    if name_len > data.len() - 2 {
        return Err(malformed(WHAT, "export name length exceeds the option data"));
    }
    let name = parse_string("export name", &data[..name_len])?;
    data.advance(name_len);
    let count = data.get_u16() as usize;
    if data.len() != count * 2 {
        return Err(malformed(
            WHAT,
            format!(
                "{count} information requests need {} bytes, got {}",
                count * 2,
                data.len()
            ),
        ));
    }
    let info_requests = (0..count).map(|_| data.get_u16()).collect();
    Ok(ExportRequest { name, info_requests })
}

/// Encodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_export_request(buf: &mut BytesMut, name: &str, info_requests: &[u16]) {
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
    buf.put_u16(info_requests.len() as u16);
    for request in info_requests {
        buf.put_u16(*request);
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parses the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn parse_meta_context_request(mut data: &[u8]) -> Result<MetaContextRequest, CodecError> {
    const WHAT: &str = "META_CONTEXT option";
    if data.len() < 8 {
        return Err(malformed(WHAT, format!("{} bytes is too short", data.len())));
    }
    let name_len = data.get_u32() as usize;
    if name_len > data.len() - 4 {
        return Err(malformed(WHAT, "export name length exceeds the option data"));
    }
    let export = parse_string("export name", &data[..name_len])?;
    data.advance(name_len);
    let count = data.get_u32() as usize;
    // Every query needs at least its 4-byte length: this bounds the allocation below.
    if count > data.len() / 4 {
        return Err(malformed(
            WHAT,
            format!("{count} queries cannot fit in {} bytes", data.len()),
        ));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        if data.len() < 4 {
            return Err(malformed(WHAT, "query length runs past the option data"));
        }
        let len = data.get_u32() as usize;
        if len > data.len() {
            return Err(malformed(WHAT, "query runs past the option data"));
        }
        queries.push(parse_string("metadata context query", &data[..len])?);
        data.advance(len);
    }
    if !data.is_empty() {
        return Err(malformed(WHAT, format!("{} trailing bytes", data.len())));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Encodes the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_context_request(buf: &mut BytesMut, export: &str, queries: &[&str]) {
    buf.put_u32(export.len() as u32);
    buf.put_slice(export.as_bytes());
    buf.put_u32(queries.len() as u32);
    for query in queries {
        buf.put_u32(query.len() as u32);
        buf.put_slice(query.as_bytes());
    }
}

/// Writes one option reply.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    buf.put_u64(wire::OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// Writes the reply to `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, wire::EXPORT_NAME_PADDING);
    }
}

/// The data of an `NBD_REP_SERVER` reply (one export of `NBD_OPT_LIST`).
pub fn server_reply_data(name: &str, description: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_slice(description.as_bytes());
    data
}

/// The data of an `NBD_INFO_EXPORT` reply.
pub fn info_export_data(size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.put_u16(wire::info::EXPORT);
    data.put_u64(size);
    data.put_u16(flags);
    data
}

/// The data of an `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` reply.
pub fn info_string_data(kind: u16, text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + text.len());
    data.put_u16(kind);
    data.put_slice(text.as_bytes());
    data
}

/// The data of an `NBD_INFO_BLOCK_SIZE` reply.
pub fn info_block_size_data(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.put_u16(wire::info::BLOCK_SIZE);
    data.put_u32(minimum);
    data.put_u32(preferred);
    data.put_u32(maximum);
    data
}

/// The data of an `NBD_REP_META_CONTEXT` reply.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.put_u32(id);
    data.put_slice(name.as_bytes());
    data
}

// ---------------------------------------------------------------------------------------------
// Handshake, client side.
// ---------------------------------------------------------------------------------------------

/// Decodes the server greeting and returns the handshake flags.
pub fn decode_greeting(buf: &mut BytesMut) -> Result<Option<u16>, CodecError> {
    if buf.len() < wire::GREETING_LEN {
        return Ok(None);
    }
    let magic = peek_u64(buf, 0);
    if magic != wire::NBD_MAGIC {
        return Err(CodecError::BadMagic {
            what: "server greeting",
            expected: wire::NBD_MAGIC,
            found: magic,
        });
    }
    let opt_magic = peek_u64(buf, 8);
    if opt_magic != wire::IHAVEOPT {
        return Err(CodecError::BadMagic {
            what: "server greeting (oldstyle servers are not supported)",
            expected: wire::IHAVEOPT,
            found: opt_magic,
        });
    }
    let flags = peek_u16(buf, 16);
    buf.advance(wire::GREETING_LEN);
    Ok(Some(flags))
}

/// Writes one client option.
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    buf.put_u64(wire::IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// One option reply as the client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Bytes,
}

/// Decodes one option reply whose data is at most `max_len` bytes.
pub fn decode_option_reply(buf: &mut BytesMut, max_len: u32) -> Result<Option<OptionReply>, CodecError> {
    if buf.len() < wire::OPTION_REPLY_HEADER_LEN {
        return Ok(None);
    }
    let magic = peek_u64(buf, 0);
    if magic != wire::OPTION_REPLY_MAGIC {
        return Err(CodecError::BadMagic {
            what: "option reply",
            expected: wire::OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    let len = peek_u32(buf, 16);
    if len > max_len {
        return Err(CodecError::TooLong {
            what: "option reply",
            len: u64::from(len),
            max: u64::from(max_len),
        });
    }
    let total = wire::OPTION_REPLY_HEADER_LEN + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let option = peek_u32(buf, 8);
    let reply = peek_u32(buf, 12);
    buf.advance(wire::OPTION_REPLY_HEADER_LEN);
    let data = buf.split_to(len as usize).freeze();
    Ok(Some(OptionReply { option, reply, data }))
}

/// Decodes the reply to `NBD_OPT_EXPORT_NAME`: export size and transmission flags.
pub fn decode_export_name_reply(buf: &mut BytesMut, no_zeroes: bool) -> Option<(u64, u16)> {
    let total = 10 + if no_zeroes { 0 } else { wire::EXPORT_NAME_PADDING };
    if buf.len() < total {
        return None;
    }
    let size = buf.get_u64();
    let flags = buf.get_u16();
    buf.advance(total - 10);
    Some((size, flags))
}

/// What an `NBD_REP_INFO` reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An information type this implementation does not know (ignored).
    Unknown(u16),
}

/// Parses the data of an `NBD_REP_INFO` reply.
pub fn parse_info(mut data: &[u8]) -> Result<Info, CodecError> {
    const WHAT: &str = "INFO reply";
    if data.len() < 2 {
        return Err(malformed(WHAT, "shorter than its type field"));
    }
    let kind = data.get_u16();
    match kind {
        wire::info::EXPORT => {
            if data.len() != 10 {
                return Err(malformed(WHAT, "NBD_INFO_EXPORT must be 12 bytes"));
            }
            Ok(Info::Export {
                size: data.get_u64(),
                flags: data.get_u16(),
            })
        }
        wire::info::NAME => Ok(Info::Name(parse_string("export name", data)?)),
        wire::info::DESCRIPTION => Ok(Info::Description(parse_string("description", data)?)),
        wire::info::BLOCK_SIZE => {
            if data.len() != 12 {
                return Err(malformed(WHAT, "NBD_INFO_BLOCK_SIZE must be 14 bytes"));
            }
            Ok(Info::BlockSize {
                minimum: data.get_u32(),
                preferred: data.get_u32(),
                maximum: data.get_u32(),
            })
        }
        other => Ok(Info::Unknown(other)),
    }
}

/// Parses the data of an `NBD_REP_SERVER` reply into export name and description.
pub fn parse_server_reply(mut data: &[u8]) -> Result<(String, String), CodecError> {
    const WHAT: &str = "SERVER reply";
    if data.len() < 4 {
        return Err(malformed(WHAT, "shorter than its name length"));
    }
    let len = data.get_u32() as usize;
    if len > data.len() {
        return Err(malformed(WHAT, "name length exceeds the reply"));
    }
    let name = parse_string("export name", &data[..len])?;
    let description = parse_string("description", &data[len..])?;
    Ok((name, description))
}

/// Parses the data of an `NBD_REP_META_CONTEXT` reply into id and name.
pub fn parse_meta_context(mut data: &[u8]) -> Result<(u32, String), CodecError> {
    if data.len() < 4 {
        return Err(malformed("META_CONTEXT reply", "shorter than its id"));
    }
    let id = data.get_u32();
    Ok((id, parse_string("metadata context name", data)?))
}

// ---------------------------------------------------------------------------------------------
// Transmission, server side.
// ---------------------------------------------------------------------------------------------

/// The payload that came with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The command carries no payload.
    None,
    /// The data of a write.
    Data(Bytes),
    /// A write longer than the maximum payload: its data is being discarded as it arrives and
    /// the request must be answered with an error.
    Oversized,
    /// The `length` bytes of a write's data follow in the stream, not decoded yet (only from
    /// [`RequestDecoder::decode_header`]): the caller reads them, or discards them with
    /// [`RequestDecoder::discard`], before it decodes the next request.
    Follows,
}

/// One transmission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
    pub payload: Payload,
}

/// Decodes transmission requests, capping the write payload length.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    max_payload: u32,
    skip: u64,
}

impl RequestDecoder {
    /// A decoder that buffers write payloads of at most `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload, skip: 0 }
    }

    /// Bytes still to be discarded from an oversized write.
    pub fn skipping(&self) -> u64 {
        self.skip
    }

    /// How many more bytes the frame at the front of `buf` needs (at least 1 if incomplete).
    pub fn needed(&self, buf: &[u8]) -> usize {
        if self.skip > 0 {
            return self.skip.min(1 << 20) as usize;
        }
        if buf.len() < wire::REQUEST_HEADER_LEN {
            return wire::REQUEST_HEADER_LEN - buf.len();
        }
        let command = peek_u16(buf, 6);
        let length = peek_u32(buf, 24);
        if command == cmd::WRITE && length <= self.max_payload {
            (wire::REQUEST_HEADER_LEN + length as usize).saturating_sub(buf.len())
        } else {
            0
        }
    }

    /// Decodes one request, or `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        self.decode_frame(buf, true)
    }

    /// Decodes one request header, or `Ok(None)` if more bytes are needed. Unlike
    /// [`decode`](Self::decode), a write within the cap leaves its data in the stream
    /// ([`Payload::Follows`]), so the caller can read it straight into a buffer of its own
    /// instead of growing `buf` to hold it. Oversized writes are skipped as with `decode`.
    pub fn decode_header(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        self.decode_frame(buf, false)
    }

    /// Discards the next `len` bytes of the stream as they arrive (the payload of a write
    /// returned with [`Payload::Follows`] that the caller does not want).
    pub fn discard(&mut self, len: u64) {
        self.skip += len;
    }

    fn decode_frame(
        &mut self,
        buf: &mut BytesMut,
        with_payload: bool,
    ) -> Result<Option<Request>, CodecError> {
        if !skip(&mut self.skip, buf) {
            return Ok(None);
        }
        if buf.len() < wire::REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let magic = peek_u32(buf, 0);
        if magic != wire::REQUEST_MAGIC {
            return Err(CodecError::BadMagic {
                what: "request",
                expected: u64::from(wire::REQUEST_MAGIC),
                found: u64::from(magic),
            });
        }
        let flags = peek_u16(buf, 4);
        let command = peek_u16(buf, 6);
        let handle = peek_u64(buf, 8);
        let offset = peek_u64(buf, 16);
        let length = peek_u32(buf, 24);
        let payload = if command != cmd::WRITE {
            buf.advance(wire::REQUEST_HEADER_LEN);
            Payload::None
        } else if length > self.max_payload {
            buf.advance(wire::REQUEST_HEADER_LEN);
            self.skip = u64::from(length);
            skip(&mut self.skip, buf);
            Payload::Oversized
        } else if !with_payload {
            buf.advance(wire::REQUEST_HEADER_LEN);
            Payload::Follows
        } else {
            let total = wire::REQUEST_HEADER_LEN + length as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            buf.advance(wire::REQUEST_HEADER_LEN);
            Payload::Data(buf.split_to(length as usize).freeze())
        };
        Ok(Some(Request {
            flags,
            command,
            handle,
            offset,
            length,
            payload,
        }))
    }
}

/// Writes a simple reply header (the data of a successful read follows it).
pub fn encode_simple_reply(buf: &mut BytesMut, handle: u64, error: u32) {
    buf.put_u32(wire::SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(handle);
}

/// Writes a structured reply chunk header; `length` bytes of payload must follow.
pub fn encode_chunk_header(buf: &mut BytesMut, flags: u16, kind: u16, handle: u64, length: u32) {
    buf.put_u32(wire::STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(handle);
    buf.put_u32(length);
}

/// Writes the header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk and its offset; `data_len`
/// bytes of data must follow.
pub fn encode_offset_data_header(buf: &mut BytesMut, handle: u64, offset: u64, data_len: u32) {
    encode_chunk_header(
        buf,
        wire::reply_flags::DONE,
        reply_type::OFFSET_DATA,
        handle,
        data_len + 8,
    );
    buf.put_u64(offset);
}

/// Writes a final `NBD_REPLY_TYPE_NONE` chunk.
pub fn encode_done_chunk(buf: &mut BytesMut, handle: u64) {
    encode_chunk_header(buf, wire::reply_flags::DONE, reply_type::NONE, handle, 0);
}

/// Writes a final `NBD_REPLY_TYPE_ERROR` chunk; the message is cut to the protocol's limit.
pub fn encode_error_chunk(buf: &mut BytesMut, handle: u64, error: u32, message: &str) {
    let message = truncate_str(message, wire::MAX_STRING_LEN);
    encode_chunk_header(
        buf,
        wire::reply_flags::DONE,
        reply_type::ERROR,
        handle,
        6 + message.len() as u32,
    );
    buf.put_u32(error);
    buf.put_u16(message.len() as u16);
    buf.put_slice(message.as_bytes());
}

/// Writes a final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with the given `(length, flags)` extents.
pub fn encode_block_status_chunk(buf: &mut BytesMut, handle: u64, context_id: u32, extents: &[(u32, u32)]) {
    encode_chunk_header(
        buf,
        wire::reply_flags::DONE,
        reply_type::BLOCK_STATUS,
        handle,
        4 + 8 * extents.len() as u32,
    );
    buf.put_u32(context_id);
    for (length, flags) in extents {
        buf.put_u32(*length);
        buf.put_u32(*flags);
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// At most [`wire::MAX_STRING_LEN`] bytes of a peer's message.
pub fn truncate_bytes(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(wire::MAX_STRING_LEN)]
}

// ---------------------------------------------------------------------------------------------
// Transmission, client side.
// ---------------------------------------------------------------------------------------------

/// Writes a request header; a write's data must follow.
pub fn encode_request(buf: &mut BytesMut, flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
    buf.put_u32(wire::REQUEST_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(command);
    buf.put_u64(handle);
    buf.put_u64(offset);
    buf.put_u32(length);
}

/// The header of a reply as the client receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; a successful read's data follows.
    Simple { handle: u64, error: u32 },
    /// A structured reply chunk; `length` bytes of payload follow.
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        length: u32,
    },
}

impl ReplyHeader {
    /// The request this reply answers.
    pub fn handle(&self) -> u64 {
        match self {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Chunk { handle, .. } => *handle,
        }
    }
}

/// Decodes a reply header (simple or structured), or `Ok(None)` if more bytes are needed.
pub fn decode_reply_header(buf: &mut BytesMut) -> Result<Option<ReplyHeader>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match peek_u32(buf, 0) {
        wire::SIMPLE_REPLY_MAGIC => {
            if buf.len() < wire::SIMPLE_REPLY_HEADER_LEN {
                return Ok(None);
            }
            let error = peek_u32(buf, 4);
            let handle = peek_u64(buf, 8);
            buf.advance(wire::SIMPLE_REPLY_HEADER_LEN);
            Ok(Some(ReplyHeader::Simple { handle, error }))
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            if buf.len() < wire::STRUCTURED_REPLY_HEADER_LEN {
                return Ok(None);
            }
            let flags = peek_u16(buf, 4);
            let kind = peek_u16(buf, 6);
            let handle = peek_u64(buf, 8);
            let length = peek_u32(buf, 16);
            buf.advance(wire::STRUCTURED_REPLY_HEADER_LEN);
            Ok(Some(ReplyHeader::Chunk {
                flags,
                kind,
                handle,
                length,
            }))
        }
        other => Err(CodecError::BadMagic {
            what: "reply",
            expected: u64::from(wire::SIMPLE_REPLY_MAGIC),
            found: u64::from(other),
        }),
    }
}

/// Parses the payload of an error chunk into error value and message.
pub fn parse_error_chunk(mut payload: &[u8]) -> Result<(u32, String), CodecError> {
    if payload.len() < 6 {
        return Err(malformed("error chunk", "shorter than 6 bytes"));
    }
    let error = payload.get_u32();
    let len = payload.get_u16() as usize;
    if len > payload.len() {
        return Err(malformed("error chunk", "message length exceeds the chunk"));
    }
    let message = String::from_utf8_lossy(&payload[..len]).into_owned();
    Ok((error, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_bytes(command: u16, length: u32, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_request(&mut buf, 0, command, 7, 4096, length);
        buf.put_slice(payload);
        buf
    }

    #[test]
    fn request_round_trip_with_payload() {
        let mut buf = request_bytes(cmd::WRITE, 4, b"abcd");
        let mut decoder = RequestDecoder::new(1024);
        let request = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(request.command, cmd::WRITE);
        assert_eq!(request.handle, 7);
        assert_eq!(request.offset, 4096);
        assert_eq!(request.payload, Payload::Data(Bytes::from_static(b"abcd")));
        assert!(buf.is_empty());
    }

    #[test]
    fn decode_header_leaves_the_write_payload_in_the_stream() {
        let mut buf = request_bytes(cmd::WRITE, 4, b"abcd");
        let mut decoder = RequestDecoder::new(1024);
        let request = decoder.decode_header(&mut buf).unwrap().unwrap();
        assert_eq!((request.command, request.length), (cmd::WRITE, 4));
        assert_eq!(request.payload, Payload::Follows);
        assert_eq!(&buf[..], b"abcd");
        // A header alone is enough, the payload need not have arrived.
        let mut buf = request_bytes(cmd::WRITE, 1000, &[]);
        let request = decoder.decode_header(&mut buf).unwrap().unwrap();
        assert_eq!(request.payload, Payload::Follows);
        assert!(buf.is_empty());
        // Oversized writes are still skipped by the decoder.
        let mut buf = request_bytes(cmd::WRITE, 2000, &[9u8; 10]);
        let request = decoder.decode_header(&mut buf).unwrap().unwrap();
        assert_eq!(request.payload, Payload::Oversized);
        assert_eq!(decoder.skipping(), 1990);
    }

    #[test]
    fn discarded_payload_is_skipped_before_the_next_request() {
        let mut buf = request_bytes(cmd::WRITE, 6, b"abc");
        let mut decoder = RequestDecoder::new(1024);
        let request = decoder.decode_header(&mut buf).unwrap().unwrap();
        decoder.discard(u64::from(request.length));
        assert_eq!(decoder.decode_header(&mut buf), Ok(None));
        assert!(buf.is_empty());
        assert_eq!(decoder.skipping(), 3);
        let mut rest = BytesMut::from(&b"def"[..]);
        rest.extend_from_slice(&request_bytes(cmd::FLUSH, 0, &[]));
        let request = decoder.decode_header(&mut rest).unwrap().unwrap();
        assert_eq!(request.command, cmd::FLUSH);
        assert!(rest.is_empty());
    }

    #[test]
    fn incomplete_request_is_not_an_error() {
        let full = request_bytes(cmd::WRITE, 4, b"abcd");
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            let mut decoder = RequestDecoder::new(1024);
            assert_eq!(decoder.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "an incomplete frame must stay buffered");
            assert!(decoder.needed(&buf) > 0);
        }
    }

    #[test]
    fn oversized_write_is_skipped_not_buffered() {
        let mut buf = request_bytes(cmd::WRITE, 100, &[1u8; 40]);
        let mut decoder = RequestDecoder::new(16);
        let request = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(request.payload, Payload::Oversized);
        assert!(buf.is_empty());
        assert_eq!(decoder.skipping(), 60);
        // The rest of the payload, then a valid request.
        let mut rest = BytesMut::from(&[2u8; 60][..]);
        rest.extend_from_slice(&request_bytes(cmd::FLUSH, 0, &[]));
        let next = decoder.decode(&mut rest).unwrap().unwrap();
        assert_eq!(next.command, cmd::FLUSH);
    }

    #[test]
    fn wrong_request_magic_is_an_error() {
        let mut buf = request_bytes(cmd::READ, 4, &[]);
        buf[0] ^= 0xff;
        let err = RequestDecoder::new(16).decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn oversized_option_is_skipped() {
        let mut buf = BytesMut::new();
        encode_option(&mut buf, 99, &[0u8; 100]);
        encode_option(&mut buf, wire::opt::ABORT, &[]);
        let mut decoder = OptionDecoder::new(10);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(OptionFrame::TooBig { option: 99, len: 100 })
        );
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(OptionFrame::Option {
                option: wire::opt::ABORT,
                data: Bytes::new()
            })
        );
    }

    #[test]
    fn export_request_round_trip() {
        let mut buf = BytesMut::new();
        encode_export_request(&mut buf, "disk", &[wire::info::BLOCK_SIZE]);
        let parsed = parse_export_request(&buf).unwrap();
        assert_eq!(parsed.name, "disk");
        assert_eq!(parsed.info_requests, vec![wire::info::BLOCK_SIZE]);
        // Name length past the data.
        let mut bad = buf.clone();
        bad[3] = 200;
        assert!(parse_export_request(&bad).is_err());
    }

    #[test]
    fn meta_context_request_round_trip() {
        let mut buf = BytesMut::new();
        encode_meta_context_request(&mut buf, "", &["base:allocation", "qemu:dirty"]);
        let parsed = parse_meta_context_request(&buf).unwrap();
        assert_eq!(parsed.queries, vec!["base:allocation", "qemu:dirty"]);
        // Huge query count does not allocate.
        let mut bad = BytesMut::new();
        bad.put_u32(0);
        bad.put_u32(u32::MAX);
        assert!(parse_meta_context_request(&bad).is_err());
    }

    #[test]
    fn reply_headers_decode() {
        let mut buf = BytesMut::new();
        encode_simple_reply(&mut buf, 5, wire::errno::EIO);
        encode_error_chunk(&mut buf, 6, wire::errno::EINVAL, "bad");
        assert_eq!(
            decode_reply_header(&mut buf).unwrap(),
            Some(ReplyHeader::Simple {
                handle: 5,
                error: wire::errno::EIO
            })
        );
        let chunk = decode_reply_header(&mut buf).unwrap().unwrap();
        assert_eq!(chunk.handle(), 6);
        assert_eq!(
            parse_error_chunk(&buf).unwrap(),
            (wire::errno::EINVAL, "bad".to_string())
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    proptest! {
        /// Any byte string fed in any split never panics the request decoder, never buffers a
        /// payload above the cap, and decodes the same requests as feeding it whole.
        #[test]
        fn request_decoder_is_split_invariant(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            split in 0usize..400,
        ) {
            let max = 64;
            let whole = {
                let mut decoder = RequestDecoder::new(max);
                let mut buf = BytesMut::from(&bytes[..]);
                let mut out = Vec::new();
                while let Ok(Some(r)) = decoder.decode(&mut buf) { out.push(r); }
                out
            };
            let split = split.min(bytes.len());
            let mut decoder = RequestDecoder::new(max);
            let mut buf = BytesMut::from(&bytes[..split]);
            let mut out = Vec::new();
            let mut failed = false;
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(r)) => {
                        if let Payload::Data(d) = &r.payload { prop_assert!(d.len() <= max as usize); }
                        out.push(r);
                    }
                    Ok(None) => break,
                    Err(_) => { failed = true; break; }
                }
            }
            if !failed {
                buf.extend_from_slice(&bytes[split..]);
                while let Ok(Some(r)) = decoder.decode(&mut buf) { out.push(r); }
                prop_assert_eq!(out, whole);
            }
        }

        /// Valid requests survive an encode/decode round trip.
        #[test]
        fn request_round_trip(
            flags in any::<u16>(), command in 0u16..10, handle in any::<u64>(),
            offset in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let length = payload.len() as u32;
            let mut buf = BytesMut::new();
            encode_request(&mut buf, flags, command, handle, offset, length);
            if command == cmd::WRITE { buf.put_slice(&payload); }
            let request = RequestDecoder::new(64).decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(request.flags, flags);
            prop_assert_eq!(request.command, command);
            prop_assert_eq!(request.handle, handle);
            prop_assert_eq!(request.offset, offset);
            prop_assert_eq!(request.length, length);
            prop_assert!(buf.is_empty());
        }

        /// Option payload parsers never panic on arbitrary bytes.
        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_export_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
            let _ = parse_info(&bytes);
            let _ = parse_server_reply(&bytes);
            let _ = parse_error_chunk(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = OptionDecoder::new(32).decode(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_option_reply(&mut buf, 32);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_reply_header(&mut buf);
        }
    }
}
