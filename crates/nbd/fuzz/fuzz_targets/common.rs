//! Shared harness: one NBD connection over an in-memory pipe to a memory export.

use std::sync::{Arc, OnceLock};

use r3map_core::{Backend, MemoryBackend};
use r3map_nbd::{Export, ServerConfig, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SIZE: u64 = 64 << 10;

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Feeds `prefix` then `input` to a fresh server connection, closes the client's write side,
/// drains every reply and waits for the handler. Returns the backend for checks.
pub fn run(prefix: &[u8], input: &[u8]) -> Arc<MemoryBackend> {
    runtime().block_on(async {
        let backend = Arc::new(MemoryBackend::new(SIZE));
        let mut config = ServerConfig::new(vec![
            Export::new("disk", backend.clone()),
            Export::new("ro", Arc::new(MemoryBackend::new(SIZE))).read_only(true),
        ]);
        config.max_request = 4096;
        config.max_in_flight_bytes = 16 << 10;
        let service = Service::new(config).expect("valid config");
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let handler = tokio::spawn(async move { service.serve_stream(server).await });
        let (mut rx, mut tx) = tokio::io::split(&mut client);
        let drain = async {
            let mut sink = [0u8; 4096];
            while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let feed = async {
            let _ = tx.write_all(prefix).await;
            let _ = tx.write_all(input).await;
            let _ = tx.shutdown().await;
        };
        tokio::join!(drain, feed);
        // A handler error is fine (bad input); a panic is the bug being hunted.
        handler.await.expect("handler panicked").ok();
        backend
    })
}

#[allow(dead_code)]
/// Bytes that bring a client through the handshake into transmission on "disk".
pub fn handshake_prefix(structured: bool, meta: bool) -> Vec<u8> {
    use bytes::BytesMut;
    use r3map_nbd::{codec, wire};
    let mut out = BytesMut::new();
    out.extend_from_slice(&(wire::client_flags::FIXED_NEWSTYLE | wire::client_flags::NO_ZEROES).to_be_bytes());
    if structured {
        codec::encode_option(&mut out, wire::opt::STRUCTURED_REPLY, &[]);
        if meta {
            let mut data = BytesMut::new();
            codec::encode_meta_context_request(&mut data, "disk", &[wire::BASE_ALLOCATION]);
            codec::encode_option(&mut out, wire::opt::SET_META_CONTEXT, &data);
        }
    }
    let mut data = BytesMut::new();
    codec::encode_export_request(&mut data, "disk", &[]);
    codec::encode_option(&mut out, wire::opt::GO, &data);
    out.to_vec()
}

#[allow(dead_code)]
pub async fn contents(backend: &MemoryBackend) -> Vec<u8> {
    let mut all = vec![0u8; SIZE as usize];
    backend.read_at(0, &mut all).await.expect("read");
    all
}
