//! The file frontend and the kernel's page cache: buffered reads arrive as large requests once
//! the mount has raised the connection's read-ahead, and the cache kept across opens
//! (`FOPEN_KEEP_CACHE`) is dropped precisely by `FileMount::invalidate`.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use common::*;
use r3map_core::testing::pattern;
use r3map_core::{MemoryBackend, SharedBackend};
use r3map_fuse::{FileMount, FileOptions};

const MIB: u64 = 1 << 20;

/// Reads `len` bytes at `offset` through the page cache, 1 MiB per `read(2)` like `dd bs=1M`.
fn buffered_read(file: &File, offset: u64, len: u64) -> Vec<u8> {
    let mut all = vec![0u8; len as usize];
    for (index, piece) in all.chunks_mut(MIB as usize).enumerate() {
        file.read_exact_at(piece, offset + index as u64 * MIB)
            .expect("buffered read");
    }
    all
}

/// Mounts a counting memory backend of `size` bytes with `read_ahead` in `dir`, reads the first
/// 16 MiB buffered after a fresh open, and returns (read requests, largest request, read-ahead
/// the mount reports).
fn sixteen_mib_buffered(dir: &std::path::Path, read_ahead: Option<u32>) -> (u64, u64, Option<u32>) {
    let rt = runtime();
    let counting = Counting::new(Arc::new(MemoryBackend::new(32 * MIB)));
    let backend: SharedBackend = counting.clone();
    let options = FileOptions {
        read_ahead,
        ..FileOptions::default()
    };
    let mut mount =
        FileMount::mount_with(backend, dir, "data", rt.handle().clone(), &options).expect("mount");
    let file = File::open(mount.path()).expect("open");
    let before = counting.reads.load(SeqCst);
    let data = buffered_read(&file, 0, 16 * MIB);
    assert_eq!(data.len() as u64, 16 * MIB);
    let reads = counting.reads.load(SeqCst) - before;
    let largest = counting.max_read.load(SeqCst);
    let applied = mount.read_ahead();
    drop(file);
    mount.unmount_blocking().expect("unmount");
    (reads, largest, applied)
}

#[test]
fn buffered_reads_arrive_as_large_requests_after_the_read_ahead_raise() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let (raised_dir, default_dir) = (subdir(dir.path(), "raised"), subdir(dir.path(), "default"));

    let (reads, largest, applied) = sixteen_mib_buffered(&raised_dir, Some(MIB as u32));
    eprintln!("read-ahead raised to {applied:?}: {reads} requests, largest {largest} bytes");
    if applied != Some(MIB as u32) {
        r3map_core::testing::skip(&format!(
            "the connection's read-ahead could not be raised to 1 MiB (it is {applied:?}); needs root and sysfs"
        ));
        return;
    }
    assert_eq!(
        largest, MIB,
        "buffered reads arrive as 1 MiB requests with the raise"
    );
    assert!(
        reads <= 20,
        "16 MiB read buffered takes 16 requests with the raise (plus read-ahead past the end), took {reads}"
    );

    let (reads, largest, applied) = sixteen_mib_buffered(&default_dir, None);
    eprintln!("kernel default read-ahead {applied:?}: {reads} requests, largest {largest} bytes");
    assert_eq!(
        applied,
        Some(128 << 10),
        "the kernel's default read-ahead is 128 KiB"
    );
    assert!(
        largest <= 128 << 10,
        "without the raise no request exceeds 128 KiB, the largest was {largest}"
    );
    assert!(
        reads >= 128,
        "16 MiB in requests of at most 128 KiB takes at least 128 of them, took {reads}"
    );
}

#[test]
fn invalidate_drops_exactly_the_stale_range_from_the_kept_cache() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let size = 4 * MIB;
    let counting = Counting::new(Arc::new(MemoryBackend::new(size)));
    let backend: SharedBackend = counting.clone();
    let old = pattern(1, size as usize);
    rt.block_on(backend.write_at(0, &old)).unwrap();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone()).unwrap();

    let first = File::open(mount.path()).unwrap();
    assert!(
        buffered_read(&first, 0, size) == old,
        "the first read returns the backend's bytes"
    );
    drop(first);

    // The backend changes behind the mount (as when chunks are re-pulled from a remote).
    let new = pattern(2, 4096);
    rt.block_on(backend.write_at(0, &new)).unwrap();
    rt.block_on(backend.write_at(3 * MIB, &new)).unwrap();

    // A new open keeps the cache: the old bytes, and no request reaches the backend.
    let reads = counting.reads.load(SeqCst);
    let second = File::open(mount.path()).unwrap();
    assert!(
        buffered_read(&second, 0, size) == old,
        "FOPEN_KEEP_CACHE: a new open reads the cached bytes"
    );
    assert_eq!(
        counting.reads.load(SeqCst),
        reads,
        "the cached re-read sent no request"
    );

    // Invalidating the first page makes exactly that page new; the other changed page, still
    // cached, keeps its old bytes until it is invalidated too.
    mount.invalidate(0, 4096).expect("invalidate");
    let mut page = vec![0u8; 4096];
    second.read_exact_at(&mut page, 0).unwrap();
    assert!(
        page == new,
        "after invalidate the re-read sees the backend's new bytes"
    );
    assert!(
        counting.reads.load(SeqCst) > reads,
        "the re-read asked the backend"
    );
    second.read_exact_at(&mut page, 3 * MIB).unwrap();
    assert!(
        page[..] == old[3 * MIB as usize..3 * MIB as usize + 4096],
        "a range that was not invalidated stays cached"
    );
    mount
        .invalidate(3 * MIB, 10 * MIB)
        .expect("invalidate a range reaching past the end");
    second.read_exact_at(&mut page, 3 * MIB).unwrap();
    assert!(page == new, "after its invalidate the second range is new too");

    drop(second);
    mount.unmount_blocking().unwrap();
    mount
        .invalidate(0, size)
        .expect("invalidating an unmounted file does nothing");
}
