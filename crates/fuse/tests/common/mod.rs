//! Helpers shared by the FUSE frontend tests: skipping on machines without FUSE or loop
//! devices, scratch directories, a runtime, and backends that count or hold requests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use r3map_core::{Backend, Result, SharedBackend};

/// True when /dev/fuse can be opened; otherwise records the skip.
pub fn fuse_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => true,
        Err(err) => {
            r3map_core::testing::skip(&format!("/dev/fuse cannot be opened: {err}"));
            false
        }
    }
}

/// True when FUSE and /dev/loop-control are usable; otherwise records the skip.
pub fn loop_available() -> bool {
    if !fuse_available() {
        return false;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
    {
        Ok(_) => true,
        Err(err) => {
            r3map_core::testing::skip(&format!("/dev/loop-control cannot be opened: {err}"));
            false
        }
    }
}

/// True when `tool` runs; otherwise records the skip.
pub fn tool_available(tool: &str, package: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        r3map_core::testing::skip(&format!("{tool} is missing (apt-get install {package})"));
    }
    found
}

/// A multi-threaded runtime for serving FUSE requests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A unique scratch directory under /var/tmp (removed when dropped, after the mounts in it,
/// which must be declared after it).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("r3map-fuse-test-")
        .tempdir_in("/var/tmp")
        .expect("scratch directory")
}

/// A new directory `name` inside `dir`.
pub fn subdir(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir(&path).expect("mkdir");
    path
}

/// Reads the whole backend directly (not through the frontend).
pub fn backend_content(runtime: &tokio::runtime::Runtime, backend: &SharedBackend) -> Vec<u8> {
    let mut all = vec![0u8; backend.size() as usize];
    runtime
        .block_on(backend.read_at(0, &mut all))
        .expect("direct read of the backend");
    all
}

/// A 4096-byte-aligned buffer of `len` bytes for O_DIRECT I/O (a slice of a larger vector).
pub struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Self { storage, start, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Counts what reaches a backend, and the largest read and write.
pub struct Counting {
    pub inner: SharedBackend,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub syncs: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub max_read: AtomicU64,
    pub max_write: AtomicU64,
}

impl Counting {
    pub fn new(inner: SharedBackend) -> Arc<Self> {
        Arc::new(Self {
            inner,
            reads: Default::default(),
            writes: Default::default(),
            syncs: Default::default(),
            trims: Default::default(),
            zeroes: Default::default(),
            max_read: Default::default(),
            max_write: Default::default(),
        })
    }
}

#[async_trait]
impl Backend for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, SeqCst);
        self.max_read.fetch_max(buf.len() as u64, SeqCst);
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writes.fetch_add(1, SeqCst);
        self.max_write.fetch_max(data.len() as u64, SeqCst);
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.syncs.fetch_add(1, SeqCst);
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.trims.fetch_add(1, SeqCst);
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes.fetch_add(1, SeqCst);
        self.inner.write_zeroes(offset, len).await
    }
}

/// Holds every read until `expected` reads are inside at the same time (or a deadline passes),
/// so a frontend that serves one request at a time cannot pass.
pub struct Rendezvous {
    pub inner: SharedBackend,
    pub expected: u64,
    pub inside: AtomicU64,
    pub met: AtomicBool,
    arrived: tokio::sync::Notify,
}

impl Rendezvous {
    pub fn new(inner: SharedBackend, expected: u64) -> Arc<Self> {
        Arc::new(Self {
            inner,
            expected,
            inside: AtomicU64::new(0),
            met: AtomicBool::new(false),
            arrived: tokio::sync::Notify::new(),
        })
    }
}

#[async_trait]
impl Backend for Rendezvous {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let now = self.inside.fetch_add(1, SeqCst) + 1;
        if now >= self.expected {
            self.met.store(true, SeqCst);
        }
        self.arrived.notify_waiters();
        let wait = async {
            loop {
                let notified = self.arrived.notified();
                if self.met.load(SeqCst) {
                    break;
                }
                notified.await;
            }
        };
        // The deadline only keeps a failing test from hanging.
        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        let result = self.inner.read_at(offset, buf).await;
        self.inside.fetch_sub(1, SeqCst);
        result
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
}

/// The transports to run a test over: classic `/dev/fuse` always, and FUSE over io_uring when
/// the kernel offers it now (`enable_uring` on: scripts/test turns it on; the io_uring tests in
/// `uring.rs` count its absence as a skip).
pub fn transports() -> Vec<r3map_fuse::FileOptions> {
    let classic = r3map_fuse::FileOptions {
        io_uring: false,
        ..r3map_fuse::FileOptions::default()
    };
    let mut all = vec![classic];
    if r3map_fuse::uring_status() == Ok(true) {
        all.push(r3map_fuse::FileOptions::default());
    }
    all
}
