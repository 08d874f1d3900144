//! A persistent local cache: the cached bytes in `DIR/data` and the chunk state (which chunks
//! are local, dirty, being pushed, durable) in `DIR/state`, a memory-mapped file. Every state
//! change is in the page cache the moment it happens, so a restarted process — even one killed
//! with SIGKILL — finds its cache as it was: no re-download, and unpushed writes are pushed.
//! After a machine crash, only what was fsynced is trusted (see [`recovery`] and the crash
//! consistency rules in ARCHITECTURE.md).

mod checkpoint;
pub mod recovery;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use r3map_backends::{FileBackend, FileOptions};
use r3map_core::mapped::MappedFile;
use r3map_core::stages::PushState;
use r3map_core::{AtomicBitmap, ChunkLayout, Error, Result, SharedBackend};

pub use checkpoint::Checkpointed;
pub use recovery::{Recovery, Shutdown};

const MAGIC: &[u8; 8] = b"R3MAPCS2";
const HEADER_LEN: u64 = 4096;
/// Room for the remote's identity in the header.
const MAX_IDENTITY: usize = 3072;
/// The session record in the header: a word that is 1 while a process has the cache open,
/// then the boot ID of the machine it runs on.
const SESSION_AT: u64 = 3584;
const BOOT_ID_LEN: usize = 36;
/// Bitmaps after the header: local, dirty, pushing, durable.
const BITMAPS: u64 = 4;

/// An opened cache directory; holds an exclusive lock on it until dropped.
pub struct PersistentCache {
    /// The cached bytes (syncing them also records which chunks are durable).
    pub data: SharedBackend,
    /// Chunks held locally.
    pub local: AtomicBitmap,
    /// Chunks to push (dirty, or pushed when the last run stopped).
    pub push: PushState,
    /// What was recovered from the previous run.
    pub recovery: Recovery,
    handle: CacheHandle,
}

impl PersistentCache {
    /// Opens (or creates) the cache in `dir` for a remote of `size` bytes known as `identity`
    /// (e.g. its URI), in `chunk_size` chunks. A cache made for another remote, size or chunk
    /// size is refused rather than mixed up, and so is one whose data file is missing or short.
    /// An unclean end of the previous run is detected and its state made safe ([`Recovery`]).
    pub fn open(dir: &Path, size: u64, chunk_size: u64, identity: &str) -> Result<Self> {
        Self::open_on_boot(dir, size, chunk_size, identity, &boot_id()?)
    }

    /// [`PersistentCache::open`] as if the machine's boot ID were `boot` (tests use it to
    /// stage a machine crash).
    pub fn open_on_boot(dir: &Path, size: u64, chunk_size: u64, identity: &str, boot: &str) -> Result<Self> {
        let layout = ChunkLayout::new(size, chunk_size)?;
        if identity.len() > MAX_IDENTITY {
            return Err(Error::InvalidConfig(format!(
                "the remote's name is longer than {MAX_IDENTITY} bytes"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| context(e, "cannot create the cache directory", dir))?;
        let lock = lock_dir(dir)?;
        let bitmap_bytes = AtomicBitmap::words_for(layout.chunk_count()) * 8;
        let file_len = HEADER_LEN + BITMAPS * bitmap_bytes;
        let (state_path, data_path) = (dir.join("state"), dir.join("data"));
        let created = !state_path.exists();
        if created {
            create(dir, size, chunk_size, identity, file_len)?;
        }
        let mut state = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&state_path)
            .map_err(|e| context(e, "cannot open", &state_path))?;
        check_header(&mut state, dir, size, chunk_size, identity)?;
        if state.metadata()?.len() != file_len {
            return Err(Error::InvalidConfig(format!(
                "the cache state {} is damaged (wrong length); remove the cache directory to start over",
                state_path.display()
            )));
        }
        let data = open_data(&data_path, size)?;
        let shutdown = if created {
            Shutdown::New
        } else {
            previous_shutdown(&state, boot)?
        };
        let map = Arc::new(MappedFile::map(&state)?);
        let bitmap = |i: u64| {
            AtomicBitmap::in_mapped_file(
                map.clone(),
                (HEADER_LEN + i * bitmap_bytes) as usize,
                layout.chunk_count(),
            )
        };
        let (local, dirty, pushing, durable) = (bitmap(0), bitmap(1), bitmap(2), bitmap(3));
        let recovery = recovery::recover(
            shutdown,
            recovery::Bits {
                local: &local,
                dirty: &dirty,
                pushing: &pushing,
                durable: &durable,
            },
        );
        // The recovered state reaches the disk before the session is marked open, and both
        // before any data is written.
        map.flush()?;
        write_session(&state, Some(boot))?;
        let data = Arc::new(Checkpointed::new(data, bitmap(0), durable, map.clone()));
        Ok(Self {
            data: data.clone(),
            local,
            push: PushState { dirty, pushing },
            recovery,
            handle: CacheHandle {
                dir: dir.to_path_buf(),
                data,
                state,
                _lock: lock,
            },
        })
    }

    /// Splits the cache into what the stages take over and a handle that keeps the directory
    /// locked and closes it.
    pub fn into_parts(self) -> (SharedBackend, AtomicBitmap, PushState, CacheHandle) {
        (self.data, self.local, self.push, self.handle)
    }
}

/// Keeps a cache directory locked for this process while it is in use.
pub struct CacheHandle {
    dir: PathBuf,
    data: Arc<Checkpointed>,
    state: File,
    _lock: File,
}

impl CacheHandle {
    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Ends the session cleanly: fsyncs the data, records every local chunk as durable,
    /// writes the state to disk and marks the cache closed. Call it once nothing writes to the
    /// cache any more; the next open then trusts the state as it is.
    pub async fn close(&self) -> Result<()> {
        self.data.checkpoint().await?;
        write_session(&self.state, None)
    }
}

/// This machine's boot ID (a new one on every boot).
fn boot_id() -> Result<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_err(|e| {
        context(
            e,
            "cannot read the boot ID from",
            Path::new("/proc/sys/kernel/random/boot_id"),
        )
    })?;
    Ok(id.trim().to_string())
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| context(e, "cannot open", &path))?;
    lock.try_lock().map_err(|_| {
        Error::InvalidConfig(format!(
            "the cache {} is in use by another r3map process",
            dir.display()
        ))
    })?;
    Ok(lock)
}

/// Creates the data file, then the state file under a temporary name, fully written (so the
/// disk space of the mapped state is allocated now: a full disk is an error here, never a
/// SIGBUS later) and fsynced, then renames it into place: a state file exists only with its
/// data file beside it.
fn create(dir: &Path, size: u64, chunk_size: u64, identity: &str, file_len: u64) -> Result<()> {
    let data_path = dir.join("data");
    if data_path.exists() {
        // Left by a creation that did not finish; no chunk of it was ever recorded.
        std::fs::remove_file(&data_path).map_err(|e| context(e, "cannot remove", &data_path))?;
    }
    drop(FileBackend::create(&data_path, size, FileOptions::new())?);
    File::open(&data_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| context(e, "cannot sync", &data_path))?;
    let temp = dir.join("state.new");
    let mut state = File::create(&temp).map_err(|e| context(e, "cannot create", &temp))?;
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&size.to_le_bytes());
    header.extend_from_slice(&chunk_size.to_le_bytes());
    header.extend_from_slice(&(identity.len() as u64).to_le_bytes());
    header.extend_from_slice(identity.as_bytes());
    header.resize(file_len as usize, 0);
    state
        .write_all(&header)
        .and_then(|()| state.sync_all())
        .map_err(|e| context(e, "cannot write", &temp))?;
    let state_path = dir.join("state");
    std::fs::rename(&temp, &state_path).map_err(|e| context(e, "cannot create", &state_path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "cannot sync", dir))?;
    Ok(())
}

fn open_data(path: &Path, size: u64) -> Result<FileBackend> {
    let found = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::InvalidConfig(format!(
                "the cache data file {} is missing although its state file is there; the cached and unpushed data are gone, so remove the cache directory to start over",
                path.display()
            )))
        }
        Err(e) => return Err(context(e, "cannot open", path)),
    };
    if found != size {
        return Err(Error::InvalidConfig(format!(
            "the cache data file {} holds {found} bytes, not {size}: it was truncated or replaced; remove the cache directory to start over",
            path.display()
        )));
    }
    FileBackend::open(path, FileOptions::new())
}

fn previous_shutdown(state: &File, boot: &str) -> Result<Shutdown> {
    let mut session = [0u8; 8 + BOOT_ID_LEN];
    state.read_exact_at(&mut session, SESSION_AT)?;
    let open = u64::from_le_bytes(session[..8].try_into().expect("8 bytes"));
    let previous_boot = String::from_utf8_lossy(&session[8..]);
    let previous_boot = previous_boot.trim_end_matches('\0');
    Ok(match open {
        0 => Shutdown::Clean,
        _ if previous_boot == boot => Shutdown::ProcessCrash,
        _ => Shutdown::MachineCrash,
    })
}

/// Marks the session open on `boot`, or closed (`None`), durably.
fn write_session(state: &File, boot: Option<&str>) -> Result<()> {
    let mut session = [0u8; 8 + BOOT_ID_LEN];
    if let Some(boot) = boot {
        session[..8].copy_from_slice(&1u64.to_le_bytes());
        let id = boot.as_bytes();
        let n = id.len().min(BOOT_ID_LEN);
        session[8..8 + n].copy_from_slice(&id[..n]);
    }
    state.write_all_at(&session, SESSION_AT)?;
    state.sync_data()?;
    Ok(())
}

fn context(err: std::io::Error, what: &str, path: &Path) -> Error {
    Error::from(std::io::Error::new(
        err.kind(),
        format!("{what} {}: {err}", path.display()),
    ))
}

fn check_header(file: &mut File, dir: &Path, size: u64, chunk_size: u64, identity: &str) -> Result<()> {
    let mut header = vec![0u8; HEADER_LEN as usize];
    file.seek(SeekFrom::Start(0))?;
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
    use r3map_core::Backend;

    const ID: &str = "nbd://a/x";

    #[test]
    fn state_survives_reopening_and_foreign_caches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = PersistentCache::open(dir.path(), 10_000, 1000, ID).unwrap();
            assert_eq!(cache.recovery.shutdown, Shutdown::New);
            for chunk in [3, 4, 9] {
                cache.local.set(chunk);
            }
            cache.push.dirty.set(9);
            cache.push.pushing.set(4);
            let err = PersistentCache::open(dir.path(), 10_000, 1000, ID).err().unwrap();
            assert!(
                err.to_string().contains("in use by another r3map process"),
                "{err}"
            );
        }
        let cache = PersistentCache::open(dir.path(), 10_000, 1000, ID).unwrap();
        assert_eq!(cache.recovery.shutdown, Shutdown::ProcessCrash);
        assert_eq!(cache.local.ones(), vec![3, 4, 9]);
        assert_eq!(
            cache.push.dirty.ones(),
            vec![4, 9],
            "a chunk being pushed is pushed again"
        );
        assert!(cache.push.pushing.ones().is_empty());
        drop(cache);
        let err = PersistentCache::open(dir.path(), 10_000, 1000, "nbd://b/y")
            .err()
            .unwrap();
        assert!(err.to_string().contains("belongs to nbd://a/x"), "{err}");
        let err = PersistentCache::open(dir.path(), 20_000, 1000, ID).err().unwrap();
        assert!(err.to_string().contains("belongs to"), "{err}");
    }

    #[tokio::test]
    async fn a_clean_close_is_told_from_a_process_crash_and_a_machine_crash() {
        let dir = tempfile::tempdir().unwrap();
        let open = |boot: &str| PersistentCache::open_on_boot(dir.path(), 8000, 1000, ID, boot).unwrap();
        let cache = open("boot-a");
        cache.data.write_at(0, &[1; 2000]).await.unwrap();
        for chunk in [0, 1] {
            cache.local.set(chunk);
        }
        cache.push.dirty.set(1);
        let (_, _, _, handle) = cache.into_parts();
        handle.close().await.unwrap();
        drop(handle);
        let cache = open("boot-b");
        assert_eq!(cache.recovery.shutdown, Shutdown::Clean);
        assert_eq!(
            (cache.local.ones(), cache.push.dirty.ones()),
            (vec![0, 1], vec![1]),
            "a clean close is trusted even after a reboot (it was checkpointed)"
        );
        // Written and fetched after the last checkpoint, then the machine restarts.
        cache.local.set(5);
        cache.push.dirty.set(5);
        drop(cache);
        let cache = open("boot-b");
        assert_eq!(cache.recovery.shutdown, Shutdown::ProcessCrash);
        assert_eq!(cache.push.dirty.ones(), vec![1, 5]);
        drop(cache);
        let cache = open("boot-c");
        assert_eq!(cache.recovery.shutdown, Shutdown::MachineCrash);
        assert_eq!(
            cache.local.ones(),
            vec![1],
            "only the dirty chunk with an fsynced base stays"
        );
        assert_eq!(cache.push.dirty.ones(), vec![1]);
        assert_eq!((cache.recovery.refetch, cache.recovery.dropped), (2, 1));
    }

    #[test]
    fn a_missing_or_short_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(PersistentCache::open(dir.path(), 10_000, 1000, ID).unwrap());
        let data = dir.path().join("data");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = PersistentCache::open(dir.path(), 10_000, 1000, ID)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("holds 4096 bytes, not 10000") && err.contains("remove the cache directory"),
            "{err}"
        );
        std::fs::remove_file(&data).unwrap();
        let err = PersistentCache::open(dir.path(), 10_000, 1000, ID)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("is missing") && err.contains("remove the cache directory"),
            "{err}"
        );
        assert!(!data.exists(), "a missing data file was recreated");
    }

    #[test]
    fn the_state_file_is_allocated_when_created() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // 1 Mi chunks: four 128 KiB bitmaps that a sparse file would leave unallocated.
        drop(PersistentCache::open(dir.path(), 1 << 30, 1024, ID).unwrap());
        let meta = std::fs::metadata(dir.path().join("state")).unwrap();
        assert_eq!(meta.len(), HEADER_LEN + 4 * (1 << 17));
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "the state file is sparse: {} blocks",
            meta.blocks()
        );
    }
}
