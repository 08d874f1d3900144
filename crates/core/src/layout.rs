//! Chunk math: which chunks a byte range touches, and how long the (possibly short) tail chunk is.

use std::ops::Range;

use crate::{Error, Result};

/// A resource of `size` bytes cut into chunks of `chunk_size` bytes. The last chunk is shorter
/// when `size` is not a multiple of `chunk_size`; every helper here accounts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    size: u64,
    chunk_size: u64,
}

impl ChunkLayout {
    /// A layout; `chunk_size` must be non-zero.
    pub fn new(size: u64, chunk_size: u64) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::InvalidConfig(
                "chunk size must be greater than zero".into(),
            ));
        }
        Ok(Self { size, chunk_size })
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk (the tail chunk may be shorter).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks, counting a short tail chunk.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// Byte range of chunk `index`, clipped to the resource size.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        let start = index * self.chunk_size;
        start..(start + self.chunk_size).min(self.size)
    }

    /// Length in bytes of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> usize {
        let range = self.chunk_range(index);
        (range.end - range.start) as usize
    }

    /// Index of the chunk holding byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset / self.chunk_size
    }

    /// Chunks touched by `len` bytes at `offset` (empty for `len == 0`).
    pub fn chunks_touching(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        self.chunk_of(offset)..(offset + len).div_ceil(self.chunk_size)
    }

    /// Whether the range starts on a chunk boundary and ends on one or at the end of the resource.
    pub fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        offset.is_multiple_of(self.chunk_size) && (end.is_multiple_of(self.chunk_size) || end == self.size)
    }

    /// Fails with `Unaligned` unless [`Self::is_aligned`].
    pub fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        if self.is_aligned(offset, len) {
            Ok(())
        } else {
            Err(Error::Unaligned {
                offset,
                len,
                alignment: self.chunk_size,
            })
        }
    }
}

impl ChunkLayout {
    /// The whole chunks around `len > 0` bytes at `offset`: from the start of the first chunk
    /// touched to the end of the last (clipped to the size).
    pub fn covering(&self, offset: u64, len: u64) -> Range<u64> {
        let chunks = self.chunks_touching(offset, len);
        self.chunk_range(chunks.start).start..self.chunk_range(chunks.end - 1).end
    }
}

/// The unit in which a stage with chunks of `chunk_size` reads from a backend whose
/// [`read_alignment`](crate::Backend::read_alignment) is `alignment`: the alignment when it is
/// smaller than a chunk and divides it, otherwise the whole chunk.
pub fn read_unit(alignment: Option<u64>, chunk_size: u64) -> u64 {
    match alignment {
        Some(a) if a > 0 && a < chunk_size && chunk_size.is_multiple_of(a) => a,
        _ => chunk_size,
    }
}

/// Fails with `OutOfBounds` unless `offset..offset+len` lies within `size` bytes (overflow-safe).
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_chunk_is_short_and_counted() {
        let layout = ChunkLayout::new(10, 4).unwrap();
        assert_eq!(layout.chunk_count(), 3);
        assert_eq!(layout.chunk_range(2), 8..10);
        assert_eq!(layout.chunk_len(2), 2);
        assert!(layout.is_aligned(8, 2));
        assert!(!layout.is_aligned(8, 1));
        assert_eq!(layout.chunks_touching(3, 6), 0..3);
        assert_eq!(layout.chunks_touching(4, 4), 1..2);
        assert_eq!(layout.covering(5, 4), 4..10);
        assert_eq!(layout.covering(4, 1), 4..8);
    }

    #[test]
    fn read_unit_is_a_divisor_of_the_chunk_or_the_chunk() {
        assert_eq!(read_unit(Some(4096), 1 << 20), 4096);
        assert_eq!(read_unit(Some(1), 64), 1);
        assert_eq!(read_unit(None, 64), 64);
        assert_eq!(read_unit(Some(0), 64), 64);
        assert_eq!(read_unit(Some(128), 64), 64, "larger than a chunk");
        assert_eq!(read_unit(Some(24), 64), 64, "does not divide the chunk");
    }

    #[test]
    fn range_check_rejects_overflow() {
        assert!(check_range(u64::MAX, 2, 10).is_err());
        assert!(check_range(8, 2, 10).is_ok());
        assert!(check_range(8, 3, 10).is_err());
        assert!(ChunkLayout::new(1, 0).is_err());
    }
}
