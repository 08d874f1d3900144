//! The memory backend: a zero-initialised byte region in this process.
//!
//! It lives in the core crate because every managed stack needs a local cache and every stage
//! test needs a backend to wrap.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use parking_lot::RwLock;

use crate::layout::check_range;
use crate::{Allocation, Backend, Extent, Result};

/// Bytes per independently locked segment: requests on different segments never contend.
const SEGMENT_SIZE: u64 = 256 << 10;

/// A fixed-size region of memory, split into independently locked segments (no global lock).
/// Pages are allocated lazily by the OS, so a large, mostly untouched backend costs little.
#[derive(Debug)]
pub struct MemoryBackend {
    segments: Box<[RwLock<Box<[u8]>>]>,
    /// Per segment: whether anything was written to it since it was last wholly zeroed. The
    /// others are reported as holes by [`Backend::extents`].
    written: Box<[AtomicBool]>,
    size: u64,
}

impl MemoryBackend {
    /// A zero-filled backend of `size` bytes.
    pub fn new(size: u64) -> Self {
        let count = size.div_ceil(SEGMENT_SIZE);
        let segments = (0..count)
            .map(|i| {
                let len = (size - i * SEGMENT_SIZE).min(SEGMENT_SIZE) as usize;
                RwLock::new(vec![0u8; len].into_boxed_slice())
            })
            .collect();
        let written = (0..count).map(|_| AtomicBool::new(false)).collect();
        Self {
            segments,
            written,
            size,
        }
    }

    /// Calls `f(segment, offset within it, byte range of the request)` for every segment the
    /// request at `offset` of `len` bytes touches.
    fn for_each_segment(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let segment = (pos / SEGMENT_SIZE) as usize;
            let within = (pos % SEGMENT_SIZE) as usize;
            let n = (len - done).min(SEGMENT_SIZE as usize - within);
            f(segment, within, done..done + n);
            done += n;
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_alignment(&self) -> Option<u64> {
        Some(1)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.for_each_segment(offset, buf.len(), |segment, within, range| {
            let data = self.segments[segment].read();
            let n = range.len();
            buf[range].copy_from_slice(&data[within..within + n]);
        });
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        self.for_each_segment(offset, data.len(), |segment, within, range| {
            let mut bytes = self.segments[segment].write();
            let n = range.len();
            // Set under the segment's lock, so a concurrent whole-segment zeroing cannot clear
            // the flag after this write landed.
            self.written[segment].store(true, Ordering::Release);
            bytes[within..within + n].copy_from_slice(&data[range]);
        });
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        self.for_each_segment(offset, len as usize, |segment, within, range| {
            let mut bytes = self.segments[segment].write();
            if !self.written[segment].load(Ordering::Acquire) {
                // Never written since it was last wholly zeroed: zeros already, and its pages
                // need not be touched (a cache skipping a remote's holes zeroes most of itself).
                return;
            }
            bytes[within..within + range.len()].fill(0);
            if range.len() == bytes.len() {
                self.written[segment].store(false, Ordering::Release);
            }
        });
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let mut extents: Vec<Extent> = Vec::new();
        self.for_each_segment(offset, len as usize, |segment, _, range| {
            let allocation = if self.written[segment].load(Ordering::Acquire) {
                Allocation::Data
            } else {
                Allocation::Hole
            };
            match extents.last_mut() {
                Some(last) if last.allocation == allocation => last.len += range.len() as u64,
                _ => extents.push(Extent {
                    len: range.len() as u64,
                    allocation,
                }),
            }
        });
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use proptest::prelude::*;
    use std::sync::Arc;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_model(size in 1u64..(3 * SEGMENT_SIZE), ops in testing::ops_strategy(SEGMENT_SIZE + 100, 40)) {
            testing::block_on(testing::check_against_model(&MemoryBackend::new(size), 1, &ops))?;
        }
    }

    #[test]
    fn never_written_segments_are_holes() {
        testing::block_on(async {
            let backend = MemoryBackend::new(4 * SEGMENT_SIZE + 10);
            let all = backend.size();
            assert_eq!(backend.extents(0, all).await.unwrap(), vec![Extent::hole(all)]);
            // A one-byte write makes its whole segment data; zeros written are data too.
            backend.write_at(SEGMENT_SIZE + 5, &[1]).await.unwrap();
            backend.write_at(3 * SEGMENT_SIZE, &[0]).await.unwrap();
            let expected = vec![
                Extent::hole(SEGMENT_SIZE),
                Extent::data(SEGMENT_SIZE),
                Extent::hole(SEGMENT_SIZE),
                Extent::data(SEGMENT_SIZE),
                Extent::hole(10),
            ];
            assert_eq!(backend.extents(0, all).await.unwrap(), expected);
            // A query in the middle is cut to the range.
            assert_eq!(
                backend.extents(SEGMENT_SIZE + 7, 3).await.unwrap(),
                vec![Extent::data(3)]
            );
            // Zeroing part of a segment keeps it data; zeroing all of it makes it a hole again.
            backend.write_zeroes(SEGMENT_SIZE, 100).await.unwrap();
            assert_eq!(
                backend.extents(SEGMENT_SIZE, 1).await.unwrap(),
                vec![Extent::data(1)]
            );
            backend.write_zeroes(SEGMENT_SIZE, SEGMENT_SIZE).await.unwrap();
            assert_eq!(
                backend.extents(0, 3 * SEGMENT_SIZE).await.unwrap(),
                vec![Extent::hole(3 * SEGMENT_SIZE)]
            );
            assert!(backend.extents(all, 1).await.is_err());
        });
    }

    #[test]
    fn concurrent_access_matches_model() {
        testing::block_on(testing::check_concurrent(
            Arc::new(MemoryBackend::new(5 * SEGMENT_SIZE + 17)),
            1,
            8,
            200,
        ))
        .unwrap();
    }
}
