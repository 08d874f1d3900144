//! Extended headers on the client: against a scripted server (`HostileServer`) for the exact
//! requests it sends and every violation of the extended framing, and against our own server
//! for block status and trims in both framings (model conformance and concurrency with
//! extended headers are in tests/client.rs).

mod common;

use std::sync::Arc;

use r3map_core::{Backend, MemoryBackend};
use r3map_nbd::testing::{self, Advertised, HostileServer};
use r3map_nbd::wire::{self, cmd, cmd_flags, opt, rep, reply_type};
use r3map_nbd::{Client, ClientError, ClientOptions};

fn extended() -> Advertised {
    Advertised {
        size: 16 << 30,
        extended: true,
        ..Advertised::default()
    }
}

async fn connect(server: &mut HostileServer, end: tokio::io::DuplexStream, advertised: Advertised) -> Client {
    let (client, ()) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        server.handshake(&advertised)
    );
    client.expect("handshake")
}

#[tokio::test(start_paused = true)]
async fn the_client_asks_for_extended_headers_first_and_uses_them() {
    let (end, mut server) = HostileServer::pair();
    let script = async {
        server.greet().await;
        // Extended headers first; once agreed, no NBD_OPT_STRUCTURED_REPLY follows.
        let (option, data) = server.recv_option().await.unwrap();
        assert_eq!((option, data.len()), (opt::EXTENDED_HEADERS, 0));
        server.reply_option(option, rep::ACK, &[]).await;
        let (option, _) = server.recv_option().await.unwrap();
        assert_eq!(option, opt::SET_META_CONTEXT);
        let meta = r3map_nbd::codec::meta_context_data(9, wire::BASE_ALLOCATION);
        server.reply_option(option, rep::META_CONTEXT, &meta).await;
        server.reply_option(option, rep::ACK, &[]).await;
        let (option, _) = server.recv_option().await.unwrap();
        assert_eq!(option, opt::GO);
        let info = r3map_nbd::codec::info_export_data(16 << 30, extended().flags);
        server.reply_option(option, rep::INFO, &info).await;
        server.reply_option(option, rep::ACK, &[]).await;
    };
    let (client, ()) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        script
    );
    let client = Arc::new(client.unwrap());
    assert!(client.info().extended_headers && client.info().structured_replies);
    // The scripted server now reads 32-byte extended headers.
    let mut server = server.into_extended();
    // Zeroes of 6 GiB and a trim of 5 GiB go out as one request each (64-bit effect length).
    let zeroes = tokio::spawn({
        let client = client.clone();
        async move { client.write_zeroes(8 << 30, 6 << 30).await }
    });
    let request = server.recv_request().await.unwrap();
    assert_eq!(
        (request.command, request.flags, request.offset, request.length),
        (cmd::WRITE_ZEROES, 0, 8 << 30, 6 << 30)
    );
    server
        .send(&testing::extended_chunk(
            wire::reply_flags::DONE,
            reply_type::NONE,
            request.handle,
            8 << 30,
            &[],
        ))
        .await;
    zeroes.await.unwrap().unwrap();
    // A write carries NBD_CMD_FLAG_PAYLOAD_LEN and its data.
    let write = tokio::spawn({
        let client = client.clone();
        async move { client.write_at(4096, b"data").await }
    });
    let request = server.recv_request().await.unwrap();
    assert_eq!(request.command, cmd::WRITE);
    assert_eq!(request.flags, cmd_flags::PAYLOAD_LEN);
    assert_eq!((request.length, &request.payload[..]), (4, &b"data"[..]));
    server
        .send(&testing::extended_chunk(
            wire::reply_flags::DONE,
            reply_type::NONE,
            request.handle,
            4096,
            &[],
        ))
        .await;
    write.await.unwrap().unwrap();
    // A read answered in two extended data chunks, the header repeating the request's offset.
    let read = tokio::spawn({
        let client = client.clone();
        async move {
            let mut buf = [0u8; 8];
            client.read_at(4096, &mut buf).await.map(|()| buf)
        }
    });
    let request = server.recv_request().await.unwrap();
    assert_eq!((request.command, request.length), (cmd::READ, 8));
    server
        .send(&testing::extended_data_chunk(
            false,
            request.handle,
            4096,
            4100,
            b"5678",
        ))
        .await;
    server
        .send(&testing::extended_data_chunk(
            true,
            request.handle,
            4096,
            4096,
            b"1234",
        ))
        .await;
    assert_eq!(&read.await.unwrap().unwrap(), b"12345678");
    // Block status: 64-bit descriptors, longer than 4 GiB, for context 9.
    let status = tokio::spawn({
        let client = client.clone();
        async move { client.block_status(0, 16 << 30, 0).await }
    });
    let request = server.recv_request().await.unwrap();
    assert_eq!((request.command, request.length), (cmd::BLOCK_STATUS, 16 << 30));
    let payload = testing::extended_status_payload(9, &[(4096, 0), ((16 << 30) - 4096, 3)]);
    server
        .send(&testing::extended_chunk(
            wire::reply_flags::DONE,
            reply_type::BLOCK_STATUS_EXT,
            request.handle,
            0,
            &payload,
        ))
        .await;
    let descriptors = status.await.unwrap().unwrap();
    let pairs: Vec<_> = descriptors.iter().map(|d| (d.length, d.status)).collect();
    assert_eq!(pairs, vec![(4096, 0), ((16 << 30) - 4096, 3)]);
}

#[tokio::test(start_paused = true)]
async fn without_extended_headers_the_client_falls_back_to_structured_replies() {
    let (end, mut server) = HostileServer::pair();
    // The default scripted server answers ERR_UNSUP to options it does not know.
    let client = Arc::new(connect(&mut server, end, Advertised::default()).await);
    assert!(!client.info().extended_headers && client.info().structured_replies);
    let zeroes = tokio::spawn({
        let client = client.clone();
        async move { client.write_zeroes(0, 1 << 20).await }
    });
    // A compact request (recv_request checks the compact magic).
    let request = server.recv_request().await.unwrap();
    assert_eq!((request.command, request.length), (cmd::WRITE_ZEROES, 1 << 20));
    server.send(&testing::done_chunk(request.handle)).await;
    zeroes.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn go_refused_as_unsupported_after_extended_headers_is_a_violation() {
    let (end, mut server) = HostileServer::pair();
    let script = async {
        server.greet().await;
        loop {
            let (option, _) = server.recv_option().await.unwrap();
            match option {
                opt::EXTENDED_HEADERS => server.reply_option(option, rep::ACK, &[]).await,
                opt::GO => {
                    server.reply_option(option, rep::ERR_UNSUP, &[]).await;
                    return server.until_closed().await;
                }
                other => server.reply_option(other, rep::ERR_UNSUP, &[]).await,
            }
        }
    };
    let (client, sent_after) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        script
    );
    let err = client.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    // In particular no NBD_OPT_EXPORT_NAME fallback (forbidden after extended headers).
    assert!(sent_after.is_empty(), "the client sent {sent_after:02x?}");
}

/// Starts a read of 8 bytes at `offset` on an extended connection and returns its request.
async fn pending_read(
    client: &Arc<Client>,
    server: &mut HostileServer,
    offset: u64,
) -> (tokio::task::JoinHandle<r3map_core::Result<()>>, u64) {
    let read = tokio::spawn({
        let client = client.clone();
        async move { client.read_at(offset, &mut [0u8; 8]).await }
    });
    let request = server.recv_request().await.unwrap();
    (read, request.handle)
}

#[tokio::test(start_paused = true)]
async fn replies_outside_the_extended_framing_fail_and_close_the_connection() {
    type Reply = fn(u64) -> Vec<u8>;
    let cases: [(&str, Reply, &str); 6] = [
        ("a simple reply", |h| testing::simple_reply(h, 0), "wrong magic"),
        ("a structured chunk", testing::done_chunk, "wrong magic"),
        (
            "another offset",
            |h| testing::extended_data_chunk(true, h, 4104, 4096, &[1; 8]),
            "offset 4104 to a request at offset 4096",
        ),
        (
            "a compact block status chunk",
            |h| {
                let mut payload = 1u32.to_be_bytes().to_vec();
                payload.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0]);
                testing::extended_chunk(1, reply_type::BLOCK_STATUS, h, 4096, &payload)
            },
            "unexpected chunk type 5",
        ),
        (
            "a 64-bit length past the request",
            |h| {
                testing::extended_chunk(1, reply_type::OFFSET_DATA, h, 4096, &[0; 16])
                    .into_iter()
                    .take(24)
                    .chain((1u64 << 40).to_be_bytes())
                    .collect()
            },
            "data chunk of 1099511627776 bytes",
        ),
        (
            "an oversized error chunk",
            |h| {
                testing::extended_chunk(1, reply_type::ERROR, h, 4096, &[])
                    .into_iter()
                    .take(24)
                    .chain((u64::MAX).to_be_bytes())
                    .collect()
            },
            "error chunk of",
        ),
    ];
    for (what, reply, needle) in cases {
        let (end, mut server) = HostileServer::pair();
        let client = Arc::new(connect(&mut server, end, extended()).await);
        assert!(client.info().extended_headers);
        let mut server = server.into_extended();
        let (read, handle) = pending_read(&client, &mut server, 4096).await;
        server.send(&reply(handle)).await;
        let err = read.await.unwrap().unwrap_err();
        assert!(err.to_string().contains(needle), "{what}: {err}");
        assert!(server.until_closed().await.is_empty(), "{what}: sent more");
        let later = client.read_at(0, &mut [0u8; 8]).await.unwrap_err();
        assert!(later.to_string().contains(needle), "{what}: later: {later}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_block_status_ext_chunk_with_a_wrong_count_is_a_violation() {
    let (end, mut server) = HostileServer::pair();
    let client = Arc::new(connect(&mut server, end, extended()).await);
    let mut server = server.into_extended();
    let status = tokio::spawn({
        let client = client.clone();
        async move { client.block_status(0, 1 << 20, 0).await }
    });
    let request = server.recv_request().await.unwrap();
    let mut payload = testing::extended_status_payload(1, &[(4096, 0)]);
    payload[7] = 2; // two descriptors announced, one sent
    server
        .send(&testing::extended_chunk(
            1,
            reply_type::BLOCK_STATUS_EXT,
            request.handle,
            0,
            &payload,
        ))
        .await;
    let err = status.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("descriptor count 2"), "{err}");
}

// ---- Our client against our server ---------------------------------------------------------

fn options(extended: bool) -> ClientOptions {
    ClientOptions {
        extended_headers: extended,
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn block_status_trim_and_zeroes_agree_between_framings() {
    let running = common::serve(common::memory_config("", 4 << 20), None).await;
    let extended = Client::connect(&running.uri, options(true)).await.unwrap();
    let compact = Client::connect(&running.uri, options(false)).await.unwrap();
    assert!(extended.info().extended_headers);
    assert!(!compact.info().extended_headers && compact.info().structured_replies);
    assert!(extended.info().base_allocation.is_some() && compact.info().base_allocation.is_some());
    // Data in the second 256 KiB segment, zeroes written over the fourth after data.
    extended.write_at(300 << 10, &[7u8; 4096]).await.unwrap();
    extended.write_at(800 << 10, &[9u8; 4096]).await.unwrap();
    extended.write_zeroes(768 << 10, 256 << 10).await.unwrap();
    extended.trim(3 << 20, 1 << 20).await.unwrap();
    let mut back = vec![1u8; 4 << 20];
    compact.read_at(0, &mut back).await.unwrap();
    assert!(back[..300 << 10].iter().all(|&b| b == 0));
    assert!(back[300 << 10..(300 << 10) + 4096].iter().all(|&b| b == 7));
    assert!(back[(300 << 10) + 4096..].iter().all(|&b| b == 0));
    let ext = extended.block_status(0, 4 << 20, 0).await.unwrap();
    let cmp = compact.block_status(0, 4 << 20, 0).await.unwrap();
    assert_eq!(ext, cmp);
    let hole = u64::from(wire::state::HOLE | wire::state::ZERO);
    let pairs: Vec<_> = ext.iter().map(|d| (d.length, d.status)).collect();
    assert_eq!(
        pairs,
        vec![(256 << 10, hole), (256 << 10, 0), ((3 << 20) + (512 << 10), hole)]
    );
    // REQ_ONE: a single descriptor, no longer than asked.
    let one = extended
        .block_status(0, 100 << 10, wire::cmd_flags::REQ_ONE)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].length, one[0].status), (100 << 10, hole));
    drop((extended, compact));
    running.stop().await;
}

#[tokio::test]
async fn the_option_turns_extended_headers_off() {
    let backend = Arc::new(MemoryBackend::new(4096));
    let config = r3map_nbd::ServerConfig::new(vec![r3map_nbd::Export::new("", backend)]);
    let running = common::serve(config, None).await;
    let client = Client::connect(&running.uri, options(false)).await.unwrap();
    assert!(!client.info().extended_headers);
    client.write_at(0, b"x").await.unwrap();
    drop(client);
    running.stop().await;
}
