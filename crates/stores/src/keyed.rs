//! [`KeyedBackend`]: a [`Backend`] over any store that keeps one value per chunk.
//!
//! The store only ever sees whole chunks, named by their byte offset (the Go r3map's layout).
//! A request spanning many chunks becomes many store requests in flight at once (bounded), each
//! with its own deadline. [`open_backend`] puts the `Arbitrary` stage in front, so unaligned
//! I/O works too (read-modify-write of partial chunks, atomic per chunk).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use r3map_core::stages::Arbitrary;
use r3map_core::{check_range, Backend, ChunkLayout, Error, Result};

/// A store holding one value per chunk. A chunk that was never written (or was deleted) reads
/// as zeros, so an untouched resource costs nothing in the store.
#[async_trait]
pub trait ChunkStore: Send + Sync + 'static {
    /// Where the store is, for messages (`redis://127.0.0.1:6379`, `s3://bucket at URL`).
    fn endpoint(&self) -> &str;

    /// Fills `buf` (the whole chunk) with the chunk stored at byte `offset`, or zeros.
    async fn get(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Stores `data` (the whole chunk) as the chunk at byte `offset`.
    async fn put(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Removes the chunk at byte `offset`, so it reads as zeros.
    async fn delete(&self, offset: u64) -> Result<()>;

    /// Returns once every acknowledged `put` is as durable as the store makes it.
    async fn sync(&self) -> Result<()>;
}

/// How a [`KeyedBackend`] drives its store.
#[derive(Debug, Clone, Copy)]
pub struct KeyedOptions {
    /// Store requests of one backend request in flight at once.
    pub concurrency: usize,
    /// Time one store request may take before it fails with `Error::Timeout`.
    pub deadline: Duration,
}

impl Default for KeyedOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            deadline: Duration::from_secs(30),
        }
    }
}

/// A resource of fixed size stored chunk by chunk in a [`ChunkStore`]; accepts whole-chunk
/// (aligned) requests only. Use [`open_backend`] for one that accepts any request.
#[derive(Debug)]
pub struct KeyedBackend<S> {
    store: S,
    layout: ChunkLayout,
    options: KeyedOptions,
}

impl<S: ChunkStore> KeyedBackend<S> {
    /// A resource of `size` bytes in `chunk_size`-byte chunks of `store`.
    pub fn new(store: S, size: u64, chunk_size: u64, options: KeyedOptions) -> Result<Self> {
        if options.concurrency == 0 {
            return Err(Error::InvalidConfig(
                "a store needs at least one request in flight".into(),
            ));
        }
        Ok(Self {
            store,
            layout: ChunkLayout::new(size, chunk_size)?,
            options,
        })
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.layout.chunk_size()
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        self.layout.check_aligned(offset, len)
    }

    async fn within_deadline<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.options.deadline, request)
            .await
            .map_err(|_| Error::Timeout(self.options.deadline))?
    }

    /// Runs `request` for every chunk of the aligned range at `offset`, many at once.
    async fn for_each_chunk<'a, F, Fut>(&'a self, offset: u64, len: u64, request: F) -> Result<()>
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = Result<()>> + 'a,
    {
        let chunks = self.layout.chunks_touching(offset, len);
        futures::stream::iter(chunks.map(|chunk| self.within_deadline(request(chunk))))
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await
    }
}

#[async_trait]
impl<S: ChunkStore> Backend for KeyedBackend<S> {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    /// One key or object per chunk: only whole chunks.
    fn read_alignment(&self) -> Option<u64> {
        Some(self.layout.chunk_size())
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let chunk_size = self.layout.chunk_size() as usize;
        // Aligned: every piece but a tail chunk at the very end is one whole chunk.
        // Boxed and collected: a lazily mapped iterator of borrowing futures trips the
        // compiler's higher-ranked `Send` inference. One box per chunk is noise next
        // to a network round trip.
        let pieces: Vec<BoxFuture<'_, Result<()>>> = buf
            .chunks_mut(chunk_size)
            .enumerate()
            .map(|(i, piece)| {
                let at = offset + (i * chunk_size) as u64;
                Box::pin(self.within_deadline(self.store.get(at, piece))) as BoxFuture<'_, _>
            })
            .collect();
        futures::stream::iter(pieces)
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        let chunk_size = self.layout.chunk_size() as usize;
        let pieces: Vec<BoxFuture<'_, Result<()>>> = data
            .chunks(chunk_size)
            .enumerate()
            .map(|(i, piece)| {
                let at = offset + (i * chunk_size) as u64;
                Box::pin(self.within_deadline(self.store.put(at, piece))) as BoxFuture<'_, _>
            })
            .collect();
        futures::stream::iter(pieces)
            .buffer_unordered(self.options.concurrency)
            .try_collect()
            .await
    }

    async fn sync(&self) -> Result<()> {
        self.within_deadline(self.store.sync()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Deletes the chunks: a missing chunk reads as zeros, and nothing is sent but the keys.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let cs = self.layout.chunk_size();
        self.for_each_chunk(offset, len, |chunk| self.store.delete(chunk * cs))
            .await
    }
}

/// A resource of `size` bytes in `chunk_size`-byte chunks of `store` that accepts requests of
/// any offset and length.
pub fn open_backend<S: ChunkStore>(
    store: S,
    size: u64,
    chunk_size: u64,
    options: KeyedOptions,
) -> Result<Arbitrary<KeyedBackend<S>>> {
    Arbitrary::new(KeyedBackend::new(store, size, chunk_size, options)?, chunk_size)
}

/// How chunk keys (Redis) and object names (S3) are formed from a prefix and a byte offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyLayout {
    /// The Go r3map's: `PREFIX-OFFSET` (decimal byte offset). Without a prefix its Redis backend
    /// uses the bare offset and its S3 backend `-OFFSET`; [`KeyLayout::key`] follows each, so
    /// either implementation reads what the other wrote, given the same chunk size.
    #[default]
    Go,
    /// `PREFIX/OFFSET`: a resource is one folder of an S3 bucket (listed, copied or deleted by
    /// prefix with any S3 tool) and matches `SCAN MATCH PREFIX/*` in Redis.
    Folder,
}

impl KeyLayout {
    /// The layout named `go` or `folder`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "go" => Some(Self::Go),
            "folder" => Some(Self::Folder),
            _ => None,
        }
    }

    /// The key of the chunk at byte `offset` under `prefix`. `bare_without_prefix`: whether an
    /// empty prefix leaves the bare offset (the Go r3map's Redis layout) rather than `-OFFSET`
    /// (its S3 layout).
    pub fn key(self, prefix: &str, offset: u64, bare_without_prefix: bool) -> String {
        match self {
            _ if prefix.is_empty() && bare_without_prefix => offset.to_string(),
            Self::Go => format!("{prefix}-{offset}"),
            Self::Folder if prefix.is_empty() => offset.to_string(),
            Self::Folder => format!("{prefix}/{offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        // The Go r3map's Redis backend: bare offsets without a prefix; its S3 backend: `-OFFSET`.
        assert_eq!(KeyLayout::Go.key("", 0, true), "0");
        assert_eq!(KeyLayout::Go.key("", 1 << 20, true), "1048576");
        assert_eq!(KeyLayout::Go.key("", 4096, false), "-4096");
        assert_eq!(KeyLayout::Go.key("vm1", 4096, true), "vm1-4096");
        assert_eq!(KeyLayout::Go.key("vm1", 4096, false), "vm1-4096");
        assert_eq!(KeyLayout::Folder.key("vms/vm1", 4096, false), "vms/vm1/4096");
        assert_eq!(KeyLayout::Folder.key("", 4096, false), "4096");
        assert_eq!(KeyLayout::parse("go"), Some(KeyLayout::Go));
        assert_eq!(KeyLayout::parse("folder"), Some(KeyLayout::Folder));
        assert_eq!(KeyLayout::parse("Go"), None);
    }
}
