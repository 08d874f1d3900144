//! The Fence stage (over the Tracker, as a seeder stacks them) in the same-chunk race mode of
//! the conformance suite (`r3map_core::testing::check_races`): tasks read and write
//! overlapping unaligned ranges while the fence is raised and lowered again and again. Writes
//! refused by a raised fence must change nothing; the rest must be linearisable per byte.
//! While the fence is up the data must not change (no write was still in flight when `raise`
//! returned), and every chunk that changed since the previous raise must be in the tracker's
//! dirty list taken then (the closed set a seeder hands to the leecher).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use r3map_core::stages::Tracker;
use r3map_core::testing::{self, check_races, racer, RaceOptions, Yielding};
use r3map_core::{Backend, ChunkLayout, Error, MemoryBackend, Result};
use r3map_migration::fence::Fence;

const CHUNK: u64 = 64;
const SIZE: u64 = 4 * CHUNK + 19;

type Stack = Fence<Tracker<Yielding<MemoryBackend>>>;

/// Counts the writes a raised fence refused (so the test knows the race reached them).
struct Refusals {
    inner: Arc<Stack>,
    refused: AtomicU64,
}

impl Refusals {
    fn count<T>(&self, result: Result<T>) -> Result<T> {
        if matches!(result, Err(Error::ReadOnly)) {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

#[async_trait]
impl Backend for Refusals {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.count(self.inner.write_at(offset, data).await)
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.count(self.inner.trim(offset, len).await)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.count(self.inner.write_zeroes(offset, len).await)
    }
}

async fn contents(backend: &dyn Backend) -> Result<Vec<u8>> {
    let mut buf = vec![0; backend.size() as usize];
    backend.read_at(0, &mut buf).await?;
    Ok(buf)
}

/// Chunks whose bytes differ between `before` and `after`.
fn changed_chunks(before: &[u8], after: &[u8]) -> Vec<u64> {
    let layout = ChunkLayout::new(SIZE, CHUNK).unwrap();
    (0..layout.chunk_count())
        .filter(|&chunk| {
            let r = layout.chunk_range(chunk);
            before[r.start as usize..r.end as usize] != after[r.start as usize..r.end as usize]
        })
        .collect()
}

#[test]
fn fence_races_raising_and_lowering() {
    let mut refused = 0;
    for seed in 1..=4 {
        refused += testing::block_on(async move {
            let tracker = Tracker::new(Yielding::new(MemoryBackend::new(SIZE)), CHUNK).unwrap();
            tracker.track();
            let fence = Arc::new(Fence::new(tracker));
            let backend = Arc::new(Refusals {
                inner: fence.clone(),
                refused: AtomicU64::new(0),
            });
            // The content at the previous raise (zeros before the first).
            let at_last_raise = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
            let raise_and_lower = {
                let (fence, at_last_raise) = (fence.clone(), at_last_raise.clone());
                racer(move |_| {
                    let (fence, at_last_raise) = (fence.clone(), at_last_raise.clone());
                    async move {
                        fence.raise().await;
                        let now = contents(&*fence).await?;
                        let dirty = fence.inner().take_dirty();
                        for chunk in changed_chunks(&at_last_raise.lock(), &now) {
                            if !dirty.contains(&chunk) {
                                return Err(Error::Remote(format!(
                                    "chunk {chunk} changed since the last raise but is not in the dirty list"
                                )));
                            }
                        }
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        if contents(&*fence).await? != now {
                            return Err(Error::Remote("the data changed while the fence was up".into()));
                        }
                        *at_last_raise.lock() = now;
                        fence.lower();
                        Ok(())
                    }
                })
            };
            let options = RaceOptions {
                seed,
                refused_writes: true,
                ..RaceOptions::default()
            };
            check_races(
                backend.clone(),
                &vec![0; SIZE as usize],
                options,
                vec![raise_and_lower],
            )
            .await
            .unwrap();
            backend.refused.load(Ordering::SeqCst)
        });
    }
    assert!(
        refused > 0,
        "no write met a raised fence: the race did not happen"
    );
}
