//! A server-side backend that applies writes late, as a busy disk or a server under load does:
//! it can hold the next write to a range until released, and delay every write by a
//! pseudo-random time. It counts writes in flight, so a test can wait until every write the
//! server accepted has been applied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::{Backend, MemoryBackend, Result};
use tokio::sync::{oneshot, Notify};

struct Hold {
    range: std::ops::Range<u64>,
    held: Option<oneshot::Sender<()>>,
    release: Arc<Notify>,
}

pub struct SlowBackend {
    pub data: MemoryBackend,
    hold: Mutex<Option<Hold>>,
    /// Longest random delay of a slow write (zero: no delays).
    max_delay: Duration,
    seed: AtomicU64,
    in_flight: AtomicU64,
    idle: Notify,
}

/// Releases a held write.
pub struct Release(Arc<Notify>);

impl Release {
    pub fn release(&self) {
        self.0.notify_one();
    }
}

impl SlowBackend {
    pub fn new(size: u64, max_delay: Duration, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            data: MemoryBackend::new(size),
            hold: Mutex::new(None),
            max_delay,
            seed: AtomicU64::new(seed),
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
        })
    }

    /// Holds the next write that touches `range`: `held` resolves once it arrived, and it is
    /// applied after [`Release::release`].
    pub fn hold_next_write(&self, range: std::ops::Range<u64>) -> (oneshot::Receiver<()>, Release) {
        let (tx, rx) = oneshot::channel();
        let release = Arc::new(Notify::new());
        *self.hold.lock() = Some(Hold {
            range,
            held: Some(tx),
            release: release.clone(),
        });
        (rx, Release(release))
    }

    /// Waits until no write is in flight.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn delay(&self) -> Duration {
        if self.max_delay.is_zero() {
            return Duration::ZERO;
        }
        let n = self.seed.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mixed = (n ^ (n >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let fraction = (mixed >> 11) as f64 / (1u64 << 53) as f64;
        // Most writes are quick; one in eight is slow (up to `max_delay`), as on a busy disk.
        if mixed & 7 == 0 {
            self.max_delay.mul_f64(fraction)
        } else {
            Duration::from_millis(1).mul_f64(fraction)
        }
    }

    async fn before_write(&self, offset: u64, len: u64) {
        let release = {
            let mut hold = self.hold.lock();
            match hold.as_mut() {
                Some(h) if offset < h.range.end && h.range.start < offset + len => {
                    let h = hold.take().unwrap();
                    let _ = h.held.unwrap().send(());
                    Some(h.release)
                }
                _ => None,
            }
        };
        if let Some(release) = release {
            release.notified().await;
        }
        tokio::time::sleep(self.delay()).await;
    }

    async fn tracked<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let out = work.await;
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
        out
    }
}

#[async_trait]
impl Backend for SlowBackend {
    fn size(&self) -> u64 {
        self.data.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.data.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.tracked(async {
            self.before_write(offset, data.len() as u64).await;
            self.data.write_at(offset, data).await
        })
        .await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.tracked(async {
            self.before_write(offset, len).await;
            self.data.write_zeroes(offset, len).await
        })
        .await
    }
}
