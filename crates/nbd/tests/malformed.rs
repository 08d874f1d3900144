//! Bad input in raw bytes: every case gets the specified error reply or a clean disconnect,
//! never a panic, never a change to stored data.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use r3map_core::testing::FaultyBackend;
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_nbd::codec;
use r3map_nbd::wire::{self, cmd, cmd_flags, errno, opt, rep, reply_type};
use r3map_nbd::{ConnectionError, Export, ServerConfig, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Raw {
    io: DuplexStream,
    task: JoinHandle<Result<(), ConnectionError>>,
}

fn config_for(backend: SharedBackend) -> ServerConfig {
    let mut config = ServerConfig::new(vec![
        Export::new("disk", backend),
        Export::new("ro", Arc::new(MemoryBackend::new(SIZE))).read_only(true),
    ]);
    config.max_request = 4096;
    config.max_in_flight_bytes = 64 << 10;
    config
}

fn memory() -> Arc<MemoryBackend> {
    Arc::new(MemoryBackend::new(SIZE))
}

async fn connect(config: ServerConfig) -> Raw {
    let service = Service::new(config).unwrap();
    let (client, server) = tokio::io::duplex(256 << 10);
    let task = tokio::spawn(async move { service.serve_stream(server).await });
    let mut raw = Raw { io: client, task };
    let mut greeting = [0u8; wire::GREETING_LEN];
    raw.read_exact(&mut greeting).await;
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    raw
}

impl Raw {
    async fn read_exact(&mut self, buf: &mut [u8]) {
        tokio::time::timeout(TIMEOUT, self.io.read_exact(buf))
            .await
            .expect("server answer timed out")
            .expect("server closed the connection");
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes()).await;
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        codec::encode_option(&mut out, option, data);
        self.send(&out).await;
    }

    /// One option reply: (option, reply type, data).
    async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut head = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut head).await;
        assert_eq!(
            u64::from_be_bytes(head[..8].try_into().unwrap()),
            wire::OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data).await;
        (option, reply, data)
    }

    /// Replies until the final one (ACK or an error); returns the final reply type.
    async fn final_reply(&mut self) -> u32 {
        loop {
            let (_, reply, _) = self.reply().await;
            if reply == rep::ACK || reply & rep::ERROR_BIT != 0 {
                return reply;
            }
        }
    }

    /// Handshake into transmission on export `name`.
    async fn go(&mut self, name: &str, structured: bool) {
        self.flags(wire::client_flags::FIXED_NEWSTYLE | wire::client_flags::NO_ZEROES)
            .await;
        if structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.final_reply().await, rep::ACK);
        }
        let mut data = BytesMut::new();
        codec::encode_export_request(&mut data, name, &[]);
        self.option(opt::GO, &data).await;
        assert_eq!(self.final_reply().await, rep::ACK);
    }

    async fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
        let mut out = BytesMut::new();
        codec::encode_request(&mut out, flags, command, handle, offset, length);
        self.send(&out).await;
    }

    /// A simple reply: (handle, error).
    async fn simple(&mut self) -> (u64, u32) {
        let mut head = [0u8; wire::SIMPLE_REPLY_HEADER_LEN];
        self.read_exact(&mut head).await;
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            wire::SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        (u64::from_be_bytes(head[8..16].try_into().unwrap()), error)
    }

    /// A structured chunk: (flags, type, handle, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut head = [0u8; wire::STRUCTURED_REPLY_HEADER_LEN];
        self.read_exact(&mut head).await;
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            wire::STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes(head[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload).await;
        (flags, kind, handle, payload)
    }

    /// Reads `len` bytes of read data after a successful simple reply.
    async fn data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.read_exact(&mut data).await;
        data
    }

    /// Asserts the server closes the connection and its handler ends without panicking.
    async fn expect_closed(mut self) -> Result<(), ConnectionError> {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, self.io.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "server did not close the connection");
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("handler did not end")
            .expect("handler panicked")
    }

    /// Sends NBD_CMD_DISC and expects a clean end.
    async fn disconnect(mut self) {
        self.request(0, cmd::DISC, 0, 0, 0).await;
        self.expect_closed().await.unwrap();
    }
}

async fn assert_unchanged(backend: &dyn Backend) {
    let all = common::contents(backend).await;
    assert!(all.iter().all(|&b| b == 0), "stored data changed");
}

// ---- Handshake -----------------------------------------------------------------------------

#[tokio::test]
async fn unknown_client_flags_disconnect() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(1 << 7).await;
    let err = raw.expect_closed().await.unwrap_err();
    assert!(matches!(err, ConnectionError::UnknownClientFlags(_)), "{err}");
}

#[tokio::test]
async fn wrong_option_magic_disconnects() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
    raw.send(b"NOTANOPTIONHEADERATALL").await;
    let err = raw.expect_closed().await.unwrap_err();
    assert!(err.to_string().contains("wrong magic"), "{err}");
}

#[tokio::test]
async fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
    raw.option(0xdead, b"whatever").await;
    let (option, reply, message) = raw.reply().await;
    assert_eq!((option, reply), (0xdead, rep::ERR_UNSUP));
    assert!(String::from_utf8_lossy(&message).contains("not supported"));
    raw.option(opt::LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, reply, data) = raw.reply().await;
        if reply == rep::ACK {
            break;
        }
        assert_eq!(reply, rep::SERVER);
        names.push(codec::parse_server_reply(&data).unwrap().0);
    }
    assert_eq!(names, ["disk", "ro"]);
    raw.option(opt::ABORT, &[]).await;
    assert_eq!(raw.reply().await.1, rep::ACK);
    raw.expect_closed().await.unwrap();
}

#[tokio::test]
async fn oversized_option_gets_err_too_big_and_negotiation_continues() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
    raw.option(opt::INFO, &vec![0xee; 1 << 20]).await;
    assert_eq!(raw.reply().await.1, rep::ERR_TOO_BIG);
    raw.option(opt::LIST, b"junk").await;
    assert_eq!(raw.reply().await.1, rep::ERR_INVALID);
    raw.option(opt::ABORT, &[]).await;
    assert_eq!(raw.reply().await.1, rep::ACK);
}

#[tokio::test]
async fn truncated_option_frame_closes_cleanly() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
    let mut out = BytesMut::new();
    codec::encode_option(&mut out, opt::GO, &[0u8; 100]);
    raw.send(&out[..40]).await;
    raw.io.shutdown().await.unwrap();
    let err = raw.expect_closed().await.unwrap_err();
    assert!(matches!(err, ConnectionError::Truncated), "{err}");
}

#[tokio::test]
async fn bad_go_and_meta_context_options_get_error_replies() {
    let mut raw = connect(config_for(memory())).await;
    raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
    // Unknown export.
    let mut data = BytesMut::new();
    codec::encode_export_request(&mut data, "nope", &[]);
    raw.option(opt::GO, &data).await;
    assert_eq!(raw.final_reply().await, rep::ERR_UNKNOWN);
    // Name length past the data.
    raw.option(opt::INFO, &[0, 0, 1, 0, 0, 0]).await;
    assert_eq!(raw.final_reply().await, rep::ERR_INVALID);
    // Meta contexts before structured replies.
    let mut meta = BytesMut::new();
    codec::encode_meta_context_request(&mut meta, "disk", &[wire::BASE_ALLOCATION]);
    raw.option(opt::SET_META_CONTEXT, &meta).await;
    assert_eq!(raw.final_reply().await, rep::ERR_INVALID);
    // STARTTLS without TLS configured.
    raw.option(opt::STARTTLS, &[]).await;
    assert_eq!(raw.final_reply().await, rep::ERR_POLICY);
    // EXPORT_NAME of an unknown export cannot be answered: disconnect.
    raw.option(opt::EXPORT_NAME, b"nope").await;
    let err = raw.expect_closed().await.unwrap_err();
    assert!(matches!(err, ConnectionError::UnknownExport(_)), "{err}");
}

// ---- Transmission --------------------------------------------------------------------------

#[tokio::test]
async fn unknown_command_gets_einval_and_stream_stays_in_sync() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    raw.request(0, 42, 1, 0, 512).await;
    assert_eq!(raw.simple().await, (1, errno::EINVAL));
    raw.request(0, cmd::READ, 2, 0, 16).await;
    assert_eq!(raw.simple().await, (2, 0));
    assert_eq!(raw.data(16).await, vec![0u8; 16]);
    raw.disconnect().await;
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn oversized_write_is_refused_discarded_and_changes_nothing() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", true).await;
    raw.request(0, cmd::WRITE, 7, 0, 64 << 10).await;
    raw.send(&vec![0xff; 64 << 10]).await;
    let (flags, kind, handle, payload) = raw.chunk().await;
    assert_eq!(
        (flags, kind, handle),
        (wire::reply_flags::DONE, reply_type::ERROR, 7)
    );
    let (error, message) = codec::parse_error_chunk(&payload).unwrap();
    assert_eq!(error, errno::EINVAL);
    assert!(message.contains("exceeds the maximum payload"), "{message}");
    // The payload was skipped: the next request parses.
    raw.request(0, cmd::READ, 8, 0, 4096).await;
    let (_, kind, handle, payload) = raw.chunk().await;
    assert_eq!((kind, handle), (reply_type::OFFSET_DATA, 8));
    assert!(payload[8..].iter().all(|&b| b == 0));
    raw.disconnect().await;
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn huge_write_header_is_refused_before_its_payload_arrives() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    // Claims 4 GiB of payload: the server must answer without buffering (or waiting for) it.
    raw.request(0, cmd::WRITE, 9, 0, u32::MAX).await;
    raw.send(&[0xff; 1000]).await;
    assert_eq!(raw.simple().await, (9, errno::EINVAL));
    drop(raw.io);
    let _ = tokio::time::timeout(TIMEOUT, raw.task).await.unwrap().unwrap();
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn offsets_past_the_end_are_refused_without_changes() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    raw.request(0, cmd::READ, 1, SIZE - 8, 16).await;
    assert_eq!(raw.simple().await, (1, errno::EINVAL));
    raw.request(0, cmd::WRITE, 2, SIZE - 8, 16).await;
    raw.send(&[0xff; 16]).await;
    assert_eq!(raw.simple().await, (2, errno::ENOSPC));
    raw.request(0, cmd::WRITE_ZEROES, 3, SIZE, 1).await;
    assert_eq!(raw.simple().await, (3, errno::ENOSPC));
    raw.request(0, cmd::TRIM, 4, u64::MAX - 1, 4).await;
    assert_eq!(raw.simple().await, (4, errno::EINVAL));
    raw.request(0, cmd::CACHE, 5, u64::MAX, 1).await;
    assert_eq!(raw.simple().await, (5, errno::EINVAL));
    raw.disconnect().await;
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn oversized_read_is_refused() {
    let mut raw = connect(config_for(memory())).await;
    raw.go("disk", false).await;
    raw.request(0, cmd::READ, 1, 0, 8192).await;
    assert_eq!(raw.simple().await, (1, errno::EINVAL));
    raw.disconnect().await;
    let mut raw = connect(config_for(memory())).await;
    raw.go("disk", true).await;
    raw.request(0, cmd::READ, 2, 0, 8192).await;
    let (_, kind, _, payload) = raw.chunk().await;
    assert_eq!(kind, reply_type::ERROR);
    assert_eq!(codec::parse_error_chunk(&payload).unwrap().0, errno::EOVERFLOW);
    raw.disconnect().await;
}

#[tokio::test]
async fn wrong_request_magic_disconnects_without_changes() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    let mut out = BytesMut::new();
    codec::encode_request(&mut out, 0, cmd::WRITE, 1, 0, 16);
    out[0] = 0;
    out.put_slice(&[0xff; 16]);
    raw.send(&out).await;
    let err = raw.expect_closed().await.unwrap_err();
    assert!(err.to_string().contains("wrong magic"), "{err}");
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn truncated_write_changes_nothing() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    raw.request(0, cmd::WRITE, 1, 0, 4096).await;
    raw.send(&[0xff; 1000]).await;
    raw.io.shutdown().await.unwrap();
    let err = raw.expect_closed().await.unwrap_err();
    assert!(matches!(err, ConnectionError::Truncated), "{err}");
    assert_unchanged(&*backend).await;
}

#[tokio::test]
async fn invalid_flags_read_only_and_missing_context_are_refused() {
    let mut raw = connect(config_for(memory())).await;
    raw.go("ro", true).await;
    raw.request(cmd_flags::NO_HOLE, cmd::READ, 1, 0, 16).await;
    let (_, kind, _, payload) = raw.chunk().await;
    assert_eq!(kind, reply_type::ERROR);
    assert_eq!(codec::parse_error_chunk(&payload).unwrap().0, errno::EINVAL);
    raw.request(0, cmd::WRITE, 2, 0, 16).await;
    raw.send(&[0xff; 16]).await;
    let (_, _, handle, payload) = raw.chunk().await;
    assert_eq!(handle, 2);
    assert_eq!(codec::parse_error_chunk(&payload).unwrap().0, errno::EPERM);
    raw.request(0, cmd::BLOCK_STATUS, 3, 0, 16).await;
    let (_, _, _, payload) = raw.chunk().await;
    assert_eq!(codec::parse_error_chunk(&payload).unwrap().0, errno::EINVAL);
    raw.disconnect().await;
}

#[tokio::test]
async fn backend_errors_become_error_replies_without_desync() {
    let faulty = Arc::new(FaultyBackend::new(memory()));
    let mut raw = connect(config_for(faulty.clone())).await;
    raw.go("disk", false).await;
    faulty.fail_reads.store(true, Ordering::SeqCst);
    raw.request(0, cmd::READ, 1, 0, 4096).await;
    // Error reply without data: the next reply header follows directly.
    assert_eq!(raw.simple().await, (1, errno::EIO));
    faulty.fail_reads.store(false, Ordering::SeqCst);
    raw.request(0, cmd::READ, 2, 0, 8).await;
    assert_eq!(raw.simple().await, (2, 0));
    assert_eq!(raw.data(8).await, vec![0; 8]);
    faulty.fail_writes.store(true, Ordering::SeqCst);
    raw.request(cmd_flags::FUA, cmd::WRITE, 3, 0, 8).await;
    raw.send(&[1; 8]).await;
    assert_eq!(raw.simple().await, (3, errno::EIO));
    raw.request(0, cmd::FLUSH, 4, 0, 0).await;
    assert_eq!(raw.simple().await, (4, errno::EIO));
    raw.disconnect().await;
}

#[tokio::test]
async fn write_payloads_arriving_in_pieces_are_stored_whole() {
    let backend = memory();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    // The header alone, then the payload in pieces, the last one together with the next
    // request's header and the start of its payload.
    raw.request(0, cmd::WRITE, 1, 4096, 4096).await;
    raw.send(&data[..1]).await;
    raw.send(&data[1..3000]).await;
    let mut tail = data[3000..].to_vec();
    let mut next = BytesMut::new();
    codec::encode_request(&mut next, 0, cmd::WRITE, 2, 0, 100);
    tail.extend_from_slice(&next);
    tail.extend_from_slice(&data[..60]);
    raw.send(&tail).await;
    raw.send(&data[60..100]).await;
    let mut replies = [raw.simple().await, raw.simple().await];
    replies.sort_unstable();
    assert_eq!(replies, [(1, 0), (2, 0)]);
    let mut stored = vec![0u8; 8192];
    backend.read_at(0, &mut stored).await.unwrap();
    assert_eq!(&stored[..100], &data[..100]);
    assert!(stored[100..4096].iter().all(|&b| b == 0));
    assert_eq!(&stored[4096..], &data[..]);
    raw.disconnect().await;
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_by_handle() {
    let backend = memory();
    backend
        .write_at(0, &common::random_bytes(1, 64 << 10))
        .await
        .unwrap();
    let mut raw = connect(config_for(backend.clone())).await;
    raw.go("disk", false).await;
    let mut out = BytesMut::new();
    for handle in 0..64u64 {
        codec::encode_request(&mut out, 0, cmd::READ, handle, handle * 1024, 1024);
    }
    raw.send(&out).await;
    let expected = common::random_bytes(1, 64 << 10);
    let mut seen = [false; 64];
    for _ in 0..64 {
        let (handle, error) = raw.simple().await;
        assert_eq!(error, 0);
        let data = raw.data(1024).await;
        let at = handle as usize * 1024;
        assert_eq!(data, expected[at..at + 1024]);
        seen[handle as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    raw.disconnect().await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random bytes in the transmission phase never panic the server, always end in a reply
    /// stream or a clean close, and never change data unless they contain a request magic
    /// (which random bytes almost never do: `mutated_write_streams_…` reaches the writes).
    #[test]
    fn random_transmission_bytes_never_panic_or_change_data(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        structured in any::<bool>(),
    ) {
        r3map_core::testing::block_on(async {
            let backend = memory();
            let mut raw = connect(config_for(backend.clone())).await;
            raw.go("disk", structured).await;
            raw.send(&bytes).await;
            raw.io.shutdown().await.unwrap();
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(TIMEOUT, raw.io.read_to_end(&mut sink)).await.unwrap();
            let outcome = tokio::time::timeout(TIMEOUT, raw.task).await.unwrap();
            prop_assert!(outcome.is_ok(), "handler panicked");
            let magic = wire::REQUEST_MAGIC.to_be_bytes();
            if !bytes.windows(4).any(|w| w == magic) {
                let all = common::contents(&*backend).await;
                prop_assert!(all.iter().all(|&b| b == 0));
            }
            Ok(())
        })?;
    }

    /// A stream of valid writes (disjoint ranges, request `i` filling its range with byte
    /// `i + 1`) with one byte changed anywhere, headers included: the server never panics and
    /// ends cleanly; every write wholly before the changed byte is stored (only the changed
    /// request may have been redirected onto its range); and when the byte was in a payload the
    /// stream stays valid, so every write is stored, that byte changed, and answered success.
    #[test]
    fn mutated_write_streams_never_panic_and_keep_the_writes_before_the_change(
        lens in proptest::collection::vec(1u64..3000, 1..8),
        position in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        r3map_core::testing::block_on(async {
            let backend = memory();
            let mut raw = connect(config_for(backend.clone())).await;
            raw.go("disk", false).await;
            let value = |i: usize| (i + 1) as u8;
            let offset = |i: usize| i as u64 * 4096;
            let mut stream = BytesMut::new();
            let mut ends = Vec::new(); // (header start, payload start, end) of each request
            for (i, &len) in lens.iter().enumerate() {
                let start = stream.len();
                codec::encode_request(&mut stream, 0, cmd::WRITE, i as u64, offset(i), len as u32);
                let payload = stream.len();
                stream.put_slice(&vec![value(i); len as usize]);
                ends.push((start, payload, stream.len()));
            }
            let p = position.index(stream.len());
            stream[p] ^= flip;
            let k = ends.iter().position(|&(_, _, end)| p < end).unwrap();
            let in_payload = p >= ends[k].1;
            raw.send(&stream).await;
            raw.io.shutdown().await.unwrap();
            let mut replies = Vec::new();
            let _ = tokio::time::timeout(TIMEOUT, raw.io.read_to_end(&mut replies)).await.unwrap();
            let outcome = tokio::time::timeout(TIMEOUT, raw.task).await.unwrap();
            prop_assert!(outcome.is_ok(), "handler panicked");
            let all = common::contents(&*backend).await;
            for (i, &len) in lens.iter().enumerate().take(k) {
                let range = &all[offset(i) as usize..(offset(i) + len) as usize];
                prop_assert!(
                    range.iter().all(|&b| b == value(i) || b == value(k)),
                    "write {} (before the change in write {}) is not stored", i, k
                );
            }
            if in_payload {
                let mut model = vec![0u8; SIZE as usize];
                for (i, &len) in lens.iter().enumerate() {
                    model[offset(i) as usize..(offset(i) + len) as usize].fill(value(i));
                }
                model[offset(k) as usize + (p - ends[k].1)] ^= flip;
                prop_assert!(all == model, "a changed payload byte: the stored data differs from every write landing");
                let mut answered: Vec<(u64, u32)> = replies
                    .chunks(wire::SIMPLE_REPLY_HEADER_LEN)
                    .map(|reply| {
                        assert_eq!(u32::from_be_bytes(reply[..4].try_into().unwrap()), wire::SIMPLE_REPLY_MAGIC);
                        (u64::from_be_bytes(reply[8..16].try_into().unwrap()), u32::from_be_bytes(reply[4..8].try_into().unwrap()))
                    })
                    .collect();
                answered.sort_unstable();
                let expected: Vec<(u64, u32)> = (0..lens.len() as u64).map(|h| (h, 0)).collect();
                prop_assert_eq!(answered, expected);
            }
            Ok(())
        })?;
    }

    /// Random bytes during the handshake never panic the server.
    #[test]
    fn random_handshake_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        r3map_core::testing::block_on(async {
            let mut raw = connect(config_for(memory())).await;
            raw.flags(wire::client_flags::FIXED_NEWSTYLE).await;
            let mut framed = BytesMut::new();
            // Half the time wrap the bytes in a valid option header, to reach option parsers.
            if bytes.first().is_some_and(|b| b % 2 == 0) && bytes.len() > 4 {
                let option = u32::from(bytes[1] % 12);
                codec::encode_option(&mut framed, option, &bytes[4..]);
            } else {
                framed.put_slice(&bytes);
            }
            raw.send(&framed).await;
            raw.io.shutdown().await.unwrap();
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(TIMEOUT, raw.io.read_to_end(&mut sink)).await.unwrap();
            let outcome = tokio::time::timeout(TIMEOUT, raw.task).await.unwrap();
            prop_assert!(outcome.is_ok(), "handler panicked");
            Ok(())
        })?;
    }
}
