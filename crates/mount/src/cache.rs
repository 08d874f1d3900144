//! A persistent local cache: the cached bytes in `DIR/data` and the chunk state (which chunks
//! are local, dirty, being pushed) in `DIR/state`, a memory-mapped file. Every state change is
//! in the page cache the moment it happens, so a restarted process — even one killed with
//! SIGKILL — finds its cache as it was: no re-download, and unpushed writes are pushed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use r3map_backends::{FileBackend, FileOptions};
use r3map_core::mapped::MappedFile;
use r3map_core::stages::PushState;
use r3map_core::{AtomicBitmap, Backend, ChunkLayout, Error, Result, SharedBackend};

const MAGIC: &[u8; 8] = b"R3MAPCS1";
const HEADER_LEN: u64 = 4096;
/// Room for the remote's identity in the header.
const MAX_IDENTITY: usize = 3072;

/// An opened cache directory; holds an exclusive lock on it until dropped.
pub struct PersistentCache {
    /// The cached bytes.
    pub data: SharedBackend,
    /// Chunks held locally.
    pub local: AtomicBitmap,
    /// Chunks to push (dirty, or pushed when the last run stopped).
    pub push: PushState,
    dir: PathBuf,
    state: Arc<MappedFile>,
    _lock: File,
}

impl PersistentCache {
    /// Opens (or creates) the cache in `dir` for a remote of `size` bytes known as `identity`
    /// (e.g. its URI), in `chunk_size` chunks. A cache made for another remote, size or chunk
    /// size is refused rather than mixed up.
    pub fn open(dir: &Path, size: u64, chunk_size: u64, identity: &str) -> Result<Self> {
        let layout = ChunkLayout::new(size, chunk_size)?;
        if identity.len() > MAX_IDENTITY {
            return Err(Error::InvalidConfig(format!(
                "the remote's name is longer than {MAX_IDENTITY} bytes"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| context(e, "cannot create the cache directory", dir))?;
        let state_path = dir.join("state");
        let mut state = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&state_path)
            .map_err(|e| context(e, "cannot open", &state_path))?;
        state.try_lock().map_err(|_| {
            Error::InvalidConfig(format!(
                "the cache {} is in use by another r3map process",
                dir.display()
            ))
        })?;
        let words = AtomicBitmap::words_for(layout.chunk_count());
        let bitmap_bytes = words * 8;
        let file_len = HEADER_LEN + 3 * bitmap_bytes;
        if state.metadata()?.len() == 0 {
            write_header(&mut state, size, chunk_size, identity)?;
            state.set_len(file_len)?;
            state.sync_all()?;
        } else {
            check_header(&mut state, dir, size, chunk_size, identity)?;
            if state.metadata()?.len() != file_len {
                return Err(Error::InvalidConfig(format!(
                    "the cache state {} is damaged (wrong length)",
                    state_path.display()
                )));
            }
        }
        let data_path = dir.join("data");
        let data: SharedBackend = if data_path.exists() {
            let file = FileBackend::open(&data_path, FileOptions::new())?;
            if file.size() != size {
                return Err(Error::InvalidConfig(format!(
                    "the cache data {} has the wrong size",
                    data_path.display()
                )));
            }
            Arc::new(file)
        } else {
            Arc::new(FileBackend::create(&data_path, size, FileOptions::new())?)
        };
        let map = Arc::new(MappedFile::map(&state)?);
        let bitmap = |i: u64| {
            AtomicBitmap::in_mapped_file(
                map.clone(),
                (HEADER_LEN + i * bitmap_bytes) as usize,
                layout.chunk_count(),
            )
        };
        Ok(Self {
            data,
            local: bitmap(0),
            push: PushState {
                dirty: bitmap(1),
                pushing: bitmap(2),
            },
            dir: dir.to_path_buf(),
            state: map,
            _lock: state,
        })
    }

    /// Splits the cache into what the stages take over and a handle that keeps the directory
    /// locked and the state mapped.
    pub fn into_parts(self) -> (SharedBackend, AtomicBitmap, PushState, CacheHandle) {
        let handle = CacheHandle {
            dir: self.dir,
            state: self.state,
            _lock: self._lock,
        };
        (self.data, self.local, self.push, handle)
    }
}

/// Keeps a cache directory locked for this process while it is in use.
pub struct CacheHandle {
    dir: PathBuf,
    state: Arc<MappedFile>,
    _lock: File,
}

impl CacheHandle {
    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the chunk state to disk (it already survives a process crash; this is for a
    /// machine crash).
    pub fn flush_state(&self) -> Result<()> {
        self.state.flush()
    }
}

fn context(err: std::io::Error, what: &str, path: &Path) -> Error {
    Error::from(std::io::Error::new(
        err.kind(),
        format!("{what} {}: {err}", path.display()),
    ))
}

fn write_header(file: &mut File, size: u64, chunk_size: u64, identity: &str) -> Result<()> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&size.to_le_bytes());
    header.extend_from_slice(&chunk_size.to_le_bytes());
    header.extend_from_slice(&(identity.len() as u64).to_le_bytes());
    header.extend_from_slice(identity.as_bytes());
    header.resize(HEADER_LEN as usize, 0);
    file.write_all(&header)?;
    Ok(())
}

fn check_header(file: &mut File, dir: &Path, size: u64, chunk_size: u64, identity: &str) -> Result<()> {
    let mut header = vec![0u8; HEADER_LEN as usize];
    file.read_exact(&mut header)
        .map_err(|_| Error::InvalidConfig(format!("{} holds no r3map cache", dir.display())))?;
    let word = |i: usize| u64::from_le_bytes(header[8 + i * 8..16 + i * 8].try_into().unwrap());
    if &header[..8] != MAGIC {
        return Err(Error::InvalidConfig(format!(
            "{} holds no r3map cache (or one of another version)",
            dir.display()
        )));
    }
    let id_len = (word(2) as usize).min(MAX_IDENTITY);
    let stored = String::from_utf8_lossy(&header[32..32 + id_len]);
    if stored != identity || word(0) != size || word(1) != chunk_size {
        return Err(Error::InvalidConfig(format!(
            "the cache {} belongs to {stored} ({} bytes, {}-byte chunks), not to {identity} ({size} bytes, {chunk_size}-byte chunks); use another cache directory or remove it",
            dir.display(),
            word(0),
            word(1)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopening_and_foreign_caches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = PersistentCache::open(dir.path(), 10_000, 1000, "nbd://a/x").unwrap();
            cache.local.set(3);
            cache.push.dirty.set(9);
            cache.push.pushing.set(4);
            let err = PersistentCache::open(dir.path(), 10_000, 1000, "nbd://a/x")
                .err()
                .unwrap();
            assert!(
                err.to_string().contains("in use by another r3map process"),
                "{err}"
            );
        }
        let cache = PersistentCache::open(dir.path(), 10_000, 1000, "nbd://a/x").unwrap();
        assert_eq!(cache.local.ones(), vec![3]);
        assert_eq!(cache.push.dirty.ones(), vec![9]);
        assert_eq!(cache.push.pushing.ones(), vec![4]);
        drop(cache);
        let err = PersistentCache::open(dir.path(), 10_000, 1000, "nbd://b/y")
            .err()
            .unwrap();
        assert!(err.to_string().contains("belongs to nbd://a/x"), "{err}");
        let err = PersistentCache::open(dir.path(), 20_000, 1000, "nbd://a/x")
            .err()
            .unwrap();
        assert!(err.to_string().contains("belongs to"), "{err}");
    }
}
