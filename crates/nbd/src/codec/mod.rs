//! Sans-IO encoding and decoding of NBD frames.
//!
//! Every decoder first checks that a whole frame is buffered (without allocating), then parses
//! it; `Ok(None)` means "not enough bytes yet" and is the normal outcome of a short read. Lengths
//! announced by the peer are capped before anything is allocated: a payload above the cap is
//! reported (and, for requests, skipped as it arrives) rather than buffered.
//!
//! - [`handshake`]: greeting, options and option replies (both sides).
//! - [`transmission`]: requests and replies in the three framings the handshake can agree on
//!   ([`Framing`]): simple, structured and extended headers.

mod handshake;
mod transmission;

pub use handshake::*;
pub use transmission::*;

use bytes::{Buf, BytesMut};

use crate::wire;

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

pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> CodecError {
    CodecError::Malformed {
        what,
        detail: detail.into(),
    }
}

pub(crate) fn peek_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub(crate) fn peek_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn peek_u64(buf: &[u8], at: usize) -> u64 {
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

/// Discards up to `*remaining` bytes from `buf`; true once nothing is left to skip.
pub(crate) fn skip(remaining: &mut u64, buf: &mut BytesMut) -> bool {
    if *remaining > 0 {
        let n = (*remaining).min(buf.len() as u64) as usize;
        buf.advance(n);
        *remaining -= n as u64;
    }
    *remaining == 0
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    proptest! {
        /// Option payload parsers never panic on arbitrary bytes.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_export_request(&bytes);
            let _ = parse_meta_context_request(&bytes);
            let _ = parse_info(&bytes);
            let _ = parse_server_reply(&bytes);
            let _ = parse_error_chunk(&bytes);
            let _ = parse_block_status(&bytes, false);
            let _ = parse_block_status(&bytes, true);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = OptionDecoder::new(32).decode(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_option_reply(&mut buf, 32);
            for framing in [Framing::Simple, Framing::Structured, Framing::Extended] {
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = decode_reply_header(&mut buf, framing);
            }
        }
    }
}
