//! O_DIRECT access to a file, bypassing the page cache.
//!
//! Direct I/O needs the file offset, the length and the memory address to be multiples of the
//! device's block size; [`DIRECT_IO_ALIGNMENT`] covers every common device. Requests must be
//! aligned (or end at the end of the resource); unaligned memory is bounced through an aligned
//! buffer. The partial block at the end of a file whose size is not a multiple of the alignment
//! goes through a buffered descriptor instead: a direct write of it would grow the file. The
//! kernel keeps buffered and direct I/O on one file coherent.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use r3map_core::{ChunkLayout, Error, Result};

use crate::fileops::setup_error;

/// Alignment of offsets, lengths and memory for O_DIRECT requests, in bytes.
pub const DIRECT_IO_ALIGNMENT: u64 = 4096;

/// Largest bounce buffer a request allocates; larger requests bounce in pieces.
const BOUNCE_SIZE: usize = 1 << 20;

/// An O_DIRECT descriptor and the block layout of the resource it serves.
#[derive(Debug)]
pub(crate) struct DirectFile {
    file: File,
    blocks: ChunkLayout,
    /// End of the last whole block; bytes past it form the partial tail block.
    whole_blocks_end: u64,
}

impl DirectFile {
    /// Opens `path` for direct I/O; this is where a filesystem refuses O_DIRECT.
    pub(crate) fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|err| open_error(err, path))
    }

    /// Serves a resource of `size` bytes through `file`, opened by [`Self::open`].
    pub(crate) fn new(file: File, size: u64) -> Result<Self> {
        Ok(Self {
            file,
            blocks: ChunkLayout::new(size, DIRECT_IO_ALIGNMENT)?,
            whole_blocks_end: size - size % DIRECT_IO_ALIGNMENT,
        })
    }

    /// Fails with `Unaligned` unless the request starts on a block boundary and ends on one or
    /// at the end of the resource.
    pub(crate) fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        self.blocks.check_aligned(offset, len)
    }

    /// Reads an aligned request; the partial tail block comes from `buffered`.
    pub(crate) fn read_at(&self, buffered: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (blocks, tail) = buf.split_at_mut(self.whole_blocks_len(offset, buf.len()));
        self.read_blocks(offset, blocks)?;
        buffered.read_exact_at(tail, offset + blocks.len() as u64)
    }

    /// Writes an aligned request; the partial tail block goes to `buffered`.
    pub(crate) fn write_at(&self, buffered: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let (blocks, tail) = data.split_at(self.whole_blocks_len(offset, data.len()));
        self.write_blocks(offset, blocks)?;
        buffered.write_all_at(tail, offset + blocks.len() as u64)
    }

    /// How many of `len` bytes at (aligned) `offset` lie in whole blocks.
    fn whole_blocks_len(&self, offset: u64, len: usize) -> usize {
        (self.whole_blocks_end.saturating_sub(offset) as usize).min(len)
    }

    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if is_aligned_memory(buf) {
            return self.file.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_SIZE));
        for (piece, at) in buf.chunks_mut(BOUNCE_SIZE).zip(piece_offsets(offset)) {
            let staged = &mut bounce.as_mut_slice()[..piece.len()];
            self.file.read_exact_at(staged, at)?;
            piece.copy_from_slice(staged);
        }
        Ok(())
    }

    fn write_blocks(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if is_aligned_memory(data) {
            return self.file.write_all_at(data, offset);
        }
        let mut bounce = AlignedBuf::new(data.len().min(BOUNCE_SIZE));
        for (piece, at) in data.chunks(BOUNCE_SIZE).zip(piece_offsets(offset)) {
            let staged = &mut bounce.as_mut_slice()[..piece.len()];
            staged.copy_from_slice(piece);
            self.file.write_all_at(staged, at)?;
        }
        Ok(())
    }
}

/// File offsets of the successive bounce-sized pieces of a request at `offset`.
fn piece_offsets(offset: u64) -> impl Iterator<Item = u64> {
    (0..).map(move |i| offset + i * BOUNCE_SIZE as u64)
}

fn is_aligned_memory(bytes: &[u8]) -> bool {
    bytes.as_ptr().addr().is_multiple_of(DIRECT_IO_ALIGNMENT as usize)
}

/// Explains the one open error users hit: a filesystem that does not support O_DIRECT.
fn open_error(err: io::Error, path: &Path) -> Error {
    if err.raw_os_error() == Some(libc::EINVAL) {
        return Error::InvalidConfig(format!(
            "the filesystem holding {} refuses O_DIRECT (tmpfs before Linux 6.6, procfs and \
             some FUSE filesystems do); put the file on a disk filesystem or open it without \
             direct I/O",
            path.display()
        ));
    }
    setup_error(err, "cannot open for direct I/O", path)
}

/// A zeroed buffer whose start is aligned for direct I/O, carved out of a slightly larger
/// vector so that no unsafe allocation is needed.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// An aligned buffer of `len` zero bytes.
    pub(crate) fn new(len: usize) -> Self {
        let align = DIRECT_IO_ALIGNMENT as usize;
        let storage = vec![0u8; len + align];
        let start = (align - storage.as_ptr().addr() % align) % align;
        Self { storage, start, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_sized() {
        for len in [0, 1, 4095, 4096, 3 * 4096 + 5] {
            let mut buf = AlignedBuf::new(len);
            assert_eq!(buf.as_mut_slice().len(), len);
            assert!(is_aligned_memory(buf.as_mut_slice()));
        }
    }

    #[test]
    fn refusal_names_the_path_and_the_fix() {
        let err = open_error(io::Error::from_raw_os_error(libc::EINVAL), Path::new("/mnt/x"));
        let message = err.to_string();
        assert!(message.contains("/mnt/x") && message.contains("refuses O_DIRECT"));
        assert!(message.contains("without direct I/O"));
    }
}
