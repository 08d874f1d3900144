//! The delay proxy over loopback: data arrives intact, late by the RTT, and no faster than the
//! rate. Only lower time bounds here (timers never fire early); how long things take at most is
//! checked exactly on a paused clock (the unit tests in src/lib.rs) and measured by the WAN
//! benchmark, not bounded by the wall clock of a loaded machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use r3map_delay_proxy::{DelayConfig, DelayProxy};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that echoes everything back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn proxy(rtt_ms: u64, rate: Option<u64>) -> SocketAddr {
    let upstream = echo_server().await.to_string();
    let config = DelayConfig {
        rtt: Duration::from_millis(rtt_ms),
        rate,
    };
    let proxy = DelayProxy::start("127.0.0.1:0".parse().unwrap(), upstream, config)
        .await
        .unwrap();
    let addr = proxy.local_addr();
    std::mem::forget(proxy); // lives for the rest of the test process
    addr
}

/// Sends `data` through the proxy to the echo server and reads it back; returns the echo.
async fn round_trip(addr: SocketAddr, data: &[u8]) -> (Vec<u8>, Duration) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut r, mut w) = stream.into_split();
    let started = Instant::now();
    let to_send = data.to_vec();
    let writer = tokio::spawn(async move { w.write_all(&to_send).await.unwrap() });
    let mut echoed = vec![0u8; data.len()];
    r.read_exact(&mut echoed).await.unwrap();
    writer.await.unwrap();
    (echoed, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_the_round_trip_time_to_each_exchange() {
    let addr = proxy(60, None).await;
    let (echo, elapsed) = round_trip(addr, b"ping").await;
    assert_eq!(echo, b"ping");
    // Half the RTT on the way to the echo server, half on the way back.
    assert!(
        elapsed >= Duration::from_millis(60),
        "round trip took only {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_large_transfers_intact() {
    let addr = proxy(30, None).await;
    let mut data = vec![0u8; 8 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let (echo, elapsed) = round_trip(addr, &data).await;
    assert!(echo == data, "the echo differs from what was sent");
    assert!(elapsed >= Duration::from_millis(30), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_the_rate() {
    let addr = proxy(0, Some(4 << 20)).await;
    let data = vec![7u8; 2 << 20];
    let (echo, elapsed) = round_trip(addr, &data).await;
    assert_eq!(echo.len(), data.len());
    // 2 MiB at 4 MiB/s takes at least half a second (each direction is capped separately, and
    // the echo overlaps them).
    assert!(
        elapsed >= Duration::from_millis(450),
        "2 MiB at 4 MiB/s took only {elapsed:?}"
    );
}

#[tokio::test]
async fn reports_an_unreachable_upstream_to_the_client_by_closing() {
    // Port 1 on loopback has no listener: the proxy accepts, fails upstream, and closes.
    let config = DelayConfig {
        rtt: Duration::ZERO,
        rate: None,
    };
    let proxy = DelayProxy::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:1".into(), config)
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    // A proxy that kept the connection open would hang here until nextest's per-test timeout.
    let n = stream.read(&mut buf).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_the_bytes_it_delivered_to_clients_over_all_connections() {
    let config = DelayConfig {
        rtt: Duration::from_millis(10),
        rate: None,
    };
    let upstream = echo_server().await.to_string();
    let proxy = DelayProxy::start("127.0.0.1:0".parse().unwrap(), upstream, config)
        .await
        .unwrap();
    assert_eq!(proxy.bytes_downstream(), 0);
    let (first, second) = (vec![1u8; 300_000], vec![2u8; 5]);
    let (echo, _) = round_trip(proxy.local_addr(), &first).await;
    assert_eq!(echo, first);
    // Counted before it is written to the client, so the echo read back is in the count.
    assert_eq!(proxy.bytes_downstream(), 300_000);
    round_trip(proxy.local_addr(), &second).await;
    assert_eq!(proxy.bytes_downstream(), 300_005);
}
