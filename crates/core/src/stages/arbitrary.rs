//! Arbitrary: accepts any offset and length and turns them into whole-chunk operations on the
//! inner backend (read-modify-write for partial chunks), atomically per chunk. Reads go to the
//! inner backend in its own read unit when it has a smaller one than a chunk (see
//! [`Backend::read_alignment`]): a 4 KiB read of an NBD remote asks for 4 KiB, not a chunk.

use std::ops::Range;

use async_trait::async_trait;

use crate::{check_range, read_unit, Backend, ChunkGuard, ChunkLayout, ChunkLocks, Extent, Result};

/// Unaligned I/O over a backend that only takes whole chunks.
///
/// Writes lock every chunk they touch (in ascending order, so they cannot deadlock), which makes
/// a read-modify-write of a partial chunk atomic against every other write of that chunk: two
/// writers of different bytes of one chunk never lose each other's bytes.
#[derive(Debug)]
pub struct Arbitrary<B> {
    inner: B,
    layout: ChunkLayout,
    /// Reads reach `inner` aligned to this layout's chunks: a divisor of the chunk size.
    reads: ChunkLayout,
    locks: ChunkLocks,
}

impl<B: Backend> Arbitrary<B> {
    /// Wraps `inner`, whose accesses will all be aligned to `chunk_size`.
    /// Reads are aligned to the inner backend's read unit instead where it divides the chunk.
    pub fn new(inner: B, chunk_size: u64) -> Result<Self> {
        let unit = read_unit(inner.read_alignment(), chunk_size);
        Ok(Self {
            layout: ChunkLayout::new(inner.size(), chunk_size)?,
            reads: ChunkLayout::new(inner.size(), unit)?,
            inner,
            locks: ChunkLocks::new(),
        })
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    async fn lock_all(&self, offset: u64, len: u64) -> Vec<ChunkGuard<'_>> {
        let mut guards = Vec::new();
        for chunk in self.layout.chunks_touching(offset, len) {
            guards.push(self.locks.lock(chunk).await);
        }
        guards
    }

    /// Writes `data` at `offset` with the chunks already locked: partial chunks at either end
    /// are read, patched and written back; the aligned middle is written directly.
    async fn write_locked(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if self.layout.is_aligned(offset, len) {
            return self.inner.write_at(offset, data).await;
        }
        let Range { start, end } = self.layout.covering(offset, len);
        let mut covering = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        let tail = (end - (offset + len)) as usize;
        // Only the partial chunks need their old bytes.
        let first_len = self.layout.chunk_len(self.layout.chunk_of(start));
        if head > 0 {
            self.inner.read_at(start, &mut covering[..first_len]).await?;
        }
        if tail > 0 {
            let last = self.layout.chunk_range(self.layout.chunk_of(end - 1));
            let at = (last.start - start) as usize;
            if head == 0 || last.start != start {
                self.inner.read_at(last.start, &mut covering[at..]).await?;
            }
        }
        covering[head..head + data.len()].copy_from_slice(data);
        self.inner.write_at(start, &covering).await
    }
}

#[async_trait]
impl<B: Backend> Backend for Arbitrary<B> {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    /// Any read is accepted; reads in the inner backend's unit pass without copies.
    fn read_alignment(&self) -> Option<u64> {
        Some(self.reads.chunk_size())
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        check_range(offset, len, self.layout.size())?;
        if len == 0 {
            return Ok(());
        }
        if self.reads.is_aligned(offset, len) {
            return self.inner.read_at(offset, buf).await;
        }
        let Range { start, end } = self.reads.covering(offset, len);
        let mut covering = vec![0u8; (end - start) as usize];
        self.inner.read_at(start, &mut covering).await?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&covering[head..head + buf.len()]);
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.layout.size())?;
        if data.is_empty() {
            return Ok(());
        }
        let _guards = self.lock_all(offset, data.len() as u64).await;
        self.write_locked(offset, data).await
    }

    async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

impl<B: Backend> Arbitrary<B> {
    /// Zeros (or trims) the aligned middle in the inner backend and patches partial chunks at
    /// the ends with zeros, all under the chunk locks.
    async fn zero_range(&self, offset: u64, len: u64, trim: bool) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        if len == 0 {
            return Ok(());
        }
        let _guards = self.lock_all(offset, len).await;
        let end = offset + len;
        let cs = self.layout.chunk_size();
        let inner_start = offset.div_ceil(cs) * cs;
        let inner_end = if end == self.layout.size() {
            end
        } else {
            end / cs * cs
        };
        if inner_start < inner_end {
            let n = inner_end - inner_start;
            if trim {
                self.inner.trim(inner_start, n).await?;
            } else {
                self.inner.write_zeroes(inner_start, n).await?;
            }
            if offset < inner_start {
                self.write_locked(offset, &vec![0; (inner_start - offset) as usize])
                    .await?;
            }
            if inner_end < end {
                self.write_locked(inner_end, &vec![0; (end - inner_end) as usize])
                    .await?;
            }
            Ok(())
        } else {
            // Within at most two partial chunks: bounded by two chunks of zeros.
            self.write_locked(offset, &vec![0; len as usize]).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::Chunked;
    use crate::{testing, MemoryBackend};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn stack(size: u64, chunk: u64) -> super::Arbitrary<Chunked<MemoryBackend>> {
        // Chunked underneath proves every inner access is aligned.
        super::Arbitrary::new(
            Chunked::new(MemoryBackend::new(size), chunk, u64::MAX).unwrap(),
            chunk,
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn unaligned_workload_matches_model(chunks in 1u64..30, tail in 0u64..16, ops in testing::ops_strategy(200, 40)) {
            testing::block_on(testing::check_against_model(&stack(chunks * 16 + tail, 16), 1, &ops))?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// An inner backend with a smaller read unit (16 in 64-byte chunks) is read in that
        /// unit, writes still in whole chunks (Chunked proves both).
        #[test]
        fn reads_in_the_inner_read_unit_match_model(chunks in 1u64..12, tail in 0u64..16, ops in testing::ops_strategy(200, 40)) {
            let size = chunks * 64 + tail;
            let inner = Chunked::new(MemoryBackend::new(size), 16, u64::MAX).unwrap();
            let backend = super::Arbitrary::new(inner, 64).unwrap();
            prop_assert_eq!(backend.read_alignment(), Some(16));
            testing::block_on(testing::check_against_model(&backend, 1, &ops))?;
        }
    }

    /// Chunked lets through only aligned 4 KiB requests: a read of 100 bytes in a 1 MiB chunk
    /// fails unless it reaches the inner backend as one 4 KiB read.
    #[test]
    fn a_small_read_asks_the_inner_backend_for_its_unit_only() {
        testing::block_on(async {
            let size = 3 << 20;
            let content = testing::pattern(9, size as usize);
            let memory = MemoryBackend::new(size);
            memory.write_at(0, &content).await.unwrap();
            let inner = Chunked::new(memory, 4096, 4096).unwrap();
            let backend = super::Arbitrary::new(inner, 1 << 20).unwrap();
            assert_eq!(backend.read_alignment(), Some(4096));
            let mut buf = [0u8; 100];
            backend.read_at((1 << 20) + 5000, &mut buf).await.unwrap();
            assert_eq!(buf[..], content[(1 << 20) + 5000..(1 << 20) + 5100]);
            // Memory reads any range: reads pass as they come.
            let whole = super::Arbitrary::new(MemoryBackend::new(size), 1 << 20).unwrap();
            assert_eq!(whole.read_alignment(), Some(1));
        });
    }

    #[test]
    fn concurrent_unaligned_access_matches_model() {
        testing::block_on(testing::check_concurrent(
            Arc::new(stack(16 * 200 + 3, 16)),
            1,
            8,
            300,
        ))
        .unwrap();
    }

    /// Many tasks write disjoint single bytes of the same few chunks: a non-atomic
    /// read-modify-write would lose some of them.
    #[test]
    fn partial_writes_to_one_chunk_are_never_lost() {
        testing::block_on(async {
            let backend = Arc::new(stack(64, 32));
            let tasks: Vec<_> = (0..64u64)
                .map(|i| {
                    let backend = backend.clone();
                    tokio::spawn(async move { backend.write_at(i, &[i as u8 + 1]).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let mut all = [0u8; 64];
            backend.read_at(0, &mut all).await.unwrap();
            let expected: Vec<u8> = (1..=64).collect();
            assert_eq!(all.to_vec(), expected);
        });
    }
}
