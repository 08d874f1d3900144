//! Fence: a stage that can stop writes for good. Raising it waits for the writes in flight, so
//! once `raise` returns, every write the application made has landed and been recorded by the
//! stages below; later writes fail with `Error::ReadOnly`. A seeder raises it at `sync`, which
//! makes "the chunks written since tracking began" a closed set.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use r3map_core::{Backend, Error, Extent, Result};
use tokio::sync::RwLock;

/// A backend whose writes can be fenced off.
#[derive(Debug)]
pub struct Fence<B> {
    inner: B,
    /// Writes hold a read lock for their whole duration; raising takes the write lock once.
    in_flight: RwLock<()>,
    raised: AtomicBool,
}

impl<B: Backend> Fence<B> {
    /// Wraps `inner` with the fence down.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            in_flight: RwLock::new(()),
            raised: AtomicBool::new(false),
        }
    }

    /// Refuses new writes, then waits until the writes in flight have finished.
    pub async fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        drop(self.in_flight.write().await);
    }

    /// Accepts writes again (a migration was aborted and the source resumes).
    pub fn lower(&self) {
        self.raised.store(false, Ordering::SeqCst);
    }

    /// Whether writes are refused.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Runs a write unless the fence is up. The flag is checked after taking the pass, so a
    /// write either finishes before `raise` returns or is refused.
    async fn write<T>(&self, write: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let _pass = self.in_flight.read().await;
        if self.is_raised() {
            return Err(Error::ReadOnly);
        }
        write.await
    }
}

#[async_trait]
impl<B: Backend> Backend for Fence<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.inner.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write(self.inner.write_at(offset, data)).await
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write(self.inner.trim(offset, len)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write(self.inner.write_zeroes(offset, len)).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::stages::Gate;
    use r3map_core::{testing, MemoryBackend};
    use std::sync::Arc;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn a_lowered_fence_matches_the_model(ops in testing::ops_strategy(500, 60)) {
            testing::block_on(testing::check_against_model(&Fence::new(MemoryBackend::new(500)), 1, &ops))?;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raise_waits_for_a_write_in_flight_and_refuses_later_ones() {
        // The inner backend is a closed gate, so a write can be held in flight on purpose.
        let inner = Arc::new(Gate::new(MemoryBackend::new(16), false));
        let fence = Arc::new(Fence::new(inner.clone()));
        let writer = tokio::spawn({
            let fence = fence.clone();
            async move { fence.write_at(0, &[5; 4]).await }
        });
        // Wait until the write holds its pass (it then waits inside the closed gate).
        while fence.in_flight.try_write().is_ok() {
            tokio::task::yield_now().await;
        }
        let raising = tokio::spawn({
            let fence = fence.clone();
            async move { fence.raise().await }
        });
        // The raise cannot finish before the write does; the write is released only now.
        while !fence.is_raised() {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!raising.is_finished(), "raise returned with a write in flight");
        inner.open();
        raising.await.unwrap();
        writer
            .await
            .unwrap()
            .expect("a write that started before the fence lands");
        let mut buf = [0; 4];
        fence.read_at(0, &mut buf).await.unwrap();
        assert_eq!(buf, [5; 4]);
        assert!(matches!(fence.write_at(0, &[1]).await, Err(Error::ReadOnly)));
        assert!(matches!(fence.trim(0, 1).await, Err(Error::ReadOnly)));
        fence.lower();
        fence.write_at(0, &[1]).await.unwrap();
    }
}
