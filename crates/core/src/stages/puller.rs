//! Puller: background workers that make chunks local ahead of use, in priority order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::{ChunkLayout, Error, Result};

/// Something whose chunks can be made local one at a time: the synced stage, or a memory
/// region that installs fetched chunks.
#[async_trait]
pub trait PullTarget: Send + Sync + 'static {
    /// Number of chunks.
    fn chunk_count(&self) -> u64;
    /// Makes `chunk` local (a no-op if it already is).
    async fn pull(&self, chunk: u64) -> Result<()>;
}

/// The order in which chunks are pulled: higher priority first, ties by index.
#[derive(Clone)]
pub struct Priority(Arc<dyn Fn(u64) -> i64 + Send + Sync>);

impl std::fmt::Debug for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Priority(..)")
    }
}

impl Priority {
    /// Any function from chunk index to priority.
    pub fn custom(f: impl Fn(u64) -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    /// From the first chunk to the last.
    pub fn sequential() -> Self {
        Self::custom(|_| 0)
    }
    /// From the last chunk to the first.
    pub fn reverse() -> Self {
        Self::custom(|chunk| chunk as i64)
    }
    /// Chunks overlapping the given byte ranges first (in the order given), then the rest.
    /// Ranges past the end are clipped; a chunk in several ranges ranks by the first.
    pub fn ranges_first(layout: ChunkLayout, ranges: Vec<std::ops::Range<u64>>) -> Self {
        // Ranked once here (the sort asks for every chunk's priority many times).
        let count = ranges.len() as i64;
        let mut rank = std::collections::HashMap::new();
        for (i, range) in ranges.iter().enumerate() {
            let end = range.end.min(layout.size());
            if range.start >= end {
                continue;
            }
            for chunk in layout.chunks_touching(range.start, end - range.start) {
                rank.entry(chunk).or_insert(count - i as i64);
            }
        }
        Self::custom(move |chunk| rank.get(&chunk).copied().unwrap_or(0))
    }
}

/// Puller settings.
#[derive(Debug, Clone)]
pub struct PullerOptions {
    /// Concurrent pulls (tasks, not threads: thousands are fine for a remote with latency).
    pub workers: usize,
    /// Pull order.
    pub priority: Priority,
}

impl Default for PullerOptions {
    fn default() -> Self {
        Self {
            workers: 64,
            priority: Priority::sequential(),
        }
    }
}

/// A snapshot of the puller's progress.
#[derive(Debug, Clone, Default)]
pub struct PullProgress {
    /// Chunks pulled (or found local) so far.
    pub pulled: u64,
    /// Chunks the puller was asked to pull in all.
    pub total: u64,
    /// Set once the queue is empty and every worker has stopped.
    pub finished: bool,
    /// The first error, which stops the puller.
    pub error: Option<Error>,
}

struct Queue {
    /// Chunks re-queued with `pull_first`, ahead of everything else.
    urgent: VecDeque<u64>,
    /// All chunks in priority order, and the next one to hand out.
    ordered: Vec<u64>,
    next: usize,
    running: usize,
}

struct Shared {
    target: Arc<dyn PullTarget>,
    queue: Mutex<Queue>,
    stopped: AtomicBool,
    progress: watch::Sender<PullProgress>,
    workers: usize,
    /// Woken whenever a worker ends (see [`Puller::stop_and_wait`]).
    worker_ended: Notify,
}

/// Background pulling of every chunk of a target. Dropping the puller stops its workers after
/// their current chunk.
pub struct Puller {
    shared: Arc<Shared>,
}

impl Puller {
    /// Starts pulling every chunk of `target` (needs a Tokio runtime).
    pub fn start(target: Arc<dyn PullTarget>, options: PullerOptions) -> Result<Self> {
        if options.workers == 0 {
            return Err(Error::InvalidConfig(
                "the puller needs at least one worker".into(),
            ));
        }
        let count = target.chunk_count();
        let mut ordered: Vec<u64> = (0..count).collect();
        let priority = &options.priority.0;
        ordered.sort_by_key(|&chunk| std::cmp::Reverse(priority(chunk)));
        let (progress, _) = watch::channel(PullProgress {
            total: count,
            finished: count == 0,
            ..PullProgress::default()
        });
        let shared = Arc::new(Shared {
            target,
            queue: Mutex::new(Queue {
                urgent: VecDeque::new(),
                ordered,
                next: 0,
                running: 0,
            }),
            stopped: AtomicBool::new(false),
            worker_ended: Notify::new(),
            progress,
            workers: options.workers,
        });
        Shared::spawn_workers(&shared);
        Ok(Self { shared })
    }

    /// Queues `chunks` ahead of all others (e.g. chunks a migration source wrote after sending
    /// them) and restarts workers if they had finished. Clears a previous error.
    pub fn pull_first(&self, chunks: &[u64]) {
        if chunks.is_empty() {
            // Nothing to queue: marking the puller unfinished would make `wait` hang, since no
            // worker would start to finish it again.
            return;
        }
        {
            let mut queue = self.shared.queue.lock();
            for &chunk in chunks.iter().rev() {
                queue.urgent.push_front(chunk);
            }
            self.shared.progress.send_modify(|p| {
                p.total += chunks.len() as u64;
                p.finished = false;
                p.error = None;
            });
        }
        Shared::spawn_workers(&self.shared);
    }

    /// A receiver that sees every progress change.
    pub fn progress(&self) -> watch::Receiver<PullProgress> {
        self.shared.progress.subscribe()
    }

    /// Waits until every queued chunk is pulled, or returns the first error.
    pub async fn wait(&self) -> Result<()> {
        let mut rx = self.progress();
        let progress = rx
            .wait_for(|p| p.finished || p.error.is_some())
            .await
            .map_err(|_| Error::Closed)?;
        match &progress.error {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    /// Stops handing out chunks; workers finish their current chunk and exit. A `wait` that
    /// has not seen the puller finish returns `Error::Closed`.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.progress.send_modify(|p| {
            if !p.finished {
                p.error.get_or_insert(Error::Closed);
            }
        });
    }
}

impl Puller {
    /// Stops the workers and waits until none is pulling any more: each ends after its
    /// current chunk, which is installed or failed by then (bounded by the target's own
    /// request deadline). A mount calls it before its last checkpoint, so no pull writes to
    /// the cache after it.
    pub async fn stop_and_wait(&self) {
        self.stop();
        loop {
            // Registered before looking, so a worker ending in between still wakes us.
            let ended = self.shared.worker_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.shared.queue.lock().running == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn spawn_workers(shared: &Arc<Self>) {
        let mut queue = shared.queue.lock();
        let pending = queue.urgent.len() + (queue.ordered.len() - queue.next);
        let wanted = shared.workers.min(pending).saturating_sub(queue.running);
        queue.running += wanted;
        drop(queue);
        for _ in 0..wanted {
            let shared = shared.clone();
            tokio::spawn(async move { shared.work().await });
        }
    }

    fn next_chunk(&self, queue: &mut Queue) -> Option<u64> {
        if self.stopped.load(Ordering::Acquire) || self.progress.borrow().error.is_some() {
            return None;
        }
        if let Some(chunk) = queue.urgent.pop_front() {
            return Some(chunk);
        }
        let chunk = queue.ordered.get(queue.next).copied()?;
        queue.next += 1;
        Some(chunk)
    }

    async fn work(self: Arc<Self>) {
        // A worker dropped before it returns (its runtime was shut down, e.g. with the region
        // that owned it) reports Closed, so that `wait` ends instead of hanging.
        let mut abandoned = Abandoned(&self, true);
        loop {
            let chunk = {
                let mut queue = self.queue.lock();
                match self.next_chunk(&mut queue) {
                    Some(chunk) => chunk,
                    None => {
                        queue.running -= 1;
                        let drained = queue.urgent.is_empty() && queue.next == queue.ordered.len();
                        if queue.running == 0 && drained {
                            self.progress.send_modify(|p| p.finished = true);
                        }
                        abandoned.1 = false;
                        drop(queue);
                        self.worker_ended.notify_waiters();
                        return;
                    }
                }
            };
            match self.target.pull(chunk).await {
                Ok(()) => self.progress.send_modify(|p| p.pulled += 1),
                Err(err) => {
                    tracing::warn!(chunk, %err, "pulling a chunk failed; stopping the puller");
                    self.progress.send_modify(|p| {
                        p.error.get_or_insert(err);
                    });
                }
            }
        }
    }
}

/// Reports `Error::Closed` when dropped armed (see [`Shared::work`]).
struct Abandoned<'a>(&'a Shared, bool);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.progress.send_modify(|p| {
                if !p.finished {
                    p.error.get_or_insert(Error::Closed);
                }
            });
            self.0.queue.lock().running -= 1;
            self.0.worker_ended.notify_waiters();
        }
    }
}
