//! Reconnect: keeps a remote usable across connection loss. A request that fails because the
//! connection is gone waits for a new connection (made in the background with exponential
//! backoff) and is retried, up to a deadline; then it fails with `Error::Timeout` (EIO to the
//! kernel), so nothing hangs forever.
//!
//! The deadline covers the whole request: waiting for a connection *and* the request in flight.
//! A remote that keeps its connection open but stops answering (a frozen server) fails the
//! request at its deadline too, and the connection is dropped and made anew, since a
//! connection that let a request hang cannot be trusted with the next one. Each lost
//! connection is logged once, with the remote's address.
//!
//! Retrying is safe because every `Backend` operation is idempotent: writing the same bytes to
//! the same place twice has the same effect as once.
//!
//! Ordering across reconnects: a write whose try ended without a reply (the connection was
//! lost, its deadline passed, or its caller gave up on it) may still be applied by the server
//! later, after newer writes of the same bytes on the next connection. So a connection given up
//! is aborted at once (reset, so nothing more of it is sent), and a new connection is handed
//! out only after a flush on it was answered: a server that completes every write it received
//! before a flush, on any connection, has then applied the old write or will never apply it
//! (see ARCHITECTURE.md, "Ordering across reconnects", for the argument and its limits).
//!
//! A remote that comes back must be the same remote: a new connection whose size differs from
//! the first one's, or whose read unit does not divide the first one's (callers align reads to
//! the first), is refused and the reconnect loop tries again, so a server restarted with
//! another export or another block size yields errors, never reads of the wrong bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Backend, Error, Extent, Result, SharedBackend};

/// Makes a new connection to the remote.
pub type Connector =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<SharedBackend>> + Send>> + Send + Sync>;

/// Reconnection settings.
#[derive(Debug, Clone)]
pub struct ReconnectOptions {
    /// How long one request may take, from its start (waiting for a connection, reconnects and
    /// the request in flight), before it fails with `Error::Timeout`.
    pub request_timeout: Duration,
    /// First pause between connection attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between connection attempts.
    pub max_backoff: Duration,
    /// Counts connections re-established after a loss. Clones of these options share it, so
    /// a process can add up the reconnects of all its remotes (its metrics do).
    pub reconnects: Arc<AtomicU64>,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            reconnects: Arc::default(),
        }
    }
}

/// The current connection, numbered so a failure reported twice causes one reconnect.
#[derive(Clone)]
enum Link {
    Up { generation: u64, backend: SharedBackend },
    Down,
}

/// What a remote must keep across reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    size: u64,
    read_alignment: Option<u64>,
}

impl Shape {
    fn of(backend: &SharedBackend) -> Self {
        Self {
            size: backend.size(),
            read_alignment: backend.read_alignment(),
        }
    }

    /// Whether a connection of shape `new` can stand in for one of this shape: the same size,
    /// and every read aligned to our unit is aligned to its unit.
    fn accepts(&self, new: &Shape) -> bool {
        let aligned = match (self.read_alignment, new.read_alignment) {
            (_, None | Some(0 | 1)) => true,
            (Some(ours), Some(theirs)) => ours % theirs == 0,
            (None, Some(_)) => false,
        };
        self.size == new.size && aligned
    }
}

struct Shared {
    /// The remote's address, for messages.
    address: String,
    /// The first connection's shape; every later connection must match it.
    shape: Shape,
    /// Where reconnects run (also when a request is abandoned outside a task).
    runtime: tokio::runtime::Handle,
    connector: Connector,
    options: ReconnectOptions,
    link: watch::Sender<Link>,
}

/// A remote that reconnects on connection loss.
pub struct Reconnecting {
    shared: Arc<Shared>,
}

impl Reconnecting {
    /// Connects once (the first connection must succeed, so a wrong address fails at once),
    /// then keeps the remote connected.
    pub async fn connect(connector: Connector, options: ReconnectOptions) -> Result<Self> {
        Self::connect_to("the remote", connector, options).await
    }

    /// Like [`Reconnecting::connect`], naming the remote's `address` in messages.
    pub async fn connect_to(
        address: impl Into<String>,
        connector: Connector,
        options: ReconnectOptions,
    ) -> Result<Self> {
        let backend = connector().await?;
        let shape = Shape::of(&backend);
        let (link, _) = watch::channel(Link::Up {
            generation: 0,
            backend,
        });
        Ok(Self {
            shared: Arc::new(Shared {
                address: address.into(),
                shape,
                runtime: tokio::runtime::Handle::current(),
                connector,
                options,
                link,
            }),
        })
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.shared.link.borrow(), Link::Up { .. })
    }

    fn attempt(&self) -> Attempt<'_> {
        Attempt {
            shared: &self.shared,
            link: self.shared.link.subscribe(),
            deadline: Instant::now() + self.shared.options.request_timeout,
        }
    }
}

/// One request's tries: hands out the current connection, waiting for a reconnect while the
/// remote is down, until the request's deadline.
struct Attempt<'a> {
    shared: &'a Arc<Shared>,
    link: watch::Receiver<Link>,
    deadline: Instant,
}

impl Attempt<'_> {
    async fn connection(&mut self) -> Result<(u64, SharedBackend)> {
        loop {
            if let Link::Up { generation, backend } = &*self.link.borrow_and_update() {
                return Ok((*generation, backend.clone()));
            }
            if tokio::time::timeout_at(self.deadline, self.link.changed())
                .await
                .is_err()
            {
                return Err(Error::Timeout(self.shared.options.request_timeout));
            }
        }
    }

    /// Runs one try of a request on connection `generation` until the request's deadline. A
    /// try still in flight at the deadline fails with `Error::Timeout` and drops the
    /// connection.
    async fn in_flight<T>(&self, generation: u64, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout_at(self.deadline, call).await {
            Ok(result) => result,
            Err(_) => {
                let timeout = self.shared.options.request_timeout;
                Shared::connection_lost(
                    self.shared,
                    generation,
                    format_args!("a request got no answer within {timeout:?}"),
                );
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// Decides what to do with a request's result: `None` = retry on a new connection.
    fn settle<T>(&self, generation: u64, result: Result<T>) -> Option<Result<T>> {
        match result {
            Err(err) if err.is_connection_loss() => {
                Shared::connection_lost(self.shared, generation, format_args!("{err}"));
                if Instant::now() >= self.deadline {
                    return Some(Err(Error::Timeout(self.shared.options.request_timeout)));
                }
                None
            }
            result => Some(result),
        }
    }
}

/// A try of a write in flight: if it is abandoned before its outcome is known (its future
/// dropped), the write may still be applied later, so its connection is given up (and the next
/// one passes a flush first) before any newer write can be sent.
struct WriteInFlight<'a> {
    shared: &'a Arc<Shared>,
    generation: u64,
}

impl Drop for WriteInFlight<'_> {
    fn drop(&mut self) {
        Shared::connection_lost(
            self.shared,
            self.generation,
            format_args!("a write was abandoned before its reply"),
        );
    }
}

/// Retries `$call` (an expression using `$backend`) on connection loss, until the deadline.
/// `write` says whether `$call` changes the remote (see [`WriteInFlight`]).
macro_rules! retried {
    ($self:ident, write: $write:expr, |$backend:ident| $call:expr) => {{
        let mut attempt = $self.attempt();
        loop {
            let (generation, $backend) = attempt.connection().await?;
            let in_flight = $write.then(|| WriteInFlight {
                shared: attempt.shared,
                generation,
            });
            let result = attempt.in_flight(generation, $call).await;
            std::mem::forget(in_flight);
            if let Some(result) = attempt.settle(generation, result) {
                break result;
            }
        }
    }};
}

impl Shared {
    /// Marks connection `generation` as lost (dropping it) and starts reconnecting, unless that
    /// already happened: the first request to see the loss logs it, the others stay quiet.
    fn connection_lost(shared: &Arc<Self>, generation: u64, why: std::fmt::Arguments<'_>) {
        let mut lost = None;
        shared.link.send_if_modified(|link| match link {
            Link::Up {
                generation: current, ..
            } if *current == generation => {
                lost = match std::mem::replace(link, Link::Down) {
                    Link::Up { backend, .. } => Some(backend),
                    Link::Down => None,
                };
                true
            }
            _ => false,
        });
        if let Some(backend) = lost {
            // Requests still holding it fail now, and nothing sent on it arrives later.
            backend.abort_connection();
            tracing::warn!(remote = %shared.address, "lost the connection to {}: {why}; reconnecting", shared.address);
            shared
                .runtime
                .spawn(Self::reconnect(shared.clone(), generation + 1));
        }
    }

    async fn reconnect(self: Arc<Self>, generation: u64) {
        let mut backoff = self.options.initial_backoff;
        let mut failures = 0u64;
        loop {
            match self.connect_past_barrier().await {
                Ok(backend) => {
                    tracing::info!(remote = %self.address, generation, "reconnected to {}", self.address);
                    self.options.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.link.send_replace(Link::Up { generation, backend });
                    return;
                }
                Err(err) => {
                    // The first failure of an outage says why; the retries stay quiet.
                    if failures == 0 {
                        tracing::warn!(remote = %self.address, %err, "reconnecting to {} failed: {err}; retrying with backoff", self.address);
                    } else {
                        tracing::debug!(remote = %self.address, %err, ?backoff, "reconnecting failed; retrying");
                    }
                    failures += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
            if self.link.is_closed() && Arc::strong_count(&self) == 1 {
                return; // nobody uses the remote any more
            }
        }
    }
}

impl Shared {
    /// A new connection, once a flush on it was answered (an error reply too): the barrier that writes sent on the
    /// connections given up before cannot pass (see the module note).
    async fn connect_past_barrier(&self) -> Result<SharedBackend> {
        let timeout = self.options.request_timeout;
        let backend = (self.connector)().await?;
        let shape = Shape::of(&backend);
        if !self.shape.accepts(&shape) {
            backend.abort_connection();
            let first = self.shape;
            return Err(Error::Remote(format!(
                "{} came back changed (size {} and read unit {:?}, was {} and {:?}); not using it",
                self.address, shape.size, shape.read_alignment, first.size, first.read_alignment
            )));
        }
        match tokio::time::timeout(timeout, backend.sync()).await {
            Ok(Ok(())) => Ok(backend),
            // An answered flush is a passed barrier, even if the remote could not sync: the
            // server took it after the writes before it (our server waits for them before it
            // syncs). Refusing the connection would leave a remote whose syncs fail unusable
            // for reads too; the flush's error reaches callers of sync() instead.
            Ok(Err(err)) if !err.is_connection_loss() => {
                tracing::warn!(remote = %self.address, %err, "the flush on a new connection to {} failed; using the connection anyway", self.address);
                Ok(backend)
            }
            Ok(Err(err)) => {
                backend.abort_connection();
                Err(err)
            }
            Err(_) => {
                backend.abort_connection();
                Err(Error::Timeout(timeout))
            }
        }
    }
}

#[async_trait]
impl Backend for Reconnecting {
    fn size(&self) -> u64 {
        self.shared.shape.size
    }
    fn read_alignment(&self) -> Option<u64> {
        self.shared.shape.read_alignment
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        retried!(self, write: false, |backend| backend.read_at(offset, buf))
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        retried!(self, write: true, |backend| backend.write_at(offset, data))
    }
    async fn sync(&self) -> Result<()> {
        retried!(self, write: false, |backend| backend.sync())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        retried!(self, write: true, |backend| backend.trim(offset, len))
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        retried!(self, write: true, |backend| backend.write_zeroes(offset, len))
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        retried!(self, write: false, |backend| backend.extents(offset, len))
    }
}
