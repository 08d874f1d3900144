//! Handshake frames: the greeting, client options and option replies, and the data of the
//! options and replies this implementation understands.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{malformed, parse_string, peek_u16, peek_u32, peek_u64, skip, CodecError};
use crate::wire;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
