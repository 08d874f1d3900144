//! The Backend services over a real loopback connection: every call round trips, the client
//! behaves like a `Vec<u8>` (streamed and compressed, and as against a Go peer), bad requests
//! get clear statuses, and work is bounded.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;
use r3map_core::{testing, Backend, Error, MemoryBackend, SharedBackend};
use r3map_grpc::limits::{MAX_CHUNK, MAX_MESSAGE};
use r3map_grpc::pb::ext::backend_extension_client::BackendExtensionClient;
use r3map_grpc::pb::ext::{Chunk, Encoding, Range, ReadChunksArgs};
use r3map_grpc::pb::mount::backend_client::BackendClient;
use r3map_grpc::pb::mount::{ReadAtArgs, SyncArgs, WriteAtArgs};
use r3map_grpc::{ClientOptions, Export, GrpcBackend, GrpcServer, ServerLimits};
use tokio::sync::Notify;
use tonic::Code;

fn memory(size: u64) -> SharedBackend {
    Arc::new(MemoryBackend::new(size))
}

fn options(compress: bool, piece: u64) -> ClientOptions {
    ClientOptions {
        compress,
        piece,
        ..ClientOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Any workload through client and server behaves like a `Vec<u8>`: streamed with and
    /// without compression, and with the Go calls only (as against a Go server).
    #[test]
    fn client_and_server_match_the_model(
        size in 1u64..300_000,
        ops in testing::ops_strategy(70_000, 30),
        mode in 0u8..3,
    ) {
        testing::block_on(async {
            let backend = memory(size);
            let mut server = GrpcServer::new(vec![Export::new("m", backend.clone())]);
            if mode == 2 {
                server = server.without_extension();
            }
            let running = common::serve(server).await;
            let client = GrpcBackend::connect(
                &running.addr(),
                "m",
                ClientOptions { size: Some(size), ..options(mode == 0, 4096) },
            )
            .await
            .unwrap();
            prop_assert_eq!(client.has_extension(), mode != 2);
            testing::check_against_model(&client, 1, &ops).await?;
            let through_client = common::contents(&client).await;
            prop_assert_eq!(common::contents(&*backend).await, through_client);
            drop(client);
            running.stop().await;
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_connection_match_the_model() {
    let running = common::serve(GrpcServer::new(vec![Export::new("", memory(4 << 20))])).await;
    for compress in [true, false] {
        let client = Arc::new(
            GrpcBackend::connect(&running.addr(), "", options(compress, 16 << 10))
                .await
                .unwrap(),
        );
        client.write_zeroes(0, 4 << 20).await.unwrap();
        testing::check_concurrent(client.clone(), 1, 8, 100)
            .await
            .unwrap();
    }
    running.stop().await;
}

/// The Go calls one by one, as a Go client makes them (no export metadata: the first export).
#[tokio::test]
async fn every_go_call_round_trips() {
    let backend = memory(1 << 20);
    let running = common::serve(GrpcServer::new(vec![Export::new("only", backend.clone())])).await;
    let mut go = BackendClient::connect(format!("http://{}", running.addr()))
        .await
        .unwrap();
    let written = go
        .write_at(WriteAtArgs {
            off: 1000,
            p: Bytes::from_static(b"hello from go"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.length, 13);
    let read = go
        .read_at(ReadAtArgs {
            length: 13,
            off: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((read.n, &read.p[..]), (13, &b"hello from go"[..]));
    go.sync(SyncArgs {}).await.unwrap();
    let mut buf = [0u8; 13];
    backend.read_at(1000, &mut buf).await.unwrap();
    assert_eq!(&buf, b"hello from go");
    running.stop().await;
}

#[tokio::test]
async fn every_extension_call_round_trips() {
    let backend = memory(1 << 20);
    backend.write_at(0, &vec![7u8; 1 << 20]).await.unwrap();
    let running = common::serve(GrpcServer::new(vec![Export::new("", backend.clone())])).await;
    let client = GrpcBackend::connect(&running.addr(), "", ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(client.size(), 1 << 20);
    client.trim(0, 4096).await.unwrap();
    client.write_zeroes(8192, 100).await.unwrap();
    let text = b"compressible text ".repeat(1000);
    client.write_at(20_000, &text).await.unwrap();
    let mut expected = vec![7u8; 1 << 20];
    expected[..4096].fill(0);
    expected[8192..8292].fill(0);
    expected[20_000..20_000 + text.len()].copy_from_slice(&text);
    assert_eq!(common::contents(&*backend).await, expected);
    assert_eq!(common::contents(&client).await, expected);

    // The server sends zero chunks without data and text compressed, raw when asked to.
    let mut ext = BackendExtensionClient::connect(format!("http://{}", running.addr()))
        .await
        .unwrap();
    for (accept, want) in [
        (
            vec![Encoding::Zero as i32, Encoding::Lz4 as i32],
            [Encoding::Zero, Encoding::Lz4, Encoding::Raw],
        ),
        (vec![], [Encoding::Raw, Encoding::Raw, Encoding::Raw]),
    ] {
        let chunks = read_chunks(&mut ext, &[(0, 4096), (20_000, 8192), (30_000, 10)], accept).await;
        let mut got = Vec::new();
        for chunk in chunks {
            got.push(Encoding::try_from(chunk.encoding).unwrap());
            if chunk.encoding == Encoding::Lz4 as i32 {
                assert!(
                    chunk.data.len() < 8192 / 4,
                    "lz4 did not shrink text: {}",
                    chunk.data.len()
                );
            }
        }
        assert_eq!(got, want);
    }
    running.stop().await;
}

/// `GrpcServer::compress(false)` (`r3map serve --no-compress`): text goes raw even to a client
/// that accepts lz4, zero chunks still go without data, and the data is the same.
#[tokio::test]
async fn a_server_with_compression_off_sends_raw_chunks_but_elides_zeros() {
    let backend = memory(1 << 20);
    let text = b"compressible text ".repeat(1000);
    backend.write_at(20_000, &text).await.unwrap();
    for (compress, want) in [(true, Encoding::Lz4), (false, Encoding::Raw)] {
        let running =
            common::serve(GrpcServer::new(vec![Export::new("", backend.clone())]).compress(compress)).await;
        let mut ext = BackendExtensionClient::connect(format!("http://{}", running.addr()))
            .await
            .unwrap();
        let accept = vec![Encoding::Zero as i32, Encoding::Lz4 as i32];
        let chunks = read_chunks(&mut ext, &[(0, 4096), (20_000, 8192)], accept).await;
        let [zeros, chunk] = &chunks[..] else {
            panic!("two ranges gave {} chunks", chunks.len());
        };
        assert_eq!((zeros.encoding, zeros.data.len()), (Encoding::Zero as i32, 0));
        assert_eq!(chunk.encoding, want as i32, "compress({compress})");
        let mut decoded = vec![0u8; 8192];
        r3map_grpc::chunk::decode_into(chunk, &mut decoded).unwrap();
        assert_eq!(&decoded[..], &text[..8192]);
        let client = GrpcBackend::connect(&running.addr(), "", ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(common::contents(&client).await, common::contents(&*backend).await);
        running.stop().await;
    }
}

/// Reads `(offset, length)` ranges through the extension's `ReadChunks`, accepting `accept`
/// encodings; returns every chunk of the stream, in order.
async fn read_chunks(
    ext: &mut BackendExtensionClient<tonic::transport::Channel>,
    ranges: &[(u64, u64)],
    accept: Vec<i32>,
) -> Vec<Chunk> {
    let ranges = ranges
        .iter()
        .map(|&(offset, length)| Range { offset, length })
        .collect();
    let mut stream = ext
        .read_chunks(ReadChunksArgs { ranges, accept })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks.push(chunk);
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_32_mib_chunk_travels_in_one_message() {
    let backend = memory(MAX_CHUNK + 4096);
    let running = common::serve(GrpcServer::new(vec![Export::new("", backend.clone())])).await;
    let data = testing::pattern(3, MAX_CHUNK as usize);
    let mut go = BackendClient::connect(format!("http://{}", running.addr()))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    go.write_at(WriteAtArgs {
        off: 4096,
        p: data.clone().into(),
    })
    .await
    .unwrap();
    let read = go
        .read_at(ReadAtArgs {
            length: MAX_CHUNK as i32,
            off: 4096,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.p == data, "the 32 MiB chunk came back different");
    let client = GrpcBackend::connect(&running.addr(), "", options(true, MAX_CHUNK))
        .await
        .unwrap();
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    client.read_at(4096, &mut buf).await.unwrap();
    assert!(buf == data);
    running.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let backend = memory(1 << 20);
    let running = common::serve(GrpcServer::new(vec![
        Export::new("rw", backend.clone()),
        Export {
            read_only: true,
            ..Export::new("ro", memory(4096))
        },
    ]))
    .await;
    let url = format!("http://{}", running.addr());
    let mut go = BackendClient::connect(url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(2 * MAX_MESSAGE);

    let past_end = go
        .read_at(ReadAtArgs {
            length: 10,
            off: (1 << 20) - 5,
        })
        .await;
    let status = past_end.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("past the end"), "{}", status.message());
    assert_eq!(
        code(go.read_at(ReadAtArgs { length: -1, off: 0 }).await),
        Code::InvalidArgument
    );
    let oversized = go
        .read_at(ReadAtArgs {
            length: MAX_CHUNK as i32 + 1,
            off: 0,
        })
        .await;
    let status = oversized.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("exceeds the maximum"),
        "{}",
        status.message()
    );
    assert_eq!(
        code(
            go.write_at(WriteAtArgs {
                off: (1 << 20) - 1,
                p: Bytes::from_static(b"ab")
            })
            .await
        ),
        Code::OutOfRange
    );
    // A message larger than one chunk is refused before it reaches the backend.
    let huge = go
        .write_at(WriteAtArgs {
            off: 0,
            p: vec![1u8; MAX_MESSAGE + 1].into(),
        })
        .await;
    assert!(huge.is_err());

    // Wrong-size and undecodable chunks, and too many ranges.
    let mut ext = BackendExtensionClient::connect(url).await.unwrap();
    let bad_chunks = [
        Chunk {
            offset: 0,
            length: 100,
            encoding: Encoding::Raw as i32,
            data: Bytes::from_static(b"short"),
        },
        Chunk {
            offset: 0,
            length: 100,
            encoding: Encoding::Lz4 as i32,
            data: Bytes::from_static(b"\xff\xff not lz4"),
        },
        Chunk {
            offset: 0,
            length: 5,
            encoding: Encoding::Zero as i32,
            data: Bytes::from_static(b"12345"),
        },
        Chunk {
            offset: 0,
            length: MAX_CHUNK + 1,
            encoding: Encoding::Zero as i32,
            data: Bytes::new(),
        },
        Chunk {
            offset: 0,
            length: 5,
            encoding: 42,
            data: Bytes::from_static(b"12345"),
        },
    ];
    for chunk in bad_chunks {
        let result = ext.write_chunks(futures::stream::iter([chunk.clone()])).await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{chunk:?}: {status:?}");
    }
    assert_eq!(
        common::contents(&*backend).await,
        vec![0u8; 1 << 20],
        "a refused request changed data"
    );
    let many = ReadChunksArgs {
        ranges: vec![Range { offset: 0, length: 1 }; r3map_grpc::limits::MAX_RANGES + 1],
        accept: vec![],
    };
    assert_eq!(code(ext.read_chunks(many).await), Code::InvalidArgument);

    // Read-only export, unknown export: typed errors through our client.
    let ro = GrpcBackend::connect(&running.addr(), "ro", ClientOptions::default())
        .await
        .unwrap();
    assert!(matches!(ro.write_at(0, b"x").await, Err(Error::ReadOnly)));
    let mut go_ro = BackendClient::connect(format!("http://{}", running.addr()))
        .await
        .unwrap();
    let mut request = tonic::Request::new(WriteAtArgs {
        off: 0,
        p: Bytes::from_static(b"x"),
    });
    request
        .metadata_mut()
        .insert("r3map-export", "ro".parse().unwrap());
    assert_eq!(code(go_ro.write_at(request).await), Code::PermissionDenied);
    let unknown = GrpcBackend::connect(&running.addr(), "nope", ClientOptions::default()).await;
    assert!(
        matches!(unknown, Err(Error::Remote(ref m)) if m.contains("no export named")),
        "{unknown:?}"
    );
    let rw = GrpcBackend::connect(&running.addr(), "rw", ClientOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        rw.read_at((1 << 20) - 1, &mut [0; 2]).await,
        Err(Error::OutOfBounds { .. })
    ));
    running.stop().await;
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map(|_| ()).unwrap_err().code()
}

/// A backend whose reads wait until released, counting how many are in flight.
struct Held {
    inner: SharedBackend,
    in_flight: AtomicUsize,
    /// The most reads ever in flight at once.
    peak: AtomicUsize,
    entered: Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl Backend for Held {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> r3map_core::Result<()> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.entered.notify_waiters();
        let _released = self.release.acquire().await.unwrap();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> r3map_core::Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> r3map_core::Result<()> {
        Ok(())
    }
}

impl Held {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Held {
            inner: memory(size),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            entered: Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    /// Waits until `n` reads are held.
    async fn wait_for(&self, n: usize) {
        loop {
            let entered = self.entered.notified();
            if self.in_flight.load(Ordering::SeqCst) >= n {
                return;
            }
            entered.await;
        }
    }
}

/// Ten reads against a bound of three: three are held in the backend, the rest wait; once
/// released, all finish and at no moment were more than three in the backend.
async fn ten_reads_never_exceed(bound: usize, held: &Held, reads: Vec<tokio::task::JoinHandle<()>>) {
    held.wait_for(bound).await;
    // Give a read past the bound the chance to get in (it would be counted by `peak`).
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(held.in_flight.load(Ordering::SeqCst), bound);
    held.release.add_permits(100);
    for read in reads {
        read.await.unwrap();
    }
    assert_eq!(
        held.peak.load(Ordering::SeqCst),
        bound,
        "more calls ran at once than the bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_bounded_server_wide() {
    let held = Held::new(1 << 20);
    let limits = ServerLimits {
        server_wide: 3,
        ..ServerLimits::default()
    };
    let running = common::serve(GrpcServer::new(vec![Export::new("", held.clone())]).limits(limits)).await;
    // One connection per call, so the per-connection bound is not what stops them.
    let reads = (0..10u64)
        .map(|i| {
            let addr = running.addr();
            tokio::spawn(async move {
                let client = GrpcBackend::connect(&addr, "", ClientOptions::default())
                    .await
                    .unwrap();
                let mut buf = vec![0u8; 4096];
                client.read_at(i * 4096, &mut buf).await.unwrap();
            })
        })
        .collect();
    ten_reads_never_exceed(3, &held, reads).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_bounded_per_connection() {
    let held = Held::new(1 << 20);
    let limits = ServerLimits {
        per_connection: 3,
        ..ServerLimits::default()
    };
    let running = common::serve(GrpcServer::new(vec![Export::new("", held.clone())]).limits(limits)).await;
    // One client, one connection, ten calls at once.
    let client = Arc::new(
        GrpcBackend::connect(&running.addr(), "", ClientOptions::default())
            .await
            .unwrap(),
    );
    let reads = (0..10u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                client.read_at(i * 4096, &mut buf).await.unwrap();
            })
        })
        .collect();
    ten_reads_never_exceed(3, &held, reads).await;
    running.stop().await;
}
