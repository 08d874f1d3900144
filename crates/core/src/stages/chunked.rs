//! Chunked: only whole, aligned chunks and bounded request sizes pass (protects servers).

use async_trait::async_trait;

use crate::{check_range, Backend, ChunkLayout, Error, Extent, Result};

/// Rejects requests that are out of range, not chunk-aligned, or larger than `max_request`.
/// Bounds are checked before alignment, so a request past the end always says so.
#[derive(Debug)]
pub struct Chunked<B> {
    inner: B,
    layout: ChunkLayout,
    max_request: u64,
}

impl<B: Backend> Chunked<B> {
    /// Wraps `inner`; `max_request` must be at least one chunk.
    pub fn new(inner: B, chunk_size: u64, max_request: u64) -> Result<Self> {
        let layout = ChunkLayout::new(inner.size(), chunk_size)?;
        if max_request < chunk_size {
            return Err(Error::InvalidConfig(format!(
                "maximum request size {max_request} is smaller than the chunk size {chunk_size}"
            )));
        }
        Ok(Self {
            inner,
            layout,
            max_request,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        self.layout.check_aligned(offset, len)?;
        if len > self.max_request {
            return Err(Error::TooLarge {
                len,
                max: self.max_request,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<B: Backend> Backend for Chunked<B> {
    fn size(&self) -> u64 {
        self.layout.size()
    }
    /// Whole chunks are what passes.
    fn read_alignment(&self) -> Option<u64> {
        Some(self.layout.chunk_size())
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.inner.write_zeroes(offset, len).await
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
    use std::sync::Arc;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn aligned_workload_matches_model(chunks in 1u64..40, tail in 0u64..64, ops in testing::ops_strategy(64 * 8, 40)) {
            let backend = Chunked::new(MemoryBackend::new(chunks * 64 + tail), 64, u64::MAX).unwrap();
            testing::block_on(testing::check_against_model(&backend, 64, &ops))?;
        }

        #[test]
        fn unaligned_or_oversized_requests_fail_and_change_nothing(offset in 0u64..1024, len in 1u64..1024) {
            let backend = Chunked::new(MemoryBackend::new(1000), 64, 256).unwrap();
            let result = testing::block_on(backend.write_at(offset, &vec![1; len as usize]));
            let in_range = offset + len <= 1000;
            let aligned = offset % 64 == 0 && ((offset + len) % 64 == 0 || offset + len == 1000);
            match result {
                Ok(()) => prop_assert!(in_range && aligned && len <= 256),
                Err(Error::OutOfBounds { .. }) => prop_assert!(!in_range),
                Err(Error::Unaligned { .. }) => prop_assert!(in_range && !aligned),
                Err(Error::TooLarge { .. }) => prop_assert!(in_range && aligned && len > 256),
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
            if !(in_range && aligned && len <= 256) {
                let mut all = vec![0xFF; 1000];
                testing::block_on(backend.inner.read_at(0, &mut all)).unwrap();
                prop_assert!(all.iter().all(|&b| b == 0), "a rejected write changed data");
            }
        }
    }

    #[test]
    fn concurrent_aligned_access_matches_model() {
        let backend = Arc::new(Chunked::new(MemoryBackend::new(64 * 100 + 5), 64, u64::MAX).unwrap());
        testing::block_on(testing::check_concurrent(backend, 64, 8, 200)).unwrap();
    }

    #[test]
    fn max_request_smaller_than_chunk_is_rejected() {
        assert!(matches!(
            Chunked::new(MemoryBackend::new(10), 8, 4),
            Err(Error::InvalidConfig(_))
        ));
    }
}
