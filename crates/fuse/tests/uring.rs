//! The file frontend over FUSE over io_uring: data and metadata round trips through the ring
//! queues, and the classic `/dev/fuse` transport when io_uring is not asked for.
//!
//! The io_uring tests need the `fuse` module parameter `enable_uring`; they turn it on if they
//! can (root; a change for the whole kernel, printed as `enable_uring: TurnedOn`), otherwise
//! they are counted skips.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::*;
use r3map_core::testing::pattern;
use r3map_core::{MemoryBackend, SharedBackend};
use r3map_fuse::{enable_uring, Transport};
use r3map_fuse::{FileMount, FileOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB + 4096;

/// Writes and reads through the mount (O_DIRECT and buffered, 4 KiB to 1 MiB), checks the
/// backend directly, and exercises stat, readdir, fsync and fallocate.
fn round_trip(rt: &tokio::runtime::Runtime, mount: &FileMount, backend: &SharedBackend) {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mount.path())
        .expect("open O_DIRECT");
    let mut big = Aligned::new(MIB as usize);
    big.as_mut().copy_from_slice(&pattern(3, MIB as usize));
    direct
        .write_all_at(big.as_slice(), 2 * MIB)
        .expect("1 MiB O_DIRECT write");
    let mut small = Aligned::new(4096);
    small.as_mut().copy_from_slice(&pattern(4, 4096));
    direct
        .write_all_at(small.as_slice(), SIZE - 4096)
        .expect("4 KiB write at the end");
    let mut back = Aligned::new(MIB as usize);
    direct
        .read_exact_at(back.as_mut(), 2 * MIB)
        .expect("1 MiB O_DIRECT read");
    assert!(
        back.as_slice() == big.as_slice(),
        "O_DIRECT read returns the write"
    );
    direct.sync_all().expect("fsync");

    let buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.path())
        .unwrap();
    buffered.write_all_at(b"through the page cache", 12345).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    buffered
        .read_exact_at(&mut all, 0)
        .expect("buffered read of everything");
    let content = backend_content(rt, backend);
    assert!(all == content, "buffered reads see the backend's bytes");
    assert_eq!(&content[12345..12345 + 22], b"through the page cache");
    assert!(content[2 * MIB as usize..3 * MIB as usize] == *big.as_slice());
    assert!(content[(SIZE - 4096) as usize..] == *small.as_slice());
    let mut past = [0u8; 16];
    assert_eq!(buffered.read_at(&mut past, SIZE).unwrap(), 0, "end of file");

    // SAFETY: fallocate only reads its integer arguments; the fd is open for the call.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&buffered),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            2 * MIB as i64,
            4096,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    let content = backend_content(rt, backend);
    assert!(content[2 * MIB as usize..2 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0));

    let meta = std::fs::metadata(mount.path()).unwrap();
    assert_eq!(meta.len(), SIZE);
    let names: Vec<_> = std::fs::read_dir(mount.mountpoint())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, ["data"], "the directory lists the one file");
    assert!(
        File::create(mount.mountpoint().join("other")).is_err(),
        "no other files"
    );
}

#[test]
fn io_uring_mode_round_trips_data_and_metadata() {
    if !fuse_available() {
        return;
    }
    match enable_uring() {
        Ok(switch) => eprintln!("enable_uring: {switch:?}"),
        Err(reason) => {
            r3map_core::testing::skip(&format!("FUSE over io_uring is unavailable: {reason}"));
            return;
        }
    }
    let dir = scratch();
    let rt = runtime();
    let counting = Counting::new(Arc::new(MemoryBackend::new(SIZE)));
    let backend: SharedBackend = counting.clone();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone()).unwrap();
    assert!(
        matches!(mount.transport(), Transport::IoUring { queues, .. } if *queues >= 1),
        "the mount uses io_uring: {}",
        mount.transport()
    );
    round_trip(&rt, &mount, &backend);
    let served = mount.ring_requests();
    assert!(
        served >= counting.reads.load(SeqCst) + counting.writes.load(SeqCst),
        "every backend request came through a ring ({served} ring requests)"
    );
    mount.unmount_blocking().expect("unmount tears the queues down");
    assert!(!mount.is_mounted());
}

#[test]
fn classic_transport_when_io_uring_is_not_requested() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let options = FileOptions {
        io_uring: false,
        ..FileOptions::default()
    };
    let mut mount =
        FileMount::mount_with(backend.clone(), dir.path(), "data", rt.handle().clone(), &options).unwrap();
    match mount.transport() {
        Transport::Classic { reason } => assert!(reason.contains("not requested"), "{reason}"),
        other => panic!("io_uring was not asked for, yet the mount uses {other}"),
    }
    round_trip(&rt, &mount, &backend);
    assert_eq!(mount.ring_requests(), 0, "no request went through a ring");
    mount.unmount_blocking().unwrap();
}

/// Holds every read at or past `from` until released, counting those that arrived.
struct Stall {
    inner: SharedBackend,
    from: u64,
    held: AtomicU64,
    release: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl r3map_core::Backend for Stall {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> r3map_core::Result<()> {
        if offset + buf.len() as u64 > self.from {
            self.held.fetch_add(1, SeqCst);
            let mut released = self.release.subscribe();
            let _ = released.wait_for(|&released| released).await;
        }
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> r3map_core::Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> r3map_core::Result<()> {
        self.inner.sync().await
    }
}

/// A readahead whose READ is still in the backend when the file is closed and the filesystem
/// unmounted (a background request outlives its file): the kernel fails the request and
/// releases its entry at the teardown, and unmount returns without waiting for the backend
/// call, over either transport. Before, a queue thread waited for every entry it had in
/// service, so unmount hung as long as the backend did.
#[test]
fn unmount_does_not_wait_for_a_backend_call_still_in_service() {
    if !fuse_available() {
        return;
    }
    let uring = match enable_uring() {
        Ok(switch) => {
            eprintln!("enable_uring: {switch:?}");
            true
        }
        Err(reason) => {
            r3map_core::testing::skip(&format!(
                "FUSE over io_uring is unavailable (only the classic transport is checked): {reason}"
            ));
            false
        }
    };
    for io_uring in [true, false].into_iter().filter(|&mode| uring || !mode) {
        let dir = scratch();
        let rt = runtime();
        let (release, _) = tokio::sync::watch::channel(false);
        let stall = Arc::new(Stall {
            inner: Arc::new(MemoryBackend::new(SIZE)),
            from: 4 * MIB,
            held: AtomicU64::new(0),
            release,
        });
        let backend: SharedBackend = stall.clone();
        let options = FileOptions {
            io_uring,
            ..FileOptions::default()
        };
        let mut mount =
            FileMount::mount_with(backend, dir.path(), "data", rt.handle().clone(), &options).unwrap();
        assert_eq!(
            matches!(mount.transport(), Transport::IoUring { .. }),
            io_uring,
            "{}",
            mount.transport()
        );
        let file = File::open(mount.path()).unwrap();
        // SAFETY: readahead(2) only reads its integer arguments; the fd is open for the call.
        let rc = unsafe {
            libc::readahead(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                (4 * MIB) as i64,
                MIB as usize,
            )
        };
        assert_eq!(rc, 0, "readahead: {}", std::io::Error::last_os_error());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stall.held.load(SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the readahead never reached the backend"
            );
            std::thread::yield_now();
        }
        drop(file);

        let (done_tx, done) = std::sync::mpsc::channel();
        let unmounting = std::thread::spawn(move || {
            let result = mount.unmount_blocking();
            let _ = done_tx.send(());
            (mount, result)
        });
        let waited = done.recv_timeout(std::time::Duration::from_secs(10));
        // Let the held call finish either way, so a failure does not hang the test.
        stall.release.send_replace(true);
        let (mount, result) = unmounting.join().unwrap();
        assert!(
            waited.is_ok(),
            "unmount ({}) waited for a backend call the kernel had already given up on",
            mount.transport()
        );
        result.expect("unmount");
        assert!(!mount.is_mounted());
    }
}
