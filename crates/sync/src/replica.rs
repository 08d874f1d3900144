//! The receiver's file. Incoming blocks go into a staging file in the same directory
//! (`.NAME.r3map-sync`); a version is published by fsync, rename over the replica and fsync of
//! the directory, so a reader sees either the old or the new version, never a mix, and a kill
//! at any point leaves the replica as it was. The staging file survives a lost connection or a
//! restart: its hashes are what the receiver asks with next, so a transfer resumes.
//!
//! The staging file starts as a copy of the published version. Making that copy of the whole
//! file for every version (and fsyncing all of it) would cost work proportional to the file,
//! not to the change, so the inode the previous version lived in is kept as a spare
//! (`.NAME.r3map-spare`, a hard link made just before the rename) and becomes the next staging
//! file: only the blocks in which it differs from the published version are copied over, and
//! the fsync writes only those and the received blocks. The spare is reused only if it is open
//! nowhere else (a write lease can be taken on it), so a reader that kept an old version open
//! never sees it change; otherwise it is unlinked and a full copy is made (copy_file_range,
//! which filesystems with reflinks, e.g. XFS and Btrfs, turn into shared extents).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::delta::BlockTarget;
use crate::hashes::{read_exact_at, BlockHashes};

/// The published file, the staging copy if one exists, and the hashes of whichever of the two
/// the next transfer builds on.
#[derive(Debug)]
pub struct Replica {
    path: PathBuf,
    staging_path: PathBuf,
    spare_path: PathBuf,
    staging: Option<File>,
    hashes: BlockHashes,
    /// Hashes of the published file while a staging file exists (`None`: not known, after a
    /// restart that resumed).
    published: Option<BlockHashes>,
    /// Hashes of the spare inode, when there is one and they are known.
    spare: Option<BlockHashes>,
    threads: usize,
    stats: ReplicaStats,
}

/// How staging files were made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Whole copies of the published file.
    pub full_copies: u64,
    /// Spare inodes brought up to date instead.
    pub spares_reused: u64,
    /// Blocks copied into reused spares.
    pub blocks_copied: u64,
    /// Spares unlinked because they were open elsewhere (or were the published inode).
    pub spares_dropped: u64,
}

/// The staging file as a place to write blocks.
pub struct Staging<'a>(&'a File);

impl BlockTarget for Staging<'_> {
    type Error = io::Error;
    fn set_len(&mut self, size: u64) -> io::Result<()> {
        self.0.set_len(size)
    }
    fn write_block(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn read_block(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_exact_at(self.0, buf, offset)
    }
}

impl Replica {
    /// Opens the replica at `path` (which need not exist yet), resuming from a staging file
    /// left by an earlier run; hashes it (and a spare inode, if one was left) with
    /// `block_size` blocks.
    pub fn open(path: &Path, block_size: u32, threads: usize) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the replica path names no file"))?
            .to_string_lossy()
            .into_owned();
        let dir = parent(path);
        let mut replica = Self {
            path: path.to_path_buf(),
            staging_path: dir.join(format!(".{name}.r3map-sync")),
            spare_path: dir.join(format!(".{name}.r3map-spare")),
            staging: None,
            hashes: BlockHashes::empty(block_size),
            published: None,
            spare: None,
            threads,
            stats: ReplicaStats::default(),
        };
        if replica.staging_path.exists() {
            replica.staging = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&replica.staging_path)?,
            );
        }
        replica.rehash(block_size)?;
        Ok(replica)
    }

    /// Whether a staging file from an interrupted transfer is being built on.
    pub fn resuming(&self) -> bool {
        self.staging.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn staging_path(&self) -> &Path {
        &self.staging_path
    }

    /// How the staging files were made so far.
    pub fn stats(&self) -> ReplicaStats {
        self.stats
    }

    /// Hashes of the staging file if there is one, else of the published file.
    pub fn hashes(&self) -> &BlockHashes {
        &self.hashes
    }

    /// Rehashes from disk with another block size (the source's).
    pub fn rehash(&mut self, block_size: u32) -> io::Result<()> {
        let published = match File::open(&self.path) {
            Ok(file) => Some(BlockHashes::of_file(&file, block_size, self.threads)?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Some(BlockHashes::empty(block_size)),
            Err(err) => return Err(err),
        };
        match &self.staging {
            Some(file) => {
                self.hashes = BlockHashes::of_file(file, block_size, self.threads)?;
                self.published = published;
            }
            None => self.hashes = published.expect("hashed above"),
        }
        self.spare = match File::open(&self.spare_path) {
            Ok(file) => Some(BlockHashes::of_file(&file, block_size, self.threads)?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => return Err(err),
        };
        Ok(())
    }

    /// Starts (or continues) a staging file holding the published version: the spare inode
    /// brought up to date, or a full copy. Returns it with the hashes to keep in step.
    pub fn stage(&mut self) -> io::Result<(Staging<'_>, &mut BlockHashes)> {
        if self.staging.is_none() {
            let file = match self.reuse_spare()? {
                Some(file) => file,
                None => self.copy_published()?,
            };
            self.staging = Some(file);
            self.published = Some(self.hashes.clone());
        }
        let file = self.staging.as_ref().expect("staging was just opened");
        Ok((Staging(file), &mut self.hashes))
    }

    /// A full copy of the published file (copy_file_range), or an empty file.
    fn copy_published(&mut self) -> io::Result<File> {
        match std::fs::copy(&self.path, &self.staging_path) {
            Ok(_) => self.stats.full_copies += 1,
            Err(err) if err.kind() == io::ErrorKind::NotFound && !self.path.exists() => {
                File::create(&self.staging_path)?;
            }
            Err(err) => return Err(err),
        }
        OpenOptions::new().read(true).write(true).open(&self.staging_path)
    }

    /// Turns the spare inode into the staging file, if it may be written: it is not the
    /// published inode itself (a crash between link and rename leaves both names on it) and
    /// nobody has it open. Copies over the blocks in which it differs from the published
    /// version; `self.hashes` (the published version's) then describe it.
    fn reuse_spare(&mut self) -> io::Result<Option<File>> {
        let spare = match OpenOptions::new().read(true).write(true).open(&self.spare_path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let spare_meta = spare.metadata()?;
        let published = match File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let published_meta = published.metadata()?;
        let same_inode = spare_meta.dev() == published_meta.dev() && spare_meta.ino() == published_meta.ino();
        // Our own descriptor for the published file is closed before asking about the spare.
        drop(published);
        if same_inode || crate::sys::open_elsewhere(&spare).unwrap_or(true) {
            self.stats.spares_dropped += 1;
            self.spare = None;
            drop(spare);
            std::fs::remove_file(&self.spare_path)?;
            return Ok(None);
        }
        let spare_hashes = match self.spare.take() {
            Some(hashes) if hashes.block_size() == self.hashes.block_size() => hashes,
            _ => BlockHashes::of_file(&spare, self.hashes.block_size(), self.threads)?,
        };
        std::fs::rename(&self.spare_path, &self.staging_path)?;
        let published = File::open(&self.path)?;
        spare.set_len(self.hashes.size())?;
        let mut buf = vec![0u8; self.hashes.block_size() as usize];
        for index in 0..self.hashes.blocks() {
            if !spare_hashes.same_block(&self.hashes, index) {
                let (offset, len) = self.hashes.range(index);
                read_exact_at(&published, &mut buf[..len], offset)?;
                spare.write_all_at(&buf[..len], offset)?;
                self.stats.blocks_copied += 1;
            }
        }
        self.stats.spares_reused += 1;
        Ok(Some(spare))
    }

    /// Forgets everything and asks for the whole file next time (after a digest mismatch that
    /// repeated, which only a hash collision explains).
    pub fn start_over(&mut self) -> io::Result<()> {
        let (mut staging, hashes) = self.stage()?;
        staging.set_len(0)?;
        hashes.resize(0);
        Ok(())
    }

    /// Publishes the staging file atomically (if there is one); the inode it replaces becomes
    /// the spare.
    pub fn publish(&mut self) -> io::Result<()> {
        let Some(file) = self.staging.take() else {
            return Ok(());
        };
        file.sync_all()?;
        drop(file);
        match std::fs::remove_file(&self.spare_path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        self.spare = match std::fs::hard_link(&self.path, &self.spare_path) {
            Ok(()) => self.published.take(),
            // Nothing published yet, or a filesystem without hard links: no spare.
            Err(_) => None,
        };
        std::fs::rename(&self.staging_path, &self.path)?;
        File::open(parent(&self.path))?.sync_all()
    }

    /// Throws the staging file away (a refused transfer) and goes back to the published file.
    pub fn discard(&mut self) -> io::Result<()> {
        if self.staging.take().is_some() {
            std::fs::remove_file(&self.staging_path)?;
        }
        self.rehash(self.hashes.block_size())
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}
