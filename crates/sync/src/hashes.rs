//! Per-block hashes of one version of a file: xxh3 to find changed blocks, blake3 to verify a
//! whole version end to end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use twox_hash::XxHash3_64;

/// Number of blocks of `block_size` bytes needed for `size` bytes (the last may be short).
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size))
}

/// The byte range `(offset, len)` of block `index` in a file of `size` bytes.
pub fn block_range(index: u64, size: u64, block_size: u32) -> (u64, usize) {
    let offset = index * u64::from(block_size);
    let len = size.saturating_sub(offset).min(u64::from(block_size));
    (offset, len as usize)
}

/// The fast hash of one block (detection only: a collision is caught by the digest).
pub fn fast_hash(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

fn strong_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Hashes of every block of one version: its size, an xxh3 and a blake3 per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    block_size: u32,
    size: u64,
    fast: Vec<u64>,
    strong: Vec<[u8; 32]>,
}

impl BlockHashes {
    /// Hashes of an empty file.
    pub fn empty(block_size: u32) -> Self {
        Self {
            block_size,
            size: 0,
            fast: Vec::new(),
            strong: Vec::new(),
        }
    }

    /// Hashes of `data` (the model the file versions are tested against).
    pub fn of_bytes(data: &[u8], block_size: u32) -> Self {
        let mut hashes = Self::empty(block_size);
        hashes.resize(data.len() as u64);
        for index in 0..hashes.blocks() {
            let (offset, len) = hashes.range(index);
            hashes.set_block(index, &data[offset as usize..offset as usize + len]);
        }
        hashes
    }

    /// Hashes of `file` as it is now, read with `threads` threads.
    pub fn of_file(file: &File, block_size: u32, threads: usize) -> io::Result<Self> {
        let mut hashes = Self::empty(block_size);
        hashes.refresh(file, threads)?;
        Ok(hashes)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn blocks(&self) -> u64 {
        self.fast.len() as u64
    }

    /// The xxh3 of every block, in order.
    pub fn fast(&self) -> &[u64] {
        &self.fast
    }

    /// The byte range of block `index`.
    pub fn range(&self, index: u64) -> (u64, usize) {
        block_range(index, self.size, self.block_size)
    }

    /// Changes the size; hashes of new blocks are those of zeros, as a file grown with
    /// `set_len` reads. The caller rehashes a last block whose length changed.
    pub fn resize(&mut self, size: u64) {
        let blocks = block_count(size, self.block_size) as usize;
        let zeros = vec![0u8; self.block_size as usize];
        self.size = size;
        let old = self.fast.len();
        self.fast.truncate(blocks);
        self.strong.truncate(blocks);
        for index in old..blocks {
            let (_, len) = self.range(index as u64);
            self.fast.push(fast_hash(&zeros[..len]));
            self.strong.push(strong_hash(&zeros[..len]));
        }
    }

    /// Records the content of block `index` (its length must be the block's length).
    pub fn set_block(&mut self, index: u64, data: &[u8]) {
        debug_assert_eq!(data.len(), self.range(index).1);
        self.fast[index as usize] = fast_hash(data);
        self.strong[index as usize] = strong_hash(data);
    }

    /// Whether block `index` holds the same bytes here and in `other`: same length, same xxh3
    /// and same blake3 (so a copy may be skipped: an xxh3 collision alone does not match).
    pub fn same_block(&self, other: &Self, index: u64) -> bool {
        let i = index as usize;
        self.block_size == other.block_size
            && i < self.fast.len()
            && i < other.fast.len()
            && self.range(index).1 == other.range(index).1
            && self.fast[i] == other.fast[i]
            && self.strong[i] == other.strong[i]
    }

    /// Rehashes the whole of `file` with `threads` threads: xxh3 of every block, blake3 only of
    /// blocks whose xxh3 changed (or that are new). Returns how many blocks changed.
    pub fn refresh(&mut self, file: &File, threads: usize) -> io::Result<u64> {
        let size = file.metadata()?.len();
        let old_size = self.size;
        let old_fast = std::mem::take(&mut self.fast);
        let mut old_strong = std::mem::take(&mut self.strong);
        self.size = size;
        let blocks = block_count(size, self.block_size) as usize;
        let old_blocks_same_len = |index: usize| {
            index < old_fast.len()
                && block_range(index as u64, old_size, self.block_size).1
                    == block_range(index as u64, size, self.block_size).1
        };
        let threads = threads.clamp(1, blocks.max(1));
        let per_thread = blocks.div_ceil(threads).max(1);
        let mut fast = vec![0u64; blocks];
        old_strong.resize(blocks, [0; 32]);
        let mut strong = old_strong;
        let mut changed = 0u64;
        let block_size = self.block_size;
        std::thread::scope(|scope| -> io::Result<()> {
            let mut workers = Vec::new();
            for (part, (fast, strong)) in fast
                .chunks_mut(per_thread)
                .zip(strong.chunks_mut(per_thread))
                .enumerate()
            {
                let old_fast = &old_fast;
                let same_len = &old_blocks_same_len;
                workers.push(scope.spawn(move || -> io::Result<u64> {
                    let mut buf = vec![0u8; block_size as usize];
                    let mut changed = 0;
                    for (i, (fast, strong)) in fast.iter_mut().zip(strong.iter_mut()).enumerate() {
                        let index = part * per_thread + i;
                        let (offset, len) = block_range(index as u64, size, block_size);
                        read_exact_at(file, &mut buf[..len], offset)?;
                        *fast = fast_hash(&buf[..len]);
                        if !(same_len(index) && old_fast[index] == *fast) {
                            *strong = strong_hash(&buf[..len]);
                            changed += 1;
                        }
                    }
                    Ok(changed)
                }));
            }
            for worker in workers {
                changed += worker.join().expect("hash worker panicked")?;
            }
            Ok(())
        })?;
        self.fast = fast;
        self.strong = strong;
        Ok(changed)
    }

    /// The blake3 digest of this version: of its size, block size and every block's blake3. Two
    /// versions with equal digests hold the same bytes.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.size.to_le_bytes());
        hasher.update(&self.block_size.to_le_bytes());
        for strong in &self.strong {
            hasher.update(strong);
        }
        *hasher.finalize().as_bytes()
    }
}

/// `read_exact_at`, but a file that shrank meanwhile reads as zeros past its end instead of
/// failing (the next change event rehashes it).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_hashes_equal_model_hashes_and_refresh_counts_changes() {
        let mut data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let mut hashes = BlockHashes::of_file(&file, 1024, 3).unwrap();
        assert_eq!(hashes, BlockHashes::of_bytes(&data, 1024));
        assert_eq!(hashes.blocks(), 10);
        data[5000] ^= 1;
        data.extend_from_slice(&[1; 300]);
        file.write_all_at(&data, 0).unwrap();
        // Block 4 changed, the short last block grew (9), block 10 is new.
        assert_eq!(hashes.refresh(&file, 2).unwrap(), 3);
        assert_eq!(hashes, BlockHashes::of_bytes(&data, 1024));
        assert_ne!(hashes.digest(), BlockHashes::of_bytes(&data[1..], 1024).digest());
    }
}
