//! Server limits against abusive clients: deadlines (handshake, idle, write), the shutdown
//! grace, the connection cap, and the memory budgets (per connection and server-wide).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use r3map_core::stages::Gate;
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_nbd::wire::{self, cmd, errno, opt, rep};
use r3map_nbd::{codec, ConnectionError, Export, Server, ServerConfig, Service};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MIB: usize = 1 << 20;

/// Greeting, flags and `GO` on the default export, with structured replies; returns once the
/// client is in transmission.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let mut greeting = [0u8; wire::GREETING_LEN];
    io.read_exact(&mut greeting).await.unwrap();
    let mut out = BytesMut::new();
    out.extend_from_slice(
        &(wire::client_flags::FIXED_NEWSTYLE | wire::client_flags::NO_ZEROES).to_be_bytes(),
    );
    codec::encode_option(&mut out, opt::STRUCTURED_REPLY, &[]);
    let mut data = BytesMut::new();
    codec::encode_export_request(&mut data, "", &[]);
    codec::encode_option(&mut out, opt::GO, &data);
    io.write_all(&out).await.unwrap();
    loop {
        let mut head = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        io.read_exact(&mut head).await.unwrap();
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut skip = vec![0u8; len as usize];
        io.read_exact(&mut skip).await.unwrap();
        assert_eq!(reply & rep::ERROR_BIT, 0, "option refused");
        if option == opt::GO && reply == rep::ACK {
            return;
        }
    }
}

fn request(command: u16, handle: u64, offset: u64, length: u32) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode_request(&mut out, 0, command, handle, offset, length);
    out
}

fn config(backend: SharedBackend) -> ServerConfig {
    let mut config = ServerConfig::new(vec![Export::new("disk", backend)]);
    config.max_request = MIB as u32;
    config.max_in_flight_bytes = 4 * MIB;
    config.memory_budget = 4 * MIB;
    config
}

#[test]
fn max_request_must_leave_room_for_the_reply_header() {
    let mut config = config(Arc::new(MemoryBackend::new(4096)));
    config.max_in_flight_bytes = u32::MAX as usize;
    config.memory_budget = u32::MAX as usize;
    config.max_request = u32::MAX;
    let err = Service::new(config.clone()).err().expect("refused");
    assert!(err.to_string().contains("max_request"), "{err}");
    config.max_request = r3map_nbd::server::MAX_REQUEST_LIMIT;
    Service::new(config).unwrap();
    // The largest read's reply header is encodable: its length field is exactly u32::MAX.
    let mut head = BytesMut::new();
    let to = codec::ReplyTo {
        framing: codec::Framing::Structured,
        handle: 1,
        offset: 0,
    };
    codec::encode_read_reply_header(&mut head, to, r3map_nbd::server::MAX_REQUEST_LIMIT);
    assert_eq!(&head[16..20], &u32::MAX.to_be_bytes());
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_is_disconnected() {
    let mut config = config(Arc::new(MemoryBackend::new(4096)));
    config.idle_timeout = Duration::from_secs(30);
    let service = Service::new(config).unwrap();
    let (mut client, server) = tokio::io::duplex(64 << 10);
    let task = tokio::spawn(async move { service.serve_stream(server).await });
    negotiate(&mut client).await;
    let started = tokio::time::Instant::now();
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::Idle(_)), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn a_slow_handshake_is_disconnected() {
    let mut config = config(Arc::new(MemoryBackend::new(4096)));
    config.handshake_timeout = Duration::from_secs(5);
    let service = Service::new(config).unwrap();
    let (mut client, server) = tokio::io::duplex(64 << 10);
    let task = tokio::spawn(async move { service.serve_stream(server).await });
    client.write_all(&[0]).await.unwrap(); // one byte of the flags, then nothing
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::HandshakeTimeout(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_by_the_write_deadline() {
    let mut config = config(Arc::new(MemoryBackend::new(4 * MIB as u64)));
    config.write_timeout = Duration::from_secs(10);
    let service = Service::new(config).unwrap();
    // A small pipe: the replies cannot all fit, and the client never reads them.
    let (mut client, server) = tokio::io::duplex(64 << 10);
    let task = tokio::spawn(async move { service.serve_stream(server).await });
    negotiate(&mut client).await;
    for handle in 0..8 {
        client
            .write_all(&request(cmd::READ, handle, 0, MIB as u32))
            .await
            .unwrap();
    }
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::WriteTimeout(_)), "{err}");
}

#[tokio::test]
async fn a_cache_request_holds_its_buffer_in_the_budget() {
    let gate = Arc::new(Gate::new(MemoryBackend::new(8 * MIB as u64), false));
    let service = Service::new(config(gate.clone())).unwrap();
    let (mut client, server) = tokio::io::duplex(64 << 10);
    let probe = service.clone();
    tokio::spawn(async move { service.serve_stream(server).await });
    negotiate(&mut client).await;
    client
        .write_all(&request(cmd::CACHE, 1, 0, 8 * MIB as u32))
        .await
        .unwrap();
    // The cache reads (held at the closed gate) through one 1 MiB buffer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.memory_in_use() != MIB {
        assert!(Instant::now() < deadline, "in use: {}", probe.memory_in_use());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.open();
    let mut reply = [0u8; wire::STRUCTURED_REPLY_HEADER_LEN];
    client.read_exact(&mut reply).await.unwrap();
    while probe.memory_in_use() != 0 {
        assert!(
            Instant::now() < deadline,
            "not released: {}",
            probe.memory_in_use()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_memory_budget_holds_across_connections() {
    let gate = Arc::new(Gate::new(MemoryBackend::new(8 * MIB as u64), false));
    let mut config = config(gate.clone());
    config.memory_budget = 2 * MIB;
    let service = Service::new(config).unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut client, server) = tokio::io::duplex(8 * MIB);
        let service = service.clone();
        tokio::spawn(async move { service.serve_stream(server).await });
        negotiate(&mut client).await;
        // Each connection alone may hold 4 MiB; together they get 2 MiB.
        for handle in 0..2 {
            client
                .write_all(&request(cmd::READ, handle, 0, MIB as u32))
                .await
                .unwrap();
        }
        clients.push(client);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.memory_in_use() < 2 * MIB {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.memory_in_use(), 2 * MIB, "over the server-wide budget");
    gate.open();
    // Every read is served in the end.
    for client in &mut clients {
        for _ in 0..2 {
            let mut head = [0u8; wire::STRUCTURED_REPLY_HEADER_LEN + 8];
            client.read_exact(&mut head).await.unwrap();
            let mut data = vec![0u8; MIB];
            client.read_exact(&mut data).await.unwrap();
        }
    }
}

#[tokio::test]
async fn shutdown_answers_negotiating_clients_with_err_shutdown() {
    let service = Service::new(config(Arc::new(MemoryBackend::new(4096)))).unwrap();
    let (mut client, server) = tokio::io::duplex(64 << 10);
    let handler = service.clone();
    let task = tokio::spawn(async move { handler.serve_stream(server).await });
    let mut greeting = [0u8; wire::GREETING_LEN];
    client.read_exact(&mut greeting).await.unwrap();
    service.shutdown();
    let mut out = BytesMut::new();
    out.extend_from_slice(&wire::client_flags::FIXED_NEWSTYLE.to_be_bytes());
    codec::encode_option(&mut out, opt::LIST, &[]);
    client.write_all(&out).await.unwrap();
    let mut head = [0u8; wire::OPTION_REPLY_HEADER_LEN];
    client.read_exact(&mut head).await.unwrap();
    let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
    assert_eq!(reply, rep::ERR_SHUTDOWN);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_answers_waiting_requests_with_eshutdown() {
    let gate = Arc::new(Gate::new(MemoryBackend::new(8 * MIB as u64), false));
    let mut config = config(gate.clone());
    config.max_in_flight = 1;
    let service = Service::new(config).unwrap();
    let (mut client, server) = tokio::io::duplex(8 * MIB);
    let handler = service.clone();
    let task = tokio::spawn(async move { handler.serve_stream(server).await });
    negotiate(&mut client).await;
    // The first read holds the only slot (at the closed gate); the second waits for it.
    client.write_all(&request(cmd::READ, 1, 0, 4096)).await.unwrap();
    client.write_all(&request(cmd::READ, 2, 0, 4096)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.memory_in_use() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    service.shutdown();
    let mut head = [0u8; wire::STRUCTURED_REPLY_HEADER_LEN];
    client.read_exact(&mut head).await.unwrap();
    let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut payload = vec![0u8; len as usize];
    client.read_exact(&mut payload).await.unwrap();
    assert_eq!(handle, 2);
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        errno::ESHUTDOWN
    );
    // The read in flight still completes once the backend answers.
    gate.open();
    let mut head = [0u8; wire::STRUCTURED_REPLY_HEADER_LEN + 8];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), 1);
    let mut data = [0u8; 4096];
    client.read_exact(&mut data).await.unwrap();
    task.await.unwrap().unwrap();
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

/// Many abusive clients at once (never reading replies, stalled handshakes, huge write
/// headers, connections beyond the cap): a well-behaved client is still served, the server's
/// memory stays within its budget, and shutdown finishes within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_cannot_starve_a_good_one_or_exhaust_memory() {
    let backend: SharedBackend = Arc::new(MemoryBackend::new(64 * MIB as u64));
    let mut config = ServerConfig::new(vec![Export::new("disk", backend.clone())]);
    config.max_request = 4 * MIB as u32;
    config.max_in_flight_bytes = 16 * MIB;
    config.memory_budget = 32 * MIB;
    config.max_connections = 48;
    config.handshake_timeout = Duration::from_secs(3);
    config.write_timeout = Duration::from_secs(2);
    config.shutdown_grace = Duration::from_secs(2);
    let budget = config.memory_budget;
    let server = Server::bind_tcp(config, "127.0.0.1:0").await.unwrap();
    let uri = server.uri("disk");
    let addr = match server.local_addr() {
        r3map_nbd::ListenAddr::Tcp(addr) => *addr,
        other => panic!("{other}"),
    };
    let service = server.service().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let baseline = rss_bytes();
    let mut abusers = Vec::new();
    // Never read: pipeline far more read data than any budget.
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        negotiate(&mut stream).await;
        for handle in 0..64 {
            stream
                .write_all(&request(cmd::READ, handle, 0, 4 * MIB as u32))
                .await
                .unwrap();
        }
        abusers.push(stream);
    }
    // Stalled handshakes.
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[0]).await.unwrap();
        abusers.push(stream);
    }
    // Huge write headers whose payload never comes.
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        negotiate(&mut stream).await;
        stream
            .write_all(&request(cmd::WRITE, 1, 0, u32::MAX))
            .await
            .unwrap();
        stream.write_all(&[7u8; 64 << 10]).await.unwrap();
        abusers.push(stream);
    }
    // The good client: served despite all of the above.
    let started = Instant::now();
    let client = r3map_nbd::Client::connect(&uri, Default::default())
        .await
        .unwrap();
    // Beyond the cap (48 = 40 abusers + the good client + 7): refused at once, not queued.
    let mut refused = 0;
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            refused += 1;
        } else {
            abusers.push(stream);
        }
    }
    assert!(
        refused >= 8,
        "only {refused} connections beyond the cap were refused"
    );
    let data = common::random_bytes(3, 2 * MIB);
    client.write_at(MIB as u64, &data).await.unwrap();
    let mut back = vec![0u8; 2 * MIB];
    client.read_at(MIB as u64, &mut back).await.unwrap();
    assert!(back == data, "the good client read wrong data");
    let served_in = started.elapsed();
    assert!(service.memory_in_use() <= budget);
    let grown = rss_bytes().saturating_sub(baseline);
    assert!(
        grown < budget + 48 * MIB,
        "RSS grew by {} MiB with a {} MiB budget",
        grown / MIB,
        budget / MIB
    );
    // Shutdown with abusers still connected ends within the grace (plus slack).
    let stopping = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(6), serving)
        .await
        .expect("shutdown hung")
        .unwrap()
        .unwrap();
    eprintln!(
        "good client served in {served_in:?}; RSS grew {} MiB; shutdown took {:?}",
        grown / MIB,
        stopping.elapsed()
    );
    drop(abusers);
    drop(client);
}
