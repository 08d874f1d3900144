//! Hostile and broken peers over real loopback TCP: an advertiser facing malformed frames,
//! silent peers and lying hash lists; a receiver facing a source that lies about sizes and
//! blocks. Nothing panics, nothing waits forever, and a refused transfer writes nothing to the
//! replica.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use r3map_sync::conn::{Conn, Counters};
use r3map_sync::receiver::{receive, ReceiveError, ReceiverConfig};
use r3map_sync::replica::Replica;
use r3map_sync::source::{Source, SourceConfig};
use r3map_sync::wire::{Role, VERSION};
use r3map_sync::{Log, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(2);
const BLOCK: u32 = 4096;

fn quiet() -> Log {
    Arc::new(|line| eprintln!("{line}"))
}

/// A direct advertiser of a 10-block file; returns its address.
async fn advertiser(dir: &Path) -> String {
    let path = dir.join("f.bin");
    std::fs::write(&path, vec![7u8; 10 * BLOCK as usize]).unwrap();
    let config = SourceConfig {
        path,
        name: "f.bin".into(),
        block_size: BLOCK,
        threads: 1,
        timeout: TIMEOUT,
    };
    let source = Source::open(config, quiet()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(source.listen(listener, None, Vec::new()));
    addr
}

/// Sends raw bytes, then reads until the advertiser closes; returns what it sent back.
async fn send_raw(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    // The advertiser closes after refusing (or after its deadline); a reset also ends it.
    let _ = tcp.read_to_end(&mut answer).await;
    answer
}

fn refusal(answer: &[u8]) -> String {
    let mut buf = BytesMut::from(answer);
    loop {
        match Message::decode(&mut buf, 1 << 20) {
            Ok(Some(Message::Refused { reason })) => return reason,
            Ok(Some(_)) => continue,
            other => panic!("no refusal in the answer ({other:?}): {answer:?}"),
        }
    }
}

fn frame(message: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    message.encode(&mut buf);
    buf
}

fn hello(name: &str) -> Message {
    Message::Hello {
        version: VERSION,
        role: Role::Receiver,
        name: name.into(),
        ticket: 0,
    }
}

/// A well-behaved receiver still gets the file (the advertiser survived what came before).
async fn still_serves(addr: &str, dir: &Path) {
    let replica_path = dir.join("replica.bin");
    let mut replica = Replica::open(&replica_path, BLOCK, 1).unwrap();
    let config = receiver_config(addr);
    receive(&config, &mut replica, Arc::default(), &quiet())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&replica_path).unwrap(),
        vec![7u8; 10 * BLOCK as usize]
    );
}

fn receiver_config(addr: &str) -> ReceiverConfig {
    ReceiverConfig {
        addr: addr.into(),
        name: "f.bin".into(),
        tls: None,
        timeout: TIMEOUT,
        max_size: 1 << 30,
        once: true,
        attempts: 1,
    }
}

#[tokio::test]
async fn the_advertiser_refuses_malformed_and_lying_peers_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let addr = advertiser(dir.path()).await;

    // A frame claiming 4 GiB: refused from its header, nothing buffered.
    let reason = refusal(&send_raw(&addr, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await);
    assert!(reason.contains("exceeds the limit"), "{reason}");
    // Not our protocol at all.
    let reason = refusal(&send_raw(&addr, b"\0\0\0\x10\x01GET / HTTP/1.1\r\n").await);
    assert!(reason.contains("bad magic"), "{reason}");
    // Another protocol version, another file name.
    let old = frame(&Message::Hello {
        version: VERSION + 1,
        role: Role::Receiver,
        name: "f.bin".into(),
        ticket: 0,
    });
    let reason = refusal(&send_raw(&addr, &old).await);
    assert!(reason.contains("protocol version"), "{reason}");
    let reason = refusal(&send_raw(&addr, &frame(&hello("other.bin"))).await);
    assert!(reason.contains("not \"other.bin\""), "{reason}");
    // A hash list that does not match the size it claims.
    let mut lying = frame(&hello("f.bin"));
    Message::Hashes {
        size: 100 * u64::from(BLOCK),
        first: 0,
        last: true,
        hashes: vec![1, 2, 3],
    }
    .encode(&mut lying);
    let reason = refusal(&send_raw(&addr, &lying).await);
    assert!(reason.contains("3 hashes for a file of"), "{reason}");
    // A hash list piece out of order.
    let mut out_of_order = frame(&hello("f.bin"));
    Message::Hashes {
        size: 10 * u64::from(BLOCK),
        first: 5,
        last: false,
        hashes: vec![1],
    }
    .encode(&mut out_of_order);
    let reason = refusal(&send_raw(&addr, &out_of_order).await);
    assert!(reason.contains("starts at block 5"), "{reason}");
    // A peer that says nothing is dropped at the deadline (read_to_end returns).
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink).await;
    // A peer that claims a huge file gets what the advertiser has, nothing more.
    let mut huge = frame(&hello("f.bin"));
    Message::Hashes {
        size: u64::MAX / 2,
        first: 0,
        last: false,
        hashes: vec![0; 1000],
    }
    .encode(&mut huge);
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(&huge).await.unwrap();
    drop(tcp);

    still_serves(&addr, dir.path()).await;
}

/// A fake source: answers a receiver's Hello and hash list with `script`.
async fn fake_source(script: Vec<BytesMut>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = Conn::new(Box::new(tcp), TIMEOUT);
        let _hello = conn.recv().await.unwrap();
        conn.send(&Message::Welcome {
            version: VERSION,
            block_size: BLOCK,
        })
        .await
        .unwrap();
        loop {
            if let Message::Hashes { last: true, .. } = conn.recv().await.unwrap() {
                break;
            }
        }
        let (mut stream, _) = conn.into_parts();
        for piece in script {
            if stream.write_all(&piece).await.is_err() {
                return;
            }
        }
        // Hold the connection open until the receiver gives up.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    });
    addr
}

/// Runs a receiver with an existing replica against `script`; checks that it fails with a
/// message containing `expected` and that the replica and its directory are as before.
async fn refused_and_untouched(script: Vec<BytesMut>, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let old = vec![3u8; 5 * BLOCK as usize + 10];
    std::fs::write(&path, &old).unwrap();
    let addr = fake_source(script).await;
    let mut replica = Replica::open(&path, BLOCK, 1).unwrap();
    let counters = Arc::new(Counters::default());
    let err = receive(&receiver_config(&addr), &mut replica, counters, &quiet())
        .await
        .unwrap_err();
    let text = match &err {
        ReceiveError::Session(err) => err.to_string(),
        other => panic!("expected a refusal, got {other}"),
    };
    assert!(text.contains(expected), "{text:?} does not mention {expected:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        old,
        "a refused transfer changed the replica"
    );
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("f.bin")],
        "a refused transfer left files behind"
    );
}

fn plan(size: u64, blocks: u64) -> BytesMut {
    frame(&Message::Plan {
        size,
        blocks,
        digest: [0; 32],
    })
}

fn block(index: u64, len: usize) -> BytesMut {
    frame(&Message::Block {
        index,
        data: Bytes::from(vec![9u8; len]),
    })
}

#[tokio::test]
async fn a_plan_beyond_the_size_limit_is_refused() {
    refused_and_untouched(vec![plan(1 << 40, 1)], "above the limit").await;
}

#[tokio::test]
async fn a_plan_with_more_blocks_than_its_size_is_refused() {
    refused_and_untouched(vec![plan(2 * u64::from(BLOCK), 3)], "plan announces 3 blocks").await;
}

#[tokio::test]
async fn a_block_of_the_wrong_length_is_refused() {
    refused_and_untouched(
        vec![
            plan(4 * u64::from(BLOCK), 2),
            block(0, BLOCK as usize),
            block(1, 100),
        ],
        "has 100 bytes",
    )
    .await;
}

#[tokio::test]
async fn blocks_out_of_order_or_past_the_end_are_refused() {
    let size = 4 * u64::from(BLOCK);
    refused_and_untouched(
        vec![plan(size, 2), block(2, BLOCK as usize), block(1, BLOCK as usize)],
        "out of order",
    )
    .await;
    refused_and_untouched(vec![plan(size, 1), block(9, BLOCK as usize)], "out of order").await;
}

#[tokio::test]
async fn an_oversized_frame_in_the_middle_of_a_transfer_is_refused() {
    let mut huge = BytesMut::new();
    huge.put_u32(u32::MAX);
    refused_and_untouched(
        vec![plan(4 * u64::from(BLOCK), 2), block(0, BLOCK as usize), huge],
        "exceeds the limit",
    )
    .await;
}

#[tokio::test]
async fn blocks_whose_digest_does_not_verify_are_never_published() {
    // The plan's digest (zeros) matches no content: the receiver must not publish, and asks
    // again (a Published frame with its own digest, then a new hash list); the fake source
    // then hangs up, which ends the single attempt.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let old = vec![3u8; 2 * BLOCK as usize];
    std::fs::write(&path, &old).unwrap();
    let addr = fake_source(vec![plan(2 * u64::from(BLOCK), 1), block(0, BLOCK as usize)]).await;
    let mut replica = Replica::open(&path, BLOCK, 1).unwrap();
    let mut config = receiver_config(&addr);
    config.timeout = Duration::from_millis(500);
    let err = receive(&config, &mut replica, Arc::default(), &quiet())
        .await
        .unwrap_err();
    assert!(matches!(err, ReceiveError::GaveUp { .. }), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        old,
        "an unverified version was published"
    );
}
