//! [`DirectoryBackend`]: one file per chunk in a directory.
//!
//! Chunk `i` lives in `chunk-<i>`; every chunk file is as long as its chunk (the tail chunk's
//! file is short) and sparse until written. A missing file reads as zeros, so an untouched
//! resource costs nothing on disk, and reads never create files. Chunk files are never deleted:
//! a request may still hold one open, and its writes would vanish with the unlinked inode, so
//! trimming punches a hole instead, which frees the space just the same.

mod record;

use std::fs::{self, File, OpenOptions};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use lru::LruCache;
use parking_lot::Mutex;
use r3map_core::{check_range, AtomicBitmap, Backend, ChunkLayout, Error, Extent, Result};

use crate::fileops::{
    file_extents, offload, read_or_zeros, setup_error, sync_dir, sync_parent, zero_range, Zeroing,
};

const CHUNK_FILE_PREFIX: &str = "chunk-";

/// Most chunks a directory may hold: beyond this the file count (and the sync bitmap) get
/// absurd, and a larger chunk size is the fix.
const MAX_CHUNKS: u64 = 1 << 28;

/// How a [`DirectoryBackend`] manages its chunk files.
#[derive(Debug, Clone, Copy)]
pub struct DirectoryOptions {
    open_files: usize,
}

impl Default for DirectoryOptions {
    fn default() -> Self {
        Self { open_files: 128 }
    }
}

impl DirectoryOptions {
    /// The defaults: up to 128 chunk files kept open.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many chunk files stay open between requests (at least 1); the least recently used
    /// one is closed when another is needed.
    pub fn open_files(mut self, count: usize) -> Self {
        self.open_files = count;
        self
    }
}

/// A resource stored as one file per chunk in a directory.
#[derive(Debug)]
pub struct DirectoryBackend {
    dir: PathBuf,
    layout: ChunkLayout,
    /// Open chunk files, least recently used evicted first. Requests hold their own `Arc`, so
    /// eviction never closes a file that is still in use.
    open_files: Mutex<LruCache<u64, Arc<File>>>,
    /// Chunks changed since the last sync, open or not: sync visits exactly these.
    unsynced: AtomicBitmap,
}

/// One chunk's share of a request.
struct Piece {
    chunk: u64,
    /// Offset inside the chunk file.
    within: u64,
    /// Bytes of the request's buffer that belong to this chunk.
    bytes: Range<usize>,
}

impl DirectoryBackend {
    /// Opens the chunk directory `dir` (created if missing) for a resource of `size` bytes cut
    /// into `chunk_size`-byte chunks. A directory used before must be reopened with the same
    /// size and chunk size, which it records on first use.
    pub fn open(
        dir: impl AsRef<Path>,
        size: u64,
        chunk_size: u64,
        options: DirectoryOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let layout = ChunkLayout::new(size, chunk_size)?;
        if layout.chunk_count() > MAX_CHUNKS {
            return Err(Error::InvalidConfig(format!(
                "{size} bytes in {chunk_size}-byte chunks would need {} chunk files, more than \
                 {MAX_CHUNKS}; use a larger chunk size",
                layout.chunk_count()
            )));
        }
        let capacity = NonZeroUsize::new(options.open_files).ok_or_else(|| {
            Error::InvalidConfig("the open chunk file cache must hold at least one file".into())
        })?;
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|err| setup_error(err, "cannot create", dir))?;
            sync_parent(dir).map_err(|err| setup_error(err, "cannot sync the parent of", dir))?;
        }
        record::check_or_write(dir, layout)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            layout,
            open_files: Mutex::new(LruCache::new(capacity)),
            unsynced: AtomicBitmap::new(layout.chunk_count()),
        })
    }

    /// Bytes per chunk (the tail chunk may be shorter).
    pub fn chunk_size(&self) -> u64 {
        self.layout.chunk_size()
    }

    /// Indices of the chunks that have a file, in order. Chunks without one read as zeros.
    pub fn existing_chunks(&self) -> Result<Vec<u64>> {
        let listing_error = |err| setup_error(err, "cannot list", &self.dir);
        let mut chunks = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(listing_error)? {
            let name = entry.map_err(listing_error)?.file_name();
            if let Some(chunk) = name.to_str().and_then(parse_chunk_file_name) {
                if chunk < self.layout.chunk_count() {
                    chunks.push(chunk);
                }
            }
        }
        chunks.sort_unstable();
        Ok(chunks)
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        self.layout.chunks_touching(offset, len).map(move |chunk| {
            let range = self.layout.chunk_range(chunk);
            let start = range.start.max(offset);
            let end = range.end.min(offset + len);
            Piece {
                chunk,
                within: start - range.start,
                bytes: (start - offset) as usize..(end - offset) as usize,
            }
        })
    }

    fn cached(&self, chunk: u64) -> Option<Arc<File>> {
        self.open_files.lock().get(&chunk).cloned()
    }

    fn remember(&self, chunk: u64, file: File) -> Arc<File> {
        let file = Arc::new(file);
        // The evicted file is dropped (maybe closed) here, after the cache lock is released.
        let _evicted = self.open_files.lock().push(chunk, file.clone());
        file
    }

    /// The chunk's file if it exists; never creates one.
    fn existing_file(&self, chunk: u64) -> Result<Option<Arc<File>>> {
        if let Some(file) = self.cached(chunk) {
            return Ok(Some(file));
        }
        let path = chunk_path(&self.dir, chunk);
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Ok(Some(self.remember(chunk, file))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// The chunk's file, created at the chunk's length if missing.
    fn file_for_writing(&self, chunk: u64) -> Result<Arc<File>> {
        if let Some(file) = self.cached(chunk) {
            return Ok(file);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(chunk_path(&self.dir, chunk))?;
        // Never shrinks: a concurrent writer may already have written into a fresh file.
        let len = self.layout.chunk_len(chunk) as u64;
        if file.metadata()?.len() < len {
            file.set_len(len)?;
        }
        Ok(self.remember(chunk, file))
    }

    fn zero(&self, offset: u64, len: u64, how: Zeroing) -> Result<()> {
        check_range(offset, len, self.layout.size())?;
        for piece in self.pieces(offset, len) {
            // A missing chunk file already reads as zeros.
            if let Some(file) = self.existing_file(piece.chunk)? {
                zero_range(&file, piece.within, piece.bytes.len() as u64, how)?;
                self.unsynced.set(piece.chunk);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for DirectoryBackend {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn read_alignment(&self) -> Option<u64> {
        Some(1)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.layout.size())?;
        for piece in self.pieces(offset, buf.len() as u64) {
            let target = &mut buf[piece.bytes];
            match self.existing_file(piece.chunk)? {
                Some(file) => read_or_zeros(&file, target, piece.within)?,
                None => target.fill(0),
            }
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.layout.size())?;
        for piece in self.pieces(offset, data.len() as u64) {
            let file = self.file_for_writing(piece.chunk)?;
            file.write_all_at(&data[piece.bytes], piece.within)?;
            // Marked only once written: a sync that already took the mark must not miss it.
            self.unsynced.set(piece.chunk);
        }
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        let chunks = self.unsynced.take();
        if chunks.is_empty() {
            return Ok(());
        }
        let open: Vec<_> = {
            let cache = self.open_files.lock();
            chunks.iter().map(|c| (*c, cache.peek(c).cloned())).collect()
        };
        let dir = self.dir.clone();
        let result = offload(move || {
            for (chunk, file) in open {
                // An evicted chunk's file is reopened: fsync flushes the file, not the descriptor.
                match file {
                    Some(file) => file.sync_data()?,
                    None => File::open(chunk_path(&dir, chunk))?.sync_data()?,
                }
            }
            sync_dir(&dir) // makes new chunk files' names durable
        })
        .await;
        if result.is_err() {
            // Keep them for the next sync to retry.
            chunks.iter().for_each(|&chunk| {
                self.unsynced.set(chunk);
            });
        }
        result
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, Zeroing::Trim)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(offset, len, Zeroing::WriteZeroes)
    }

    /// Missing chunk files are holes; inside a chunk file, its own holes (it is sparse until
    /// written) and the part past its end are too.
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.layout.size())?;
        let mut extents: Vec<Extent> = Vec::new();
        for piece in self.pieces(offset, len) {
            let len = piece.bytes.len() as u64;
            let found = match self.existing_file(piece.chunk)? {
                Some(file) => file_extents(&file, piece.within, piece.within + len)?,
                None => vec![Extent::hole(len)],
            };
            let complete = found.iter().map(|e| e.len).sum::<u64>() == len;
            for extent in found {
                match extents.last_mut() {
                    Some(last) if last.allocation == extent.allocation => last.len += extent.len,
                    _ => extents.push(extent),
                }
            }
            // A short answer for one chunk, or enough extents: the caller asks again.
            if !complete || extents.len() >= MAX_EXTENTS_PER_QUERY {
                break;
            }
        }
        Ok(extents)
    }
}

/// Extents after which [`DirectoryBackend::extents`] stops (the caller asks again).
const MAX_EXTENTS_PER_QUERY: usize = 1024;

fn chunk_path(dir: &Path, chunk: u64) -> PathBuf {
    dir.join(chunk_file_name(chunk))
}

fn chunk_file_name(chunk: u64) -> String {
    format!("{CHUNK_FILE_PREFIX}{chunk:08}")
}

/// The chunk index a file name stands for; only names [`chunk_file_name`] produces count.
fn parse_chunk_file_name(name: &str) -> Option<u64> {
    let chunk = name.strip_prefix(CHUNK_FILE_PREFIX)?.parse().ok()?;
    (chunk_file_name(chunk) == name).then_some(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_file_names_round_trip_and_reject_lookalikes() {
        for chunk in [0, 7, 12_345_678, 123_456_789_012, u64::MAX] {
            assert_eq!(parse_chunk_file_name(&chunk_file_name(chunk)), Some(chunk));
        }
        for name in [
            "chunk-7",
            "chunk-+0000007",
            "chunk-00000007.tmp",
            "r3map-layout",
            "x",
        ] {
            assert_eq!(parse_chunk_file_name(name), None, "{name}");
        }
    }
}
