//! The file frontend over FUSE over io_uring: data and metadata round trips through the ring
//! queues, and the classic `/dev/fuse` transport when io_uring is not asked for.
//!
//! The io_uring test needs the `fuse` module parameter `enable_uring`; it turns it on if it can
//! (root), otherwise it is a counted skip.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering::SeqCst;
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
    if let Err(reason) = enable_uring() {
        r3map_core::testing::skip(&format!("FUSE over io_uring is unavailable: {reason}"));
        return;
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
