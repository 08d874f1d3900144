//! Same-chunk races: several tasks read and write overlapping (unaligned where the stage allows)
//! ranges of a small resource at the same time, while background work (a pull, a push, a gate
//! closing, a connection dropping) races them. Every operation is recorded with its invocation
//! and response time on one logical clock, and the history is checked against a model of every
//! linearisable outcome.
//!
//! The model treats each byte as a register. A read of byte `x` is correct when its value is
//! one the byte held at some point between the read's invocation and response: the value of a
//! write of `x` that overlapped the read in time, or of a write that ended before the read
//! began and that no later-begun, also-ended write of `x` superseded (or the initial value when
//! no write of `x` had ended before the read began). The final content is checked the same way
//! against the writes that nothing superseded. This is exactly linearisability per byte; a
//! stage is not required to make multi-byte requests atomic (no backend promises that).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use proptest::test_runner::TestCaseError;

use super::{fit, pattern, random_ops, Op};

use crate::Backend;

/// Settings of one race.
#[derive(Debug, Clone)]
pub struct RaceOptions {
    /// Requests are aligned to this (1 = any offset and length).
    pub alignment: u64,
    /// Tasks racing on the whole resource.
    pub tasks: u64,
    /// Operations per task.
    pub ops_per_task: usize,
    /// Longest request in bytes (keep it near a chunk or two, so requests share chunks).
    pub max_len: u64,
    /// Seed of the workload (each round of a looped test should use another).
    pub seed: u64,
    /// A write, zeroing or trim refused with `Error::ReadOnly` (a fenced stage) is taken as one
    /// that never happened: the model checks that it changed nothing. Off: it fails the race.
    pub refused_writes: bool,
}

impl Default for RaceOptions {
    fn default() -> Self {
        Self {
            alignment: 1,
            tasks: 8,
            ops_per_task: 150,
            max_len: 96,
            seed: 1,
            refused_writes: false,
        }
    }
}

/// Background work racing the workload, e.g. `|i| synced.fetch(i % chunks)` (a pull) or
/// `|_| pusher.flush()` (a push). It is called again and again, with a counter, until the
/// workload ends; an error fails the race.
pub type Racer = Arc<dyn Fn(u64) -> BoxFuture<'static, crate::Result<()>> + Send + Sync>;

/// Makes a [`Racer`] from a closure returning a future.
pub fn racer<F, Fut>(f: F) -> Racer
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::Result<()>> + Send + 'static,
{
    Arc::new(move |i| Box::pin(f(i)))
}

/// One completed operation: what it did, and when (logical clock) it was invoked and answered.
#[derive(Debug, Clone)]
struct Event {
    op: Op,
    offset: u64,
    /// Bytes written (zeros for write_zeroes/trim) or read.
    bytes: Vec<u8>,
    write: bool,
    invoked: u64,
    answered: u64,
}

/// Runs the race on `backend`, which holds `initial` (e.g. a synced stage over a remote with
/// that content), and checks every read and the final content against the model. Returns the
/// final content, so the caller can compare the remote with it after a sync.
pub async fn check_races(
    backend: Arc<dyn Backend>,
    initial: &[u8],
    options: RaceOptions,
    racers: Vec<Racer>,
) -> Result<Vec<u8>, TestCaseError> {
    let size = backend.size();
    if initial.len() as u64 != size {
        return Err(TestCaseError::fail(
            "initial content differs in size from the backend",
        ));
    }
    let clock = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let background: Vec<_> = racers
        .into_iter()
        .map(|racer| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    racer(round).await?;
                    round += 1;
                    tokio::task::yield_now().await;
                }
                Ok::<_, crate::Error>(round)
            })
        })
        .collect();
    let workers: Vec<_> = (0..options.tasks)
        .map(|task| {
            let (backend, clock) = (backend.clone(), clock.clone());
            let ops = race_ops(
                options.seed.wrapping_mul(1000).wrapping_add(task),
                options.ops_per_task,
                options.max_len,
            );
            let (alignment, refused_writes) = (options.alignment, options.refused_writes);
            tokio::spawn(async move { run_task(&*backend, &clock, alignment, refused_writes, ops).await })
        })
        .collect();
    let mut history = Vec::new();
    let mut failure = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(events)) => history.extend(events),
            Ok(Err(err)) => failure = failure.or(Some(err)),
            Err(err) => failure = failure.or(Some(TestCaseError::fail(format!("a task panicked: {err}")))),
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in background {
        match task.await {
            Ok(Ok(_rounds)) => {}
            Ok(Err(err)) => failure = failure.or(Some(TestCaseError::fail(format!("a racer failed: {err}")))),
            Err(err) => failure = failure.or(Some(TestCaseError::fail(format!("a racer panicked: {err}")))),
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    let mut last = vec![0u8; size as usize];
    backend
        .read_at(0, &mut last)
        .await
        .map_err(|e| TestCaseError::fail(format!("final read failed: {e}")))?;
    Model::new(initial, &history).check(&history, &last)?;
    Ok(last)
}

/// The concurrent check's workload with some zeroing turned into trims (both read back as
/// zeros, but stages treat them apart).
fn race_ops(seed: u64, count: usize, max_len: u64) -> Vec<Op> {
    random_ops(seed, count, max_len)
        .into_iter()
        .enumerate()
        .map(|(i, op)| match op {
            Op::WriteZeroes { at, len } if i % 2 == 1 => Op::Trim { at, len },
            op => op,
        })
        .collect()
}

async fn run_task(
    backend: &dyn Backend,
    clock: &AtomicU64,
    alignment: u64,
    refused_writes: bool,
    ops: Vec<Op>,
) -> Result<Vec<Event>, TestCaseError> {
    let size = backend.size();
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        let (at, len) = match op {
            Op::Read { at, len }
            | Op::Write { at, len, .. }
            | Op::WriteZeroes { at, len }
            | Op::Trim { at, len } => (at, len),
            Op::Sync | Op::PastEnd { .. } => (0, 1),
        };
        let (offset, len) = fit(at, len, 0..size, alignment);
        let invoked = clock.fetch_add(1, Ordering::SeqCst);
        let (result, bytes, write) = match op {
            Op::Read { .. } => {
                let mut buf = vec![0xA5; len as usize];
                (backend.read_at(offset, &mut buf).await, buf, false)
            }
            Op::Write { seed, .. } => {
                let data = pattern(seed, len as usize);
                (backend.write_at(offset, &data).await, data, true)
            }
            Op::WriteZeroes { .. } => (
                backend.write_zeroes(offset, len).await,
                vec![0; len as usize],
                true,
            ),
            Op::Trim { .. } => (backend.trim(offset, len).await, vec![0; len as usize], true),
            Op::Sync | Op::PastEnd { .. } => (backend.sync().await, Vec::new(), false),
        };
        let answered = clock.fetch_add(1, Ordering::SeqCst);
        if write && refused_writes && matches!(result, Err(crate::Error::ReadOnly)) {
            continue; // refused: the model sees no write, so any byte it changed is caught
        }
        result.map_err(|e| TestCaseError::fail(format!("{op:?} at {offset}+{len} failed: {e}")))?;
        events.push(Event {
            op,
            offset,
            bytes,
            write,
            invoked,
            answered,
        });
    }
    Ok(events)
}

/// For every byte, the writes that cover it (indices into the history), in the order they were
/// answered, with the latest invocation among each prefix (to find the horizon quickly).
struct Model<'a> {
    initial: &'a [u8],
    writers: Vec<Vec<usize>>,
    latest_invoked: Vec<Vec<u64>>,
}

impl<'a> Model<'a> {
    fn new(initial: &'a [u8], history: &[Event]) -> Self {
        let mut writers = vec![Vec::new(); initial.len()];
        for (i, event) in history.iter().enumerate().filter(|(_, e)| e.write) {
            for x in event.offset..event.offset + event.bytes.len() as u64 {
                writers[x as usize].push(i);
            }
        }
        let latest_invoked = writers
            .iter_mut()
            .map(|list| {
                list.sort_by_key(|&i| history[i].answered);
                list.iter()
                    .scan(0, |latest, &i| {
                        *latest = history[i].invoked.max(*latest);
                        Some(*latest)
                    })
                    .collect()
            })
            .collect();
        Self {
            initial,
            writers,
            latest_invoked,
        }
    }

    /// The values byte `x` may hold at some point in `invoked..answered` (for the final
    /// content: both infinite), nearest the horizon first.
    fn possible<'h>(
        &'h self,
        history: &'h [Event],
        x: usize,
        invoked: u64,
        answered: u64,
    ) -> impl Iterator<Item = u8> + 'h {
        let writers = &self.writers[x];
        // Writes of `x` that had ended before the read began, and the latest invocation among
        // them: every write of `x` that ended before that one began is superseded.
        let ended = writers.partition_point(|&i| history[i].answered < invoked);
        let horizon = ended.checked_sub(1).map(|k| self.latest_invoked[x][k]);
        let first = horizon.map_or(0, |h| writers.partition_point(|&i| history[i].answered < h));
        let history_values = writers[first..]
            .iter()
            .filter(move |&&i| history[i].invoked < answered)
            .map(move |&i| history[i].bytes[x - history[i].offset as usize]);
        let initial = horizon.is_none().then_some(self.initial[x]);
        initial.into_iter().chain(history_values)
    }

    fn check(&self, history: &[Event], last: &[u8]) -> Result<(), TestCaseError> {
        for read in history.iter().filter(|e| !e.write && !e.bytes.is_empty()) {
            for (k, &got) in read.bytes.iter().enumerate() {
                let x = read.offset as usize + k;
                if !self
                    .possible(history, x, read.invoked, read.answered)
                    .any(|v| v == got)
                {
                    let possible: Vec<u8> = self.possible(history, x, read.invoked, read.answered).collect();
                    return Err(TestCaseError::fail(format!(
                        "{:?} at {}+{} (clock {}..{}) read {got:#04x} at byte {x}; linearisable values: {possible:02x?}",
                        read.op,
                        read.offset,
                        read.bytes.len(),
                        read.invoked,
                        read.answered
                    )));
                }
            }
        }
        for (x, &got) in last.iter().enumerate() {
            if !self.possible(history, x, u64::MAX, u64::MAX).any(|v| v == got) {
                let possible: Vec<u8> = self.possible(history, x, u64::MAX, u64::MAX).collect();
                return Err(TestCaseError::fail(format!(
                    "final content has {got:#04x} at byte {x}; writes nothing superseded give {possible:02x?}"
                )));
            }
        }
        Ok(())
    }
}

/// A backend that gives up its thread a few times before and after every call (how many comes
/// from a counter, so it varies from call to call). In-memory backends finish without ever
/// awaiting, which hides races behind them; wrapped in this, a fetch, a push or a
/// read-modify-write is interleaved with other tasks at every step, as with a real remote.
pub struct Yielding<B> {
    inner: B,
    calls: AtomicU64,
}

impl<B: Backend> Yielding<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            calls: AtomicU64::new(0),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    async fn pause(&self) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        for _ in 0..(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62) {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait::async_trait]
impl<B: Backend> Backend for Yielding<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.inner.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.pause().await;
        let result = self.inner.read_at(offset, buf).await;
        self.pause().await;
        result
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> crate::Result<()> {
        self.pause().await;
        let result = self.inner.write_at(offset, data).await;
        self.pause().await;
        result
    }
    async fn sync(&self) -> crate::Result<()> {
        self.pause().await;
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.pause().await;
        let result = self.inner.trim(offset, len).await;
        self.pause().await;
        result
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.pause().await;
        let result = self.inner.write_zeroes(offset, len).await;
        self.pause().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: u64, bytes: &[u8], write: bool, invoked: u64, answered: u64) -> Event {
        Event {
            op: Op::Sync,
            offset,
            bytes: bytes.to_vec(),
            write,
            invoked,
            answered,
        }
    }

    /// The checker itself: each rule can fail.
    #[test]
    fn the_model_accepts_exactly_the_linearisable_values() {
        let initial = [0u8; 2];
        let history = vec![
            event(0, &[1, 1], true, 0, 1),  // w1 ends before everything else
            event(0, &[2], true, 2, 5),     // w2 overlaps the first read
            event(0, &[1], false, 3, 4),    // reads while w2 is in flight: 1 or 2
            event(0, &[3], true, 6, 7),     // w3 supersedes w1 and w2 at byte 0
            event(0, &[2, 1], false, 8, 9), // byte 0: only 3 possible -> wrong
        ];
        let model = Model::new(&initial, &history);
        let possible =
            |x, invoked, answered| model.possible(&history, x, invoked, answered).collect::<Vec<_>>();
        assert_eq!(possible(0, 3, 4), vec![1, 2]);
        assert_eq!(possible(0, 8, 9), vec![3]);
        assert_eq!(possible(1, 8, 9), vec![1]);
        assert_eq!(possible(1, 0, 1), vec![0, 1], "initial while w1 runs");
        assert!(
            model.check(&history, &[3, 1]).is_err(),
            "the stale read must be caught"
        );
        let good: Vec<Event> = history[..4].to_vec();
        let model = Model::new(&initial, &good);
        assert!(model.check(&good, &[3, 1]).is_ok());
        assert!(
            model.check(&good, &[2, 1]).is_err(),
            "final content must be the last write"
        );
        assert!(
            model.check(&good, &[3, 0]).is_err(),
            "initial value after a completed write"
        );
    }
}
