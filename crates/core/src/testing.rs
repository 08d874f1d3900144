//! The shared conformance suite: every backend and stage is checked against a `Vec<u8>` model
//! with the same operations, sequentially (property tests) and concurrently.
//!
//! Operations carry raw numbers that are fitted to the backend's size and alignment when they
//! run, so one strategy serves every size.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::{Backend, Error};

/// One operation of a generated workload.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read `len` bytes near `at`.
    Read { at: u64, len: u64 },
    /// Write `len` pseudo-random bytes derived from `seed` near `at`.
    Write { at: u64, len: u64, seed: u64 },
    /// Zero a range.
    WriteZeroes { at: u64, len: u64 },
    /// Trim a range (r3map backends read trimmed ranges as zeros).
    Trim { at: u64, len: u64 },
    /// Sync.
    Sync,
    /// A request reaching past the end: must fail and change nothing.
    PastEnd { len: u64, write: bool },
}

/// Workloads of up to `count` operations with lengths up to `max_len` bytes.
pub fn ops_strategy(max_len: u64, count: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (any::<u64>(), 1..=max_len).prop_map(|(at, len)| Op::Read { at, len }),
        4 => (any::<u64>(), 1..=max_len, any::<u64>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        1 => (any::<u64>(), 1..=max_len).prop_map(|(at, len)| Op::WriteZeroes { at, len }),
        1 => (any::<u64>(), 1..=max_len).prop_map(|(at, len)| Op::Trim { at, len }),
        1 => Just(Op::Sync),
        1 => (1..=max_len, any::<bool>()).prop_map(|(len, write)| Op::PastEnd { len, write }),
    ];
    proptest::collection::vec(op, 1..count)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce from the seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Fits a raw position and length into `window` (a byte range of the resource), aligned down to
/// `alignment`; the length is a whole number of `alignment` units or reaches the window's end.
fn fit(at: u64, len: u64, window: std::ops::Range<u64>, alignment: u64) -> (u64, u64) {
    let span = window.end - window.start;
    let offset = window.start + (at % span) / alignment * alignment;
    let room = window.end - offset;
    let len = len.max(1).min(room);
    let len = if offset + len == window.end {
        len
    } else {
        len.div_ceil(alignment) * alignment
    };
    (offset, len.min(room))
}

fn check(condition: bool, message: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if condition {
        Ok(())
    } else {
        Err(TestCaseError::fail(message()))
    }
}

/// Runs `ops` against `backend` and `model` (which must hold the backend's current content),
/// restricted to `window` of the resource, asserting every read and every result.
pub async fn run_ops(
    backend: &dyn Backend,
    model: &mut [u8],
    window: std::ops::Range<u64>,
    alignment: u64,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let size = backend.size();
    check(model.len() as u64 == size, || {
        "model size differs from backend size".into()
    })?;
    for op in ops {
        match *op {
            Op::Read { at, len } => {
                let (offset, len) = fit(at, len, window.clone(), alignment);
                let mut buf = vec![0xA5; len as usize];
                backend.read_at(offset, &mut buf).await.map_err(fail(op))?;
                let expected = &model[offset as usize..(offset + len) as usize];
                check(buf == expected, || {
                    let first = buf.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
                    format!("{op:?}: read {len} bytes at {offset} differs from the model first at +{first}")
                })?;
            }
            Op::Write { at, len, seed } => {
                let (offset, len) = fit(at, len, window.clone(), alignment);
                let data = pattern(seed, len as usize);
                backend.write_at(offset, &data).await.map_err(fail(op))?;
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::WriteZeroes { at, len } | Op::Trim { at, len } => {
                let (offset, len) = fit(at, len, window.clone(), alignment);
                if matches!(op, Op::Trim { .. }) {
                    backend.trim(offset, len).await.map_err(fail(op))?;
                } else {
                    backend.write_zeroes(offset, len).await.map_err(fail(op))?;
                }
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Sync => backend.sync().await.map_err(fail(op))?,
            Op::PastEnd { len, write } => {
                // Stages check bounds before alignment, so any start works.
                let offset = size.saturating_sub(len / 2);
                let len = (size - offset) + len; // always reaches past the end
                let result = if write {
                    backend.write_at(offset, &pattern(len, len as usize)).await
                } else {
                    backend.read_at(offset, &mut vec![0; len as usize]).await
                };
                check(matches!(result, Err(Error::OutOfBounds { .. })), || {
                    format!("{op:?}: request of {len} bytes at {offset} on a {size}-byte resource gave {result:?}, expected OutOfBounds")
                })?;
            }
        }
    }
    Ok(())
}

fn fail(op: &Op) -> impl FnOnce(Error) -> TestCaseError + '_ {
    move |err| TestCaseError::fail(format!("{op:?} failed: {err}"))
}

/// Runs `ops` on a backend that is all zeros, then compares its whole content with the model.
pub async fn check_against_model(
    backend: &dyn Backend,
    alignment: u64,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut model = vec![0u8; backend.size() as usize];
    run_ops(backend, &mut model, 0..backend.size(), alignment, ops).await?;
    check_content(backend, &model).await
}

/// Reads the whole backend and compares it with `model`.
pub async fn check_content(backend: &dyn Backend, model: &[u8]) -> Result<(), TestCaseError> {
    let mut all = vec![0u8; backend.size() as usize];
    backend
        .read_at(0, &mut all)
        .await
        .map_err(|e| TestCaseError::fail(format!("full read failed: {e}")))?;
    check(all == model, || "final content differs from the model".into())?;
    check_extents(backend, model).await
}

/// Checks [`Backend::extents`] over the whole backend: the extents are in order, non-empty,
/// tile the backend exactly (asking again after a short answer), and every hole reads as zeros
/// in `model`.
pub async fn check_extents(backend: &dyn Backend, model: &[u8]) -> Result<(), TestCaseError> {
    let size = backend.size();
    let mut at = 0u64;
    while at < size {
        let extents = backend
            .extents(at, size - at)
            .await
            .map_err(|e| TestCaseError::fail(format!("extents at {at} failed: {e}")))?;
        check(!extents.is_empty(), || format!("no extents at {at}"))?;
        for extent in extents {
            check(extent.len > 0 && extent.len <= size - at, || {
                format!("extent of {} bytes at {at} of a {size}-byte backend", extent.len)
            })?;
            if extent.allocation == crate::Allocation::Hole {
                let range = at as usize..(at + extent.len) as usize;
                check(model[range.clone()].iter().all(|&b| b == 0), || {
                    format!("hole {range:?} holds data")
                })?;
            }
            at += extent.len;
        }
    }
    Ok(())
}

/// Splits an all-zero backend into `tasks` disjoint windows (aligned to `alignment`) and runs a
/// random workload in each window at the same time, each against its own part of the model;
/// then compares the whole backend with the model.
pub async fn check_concurrent(
    backend: Arc<dyn Backend>,
    alignment: u64,
    tasks: u64,
    ops_per_task: usize,
) -> Result<(), TestCaseError> {
    let size = backend.size();
    let units = size.div_ceil(alignment);
    let per_task = units.div_ceil(tasks).max(1);
    let mut handles = Vec::new();
    for task in 0..tasks {
        let start = (task * per_task * alignment).min(size);
        let end = ((task + 1) * per_task * alignment).min(size);
        if start == end {
            continue;
        }
        let backend = backend.clone();
        handles.push(tokio::spawn(async move {
            let mut model = vec![0u8; size as usize];
            let ops = random_ops(task, ops_per_task, (end - start).min(4 * alignment.max(4096)));
            run_ops(&*backend, &mut model, start..end, alignment, &ops).await?;
            Ok::<_, TestCaseError>((start, model[start as usize..end as usize].to_vec()))
        }));
    }
    let mut model = vec![0u8; size as usize];
    for handle in handles {
        let (start, part) = handle
            .await
            .map_err(|e| TestCaseError::fail(format!("task panicked: {e}")))??;
        model[start as usize..start as usize + part.len()].copy_from_slice(&part);
    }
    check_content(&*backend, &model).await
}

/// A reproducible workload without proptest's runner (for the concurrent check).
fn random_ops(seed: u64, count: usize, max_len: u64) -> Vec<Op> {
    let numbers = pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) + 1, count * 24);
    numbers
        .chunks_exact(24)
        .map(|n| {
            let word = |i: usize| u64::from_le_bytes(n[i * 8..i * 8 + 8].try_into().unwrap());
            let (at, len) = (word(1), word(2) % max_len + 1);
            match n[0] % 10 {
                0..=3 => Op::Read { at, len },
                4..=7 => Op::Write {
                    at,
                    len,
                    seed: word(0),
                },
                8 => Op::WriteZeroes { at, len },
                _ => Op::Sync,
            }
        })
        .collect()
}

/// Runs a future on a fresh multi-threaded runtime (for proptest bodies, which are sync).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

/// A memory backend that counts the bytes read from it (what a remote served) and answers
/// `extents` with its real holes: the export of sparse-pull tests and benchmarks.
pub struct ReadCounting {
    pub inner: crate::MemoryBackend,
    /// Bytes read so far.
    pub read: std::sync::atomic::AtomicU64,
}

impl ReadCounting {
    pub fn new(size: u64) -> Self {
        Self {
            inner: crate::MemoryBackend::new(size),
            read: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Backend for ReadCounting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> crate::Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn extents(&self, offset: u64, len: u64) -> crate::Result<Vec<crate::Extent>> {
        self.inner.extents(offset, len).await
    }
}

/// Fault injection around a real backend: reads or writes fail while the switch is on, and every
/// call is counted. Used to test how stages behave when a remote fails.
pub struct FaultyBackend {
    inner: crate::SharedBackend,
    /// While set, reads fail with an I/O error.
    pub fail_reads: std::sync::atomic::AtomicBool,
    /// While set, writes fail with an I/O error.
    pub fail_writes: std::sync::atomic::AtomicBool,
    /// Reads served or refused so far.
    pub reads: std::sync::atomic::AtomicU64,
    /// Writes served or refused so far.
    pub writes: std::sync::atomic::AtomicU64,
}

impl FaultyBackend {
    /// Wraps `inner` with both switches off.
    pub fn new(inner: crate::SharedBackend) -> Self {
        Self {
            inner,
            fail_reads: Default::default(),
            fail_writes: Default::default(),
            reads: Default::default(),
            writes: Default::default(),
        }
    }

    fn injected(&self, what: &str) -> Error {
        Error::from(std::io::Error::other(format!("injected {what} failure")))
    }
}

#[async_trait::async_trait]
impl Backend for FaultyBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.inner.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.reads.fetch_add(1, SeqCst);
        if self.fail_reads.load(SeqCst) {
            return Err(self.injected("read"));
        }
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> crate::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.writes.fetch_add(1, SeqCst);
        if self.fail_writes.load(SeqCst) {
            return Err(self.injected("write"));
        }
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> crate::Result<()> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(self.injected("sync"));
        }
        self.inner.sync().await
    }
}

mod races;
mod skip;
pub use races::{check_races, racer, RaceOptions, Racer, Yielding};
pub use skip::skip;

/// The path of example `name` of the package at `manifest_dir`, built next to the running test
/// binary. `cargo test` and `cargo nextest` build examples already; when only one test target
/// was built, this builds the example the same way (same target directory and profile).
/// Under nextest (which holds no cargo lock while tests run) the build always runs, so a binary
/// older than its sources is never used; under `cargo test`, which holds the lock, only a
/// missing binary is built (a cargo inside would wait for the lock forever).
/// Call as `example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "name")`.
pub fn example_binary(cargo: &str, manifest_dir: &str, name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // Test binaries live in target/<profile>/deps; examples in target/<profile>/examples.
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("examples").join(name);
    if !binary.exists() || std::env::var_os("NEXTEST").is_some() {
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--example", name, "--manifest-path"])
            .arg(std::path::Path::new(manifest_dir).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(profile_dir.parent().expect("target directory"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo to build the example");
        assert!(status.success(), "building example {name} failed");
    }
    binary
}
