//! The backend abstraction: fixed-size random-access storage.

use std::sync::Arc;

use async_trait::async_trait;

use crate::layout::check_range;
use crate::Result;

/// Largest buffer the default `write_zeroes` allocates; bigger ranges are written in pieces.
const ZERO_PIECE: usize = 1 << 20;

/// What a range of a backend holds, as far as the backend knows without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// The range may hold any bytes (the answer when a backend does not know).
    Data,
    /// The range was never written (or was trimmed) and reads as zeros: a copy can skip it.
    Hole,
}

/// A run of bytes with one [`Allocation`], as returned by [`Backend::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub len: u64,
    pub allocation: Allocation,
}

impl Extent {
    /// `len` bytes that may hold data.
    pub fn data(len: u64) -> Self {
        Self {
            len,
            allocation: Allocation::Data,
        }
    }

    /// `len` bytes that read as zeros.
    pub fn hole(len: u64) -> Self {
        Self {
            len,
            allocation: Allocation::Hole,
        }
    }
}

/// Fixed-size random-access storage: a local memory region, a file, a directory of chunk files,
/// or a remote (NBD, gRPC, Redis, S3), and every stage that wraps one.
///
/// Methods take `&self` and must be safe to call concurrently on different chunks without a
/// global lock. The methods are `async` so that a remote can keep thousands of requests in
/// flight on a few OS threads; see ARCHITECTURE.md for how thread-based kernel handlers call in.
///
/// Reads and writes are exact: `read_at` fills the whole buffer and `write_at` writes all of
/// `data`, or they fail. A range past [`Backend::size`] fails with `Error::OutOfBounds`.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Size of the resource in bytes; it never changes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` at `offset`.
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes every completed write durable (as durable as the backend can be).
    async fn sync(&self) -> Result<()>;

    /// Tells the backend a range is no longer needed. Every r3map backend reads a trimmed range
    /// back as zeros, so the default writes zeros.
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Sets a range to zeros. The default writes zeros in bounded pieces.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        let zeros = vec![0u8; (len as usize).min(ZERO_PIECE)];
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..piece]).await?;
            done += piece as u64;
        }
        Ok(())
    }

    /// Which parts of the range at `offset` of `len` bytes (`len > 0`) hold data and which
    /// are holes that read as zeros. The extents are in order, non-empty, and cover a non-empty
    /// prefix of the range (a backend may stop early to bound its answer; ask again for the
    /// rest). Reporting [`Allocation::Data`] for a hole is always correct, so the default
    /// reports the whole range as data; stages that wrap a backend forward the question.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        Ok(vec![Extent::data(len)])
    }

    /// The smallest read this backend serves well: a read whose offset and length are multiples
    /// of it (or that ends at [`Backend::size`]) is accepted and costs about the bytes it asks
    /// for, so a stage in front may pass such a read through instead of reading whole chunks
    /// (an NBD server's preferred block size; 1 for memory). `None`, the default: not known, or
    /// only whole chunks are accepted; stages in front then read whole chunks of their own
    /// layout. Stages that wrap a backend forward the question or answer for themselves.
    fn read_alignment(&self) -> Option<u64> {
        None
    }

    /// Drops this backend's connection to a remote at once: requests in flight fail, nothing
    /// more is sent, and the peer sees the connection reset, not an orderly close after the
    /// data still queued. The reconnect stage calls it on every connection it gives up, so a
    /// request sent on it cannot reach the server after the next connection is up
    /// (ARCHITECTURE.md, "Ordering across reconnects"). Local backends and stages ignore it.
    fn abort_connection(&self) {}
}

/// The shared, type-erased backend every stage and frontend can hold.
pub type SharedBackend = Arc<dyn Backend>;

#[async_trait]
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        (**self).sync().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        (**self).trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len).await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        (**self).extents(offset, len).await
    }
    fn read_alignment(&self) -> Option<u64> {
        (**self).read_alignment()
    }
    fn abort_connection(&self) {
        (**self).abort_connection()
    }
}
