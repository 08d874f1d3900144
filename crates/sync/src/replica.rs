//! The receiver's file. Incoming blocks go into a staging copy in the same directory
//! (`.NAME.r3map-sync`); a version is published by fsync, rename over the replica and fsync of
//! the directory, so a reader sees either the old or the new version, never a mix, and a kill
//! at any point leaves the replica as it was. The staging copy survives a lost connection or a
//! restart: its hashes are what the receiver asks with next, so a transfer resumes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::delta::BlockTarget;
use crate::hashes::{read_exact_at, BlockHashes};

/// The published file, the staging copy if one exists, and the hashes of whichever of the two
/// the next transfer builds on.
#[derive(Debug)]
pub struct Replica {
    path: PathBuf,
    staging_path: PathBuf,
    staging: Option<File>,
    hashes: BlockHashes,
    threads: usize,
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
    /// Opens the replica at `path` (which need not exist yet), resuming from a staging copy
    /// left by an earlier run; hashes it with `block_size` blocks.
    pub fn open(path: &Path, block_size: u32, threads: usize) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the replica path names no file"))?;
        let dir = parent(path);
        let staging_path = dir.join(format!(".{}.r3map-sync", name.to_string_lossy()));
        let mut replica = Self {
            path: path.to_path_buf(),
            staging_path,
            staging: None,
            hashes: BlockHashes::empty(block_size),
            threads,
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

    /// Whether a staging copy from an interrupted transfer is being built on.
    pub fn resuming(&self) -> bool {
        self.staging.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn staging_path(&self) -> &Path {
        &self.staging_path
    }

    /// Hashes of the staging copy if there is one, else of the published file.
    pub fn hashes(&self) -> &BlockHashes {
        &self.hashes
    }

    /// Rehashes from disk with another block size (the source's).
    pub fn rehash(&mut self, block_size: u32) -> io::Result<()> {
        self.hashes = match &self.staging {
            Some(file) => BlockHashes::of_file(file, block_size, self.threads)?,
            None => match File::open(&self.path) {
                Ok(file) => BlockHashes::of_file(&file, block_size, self.threads)?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => BlockHashes::empty(block_size),
                Err(err) => return Err(err),
            },
        };
        Ok(())
    }

    /// Starts (or continues) a staging copy: a copy of the published file, made in the kernel
    /// (copy_file_range), or an empty file. Returns it with the hashes to keep in step.
    pub fn stage(&mut self) -> io::Result<(Staging<'_>, &mut BlockHashes)> {
        if self.staging.is_none() {
            match std::fs::copy(&self.path, &self.staging_path) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound && !self.path.exists() => {
                    File::create(&self.staging_path)?;
                }
                Err(err) => return Err(err),
            }
            self.staging = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.staging_path)?,
            );
        }
        let file = self.staging.as_ref().expect("staging was just opened");
        Ok((Staging(file), &mut self.hashes))
    }

    /// Forgets everything and asks for the whole file next time (after a digest mismatch that
    /// repeated, which only a hash collision explains).
    pub fn start_over(&mut self) -> io::Result<()> {
        let (mut staging, hashes) = self.stage()?;
        staging.set_len(0)?;
        hashes.resize(0);
        Ok(())
    }

    /// Publishes the staging copy atomically (if there is one).
    pub fn publish(&mut self) -> io::Result<()> {
        let Some(file) = self.staging.take() else {
            return Ok(());
        };
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.staging_path, &self.path)?;
        File::open(parent(&self.path))?.sync_all()
    }

    /// Throws the staging copy away (a refused transfer) and goes back to the published file.
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
