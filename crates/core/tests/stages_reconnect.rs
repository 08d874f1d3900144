//! The reconnect stage: outages are ridden out, bounded by the request timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use r3map_core::stages::{Connector, ReconnectOptions, Reconnecting};
use r3map_core::{Backend, Error, MemoryBackend, Result, SharedBackend};

/// A server that can go down: going down kills every open connection (like a restart), and
/// new connections are refused until it is up again. The data survives (it is on its disk).
struct Server {
    data: Arc<MemoryBackend>,
    up: AtomicBool,
    epoch: AtomicU64,
    connects: AtomicU64,
    /// Connections numbered below this never answer (a server that froze with its TCP
    /// connections still open, e.g. stopped with SIGSTOP).
    hang_below: AtomicU64,
    /// Requests that reached the server: (connection number, operation).
    log: Mutex<Vec<(u64, &'static str)>>,
    /// Connections the client aborted.
    aborted: Mutex<Vec<u64>>,
    /// Every flush is answered with an error (a disk that cannot sync), the connection stays.
    flush_fails: AtomicBool,
    /// The read unit new connections report (0: none).
    read_unit: AtomicU64,
    /// Added to the size new connections report (a server restarted with another export).
    size_change: AtomicU64,
}

impl Server {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Arc::new(MemoryBackend::new(size)),
            up: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            hang_below: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            aborted: Mutex::new(Vec::new()),
            flush_fails: AtomicBool::new(false),
            read_unit: AtomicU64::new(0),
            size_change: AtomicU64::new(0),
        })
    }
    fn go_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
    fn come_up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
    /// Every connection open now stops answering; later connections work.
    fn freeze_open_connections(&self) {
        let next = self.connects.load(Ordering::SeqCst) + 1;
        self.hang_below.store(next, Ordering::SeqCst);
    }
    fn connector(self: &Arc<Self>) -> Connector {
        let server = self.clone();
        Arc::new(move || {
            let server = server.clone();
            Box::pin(async move {
                let number = server.connects.fetch_add(1, Ordering::SeqCst) + 1;
                if !server.up.load(Ordering::SeqCst) {
                    return Err(
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "server down").into(),
                    );
                }
                let epoch = server.epoch.load(Ordering::SeqCst);
                let read_unit = Some(server.read_unit.load(Ordering::SeqCst)).filter(|&unit| unit > 0);
                let size = server.data.size() + server.size_change.load(Ordering::SeqCst);
                Ok(Arc::new(Connection {
                    server,
                    epoch,
                    number,
                    read_unit,
                    size,
                }) as SharedBackend)
            })
        })
    }
}

struct Connection {
    server: Arc<Server>,
    epoch: u64,
    number: u64,
    read_unit: Option<u64>,
    size: u64,
}

impl Connection {
    async fn check(&self, operation: &'static str) -> Result<()> {
        self.server.log.lock().unwrap().push((self.number, operation));
        if self.number < self.server.hang_below.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.server.epoch.load(Ordering::SeqCst) != self.epoch {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection lost").into());
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Connection {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_alignment(&self) -> Option<u64> {
        self.read_unit
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check("read").await?;
        self.server.data.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check("write").await?;
        self.server.data.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.check("flush").await?;
        if self.server.flush_fails.load(Ordering::SeqCst) {
            return Err(Error::Remote("flush failed: EIO".into()));
        }
        Ok(())
    }
    fn abort_connection(&self) {
        self.server.aborted.lock().unwrap().push(self.number);
    }
}

fn options(timeout_ms: u64) -> ReconnectOptions {
    ReconnectOptions {
        request_timeout: Duration::from_millis(timeout_ms),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..ReconnectOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_an_outage_wait_and_succeed_after_it() {
    let server = Server::new(4096);
    let remote = Arc::new(
        Reconnecting::connect(server.connector(), options(10_000))
            .await
            .unwrap(),
    );
    remote.write_at(0, b"before").await.unwrap();
    server.go_down();
    let writers: Vec<_> = (0..16u64)
        .map(|i| {
            let remote = remote.clone();
            tokio::spawn(async move { remote.write_at(100 + i * 10, &[i as u8 + 1; 10]).await })
        })
        .collect();
    // Wait until the writers have hit the outage (a reconnect was attempted), then bring the
    // server back.
    tokio::time::timeout(Duration::from_secs(60), async {
        while server.connects.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the writers never tried to reconnect");
    assert!(!remote.is_connected());
    server.come_up();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let mut buf = [0u8; 6];
    remote.read_at(0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"before");
    for i in 0..16u64 {
        let mut piece = [0u8; 10];
        remote.read_at(100 + i * 10, &mut piece).await.unwrap();
        assert_eq!(piece, [i as u8 + 1; 10]);
    }
    assert!(remote.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_stays_down_fails_requests_after_the_timeout() {
    let server = Server::new(4096);
    let remote = Reconnecting::connect(server.connector(), options(300))
        .await
        .unwrap();
    server.go_down();
    let started = std::time::Instant::now();
    let result = remote.read_at(0, &mut [0; 16]).await;
    let elapsed = started.elapsed();
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert_eq!(
        result.unwrap_err().errno(),
        5,
        "a timeout must reach the kernel as EIO"
    );
    // Not before the deadline (timers never fire early); that it returned at all shows that it
    // does not wait forever (no upper bound: a loaded machine may be late by any amount).
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(
        server.connects.load(Ordering::SeqCst) > 2,
        "it never retried connecting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_failing_requests_cause_one_reconnect() {
    let server = Server::new(1 << 20);
    let options = options(10_000);
    let reconnects = options.reconnects.clone();
    let remote = Arc::new(Reconnecting::connect(server.connector(), options).await.unwrap());
    assert_eq!(
        reconnects.load(Ordering::SeqCst),
        0,
        "the first connection is no reconnect"
    );
    server.go_down();
    server.come_up();
    let readers: Vec<_> = (0..64u64)
        .map(|i| {
            let remote = remote.clone();
            tokio::spawn(async move { remote.read_at(i * 4096, &mut [0; 4096]).await })
        })
        .collect();
    for r in readers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(
        server.connects.load(Ordering::SeqCst),
        2,
        "one initial connection and one reconnect"
    );
    assert_eq!(
        reconnects.load(Ordering::SeqCst),
        1,
        "the reconnect counter counts the one reconnect"
    );
}

/// A server that stops answering on an open connection: every request in flight fails at its
/// deadline (EIO), measured on a paused clock, the connection is dropped and made anew once,
/// and the next request works on the new connection.
#[tokio::test(start_paused = true)]
async fn requests_in_flight_on_a_frozen_connection_fail_at_their_deadline_and_it_reconnects() {
    let server = Server::new(1 << 16);
    let timeout = Duration::from_secs(5);
    let options = ReconnectOptions {
        request_timeout: timeout,
        ..options(0)
    };
    let remote = Arc::new(
        Reconnecting::connect_to("test-server", server.connector(), options)
            .await
            .unwrap(),
    );
    remote.write_at(0, b"acknowledged").await.unwrap();
    server.freeze_open_connections();
    let started = tokio::time::Instant::now();
    let requests: Vec<_> = (0..8u64)
        .map(|i| {
            let remote = remote.clone();
            tokio::spawn(async move {
                let result = if i % 2 == 0 {
                    remote.write_at(4096 * i, &[1; 4096]).await
                } else {
                    remote.read_at(4096 * i, &mut [0; 4096]).await
                };
                (result, tokio::time::Instant::now())
            })
        })
        .collect();
    for request in requests {
        let (result, ended) = request.await.unwrap();
        assert!(
            matches!(result, Err(Error::Timeout(t)) if t == timeout),
            "{result:?}"
        );
        assert_eq!(result.unwrap_err().errno(), libc::EIO);
        let took = ended - started;
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(100),
            "a request in flight failed after {took:?}, not at its {timeout:?} deadline"
        );
    }
    let mut buf = [0u8; 12];
    remote.read_at(0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"acknowledged");
    assert_eq!(
        server.connects.load(Ordering::SeqCst),
        2,
        "eight timed-out requests must cause exactly one reconnect"
    );
    assert!(remote.is_connected());
}

/// Ordering across reconnects, client side: a connection given up is aborted (nothing sent on
/// it arrives later), and a new connection carries a flush before any request, so a server
/// that finishes earlier writes before a flush has settled the old connection's writes.
#[tokio::test(start_paused = true)]
async fn a_lost_connection_is_aborted_and_the_next_one_is_flushed_before_it_carries_requests() {
    let server = Server::new(1 << 16);
    let remote = Arc::new(
        Reconnecting::connect(server.connector(), options(5_000))
            .await
            .unwrap(),
    );
    remote.write_at(0, b"first").await.unwrap();
    server.freeze_open_connections();
    let result = remote.write_at(0, b"in doubt").await;
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    remote.write_at(0, b"newer").await.unwrap();
    assert_eq!(
        *server.aborted.lock().unwrap(),
        vec![1],
        "the frozen connection was aborted"
    );
    let log = server.log.lock().unwrap().clone();
    let on_second: Vec<_> = log.iter().filter(|(c, _)| *c == 2).map(|(_, op)| *op).collect();
    assert_eq!(on_second, ["flush", "write"], "{log:?}");
}

/// A flush answered with an error still passed the barrier (the server answered it, after the
/// writes before it): a remote whose flushes fail keeps serving reads and writes after a
/// reconnect, and the flush's own error reaches its caller.
#[tokio::test(start_paused = true)]
async fn a_remote_whose_flushes_fail_still_serves_after_a_reconnect() {
    let server = Server::new(1 << 16);
    let remote = Arc::new(
        Reconnecting::connect(server.connector(), options(5_000))
            .await
            .unwrap(),
    );
    remote.write_at(0, b"first").await.unwrap();
    server.flush_fails.store(true, Ordering::SeqCst);
    server.freeze_open_connections();
    let result = remote.write_at(0, b"in doubt").await;
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    remote.write_at(0, b"newer").await.unwrap();
    let mut buf = [0u8; 5];
    remote.read_at(0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"newer");
    let flushed = remote.sync().await;
    assert!(matches!(flushed, Err(Error::Remote(_))), "{flushed:?}");
    let log = server.log.lock().unwrap().clone();
    let on_second: Vec<_> = log.iter().filter(|(c, _)| *c == 2).map(|(_, op)| *op).collect();
    assert_eq!(on_second, ["flush", "write", "read", "flush"], "{log:?}");
}

/// A write whose caller gives up on it before its reply (its future dropped, as the pusher
/// does with the pushes of a failed round) may still be applied later: its connection is given
/// up, and the next request runs on a new connection after a flush.
#[tokio::test(start_paused = true)]
async fn an_abandoned_write_gives_up_its_connection() {
    let server = Server::new(1 << 16);
    let remote = Arc::new(
        Reconnecting::connect(server.connector(), options(60_000))
            .await
            .unwrap(),
    );
    server.freeze_open_connections();
    let abandoned = tokio::time::timeout(Duration::from_millis(10), remote.write_at(0, b"old")).await;
    assert!(abandoned.is_err(), "the frozen connection does not answer");
    let read = tokio::time::timeout(Duration::from_millis(10), remote.read_at(0, &mut [0; 3])).await;
    assert!(
        matches!(read, Ok(Ok(()))),
        "the next request runs on a new connection: {read:?}"
    );
    assert_eq!(*server.aborted.lock().unwrap(), vec![1]);
    let log = server.log.lock().unwrap().clone();
    let on_second: Vec<_> = log.iter().filter(|(c, _)| *c == 2).map(|(_, op)| *op).collect();
    assert_eq!(on_second, ["flush", "read"], "{log:?}");
}

/// An abandoned read says nothing about the remote's content: the connection is kept.
#[tokio::test(start_paused = true)]
async fn an_abandoned_read_keeps_its_connection() {
    let server = Server::new(1 << 16);
    let remote = Reconnecting::connect(server.connector(), options(60_000))
        .await
        .unwrap();
    server.freeze_open_connections();
    let abandoned = tokio::time::timeout(Duration::from_millis(10), remote.read_at(0, &mut [0; 3])).await;
    assert!(abandoned.is_err());
    assert!(remote.is_connected());
    assert!(server.aborted.lock().unwrap().is_empty());
    assert_eq!(server.connects.load(Ordering::SeqCst), 1);
}

/// A server that comes back with another size, or with a read unit our callers' alignment does
/// not satisfy, is not the remote we had: its connections are refused (aborted, nothing sent on
/// them), requests fail at their deadline instead of reading wrong bytes, and the remote is used
/// again once a connection of the first shape comes. A smaller read unit that divides ours, or
/// none, is fine.
#[tokio::test(start_paused = true)]
async fn a_remote_that_comes_back_changed_is_not_used() {
    let server = Server::new(1 << 16);
    server.read_unit.store(4096, Ordering::SeqCst);
    let remote = Reconnecting::connect(server.connector(), options(1_000))
        .await
        .unwrap();
    assert_eq!(remote.read_alignment(), Some(4096));
    remote.write_at(0, b"kept").await.unwrap();
    for (size_change, read_unit) in [(4096, 4096), (0, 8192), (0, 3072)] {
        server.size_change.store(size_change, Ordering::SeqCst);
        server.read_unit.store(read_unit, Ordering::SeqCst);
        server.go_down();
        server.come_up();
        let tried_before = server.connects.load(Ordering::SeqCst);
        let result = remote.read_at(0, &mut [0; 4096]).await;
        assert!(
            matches!(result, Err(Error::Timeout(_))),
            "size +{size_change}, read unit {read_unit}: {result:?}"
        );
        let tried = server.connects.load(Ordering::SeqCst) - tried_before;
        assert!(tried >= 2, "it kept trying to reconnect ({tried} connections)");
        let log = server.log.lock().unwrap().clone();
        assert!(
            log.iter().all(|(c, _)| *c <= tried_before),
            "a changed connection carried requests: {log:?}"
        );
        let aborted = server.aborted.lock().unwrap().len() as u64;
        let connects = server.connects.load(Ordering::SeqCst);
        assert_eq!(
            aborted, connects,
            "the lost connection and every changed one are aborted"
        );
    }
    server.size_change.store(0, Ordering::SeqCst);
    server.read_unit.store(512, Ordering::SeqCst);
    let mut buf = [0u8; 4];
    remote.read_at(0, &mut buf).await.unwrap();
    assert_eq!(
        &buf, b"kept",
        "a connection of the first shape (a smaller unit dividing ours) is used"
    );
    assert_eq!(remote.size(), 1 << 16);
    assert_eq!(remote.read_alignment(), Some(4096));
}

#[tokio::test]
async fn refusals_are_not_retried_and_the_first_connection_must_succeed() {
    let server = Server::new(100);
    let remote = Reconnecting::connect(server.connector(), options(10_000))
        .await
        .unwrap();
    let result = remote.read_at(90, &mut [0; 20]).await;
    assert!(matches!(result, Err(Error::OutOfBounds { .. })), "{result:?}");
    assert_eq!(server.connects.load(Ordering::SeqCst), 1);
    server.go_down();
    assert!(Reconnecting::connect(server.connector(), options(100))
        .await
        .is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Any workload through the reconnect stage matches the model while the server goes down
    /// and comes back between operations (a background task brings it back each time).
    #[test]
    fn workload_matches_model_across_outages(
        ops in r3map_core::testing::ops_strategy(3000, 30),
        outages in proptest::collection::vec(proptest::prelude::any::<bool>(), 30),
    ) {
        r3map_core::testing::block_on(async {
            let server = Server::new(10_000);
            let remote = Reconnecting::connect(server.connector(), options(10_000)).await.unwrap();
            let mut model = vec![0u8; 10_000];
            for (op, outage) in ops.iter().zip(outages.iter().chain(std::iter::repeat(&false))) {
                if *outage {
                    server.go_down();
                    let server = server.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        server.come_up();
                    });
                }
                r3map_core::testing::run_ops(&remote, &mut model, 0..10_000, 1, std::slice::from_ref(op)).await?;
            }
            r3map_core::testing::check_content(&remote, &model).await
        })?;
    }
}
