//! The sans-IO decoders and option parsers on arbitrary bytes, whole and split in two.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use r3map_nbd::codec;

fuzz_target!(|data: &[u8]| {
    let _ = codec::parse_export_request(data);
    let _ = codec::parse_meta_context_request(data);
    let _ = codec::parse_info(data);
    let _ = codec::parse_server_reply(data);
    let _ = codec::parse_error_chunk(data);
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut decoder = codec::RequestDecoder::new(512);
    let mut buf = BytesMut::from(&data[..split]);
    while let Ok(Some(request)) = decoder.decode(&mut buf) {
        if let codec::Payload::Data(payload) = &request.payload {
            assert!(payload.len() <= 512);
        }
    }
    buf.extend_from_slice(&data[split..]);
    while let Ok(Some(_)) = decoder.decode(&mut buf) {}
    // Headers only, as the server decodes them: a write's data is discarded unread.
    let mut decoder = codec::RequestDecoder::new(512);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(request)) = decoder.decode_header(&mut buf) {
        if request.payload == codec::Payload::Follows {
            assert!(request.length <= 512);
            decoder.discard(request.length);
        }
    }
    // Extended headers: 64-bit lengths, payloads announced by NBD_CMD_FLAG_PAYLOAD_LEN.
    let mut decoder = codec::RequestDecoder::for_framing(512, codec::Framing::Extended);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(request)) = decoder.decode_header(&mut buf) {
        if request.payload == codec::Payload::Follows {
            assert!(request.length <= 512);
            decoder.discard(request.length);
        }
    }
    let _ = codec::parse_block_status(data, false);
    let _ = codec::parse_block_status(data, true);
    let mut options = codec::OptionDecoder::new(512);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = options.decode(&mut buf) {}
    for framing in [codec::Framing::Simple, codec::Framing::Structured, codec::Framing::Extended] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(_)) = codec::decode_reply_header(&mut buf, framing) {}
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec::decode_option_reply(&mut buf, 512) {}
});
