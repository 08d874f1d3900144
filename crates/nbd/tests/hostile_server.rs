//! The client against a scripted hostile server (`r3map_nbd::testing::HostileServer`): every
//! protocol violation fails every pending request with a clear error and closes the connection;
//! nothing panics or hangs. All tests run on a paused clock, so deadlines pass instantly.

use std::time::Duration;

use r3map_core::{Backend, Error};
use r3map_nbd::testing::{self, Advertised, HostileServer};
use r3map_nbd::wire::{self, cmd, opt, rep, reply_type, transmission_flags};
use r3map_nbd::{Client, ClientError};

async fn connect(server: &mut HostileServer, end: tokio::io::DuplexStream, advertised: Advertised) -> Client {
    let (client, ()) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        server.handshake(&advertised)
    );
    client.expect("handshake")
}

/// Starts `n` reads of 8 bytes at 0, 8, 16, … and returns them with the requests received.
async fn pending_reads(
    client: &std::sync::Arc<Client>,
    server: &mut HostileServer,
    n: u64,
) -> (
    Vec<tokio::task::JoinHandle<r3map_core::Result<()>>>,
    Vec<testing::ReceivedRequest>,
) {
    let reads: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.read_at(8 * i, &mut [0u8; 8]).await })
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..n {
        requests.push(server.recv_request().await.expect("a request"));
    }
    (reads, requests)
}

/// Every read failed with a message containing `needle`, the connection is closed and a new
/// request fails at once without reaching the server.
async fn assert_all_failed_and_closed(
    client: &Client,
    server: &mut HostileServer,
    reads: Vec<tokio::task::JoinHandle<r3map_core::Result<()>>>,
    needle: &str,
) {
    for read in reads {
        let err = read.await.unwrap().unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    // Closed: the server sees the end of the stream with no further request.
    let after = server.until_closed().await;
    assert!(
        after.is_empty(),
        "the client sent {} bytes after the violation",
        after.len()
    );
    let err = client.read_at(0, &mut [0u8; 8]).await.unwrap_err();
    assert!(err.to_string().contains(needle), "later request: {err}");
}

#[tokio::test(start_paused = true)]
async fn block_sizes_against_the_protocol_are_refused_not_a_panic() {
    for (block_size, needle) in [
        ((64 << 20, 64 << 20, u32::MAX), "minimum block size"),
        ((3, 4096, 1 << 20), "minimum block size"),
        ((4096, 512, 1 << 20), "preferred block size"),
        ((512, 4096, 1024), "maximum payload"),
    ] {
        let (end, mut server) = HostileServer::pair();
        let advertised = Advertised {
            block_size: Some(block_size),
            ..Advertised::default()
        };
        let (client, ()) = tokio::join!(
            Client::connect_stream(end, "", testing::hostile_options()),
            server.handshake(&advertised)
        );
        let err = client.unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
        assert!(err.to_string().contains(needle), "{block_size:?}: {err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_64k_minimum_block_is_honoured() {
    let (end, mut server) = HostileServer::pair();
    let advertised = Advertised {
        block_size: Some((1 << 16, 1 << 16, 1 << 20)),
        ..Advertised::default()
    };
    let client = connect(&mut server, end, advertised).await;
    assert_eq!(client.info().min_block, 1 << 16);
    let err = client.read_at(4096, &mut [0u8; 4096]).await.unwrap_err();
    assert!(matches!(err, Error::Unaligned { alignment: 65536, .. }), "{err}");
}

/// The read unit the stages in front use (`Backend::read_alignment`): the preferred block
/// size, 4096 when the server names none.
#[tokio::test(start_paused = true)]
async fn the_read_unit_is_the_preferred_block_size() {
    for (block_size, unit) in [(None, 4096), (Some((512, 8192, 1 << 20)), 8192)] {
        let (end, mut server) = HostileServer::pair();
        let advertised = Advertised {
            block_size,
            ..Advertised::default()
        };
        let client = connect(&mut server, end, advertised).await;
        assert_eq!(client.read_alignment(), Some(unit), "{block_size:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_chunk_offset_near_u64_max_fails_every_pending_request_and_closes() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (reads, requests) = pending_reads(&client, &mut server, 3).await;
    let chunk = testing::data_chunk(true, requests[0].handle, u64::MAX - 2, &[7; 8]);
    server.send(&chunk).await;
    assert_all_failed_and_closed(&client, &mut server, reads, "outside the requested range").await;
}

#[tokio::test(start_paused = true)]
async fn overlapping_chunks_are_a_violation_not_zeros() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (reads, requests) = pending_reads(&client, &mut server, 2).await;
    let handle = requests[0].handle;
    // 4 + 4 + 2 bytes "cover" 8, but 6..8 was never sent.
    server.send(&testing::data_chunk(false, handle, 0, &[1; 4])).await;
    server.send(&testing::data_chunk(false, handle, 0, &[2; 4])).await;
    server.send(&testing::hole_chunk(true, handle, 4, 2)).await;
    assert_all_failed_and_closed(&client, &mut server, reads, "overlaps").await;
}

#[tokio::test(start_paused = true)]
async fn a_short_structured_read_is_a_violation() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (reads, requests) = pending_reads(&client, &mut server, 2).await;
    server
        .send(&testing::data_chunk(true, requests[0].handle, 0, &[1; 4]))
        .await;
    assert_all_failed_and_closed(&client, &mut server, reads, "did not cover").await;
}

#[tokio::test(start_paused = true)]
async fn chunks_reassemble_in_any_order() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 8];
            client.read_at(0, &mut buf).await.map(|()| buf)
        })
    };
    let request = server.recv_request().await.unwrap();
    server
        .send(&testing::hole_chunk(false, request.handle, 6, 2))
        .await;
    server
        .send(&testing::data_chunk(false, request.handle, 2, &[3; 4]))
        .await;
    server
        .send(&testing::data_chunk(false, request.handle, 0, &[1; 2]))
        .await;
    server.send(&testing::done_chunk(request.handle)).await;
    assert_eq!(reader.await.unwrap().unwrap(), [1, 1, 3, 3, 3, 3, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_reply_for_an_unknown_handle_fails_everything() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (reads, _) = pending_reads(&client, &mut server, 2).await;
    server.send(&testing::done_chunk(999)).await;
    assert_all_failed_and_closed(&client, &mut server, reads, "unknown handle").await;
}

#[tokio::test(start_paused = true)]
async fn a_simple_reply_to_a_structured_read_is_a_violation() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (reads, requests) = pending_reads(&client, &mut server, 2).await;
    let mut reply = testing::simple_reply(requests[1].handle, 0);
    reply.extend_from_slice(&[5; 8]);
    server.send(&reply).await;
    assert_all_failed_and_closed(&client, &mut server, reads, "simple reply").await;
}

#[tokio::test(start_paused = true)]
async fn an_error_chunk_fails_only_its_request() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let (mut reads, requests) = pending_reads(&client, &mut server, 2).await;
    let mut payload = wire::errno::EIO.to_be_bytes().to_vec();
    payload.extend_from_slice(&4u16.to_be_bytes());
    payload.extend_from_slice(b"disk");
    let error = testing::chunk(
        wire::reply_flags::DONE,
        reply_type::ERROR,
        requests[0].handle,
        &payload,
    );
    server.send(&error).await;
    server
        .send(&testing::data_chunk(true, requests[1].handle, 8, &[9; 8]))
        .await;
    let second = reads.pop().unwrap();
    let err = reads.pop().unwrap().await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("EIO") && err.to_string().contains("disk"),
        "{err}"
    );
    second.await.unwrap().unwrap();
    // The connection is still good.
    let reader = tokio::spawn({
        let client = client.clone();
        async move { client.read_at(0, &mut [0u8; 8]).await }
    });
    let request = server.recv_request().await.unwrap();
    server
        .send(&testing::data_chunk(true, request.handle, 0, &[1; 8]))
        .await;
    reader.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_has_flags_no_flag_is_honoured() {
    use transmission_flags::*;
    let (end, mut server) = HostileServer::pair();
    let advertised = Advertised {
        flags: READ_ONLY | SEND_FLUSH,
        ..Advertised::default()
    };
    let client = std::sync::Arc::new(connect(&mut server, end, advertised).await);
    assert_eq!(client.info().flags, 0);
    assert!(!client.info().read_only());
    // No FLUSH is sent (the flag is meaningless), so the next request the server sees is the
    // write, which goes out (READ_ONLY is meaningless too).
    client.sync().await.unwrap();
    let writer = tokio::spawn({
        let client = client.clone();
        async move { client.write_at(0, &[1; 8]).await }
    });
    let request = server.recv_request().await.unwrap();
    assert_eq!(request.command, cmd::WRITE);
    server.send(&testing::done_chunk(request.handle)).await;
    writer.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_option_reply_must_answer_the_option_sent() {
    let (end, mut server) = HostileServer::pair();
    let script = async {
        server.greet().await;
        let (option, _) = server.recv_option().await.unwrap();
        assert_eq!(option, opt::EXTENDED_HEADERS);
        server.reply_option(option, rep::ERR_UNSUP, &[]).await;
        let (option, _) = server.recv_option().await.unwrap();
        assert_eq!(option, opt::STRUCTURED_REPLY);
        server.reply_option(opt::GO, rep::ACK, &[]).await;
    };
    let (client, ()) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        script
    );
    let err = client.unwrap_err();
    assert!(
        err.to_string()
            .contains("while waiting for the reply to STRUCTURED_REPLY"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_frozen_server_times_out_every_pending_request_and_is_disconnected() {
    let (end, mut server) = HostileServer::pair();
    let client = std::sync::Arc::new(connect(&mut server, end, Advertised::default()).await);
    let started = tokio::time::Instant::now();
    let (reads, _) = pending_reads(&client, &mut server, 3).await;
    // No reply ever comes.
    assert_all_failed_and_closed(&client, &mut server, reads, "did not answer").await;
    let limit = testing::hostile_options().request_timeout.unwrap();
    assert!(started.elapsed() >= limit && started.elapsed() < limit + Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_during_the_handshake_times_out() {
    let (end, mut server) = HostileServer::pair();
    let (client, _) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        server.greet()
    );
    assert!(matches!(client.unwrap_err(), ClientError::Timeout(_)));
}

/// The handshake for the kernel's NBD client asks for nothing the kernel cannot speak: the
/// first option is `NBD_OPT_GO`, and bytes after the handshake are refused.
#[tokio::test(start_paused = true)]
async fn the_simple_handshake_asks_only_for_the_export() {
    for trailing in [false, true] {
        let (end, mut server) = HostileServer::pair();
        let script = async {
            server.greet().await;
            let (option, _) = server.recv_option().await.unwrap();
            assert_eq!(option, opt::GO, "no other option before GO");
            let info = r3map_nbd::codec::info_export_data(1 << 20, Advertised::default().flags);
            server.reply_option(option, rep::INFO, &info).await;
            server.reply_option(option, rep::ACK, &[]).await;
            if trailing {
                server.send(&testing::simple_reply(1, 0)).await;
            }
        };
        let (info, ()) = tokio::join!(Client::negotiate_simple(end, "", Duration::from_secs(5)), script);
        if trailing {
            let err = info.unwrap_err();
            assert!(
                err.to_string().contains("after the end of the handshake"),
                "{err}"
            );
        } else {
            let info = info.unwrap();
            assert_eq!(info.size, 1 << 20);
            assert!(!info.structured_replies && !info.extended_headers);
        }
    }
}
