//! Tracker: after `track()`, records which chunks are written; `take_dirty()` returns and resets
//! them (a migration source uses it to tell the destination what changed after sending).

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use crate::{check_range, AtomicBitmap, Backend, ChunkLayout, Extent, Result};

/// Records written chunks once tracking has started.
#[derive(Debug)]
pub struct Tracker<B> {
    inner: B,
    layout: ChunkLayout,
    tracking: AtomicBool,
    dirty: AtomicBitmap,
}

impl<B: Backend> Tracker<B> {
    /// Wraps `inner`; nothing is recorded until [`Tracker::track`].
    pub fn new(inner: B, chunk_size: u64) -> Result<Self> {
        let layout = ChunkLayout::new(inner.size(), chunk_size)?;
        Ok(Self {
            dirty: AtomicBitmap::new(layout.chunk_count()),
            inner,
            layout,
            tracking: AtomicBool::new(false),
        })
    }

    /// Starts recording writes (from a clean slate).
    pub fn track(&self) {
        self.dirty.take();
        self.tracking.store(true, Ordering::Release);
    }

    /// Returns the chunks written since `track()` or the previous call, and forgets them.
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty.take()
    }

    /// The chunks written since `track()` or the last `take_dirty`, without forgetting them.
    pub fn dirty(&self) -> Vec<u64> {
        self.dirty.ones()
    }

    /// The chunk layout dirty chunks are counted in.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn record(&self, offset: u64, len: u64) {
        if self.tracking.load(Ordering::Acquire) {
            for chunk in self.layout.chunks_touching(offset, len) {
                self.dirty.set(chunk);
            }
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for Tracker<B> {
    fn size(&self) -> u64 {
        self.layout.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.inner.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.layout.size())?;
        let result = self.inner.write_at(offset, data).await;
        // Recorded even on failure: part of the write may have landed.
        self.record(offset, data.len() as u64);
        result
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        let result = self.inner.trim(offset, len).await;
        self.record(offset, len);
        result
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        let result = self.inner.write_zeroes(offset, len).await;
        self.record(offset, len);
        result
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testing, MemoryBackend};
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn workload_matches_model_and_dirty_set_is_exact(chunks in 1u64..30, tail in 0u64..16, before in testing::ops_strategy(80, 20), after in testing::ops_strategy(80, 20)) {
            let size = chunks * 16 + tail;
            let tracker = Tracker::new(MemoryBackend::new(size), 16).unwrap();
            let mut model = vec![0u8; size as usize];
            testing::block_on(testing::run_ops(&tracker, &mut model, 0..size, 1, &before))?;
            prop_assert!(tracker.take_dirty().is_empty(), "recorded before track()");
            tracker.track();
            let previous = model.clone();
            testing::block_on(testing::run_ops(&tracker, &mut model, 0..size, 1, &after))?;
            testing::block_on(testing::check_content(&tracker, &model))?;
            let dirty: BTreeSet<u64> = tracker.take_dirty().into_iter().collect();
            // Every chunk whose bytes changed is reported (a rewrite with equal bytes may be too).
            let layout = ChunkLayout::new(size, 16).unwrap();
            for chunk in 0..layout.chunk_count() {
                let r = layout.chunk_range(chunk);
                let r = r.start as usize..r.end as usize;
                if previous[r.clone()] != model[r] {
                    prop_assert!(dirty.contains(&chunk), "chunk {} changed but was not reported", chunk);
                }
            }
            prop_assert!(tracker.take_dirty().is_empty(), "take_dirty did not reset");
        }
    }

    #[test]
    fn reports_exactly_the_written_chunks() {
        testing::block_on(async {
            let tracker = Tracker::new(MemoryBackend::new(100), 10).unwrap();
            tracker.track();
            tracker.write_at(5, &[1; 10]).await.unwrap(); // chunks 0 and 1
            tracker.write_zeroes(95, 5).await.unwrap(); // tail chunk 9
            assert!(tracker.write_at(99, &[1, 2]).await.is_err());
            assert_eq!(tracker.take_dirty(), vec![0, 1, 9]);
            assert!(tracker.take_dirty().is_empty());
        });
    }

    #[test]
    fn concurrent_access_matches_model() {
        let tracker = Arc::new(Tracker::new(MemoryBackend::new(1000), 16).unwrap());
        tracker.track();
        testing::block_on(testing::check_concurrent(tracker, 1, 8, 200)).unwrap();
    }
}
