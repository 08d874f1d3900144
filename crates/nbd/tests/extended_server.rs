//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`) on the server, driven with hand-written bytes:
//! the exact replies the protocol asks for, 64-bit effect lengths reaching the backend in one
//! call, and the negotiation rules (structured replies implied, no `EXPORT_NAME` afterwards,
//! no compact request afterwards). The peers installable here predate extended headers, so
//! these transcripts and our own client (tests/extended_client.rs) are what tests them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::{Backend, Extent, MemoryBackend, Result, SharedBackend};
use r3map_nbd::{ConnectionError, Export, ServerConfig, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes from hexadecimal digits; whitespace and `|` (field separators) are ignored.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'|')
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Hex for the ASCII bytes of `text`.
fn ascii(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

struct Peer {
    io: DuplexStream,
    task: JoinHandle<std::result::Result<(), ConnectionError>>,
}

impl Peer {
    fn start(backend: SharedBackend) -> Self {
        let mut config = ServerConfig::new(vec![Export::new("disk", backend)]);
        config.max_request = 1 << 20;
        let service = Service::new(config).unwrap();
        let (io, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move { service.serve_stream(server).await });
        Self { io, task }
    }

    async fn send(&mut self, text: &str) {
        self.io.write_all(&hex(text)).await.unwrap();
    }

    /// Reads exactly the bytes `text` describes and compares them.
    async fn expect(&mut self, text: &str) {
        let expected = hex(text);
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(TIMEOUT, self.io.read_exact(&mut got))
            .await
            .expect("the server did not answer")
            .expect("the server closed the connection");
        assert_eq!(
            got.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            expected.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        );
    }

    /// Waits for the server to close the connection; the handler's result.
    async fn closed(mut self) -> std::result::Result<(), ConnectionError> {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.io.read_to_end(&mut rest))
            .await
            .expect("the server did not close the connection")
            .unwrap();
        assert!(rest.is_empty(), "unexpected bytes before the close: {rest:02x?}");
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the handler did not end")
            .expect("the handler panicked")
    }

    /// Greeting, client flags, `NBD_OPT_EXTENDED_HEADERS` (acknowledged).
    async fn extended(&mut self) {
        // NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES.
        self.expect("4e42444d41474943 | 49484156454f5054 | 0003").await;
        self.send("00000003").await;
        // IHAVEOPT, option 11, no data.
        self.send("49484156454f5054 | 0000000b | 00000000").await;
        // Option reply magic, option 11, NBD_REP_ACK, no data.
        self.expect("0003e889045565a9 | 0000000b | 00000001 | 00000000")
            .await;
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` of "disk": selected as context 1.
    async fn base_allocation(&mut self) {
        self.send(&format!(
            "49484156454f5054 | 0000000a | 0000001f | 00000004 {} | 00000001 | 0000000f {}",
            ascii("disk"),
            ascii("base:allocation")
        ))
        .await;
        self.expect(&format!(
            "0003e889045565a9 | 0000000a | 00000004 | 00000013 | 00000001 {}",
            ascii("base:allocation")
        ))
        .await;
        self.expect("0003e889045565a9 | 0000000a | 00000001 | 00000000")
            .await;
    }

    /// `NBD_OPT_GO` for "disk" of `size` bytes with the flags of a writable export.
    async fn go(&mut self, size: u64) {
        self.send(&format!(
            "49484156454f5054 | 00000007 | 0000000a | 00000004 {} | 0000",
            ascii("disk")
        ))
        .await;
        // NBD_INFO_EXPORT: size, flags HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
        // SEND_WRITE_ZEROES | SEND_DF | CAN_MULTI_CONN | SEND_CACHE = 0x05ed.
        self.expect(&format!(
            "0003e889045565a9 | 00000007 | 00000003 | 0000000c | 0000 {size:016x} 05ed"
        ))
        .await;
        // NBD_INFO_BLOCK_SIZE: minimum 1, preferred 4096, maximum 1 MiB; then NBD_REP_ACK.
        self.expect("0003e889045565a9 | 00000007 | 00000003 | 0000000e | 0003 00000001 00001000 00100000")
            .await;
        self.expect("0003e889045565a9 | 00000007 | 00000001 | 00000000")
            .await;
    }
}

#[tokio::test]
async fn a_session_with_extended_headers_byte_by_byte() {
    let backend = Arc::new(MemoryBackend::new(1 << 20));
    let mut peer = Peer::start(backend.clone());
    peer.extended().await;
    // Structured replies after extended headers: NBD_REP_ERR_EXT_HEADER_REQD (2^31 + 10).
    peer.send("49484156454f5054 | 00000008 | 00000000").await;
    let message = "extended headers are already negotiated";
    peer.expect(&format!(
        "0003e889045565a9 | 00000008 | 8000000a | {:08x} {}",
        message.len(),
        ascii(message)
    ))
    .await;
    // Metadata contexts need no structured replies once extended headers are agreed.
    peer.base_allocation().await;
    peer.go(1 << 20).await;

    // Extended request: magic, flags, type, cookie, offset, 64-bit length.
    // WRITE with NBD_CMD_FLAG_PAYLOAD_LEN (0x20): "abcd" at 0x1000.
    peer.send(&format!(
        "21e41c71 | 0020 | 0001 | 0000000000000001 | 0000000000001000 | 0000000000000004 | {}",
        ascii("abcd")
    ))
    .await;
    // Extended reply: magic, flags DONE, type NONE, cookie, the request's offset, length 0.
    peer.expect("6e8a278c | 0001 | 0000 | 0000000000000001 | 0000000000001000 | 0000000000000000")
        .await;
    // READ 4 bytes at 0x1000: one final OFFSET_DATA chunk (length 8 + 4).
    peer.send("21e41c71 | 0000 | 0000 | 0000000000000002 | 0000000000001000 | 0000000000000004")
        .await;
    peer.expect(&format!(
        "6e8a278c | 0001 | 0001 | 0000000000000002 | 0000000000001000 | 000000000000000c | 0000000000001000 {}",
        ascii("abcd")
    ))
    .await;
    // BLOCK_STATUS of the whole export: NBD_REPLY_TYPE_BLOCK_STATUS_EXT (6) with context 1,
    // descriptor count 2, then 64-bit length and status: the written 256 KiB segment is data,
    // the rest a hole that reads as zeros (HOLE | ZERO = 3).
    peer.send("21e41c71 | 0000 | 0007 | 0000000000000003 | 0000000000000000 | 0000000000100000")
        .await;
    peer.expect(
        "6e8a278c | 0001 | 0006 | 0000000000000003 | 0000000000000000 | 0000000000000028 \
         | 00000001 | 00000002 \
         | 0000000000040000 0000000000000000 \
         | 00000000000c0000 0000000000000003",
    )
    .await;
    // WRITE without NBD_CMD_FLAG_PAYLOAD_LEN: the length is an effect length, nothing
    // follows, and the write is refused with an error chunk (NBD_EINVAL = 22).
    peer.send("21e41c71 | 0000 | 0001 | 0000000000000004 | 0000000000000000 | 0000000000000004")
        .await;
    let message = "WRITE without NBD_CMD_FLAG_PAYLOAD_LEN (required with extended headers)";
    peer.expect(&format!(
        "6e8a278c | 0001 | 8001 | 0000000000000004 | 0000000000000000 | {:016x} | 00000016 {:04x} {}",
        6 + message.len(),
        message.len(),
        ascii(message)
    ))
    .await;
    // TRIM with a payload it does not take: the payload is consumed, then NBD_EINVAL.
    peer.send(&format!(
        "21e41c71 | 0020 | 0004 | 0000000000000005 | 0000000000000000 | 0000000000000003 | {}",
        ascii("xyz")
    ))
    .await;
    let message = "flags 0x20 are not valid for TRIM";
    peer.expect(&format!(
        "6e8a278c | 0001 | 8001 | 0000000000000005 | 0000000000000000 | {:016x} | 00000016 {:04x} {}",
        6 + message.len(),
        message.len(),
        ascii(message)
    ))
    .await;
    // The stream is still in step: FLUSH, then the written data is still there.
    peer.send("21e41c71 | 0000 | 0003 | 0000000000000006 | 0000000000000000 | 0000000000000000")
        .await;
    peer.expect("6e8a278c | 0001 | 0000 | 0000000000000006 | 0000000000000000 | 0000000000000000")
        .await;
    // NBD_CMD_DISC: a clean end.
    peer.send("21e41c71 | 0000 | 0002 | 0000000000000007 | 0000000000000000 | 0000000000000000")
        .await;
    peer.closed().await.unwrap();
    let mut back = [0u8; 6];
    backend.read_at(0x1000 - 1, &mut back).await.unwrap();
    assert_eq!(&back, b"\0abcd\0");
}

/// A 16 GiB export without storage that records trims, zeroes and block status questions,
/// and reports 4 KiB of data followed by a hole.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<(&'static str, u64, u64)>>,
}

const BIG: u64 = 16 << 30;

#[async_trait]
impl Backend for Recording {
    fn size(&self) -> u64 {
        BIG
    }
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    async fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Ok(())
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.calls.lock().push(("trim", offset, len));
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.calls.lock().push(("zeroes", offset, len));
        Ok(())
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.calls.lock().push(("extents", offset, len));
        Ok(vec![Extent::data(4096), Extent::hole(len - 4096)])
    }
}

#[tokio::test]
async fn effect_lengths_above_4_gib_reach_the_backend_in_one_call() {
    let backend = Arc::new(Recording::default());
    let mut peer = Peer::start(backend.clone());
    peer.extended().await;
    peer.base_allocation().await;
    peer.go(BIG).await;
    // TRIM of 5 GiB at 0 and WRITE_ZEROES (FUA) of 6 GiB at 8 GiB.
    peer.send("21e41c71 | 0000 | 0004 | 0000000000000001 | 0000000000000000 | 0000000140000000")
        .await;
    peer.expect("6e8a278c | 0001 | 0000 | 0000000000000001 | 0000000000000000 | 0000000000000000")
        .await;
    peer.send("21e41c71 | 0001 | 0006 | 0000000000000002 | 0000000200000000 | 0000000180000000")
        .await;
    peer.expect("6e8a278c | 0001 | 0000 | 0000000000000002 | 0000000200000000 | 0000000000000000")
        .await;
    // BLOCK_STATUS of 12 GiB at 4 GiB: one hole descriptor longer than 32 bits can express.
    peer.send("21e41c71 | 0000 | 0007 | 0000000000000003 | 0000000100000000 | 0000000300000000")
        .await;
    peer.expect(
        "6e8a278c | 0001 | 0006 | 0000000000000003 | 0000000100000000 | 0000000000000028 \
         | 00000001 | 00000002 \
         | 0000000000001000 0000000000000000 \
         | 00000002fffff000 0000000000000003",
    )
    .await;
    // A READ above the maximum payload is refused with NBD_EOVERFLOW (75) and no data.
    peer.send("21e41c71 | 0000 | 0000 | 0000000000000004 | 0000000000000000 | 0000000100000000")
        .await;
    let message = "read of 4294967296 bytes exceeds the maximum payload of 1048576 bytes";
    peer.expect(&format!(
        "6e8a278c | 0001 | 8001 | 0000000000000004 | 0000000000000000 | {:016x} | 0000004b {:04x} {}",
        6 + message.len(),
        message.len(),
        ascii(message)
    ))
    .await;
    peer.send("21e41c71 | 0000 | 0002 | 0000000000000005 | 0000000000000000 | 0000000000000000")
        .await;
    peer.closed().await.unwrap();
    assert_eq!(
        *backend.calls.lock(),
        vec![
            ("trim", 0, 5 << 30),
            ("zeroes", 8 << 30, 6 << 30),
            ("extents", 4 << 30, 12 << 30)
        ]
    );
}

#[tokio::test]
async fn export_name_after_extended_headers_disconnects() {
    let mut peer = Peer::start(Arc::new(MemoryBackend::new(4096)));
    peer.extended().await;
    peer.send(&format!(
        "49484156454f5054 | 00000001 | 00000004 | {}",
        ascii("disk")
    ))
    .await;
    let err = peer.closed().await.unwrap_err();
    assert!(
        matches!(err, ConnectionError::ExportNameAfterExtendedHeaders),
        "{err}"
    );
}

#[tokio::test]
async fn extended_headers_with_data_are_invalid_and_not_agreed() {
    let mut peer = Peer::start(Arc::new(MemoryBackend::new(4096)));
    peer.expect("4e42444d41474943 | 49484156454f5054 | 0003").await;
    peer.send("00000003").await;
    peer.send("49484156454f5054 | 0000000b | 00000001 | 00").await;
    let message = "NBD_OPT_EXTENDED_HEADERS takes no data";
    peer.expect(&format!(
        "0003e889045565a9 | 0000000b | 80000003 | {:08x} {}",
        message.len(),
        ascii(message)
    ))
    .await;
    // Not agreed: structured replies are still possible, and the transmission is compact.
    peer.send("49484156454f5054 | 00000008 | 00000000").await;
    peer.expect("0003e889045565a9 | 00000008 | 00000001 | 00000000")
        .await;
    peer.go(4096).await;
    peer.send("25609513 | 0000 | 0003 | 0000000000000001 | 0000000000000000 | 00000000")
        .await;
    peer.expect("668e33ef | 0001 | 0000 | 0000000000000001 | 00000000")
        .await;
    peer.send("25609513 | 0000 | 0002 | 0000000000000002 | 0000000000000000 | 00000000")
        .await;
    peer.closed().await.unwrap();
}

#[tokio::test]
async fn a_compact_request_after_extended_headers_disconnects() {
    let mut peer = Peer::start(Arc::new(MemoryBackend::new(4096)));
    peer.extended().await;
    peer.go(4096).await;
    // A compact FLUSH is 28 bytes; padded to a full extended header it is a wrong magic.
    peer.send("25609513 | 0000 | 0003 | 0000000000000001 | 0000000000000000 | 00000000 | 00000000")
        .await;
    let err = peer.closed().await.unwrap_err();
    assert!(
        err.to_string().contains("wrong magic in extended request"),
        "{err}"
    );
}

#[tokio::test]
async fn an_extended_payload_above_the_maximum_disconnects() {
    let mut peer = Peer::start(Arc::new(MemoryBackend::new(4096)));
    peer.extended().await;
    peer.go(4096).await;
    // A write announcing 8 GiB of payload: the protocol asks for a hard disconnect, not for
    // reading (or skipping) that much.
    peer.send("21e41c71 | 0020 | 0001 | 0000000000000001 | 0000000000000000 | 0000000200000000")
        .await;
    let err = peer.closed().await.unwrap_err();
    assert!(err.to_string().contains("extended request payload"), "{err}");
}
