//! Backends and helpers shared by the slice frontend tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::{Backend, Error, Result};
use r3map_frontends::slice::{RegionOptions, TrackingMode};
use tokio::sync::{watch, Notify};

/// The byte a [`PatternBackend`] holds at `offset`.
pub fn pattern_byte(offset: u64) -> u8 {
    let v = (offset >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((v >> 56) as u8) ^ (offset as u8 & 7) ^ 0x5a
}

/// A read-only backend of any size whose content is computed from the offset (no memory).
pub struct PatternBackend {
    pub size: u64,
    pub reads: AtomicU64,
}

impl PatternBackend {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            reads: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Backend for PatternBackend {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        r3map_core::check_range(offset, buf.len() as u64, self.size)?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(offset + i as u64);
        }
        Ok(())
    }
    async fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(Error::ReadOnly)
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// A backend whose reads wait until `open` is called (or fail once `fail` is set), and that
/// reports how many reads have started.
pub struct GateBackend {
    pub inner: PatternBackend,
    pub opened: AtomicBool,
    pub gate: Notify,
    pub started: watch::Sender<u64>,
}

impl GateBackend {
    pub fn new(size: u64) -> Self {
        Self {
            inner: PatternBackend::new(size),
            opened: AtomicBool::new(false),
            gate: Notify::new(),
            started: watch::channel(0).0,
        }
    }
    pub fn open(&self) {
        self.opened.store(true, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

#[async_trait]
impl Backend for GateBackend {
    fn size(&self) -> u64 {
        self.inner.size
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.started.send_modify(|n| *n += 1);
        loop {
            let notified = self.gate.notified();
            if self.opened.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

pub fn shared<B: Backend>(b: B) -> (Arc<B>, r3map_core::SharedBackend) {
    let arc = Arc::new(b);
    (arc.clone(), arc)
}

pub const PAGE: u64 = 4096;

/// Whether this kernel offers userfaultfd with what a default region needs (UFFDIO_POISON
/// among it); when it does not (no syscall, `vm.unprivileged_userfaultfd` and no privilege, or
/// an older kernel), the test is counted as skipped with the missing feature named.
pub fn have_userfaultfd() -> bool {
    match r3map_frontends::slice::probe(&RegionOptions::default(), false) {
        Ok(_) => true,
        Err(err) => {
            r3map_core::testing::skip(&format!("userfaultfd is unavailable here: {err}"));
            false
        }
    }
}

/// Whether a default region here tracks writes with async write-protect
/// (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN, Linux 6.7+); tests of that mode are counted as
/// skipped without it.
pub fn have_async_tracking() -> bool {
    match r3map_frontends::slice::probe(&RegionOptions::default(), false) {
        Ok(TrackingMode::AsyncWriteProtect) => true,
        Ok(mode) => {
            r3map_core::testing::skip(&format!(
                "this kernel tracks writes as {mode:?}, not with async write-protect \
                 (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN, Linux 6.7+)"
            ));
            false
        }
        Err(err) => {
            r3map_core::testing::skip(&format!("userfaultfd is unavailable here: {err}"));
            false
        }
    }
}
