//! The delta engine, free of I/O: which blocks a receiver lacks, and the checks each side runs
//! on what the other sends (so a hostile or broken peer is refused before anything is written).

use crate::hashes::{block_count, block_range, BlockHashes};
use crate::wire::{Message, MAX_HASHES_PER_FRAME};

/// Why a peer's messages were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("hash list piece starts at block {got}, expected {expected}")]
    HashesOutOfOrder { expected: u64, got: u64 },
    #[error("hash list has {got} hashes for a file of {size} bytes, which has {expected} blocks")]
    HashCount { size: u64, expected: u64, got: u64 },
    #[error("hash list pieces disagree on the file size ({first} then {then})")]
    SizeChanged { first: u64, then: u64 },
    #[error("the file is {size} bytes, above the limit of {max} bytes (--max-size)")]
    TooLarge { size: u64, max: u64 },
    #[error("plan announces {blocks} blocks but a file of {size} bytes has {max}")]
    TooManyBlocks { blocks: u64, size: u64, max: u64 },
    #[error("block {index} is out of order (after block {after:?}) or beyond the file's {blocks} blocks")]
    BlockIndex {
        index: u64,
        after: Option<u64>,
        blocks: u64,
    },
    #[error("block {index} has {got} bytes, expected {expected}")]
    BlockLength { index: u64, got: usize, expected: usize },
    #[error("more blocks than the plan announced ({blocks})")]
    ExtraBlock { blocks: u64 },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

/// Indices of the blocks of `source` that a receiver with `receiver` hashes lacks: those whose
/// hashes differ and those it has no hash for. Blocks past the source's end are cut off.
pub fn changed_blocks(source: &[u64], receiver: &[u64]) -> Vec<u64> {
    source
        .iter()
        .enumerate()
        .filter(|(i, hash)| receiver.get(*i) != Some(hash))
        .map(|(i, _)| i as u64)
        .collect()
}

/// The `Hashes` frames describing `hashes`.
pub fn hash_messages(hashes: &BlockHashes) -> Vec<Message> {
    let pieces: Vec<&[u64]> = hashes.fast().chunks(MAX_HASHES_PER_FRAME).collect();
    if pieces.is_empty() {
        return vec![Message::Hashes {
            size: hashes.size(),
            first: 0,
            last: true,
            hashes: Vec::new(),
        }];
    }
    let count = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(n, piece)| Message::Hashes {
            size: hashes.size(),
            first: (n * MAX_HASHES_PER_FRAME) as u64,
            last: n + 1 == count,
            hashes: piece.to_vec(),
        })
        .collect()
}

/// The source's side: collects a receiver's hash list piece by piece, keeping at most `keep`
/// hashes (the source's own block count), so a peer claiming a huge file costs no memory.
#[derive(Debug)]
pub struct HashList {
    block_size: u32,
    keep: usize,
    size: Option<u64>,
    received: u64,
    hashes: Vec<u64>,
}

impl HashList {
    pub fn new(block_size: u32, keep: u64) -> Self {
        Self {
            block_size,
            keep: keep as usize,
            size: None,
            received: 0,
            hashes: Vec::new(),
        }
    }

    /// Adds one piece; `Ok(true)` when the list is complete.
    pub fn add(&mut self, size: u64, first: u64, last: bool, hashes: &[u64]) -> Result<bool, DeltaError> {
        match self.size {
            Some(known) if known != size => {
                return Err(DeltaError::SizeChanged {
                    first: known,
                    then: size,
                })
            }
            _ => self.size = Some(size),
        }
        if first != self.received {
            return Err(DeltaError::HashesOutOfOrder {
                expected: self.received,
                got: first,
            });
        }
        let expected = block_count(size, self.block_size);
        let got = self.received + hashes.len() as u64;
        if got > expected || (last && got != expected) {
            return Err(DeltaError::HashCount { size, expected, got });
        }
        let room = self.keep.saturating_sub(self.hashes.len());
        self.hashes.extend_from_slice(&hashes[..hashes.len().min(room)]);
        self.received = got;
        Ok(last)
    }

    /// The receiver's size and the hashes kept.
    pub fn finish(self) -> (u64, Vec<u64>) {
        (self.size.unwrap_or(0), self.hashes)
    }
}

/// Where a receiver puts an incoming version (a staging file, or a `Vec<u8>` in tests).
pub trait BlockTarget {
    type Error;
    fn set_len(&mut self, size: u64) -> Result<(), Self::Error>;
    fn write_block(&mut self, offset: u64, data: &[u8]) -> Result<(), Self::Error>;
    fn read_block(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

impl BlockTarget for Vec<u8> {
    type Error = std::convert::Infallible;
    fn set_len(&mut self, size: u64) -> Result<(), Self::Error> {
        self.resize(size as usize, 0);
        Ok(())
    }
    fn write_block(&mut self, offset: u64, data: &[u8]) -> Result<(), Self::Error> {
        self.as_mut_slice()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read_block(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        buf.copy_from_slice(&self[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

/// The receiver's side of one transfer: checks a plan and its blocks (count, order, index,
/// length) before they are written, and keeps the receiver's hashes in step.
#[derive(Debug)]
pub struct Incoming {
    size: u64,
    blocks: u64,
    digest: [u8; 32],
    received: u64,
    last_index: Option<u64>,
}

impl Incoming {
    /// Checks a plan against the receiver's limit on file size.
    pub fn new(
        size: u64,
        blocks: u64,
        digest: [u8; 32],
        block_size: u32,
        max_size: u64,
    ) -> Result<Self, DeltaError> {
        if size > max_size {
            return Err(DeltaError::TooLarge { size, max: max_size });
        }
        let max = block_count(size, block_size);
        if blocks > max {
            return Err(DeltaError::TooManyBlocks { blocks, size, max });
        }
        Ok(Self {
            size,
            blocks,
            digest,
            received: 0,
            last_index: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Blocks still to come.
    pub fn remaining(&self) -> u64 {
        self.blocks - self.received
    }

    /// Checks block `index` with `data`; returns its offset.
    pub fn check(&mut self, index: u64, data: &[u8], block_size: u32) -> Result<u64, DeltaError> {
        if self.received == self.blocks {
            return Err(DeltaError::ExtraBlock { blocks: self.blocks });
        }
        let blocks = block_count(self.size, block_size);
        if index >= blocks || self.last_index.is_some_and(|last| index <= last) {
            return Err(DeltaError::BlockIndex {
                index,
                after: self.last_index,
                blocks,
            });
        }
        let (offset, expected) = block_range(index, self.size, block_size);
        if data.len() != expected {
            return Err(DeltaError::BlockLength {
                index,
                got: data.len(),
                expected,
            });
        }
        self.last_index = Some(index);
        self.received += 1;
        Ok(offset)
    }
}

/// Resizes `target` and `hashes` to a plan's size, before its blocks are written; the block
/// that was the last one is rehashed if its length changed (it now ends in zeros or is cut).
pub fn apply_size<T: BlockTarget>(
    target: &mut T,
    hashes: &mut BlockHashes,
    size: u64,
) -> Result<(), T::Error> {
    let old_size = hashes.size();
    if old_size == size {
        return Ok(());
    }
    target.set_len(size)?;
    hashes.resize(size);
    let block_size = hashes.block_size();
    let boundary = old_size.min(size) / u64::from(block_size);
    if !old_size.is_multiple_of(u64::from(block_size)) || !size.is_multiple_of(u64::from(block_size)) {
        let (offset, len) = block_range(boundary, size, block_size);
        if len > 0 {
            let mut buf = vec![0; len];
            target.read_block(offset, &mut buf)?;
            hashes.set_block(boundary, &buf);
        }
    }
    Ok(())
}

/// What a source sends for one receiver: its version's size, the blocks the receiver lacks (in
/// ascending order) and the version's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub size: u64,
    pub blocks: Vec<u64>,
    pub digest: [u8; 32],
}

impl Plan {
    /// The plan for a receiver whose hash list is `receiver` (as kept by [`HashList`]).
    pub fn new(source: &BlockHashes, receiver: &[u64]) -> Self {
        Self {
            size: source.size(),
            blocks: changed_blocks(source.fast(), receiver),
            digest: source.digest(),
        }
    }

    pub fn message(&self) -> Message {
        Message::Plan {
            size: self.size,
            blocks: self.blocks.len() as u64,
            digest: self.digest,
        }
    }
}

/// A refused block, or the target failed to store it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError<E> {
    #[error(transparent)]
    Refused(#[from] DeltaError),
    #[error("cannot store the block: {0}")]
    Target(E),
}

impl Incoming {
    /// Checks block `index`, writes it to `target` and records its hashes.
    pub fn accept<T: BlockTarget>(
        &mut self,
        target: &mut T,
        hashes: &mut BlockHashes,
        index: u64,
        data: &[u8],
    ) -> Result<(), ApplyError<T::Error>> {
        let offset = self.check(index, data, hashes.block_size())?;
        target.write_block(offset, data).map_err(ApplyError::Target)?;
        hashes.set_block(index, data);
        Ok(())
    }
}
