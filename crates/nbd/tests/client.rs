//! Our client against our server: model conformance, splitting, errors, connection loss.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use r3map_core::{testing, Backend, Error, MemoryBackend};
use r3map_nbd::{Client, ClientError, ClientOptions, Export, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Any workload through client and server behaves like a `Vec<u8>`, with extended headers
    /// (the default) or structured replies.
    #[test]
    fn client_and_server_match_the_model(
        size in 1u64..300_000,
        ops in testing::ops_strategy(70_000, 30),
        extended in any::<bool>(),
    ) {
        testing::block_on(async {
            let running = common::serve(common::memory_config("m", size), None).await;
            let options = ClientOptions { extended_headers: extended, ..ClientOptions::default() };
            let client = Client::connect(&running.uri_for("m"), options).await.unwrap();
            prop_assert_eq!(client.info().extended_headers, extended);
            testing::check_against_model(&client, 1, &ops).await?;
            // The server's backend holds what the client wrote.
            let through_client = common::contents(&client).await;
            prop_assert_eq!(common::contents(&*running.backends[0]).await, through_client);
            drop(client);
            running.stop().await;
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_connection_match_the_model() {
    let running = common::serve(common::memory_config("", 4 << 20), None).await;
    for (structured, extended) in [(true, true), (true, false), (false, false)] {
        let options = ClientOptions {
            structured_replies: structured,
            extended_headers: extended,
            ..ClientOptions::default()
        };
        let client = Arc::new(Client::connect(&running.uri, options).await.unwrap());
        assert_eq!(client.info().structured_replies, structured);
        assert_eq!(client.info().extended_headers, extended);
        client.write_zeroes(0, 4 << 20).await.unwrap();
        testing::check_concurrent(client.clone(), 1, 8, 100)
            .await
            .unwrap();
    }
    running.stop().await;
}

#[tokio::test]
async fn large_requests_are_split_to_the_servers_maximum_payload() {
    let mut config = common::memory_config("big", 3 << 20);
    config.max_request = 64 << 10;
    let running = common::serve(config, None).await;
    let client = Client::connect(&running.uri_for("big"), ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(client.info().max_payload, 64 << 10);
    let data = common::random_bytes(5, (3 << 20) - 100);
    client.write_at(100, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(100, &mut back).await.unwrap();
    assert!(back == data);
    client.sync().await.unwrap();
    running.stop().await;
}

#[tokio::test]
async fn read_only_unknown_export_and_listing_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let config = ServerConfig::new(vec![
        Export::new("rw", Arc::new(MemoryBackend::new(4096))).with_description("writable"),
        Export::new("ro", Arc::new(MemoryBackend::new(8192))).read_only(true),
    ]);
    let running = common::serve(config, Some(&socket)).await;
    assert!(running.uri.starts_with("nbd+unix:///"), "{}", running.uri);
    let exports = Client::list_exports(&running.uri, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        exports,
        vec![
            ("rw".to_string(), "writable".to_string()),
            ("ro".to_string(), String::new())
        ]
    );
    let ro = Client::connect(&running.uri_for("ro"), ClientOptions::default())
        .await
        .unwrap();
    assert!(ro.info().read_only());
    assert_eq!(ro.size(), 8192);
    assert!(matches!(ro.write_at(0, b"x").await, Err(Error::ReadOnly)));
    let err = Client::connect(&running.uri_for("nope"), ClientOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("no export named \"nope\""), "{err}");
    // Out-of-range requests fail locally with the core error.
    let rw = Client::connect(&running.uri_for("rw"), ClientOptions::default())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        rw.read_at(4090, &mut buf).await,
        Err(Error::OutOfBounds { .. })
    ));
    drop((ro, rw));
    running.stop().await;
    assert!(!socket.exists(), "socket file removed on shutdown");
}

/// A fake server that completes the handshake, then closes the connection as soon as the
/// first request arrives.
async fn dying_server() -> (String, tokio::task::JoinHandle<()>) {
    use r3map_nbd::{codec, wire};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("nbd://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut out = bytes::BytesMut::new();
        codec::encode_greeting(&mut out, wire::handshake_flags::FIXED_NEWSTYLE);
        io.write_all(&out).await.unwrap();
        let mut flags = [0u8; 4];
        io.read_exact(&mut flags).await.unwrap();
        loop {
            let mut head = [0u8; 16];
            io.read_exact(&mut head).await.unwrap();
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            io.read_exact(&mut data).await.unwrap();
            let mut out = bytes::BytesMut::new();
            if option == wire::opt::GO {
                let info = codec::info_export_data(1 << 20, wire::transmission_flags::HAS_FLAGS);
                codec::encode_option_reply(&mut out, option, wire::rep::INFO, &info);
            }
            codec::encode_option_reply(&mut out, option, wire::rep::ACK, &[]);
            io.write_all(&out).await.unwrap();
            if option == wire::opt::GO {
                break;
            }
        }
        let mut request = [0u8; 28];
        io.read_exact(&mut request).await.unwrap();
        drop(io);
    });
    (uri, task)
}

#[tokio::test]
async fn connection_loss_fails_pending_and_later_requests() {
    let (uri, server) = dying_server().await;
    let client = Arc::new(Client::connect(&uri, ClientOptions::default()).await.unwrap());
    let reads: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                client.read_at(i * 4096, &mut buf).await
            })
        })
        .collect();
    for read in reads {
        let result = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a pending request hung after connection loss")
            .unwrap();
        let err = result.unwrap_err();
        assert!(err.to_string().contains("NBD connection lost"), "{err}");
    }
    server.await.unwrap();
    let mut buf = [0u8; 8];
    let later = tokio::time::timeout(Duration::from_secs(10), client.read_at(0, &mut buf))
        .await
        .expect("a later request hung");
    assert!(later.is_err());
}

#[tokio::test]
async fn connecting_to_nothing_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = Client::connect(&format!("nbd://{addr}/"), ClientOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    let err = Client::connect(&format!("nbds://{addr}/"), ClientOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TlsNotConfigured), "{err}");
}
