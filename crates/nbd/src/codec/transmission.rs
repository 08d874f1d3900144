//! Transmission frames: requests (compact or extended) and replies (simple, structured or
//! extended), in whichever [`Framing`] the handshake agreed on.
//!
//! With extended headers (`NBD_OPT_EXTENDED_HEADERS`) both directions use 32-byte headers with
//! a 64-bit length: a request's length is a payload length when it carries
//! `NBD_CMD_FLAG_PAYLOAD_LEN` (required for writes) and otherwise an effect length, so trims,
//! zeroes, caches and block status queries can cover more than 4 GiB at once. Every reply is
//! then an extended chunk that repeats the request's offset; block status uses 64-bit
//! descriptors (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{malformed, peek_u16, peek_u32, peek_u64, skip, truncate_str, CodecError};
use crate::wire::{self, cmd, cmd_flags, reply_type};

/// The transmission headers both sides use, as the handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Compact requests, simple replies only (nothing negotiated).
    #[default]
    Simple,
    /// Compact requests, structured reply chunks (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended requests and extended reply chunks (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl Framing {
    /// Whether replies come as chunks (structured or extended), so they can carry error
    /// messages, holes and block status.
    pub fn chunked(self) -> bool {
        self != Framing::Simple
    }

    /// Whether headers are the 32-byte extended ones.
    pub fn extended(self) -> bool {
        self == Framing::Extended
    }

    /// Bytes of a request header.
    pub fn request_header_len(self) -> usize {
        if self.extended() {
            wire::EXTENDED_HEADER_LEN
        } else {
            wire::REQUEST_HEADER_LEN
        }
    }

    /// Largest length a request (and so a block status descriptor) can express.
    pub fn max_length(self) -> u64 {
        if self.extended() {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }
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
    /// A compact write longer than the maximum payload: its data is being discarded as it
    /// arrives and the request must be answered with an error.
    Oversized,
    /// The `length` bytes of a payload follow in the stream, not decoded yet (only from
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
    /// Payload length (a write's, or any request with `NBD_CMD_FLAG_PAYLOAD_LEN`) or effect
    /// length; at most `u32::MAX` unless extended headers are in use.
    pub length: u64,
    pub payload: Payload,
}

/// Decodes transmission requests, capping the payload length.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    max_payload: u32,
    extended: bool,
    skip: u64,
}

impl RequestDecoder {
    /// A decoder of compact requests that buffers write payloads of at most `max_payload`
    /// bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            extended: false,
            skip: 0,
        }
    }

    /// A decoder for the requests of `framing` (extended ones after `NBD_OPT_EXTENDED_HEADERS`).
    pub fn for_framing(max_payload: u32, framing: Framing) -> Self {
        Self {
            extended: framing.extended(),
            ..Self::new(max_payload)
        }
    }

    /// Bytes still to be discarded from an oversized write.
    pub fn skipping(&self) -> u64 {
        self.skip
    }

    fn header_len(&self) -> usize {
        if self.extended {
            wire::EXTENDED_HEADER_LEN
        } else {
            wire::REQUEST_HEADER_LEN
        }
    }

    /// Whether a request with these fields carries a payload of its `length`.
    fn has_payload(&self, flags: u16, command: u16) -> bool {
        if self.extended {
            flags & cmd_flags::PAYLOAD_LEN != 0
        } else {
            command == cmd::WRITE
        }
    }

    fn peek_length(&self, buf: &[u8]) -> u64 {
        if self.extended {
            peek_u64(buf, 24)
        } else {
            u64::from(peek_u32(buf, 24))
        }
    }

    /// How many more bytes the frame at the front of `buf` needs (at least 1 if incomplete).
    pub fn needed(&self, buf: &[u8]) -> usize {
        if self.skip > 0 {
            return self.skip.min(1 << 20) as usize;
        }
        let header = self.header_len();
        if buf.len() < header {
            return header - buf.len();
        }
        let length = self.peek_length(buf);
        if self.has_payload(peek_u16(buf, 4), peek_u16(buf, 6)) && length <= u64::from(self.max_payload) {
            (header + length as usize).saturating_sub(buf.len())
        } else {
            0
        }
    }

    /// Decodes one request, or `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        self.decode_frame(buf, true)
    }

    /// Decodes one request header, or `Ok(None)` if more bytes are needed. Unlike
    /// [`decode`](Self::decode), a payload within the cap stays in the stream
    /// ([`Payload::Follows`]), so the caller can read it straight into a buffer of its own
    /// instead of growing `buf` to hold it. Oversized writes are skipped as with `decode`.
    pub fn decode_header(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        self.decode_frame(buf, false)
    }

    /// Discards the next `len` bytes of the stream as they arrive (the payload of a request
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
        let header = self.header_len();
        if buf.len() < header {
            return Ok(None);
        }
        let magic = peek_u32(buf, 0);
        let expected = if self.extended {
            wire::EXTENDED_REQUEST_MAGIC
        } else {
            wire::REQUEST_MAGIC
        };
        if magic != expected {
            return Err(CodecError::BadMagic {
                what: if self.extended {
                    "extended request"
                } else {
                    "request"
                },
                expected: u64::from(expected),
                found: u64::from(magic),
            });
        }
        let flags = peek_u16(buf, 4);
        let command = peek_u16(buf, 6);
        let handle = peek_u64(buf, 8);
        let offset = peek_u64(buf, 16);
        let length = self.peek_length(buf);
        let payload = if !self.has_payload(flags, command) {
            buf.advance(header);
            Payload::None
        } else if length > u64::from(self.max_payload) {
            if self.extended {
                // The protocol asks for a hard disconnect here: skipping up to 2^64 bytes of
                // junk would keep the connection busy forever.
                return Err(CodecError::TooLong {
                    what: "extended request payload",
                    len: length,
                    max: u64::from(self.max_payload),
                });
            }
            buf.advance(header);
            self.skip = length;
            skip(&mut self.skip, buf);
            Payload::Oversized
        } else if !with_payload {
            buf.advance(header);
            Payload::Follows
        } else {
            let total = header + length as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            buf.advance(header);
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

/// The request a reply answers, and how replies are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub framing: Framing,
    pub handle: u64,
    /// The request's offset (extended replies repeat it).
    pub offset: u64,
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

/// Writes an extended reply chunk header; `length` bytes of payload must follow. `offset` is
/// the offset of the request it answers.
pub fn encode_extended_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u64,
) {
    buf.put_u32(wire::EXTENDED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(handle);
    buf.put_u64(offset);
    buf.put_u64(length);
}

/// The header of a final chunk of `length` payload bytes in the framing of `to` (structured
/// or extended; a structured chunk's `length` is at most `u32::MAX` by construction: every
/// caller's payload is bounded by the server's maximum request).
fn final_chunk_header(buf: &mut BytesMut, to: ReplyTo, kind: u16, length: u64) {
    let done = wire::reply_flags::DONE;
    if to.framing.extended() {
        encode_extended_chunk_header(buf, done, kind, to.handle, to.offset, length);
    } else {
        debug_assert!(length <= u64::from(u32::MAX));
        encode_chunk_header(buf, done, kind, to.handle, length as u32);
    }
}

/// Writes the reply to a successful command without data: a simple reply, or a final
/// `NBD_REPLY_TYPE_NONE` chunk.
pub fn encode_ok_reply(buf: &mut BytesMut, to: ReplyTo) {
    if to.framing.chunked() {
        final_chunk_header(buf, to, reply_type::NONE, 0);
    } else {
        encode_simple_reply(buf, to.handle, 0);
    }
}

/// Writes an error reply: a simple reply, or a final `NBD_REPLY_TYPE_ERROR` chunk carrying the
/// message cut to the protocol's limit.
pub fn encode_error_reply(buf: &mut BytesMut, to: ReplyTo, error: u32, message: &str) {
    if !to.framing.chunked() {
        encode_simple_reply(buf, to.handle, error);
        return;
    }
    let message = truncate_str(message, wire::MAX_STRING_LEN);
    final_chunk_header(buf, to, reply_type::ERROR, 6 + message.len() as u64);
    buf.put_u32(error);
    buf.put_u16(message.len() as u16);
    buf.put_slice(message.as_bytes());
}

/// Writes the header of a successful read of `data_len` bytes; the data must follow. With
/// chunks that is one final `NBD_REPLY_TYPE_OFFSET_DATA` chunk (or `NONE` for an empty read).
pub fn encode_read_reply_header(buf: &mut BytesMut, to: ReplyTo, data_len: u32) {
    if !to.framing.chunked() {
        encode_simple_reply(buf, to.handle, 0);
    } else if data_len == 0 {
        final_chunk_header(buf, to, reply_type::NONE, 0);
    } else {
        final_chunk_header(buf, to, reply_type::OFFSET_DATA, u64::from(data_len) + 8);
        buf.put_u64(to.offset);
    }
}

/// One block status descriptor: `length` bytes with `status` flags of the metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    pub length: u64,
    pub status: u64,
}

/// Writes a final block status chunk for `context_id`: `NBD_REPLY_TYPE_BLOCK_STATUS` with
/// 32-bit descriptors, or with extended headers `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` with 64-bit
/// ones. Without extended headers every length and status must fit 32 bits
/// ([`Framing::max_length`]).
pub fn encode_block_status_reply(
    buf: &mut BytesMut,
    to: ReplyTo,
    context_id: u32,
    descriptors: &[StatusDescriptor],
) {
    debug_assert!(to.framing.chunked(), "block status needs chunked replies");
    let count = descriptors.len() as u64;
    if to.framing.extended() {
        final_chunk_header(buf, to, reply_type::BLOCK_STATUS_EXT, 8 + 16 * count);
        buf.put_u32(context_id);
        buf.put_u32(count as u32);
        for descriptor in descriptors {
            buf.put_u64(descriptor.length);
            buf.put_u64(descriptor.status);
        }
    } else {
        final_chunk_header(buf, to, reply_type::BLOCK_STATUS, 4 + 8 * count);
        buf.put_u32(context_id);
        for descriptor in descriptors {
            debug_assert!(
                descriptor.length <= u64::from(u32::MAX) && descriptor.status <= u64::from(u32::MAX)
            );
            buf.put_u32(descriptor.length as u32);
            buf.put_u32(descriptor.status as u32);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission, client side.
// ---------------------------------------------------------------------------------------------

/// Writes a compact request header; a write's data must follow.
pub fn encode_request(buf: &mut BytesMut, flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
    buf.put_u32(wire::REQUEST_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(command);
    buf.put_u64(handle);
    buf.put_u64(offset);
    buf.put_u32(length);
}

/// Writes an extended request header; with `NBD_CMD_FLAG_PAYLOAD_LEN` in `flags`, `length`
/// bytes of payload must follow, otherwise `length` is the effect length.
pub fn encode_extended_request(
    buf: &mut BytesMut,
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    length: u64,
) {
    buf.put_u32(wire::EXTENDED_REQUEST_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(command);
    buf.put_u64(handle);
    buf.put_u64(offset);
    buf.put_u64(length);
}

/// The header of a reply as the client receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; a successful read's data follows.
    Simple { handle: u64, error: u32 },
    /// A structured or extended reply chunk; `length` bytes of payload follow.
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        /// The request's offset, repeated by extended replies (`None` for structured ones).
        offset: Option<u64>,
        length: u64,
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

/// Decodes a reply header, or `Ok(None)` if more bytes are needed. Which headers are valid
/// depends on the framing: simple ones always except with extended headers (which allow only
/// extended chunks), structured chunks only with structured replies. A reply that may not
/// appear is a [`CodecError::BadMagic`].
pub fn decode_reply_header(buf: &mut BytesMut, framing: Framing) -> Result<Option<ReplyHeader>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = peek_u32(buf, 0);
    let (expected, what) = match framing {
        Framing::Simple => (wire::SIMPLE_REPLY_MAGIC, "simple reply"),
        Framing::Structured => (wire::STRUCTURED_REPLY_MAGIC, "simple or structured reply"),
        Framing::Extended => (wire::EXTENDED_REPLY_MAGIC, "extended reply"),
    };
    match magic {
        wire::SIMPLE_REPLY_MAGIC if framing != Framing::Extended => {
            if buf.len() < wire::SIMPLE_REPLY_HEADER_LEN {
                return Ok(None);
            }
            let error = peek_u32(buf, 4);
            let handle = peek_u64(buf, 8);
            buf.advance(wire::SIMPLE_REPLY_HEADER_LEN);
            Ok(Some(ReplyHeader::Simple { handle, error }))
        }
        wire::STRUCTURED_REPLY_MAGIC if framing == Framing::Structured => {
            if buf.len() < wire::STRUCTURED_REPLY_HEADER_LEN {
                return Ok(None);
            }
            let header = ReplyHeader::Chunk {
                flags: peek_u16(buf, 4),
                kind: peek_u16(buf, 6),
                handle: peek_u64(buf, 8),
                offset: None,
                length: u64::from(peek_u32(buf, 16)),
            };
            buf.advance(wire::STRUCTURED_REPLY_HEADER_LEN);
            Ok(Some(header))
        }
        wire::EXTENDED_REPLY_MAGIC if framing == Framing::Extended => {
            if buf.len() < wire::EXTENDED_HEADER_LEN {
                return Ok(None);
            }
            let header = ReplyHeader::Chunk {
                flags: peek_u16(buf, 4),
                kind: peek_u16(buf, 6),
                handle: peek_u64(buf, 8),
                offset: Some(peek_u64(buf, 16)),
                length: peek_u64(buf, 24),
            };
            buf.advance(wire::EXTENDED_HEADER_LEN);
            Ok(Some(header))
        }
        other => Err(CodecError::BadMagic {
            what,
            expected: u64::from(expected),
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

/// Parses the payload of a block status chunk (`NBD_REPLY_TYPE_BLOCK_STATUS`, or with
/// `extended` `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`) into its context id and descriptors. At least
/// one descriptor, none of length 0, and (extended) a descriptor count that matches.
pub fn parse_block_status(
    mut payload: &[u8],
    extended: bool,
) -> Result<(u32, Vec<StatusDescriptor>), CodecError> {
    const WHAT: &str = "block status chunk";
    let (fixed, size) = if extended { (8, 16) } else { (4, 8) };
    if payload.len() < fixed + size || !(payload.len() - fixed).is_multiple_of(size) {
        return Err(malformed(
            WHAT,
            format!(
                "{} bytes is not {fixed} + a positive multiple of {size}",
                payload.len()
            ),
        ));
    }
    let count = (payload.len() - fixed) / size;
    let context = payload.get_u32();
    if extended {
        let announced = payload.get_u32() as usize;
        if announced != count {
            return Err(malformed(
                WHAT,
                format!("descriptor count {announced} but {count} descriptors"),
            ));
        }
    }
    let mut descriptors = Vec::with_capacity(count);
    for _ in 0..count {
        let descriptor = if extended {
            StatusDescriptor {
                length: payload.get_u64(),
                status: payload.get_u64(),
            }
        } else {
            StatusDescriptor {
                length: u64::from(payload.get_u32()),
                status: u64::from(payload.get_u32()),
            }
        };
        if descriptor.length == 0 {
            return Err(malformed(WHAT, "a descriptor of length 0"));
        }
        descriptors.push(descriptor);
    }
    Ok((context, descriptors))
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
        decoder.discard(request.length);
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

    fn to(framing: Framing) -> ReplyTo {
        ReplyTo {
            framing,
            handle: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
        }
    }

    #[test]
    fn compact_replies_are_unchanged() {
        let mut buf = BytesMut::new();
        encode_ok_reply(&mut buf, to(Framing::Simple));
        assert_eq!(
            &buf[..],
            b"\x67\x44\x66\x98\0\0\0\0\x01\x02\x03\x04\x05\x06\x07\x08"
        );
        buf.clear();
        encode_error_reply(&mut buf, to(Framing::Simple), wire::errno::EIO, "ignored");
        assert_eq!(
            &buf[..],
            b"\x67\x44\x66\x98\0\0\0\x05\x01\x02\x03\x04\x05\x06\x07\x08"
        );
        buf.clear();
        encode_ok_reply(&mut buf, to(Framing::Structured));
        assert_eq!(
            &buf[..],
            b"\x66\x8e\x33\xef\0\x01\0\0\x01\x02\x03\x04\x05\x06\x07\x08\0\0\0\0"
        );
    }

    #[test]
    fn extended_replies_repeat_the_offset_and_use_64_bit_lengths() {
        let mut buf = BytesMut::new();
        encode_ok_reply(&mut buf, to(Framing::Extended));
        let header: &[u8] = b"\x6e\x8a\x27\x8c\0\x01\0\0\x01\x02\x03\x04\x05\x06\x07\x08\
            \x11\x22\x33\x44\x55\x66\x77\x88\0\0\0\0\0\0\0\0";
        assert_eq!(&buf[..], header);
        buf.clear();
        encode_read_reply_header(&mut buf, to(Framing::Extended), 512);
        assert_eq!(buf.len(), 32 + 8);
        assert_eq!(&buf[4..8], b"\0\x01\0\x01", "DONE, OFFSET_DATA");
        assert_eq!(&buf[24..32], &(512u64 + 8).to_be_bytes());
        assert_eq!(&buf[32..], &0x1122_3344_5566_7788u64.to_be_bytes());
        buf.clear();
        encode_error_reply(&mut buf, to(Framing::Extended), wire::errno::EINVAL, "no");
        assert_eq!(&buf[6..8], &reply_type::ERROR.to_be_bytes());
        assert_eq!(&buf[24..32], &8u64.to_be_bytes());
        assert_eq!(&buf[32..], b"\0\0\0\x16\0\x02no");
        // Every extended reply decodes back; other magics are refused.
        let mut stream = BytesMut::new();
        encode_ok_reply(&mut stream, to(Framing::Extended));
        let header = decode_reply_header(&mut stream, Framing::Extended)
            .unwrap()
            .unwrap();
        assert_eq!(
            header,
            ReplyHeader::Chunk {
                flags: wire::reply_flags::DONE,
                kind: reply_type::NONE,
                handle: 0x0102_0304_0506_0708,
                offset: Some(0x1122_3344_5566_7788),
                length: 0,
            }
        );
        for framing in [Framing::Simple, Framing::Structured] {
            let mut stream = BytesMut::new();
            encode_ok_reply(&mut stream, to(framing));
            assert!(matches!(
                decode_reply_header(&mut stream, Framing::Extended),
                Err(CodecError::BadMagic { .. })
            ));
            let mut stream = BytesMut::new();
            encode_ok_reply(&mut stream, to(Framing::Extended));
            assert!(matches!(
                decode_reply_header(&mut stream, framing),
                Err(CodecError::BadMagic { .. })
            ));
        }
        // Structured chunks are refused without structured replies.
        let mut stream = BytesMut::new();
        encode_ok_reply(&mut stream, to(Framing::Structured));
        assert!(decode_reply_header(&mut stream, Framing::Simple).is_err());
    }

    #[test]
    fn extended_reply_header_decodes_lengths_above_4_gib() {
        let mut buf = BytesMut::new();
        encode_extended_chunk_header(&mut buf, 0, reply_type::OFFSET_DATA, 9, 1 << 40, (5 << 30) + 8);
        for cut in 0..buf.len() {
            let mut part = BytesMut::from(&buf[..cut]);
            assert_eq!(decode_reply_header(&mut part, Framing::Extended), Ok(None));
        }
        let header = decode_reply_header(&mut buf, Framing::Extended).unwrap().unwrap();
        let ReplyHeader::Chunk { length, offset, .. } = header else {
            panic!("a chunk");
        };
        assert_eq!((length, offset), ((5 << 30) + 8, Some(1 << 40)));
    }

    #[test]
    fn extended_requests_carry_64_bit_effect_lengths() {
        let mut buf = BytesMut::new();
        let six_gib = 6u64 << 30;
        encode_extended_request(&mut buf, cmd_flags::FUA, cmd::WRITE_ZEROES, 3, 1 << 41, six_gib);
        assert_eq!(buf.len(), wire::EXTENDED_HEADER_LEN);
        assert_eq!(&buf[..4], b"\x21\xe4\x1c\x71");
        assert_eq!(&buf[24..], &six_gib.to_be_bytes());
        let mut decoder = RequestDecoder::for_framing(1024, Framing::Extended);
        assert_eq!(decoder.needed(&buf[..10]), 22);
        assert_eq!(decoder.needed(&buf), 0);
        let request = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            request,
            Request {
                flags: cmd_flags::FUA,
                command: cmd::WRITE_ZEROES,
                handle: 3,
                offset: 1 << 41,
                length: six_gib,
                payload: Payload::None,
            }
        );
        // A compact decoder refuses the extended magic and the other way round.
        let mut buf = BytesMut::new();
        encode_extended_request(&mut buf, 0, cmd::READ, 1, 0, 512);
        assert!(RequestDecoder::new(1024).decode(&mut buf).is_err());
        let mut buf = BytesMut::new();
        encode_request(&mut buf, 0, cmd::READ, 1, 0, 512);
        encode_request(&mut buf, 0, cmd::READ, 2, 0, 512);
        assert!(RequestDecoder::for_framing(1024, Framing::Extended)
            .decode(&mut buf)
            .is_err());
    }

    #[test]
    fn extended_payload_follows_only_with_payload_len() {
        let mut decoder = RequestDecoder::for_framing(1024, Framing::Extended);
        // A write with the flag: its payload follows.
        let mut buf = BytesMut::new();
        encode_extended_request(&mut buf, cmd_flags::PAYLOAD_LEN, cmd::WRITE, 1, 0, 4);
        buf.put_slice(b"abcd");
        assert_eq!(decoder.needed(&buf[..32]), 4);
        let request = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(request.payload, Payload::Data(Bytes::from_static(b"abcd")));
        // A write without it has no payload (the server refuses it); the next header is read
        // right after.
        encode_extended_request(&mut buf, 0, cmd::WRITE, 2, 0, 4);
        encode_extended_request(&mut buf, 0, cmd::FLUSH, 3, 0, 0);
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().payload, Payload::None);
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().handle, 3);
        // Any other command with the flag carries a payload too (consumed, then refused).
        encode_extended_request(&mut buf, cmd_flags::PAYLOAD_LEN, cmd::TRIM, 4, 0, 3);
        buf.put_slice(b"xyz");
        let request = decoder.decode_header(&mut buf).unwrap().unwrap();
        assert_eq!(request.payload, Payload::Follows);
        decoder.discard(request.length);
        encode_extended_request(&mut buf, 0, cmd::FLUSH, 5, 0, 0);
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().handle, 5);
        // A payload above the cap ends the connection (the protocol's hard disconnect).
        encode_extended_request(&mut buf, cmd_flags::PAYLOAD_LEN, cmd::WRITE, 6, 0, 5 << 30);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(CodecError::TooLong { len, .. }) if len == 5 << 30
        ));
    }

    #[test]
    fn block_status_round_trips_in_both_framings() {
        let descriptors = [
            StatusDescriptor {
                length: 4096,
                status: 0,
            },
            StatusDescriptor {
                length: 1 << 20,
                status: 3,
            },
        ];
        for framing in [Framing::Structured, Framing::Extended] {
            let mut buf = BytesMut::new();
            encode_block_status_reply(&mut buf, to(framing), 7, &descriptors);
            let header = decode_reply_header(&mut buf, framing).unwrap().unwrap();
            let ReplyHeader::Chunk { kind, length, .. } = header else {
                panic!("a chunk");
            };
            assert_eq!(length, buf.len() as u64);
            let extended = framing.extended();
            let expected = if extended {
                reply_type::BLOCK_STATUS_EXT
            } else {
                reply_type::BLOCK_STATUS
            };
            assert_eq!(kind, expected);
            assert_eq!(
                parse_block_status(&buf, extended).unwrap(),
                (7, descriptors.to_vec())
            );
        }
        // 64-bit extent lengths (above 4 GiB) only exist in the extended form.
        let big = [StatusDescriptor {
            length: 9 << 30,
            status: 1,
        }];
        let mut buf = BytesMut::new();
        encode_block_status_reply(&mut buf, to(Framing::Extended), 1, &big);
        decode_reply_header(&mut buf, Framing::Extended).unwrap().unwrap();
        assert_eq!(&buf[4..8], &1u32.to_be_bytes(), "descriptor count");
        assert_eq!(parse_block_status(&buf, true).unwrap(), (1, big.to_vec()));
    }

    #[test]
    fn malformed_block_status_is_refused() {
        // Extended: a count that does not match, no descriptors, a zero length.
        let mut payload = BytesMut::new();
        payload.put_u32(1);
        payload.put_u32(2);
        payload.put_u64(4096);
        payload.put_u64(0);
        assert!(parse_block_status(&payload, true).is_err());
        assert!(parse_block_status(&payload[..8], true).is_err());
        payload[7] = 1;
        assert!(parse_block_status(&payload, true).is_ok());
        payload[8..16].fill(0);
        assert!(parse_block_status(&payload, true).is_err());
        // Compact: not 4 + a multiple of 8.
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], false).is_err());
        assert!(parse_block_status(&[0, 0, 0, 1], false).is_err());
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
            let length = u64::from(length);
            if command == cmd::WRITE { buf.put_slice(&payload); }
            let request = RequestDecoder::new(64).decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(request.flags, flags);
            prop_assert_eq!(request.command, command);
            prop_assert_eq!(request.handle, handle);
            prop_assert_eq!(request.offset, offset);
            prop_assert_eq!(request.length, length);
            prop_assert!(buf.is_empty());
        }

        /// Extended requests survive a round trip with any 64-bit length; payloads follow
        /// exactly when `NBD_CMD_FLAG_PAYLOAD_LEN` is set.
        #[test]
        fn extended_request_round_trip(
            flags in any::<u16>(), command in 0u16..10, handle in any::<u64>(),
            offset in any::<u64>(), length in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let with_payload = flags & cmd_flags::PAYLOAD_LEN != 0;
            let length = if with_payload { payload.len() as u64 } else { length };
            let mut buf = BytesMut::new();
            encode_extended_request(&mut buf, flags, command, handle, offset, length);
            if with_payload { buf.put_slice(&payload); }
            let request = RequestDecoder::for_framing(64, Framing::Extended)
                .decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(request.flags, flags);
            prop_assert_eq!(request.command, command);
            prop_assert_eq!(request.handle, handle);
            prop_assert_eq!(request.offset, offset);
            prop_assert_eq!(request.length, length);
            let expected = if with_payload { Payload::Data(Bytes::from(payload)) } else { Payload::None };
            prop_assert_eq!(request.payload, expected);
            prop_assert!(buf.is_empty());
        }

        /// The extended request decoder is split-invariant too and never buffers above its cap.
        #[test]
        fn extended_request_decoder_is_split_invariant(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            split in 0usize..400,
        ) {
            let decode_all = |decoder: &mut RequestDecoder, buf: &mut BytesMut, out: &mut Vec<Request>| {
                loop {
                    match decoder.decode(buf) {
                        Ok(Some(r)) => out.push(r),
                        Ok(None) => return true,
                        Err(_) => return false,
                    }
                }
            };
            let mut whole = Vec::new();
            let mut decoder = RequestDecoder::for_framing(64, Framing::Extended);
            decode_all(&mut decoder, &mut BytesMut::from(&bytes[..]), &mut whole);
            let split = split.min(bytes.len());
            let mut decoder = RequestDecoder::for_framing(64, Framing::Extended);
            let mut buf = BytesMut::from(&bytes[..split]);
            let mut out = Vec::new();
            if decode_all(&mut decoder, &mut buf, &mut out) {
                buf.extend_from_slice(&bytes[split..]);
                decode_all(&mut decoder, &mut buf, &mut out);
                prop_assert_eq!(&out, &whole);
            }
            for request in &out {
                if let Payload::Data(d) = &request.payload { prop_assert!(d.len() <= 64); }
            }
        }

        /// Reply headers of every framing decode back to what was encoded, whatever the split.
        #[test]
        fn reply_headers_round_trip(
            framing in prop_oneof![Just(Framing::Simple), Just(Framing::Structured), Just(Framing::Extended)],
            handle in any::<u64>(), offset in any::<u64>(), error in 1u32..200,
            message in "[a-z]{0,20}", cut in 0usize..64,
        ) {
            let to = ReplyTo { framing, handle, offset };
            let mut buf = BytesMut::new();
            encode_error_reply(&mut buf, to, error, &message);
            let whole = buf.clone();
            let mut part = BytesMut::from(&whole[..cut.min(whole.len())]);
            let header_len = match framing {
                Framing::Simple => wire::SIMPLE_REPLY_HEADER_LEN,
                Framing::Structured => wire::STRUCTURED_REPLY_HEADER_LEN,
                Framing::Extended => wire::EXTENDED_HEADER_LEN,
            };
            let partial = decode_reply_header(&mut part, framing).unwrap();
            prop_assert_eq!(partial.is_some(), cut >= header_len);
            let header = decode_reply_header(&mut buf, framing).unwrap().unwrap();
            prop_assert_eq!(header.handle(), handle);
            match header {
                ReplyHeader::Simple { error: got, .. } => {
                    prop_assert_eq!(framing, Framing::Simple);
                    prop_assert_eq!(got, error);
                }
                ReplyHeader::Chunk { offset: got, length, .. } => {
                    prop_assert_eq!(got, framing.extended().then_some(offset));
                    prop_assert_eq!(length, buf.len() as u64);
                    prop_assert_eq!(parse_error_chunk(&buf).unwrap(), (error, message));
                }
            }
        }
    }
}
