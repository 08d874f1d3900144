//! `FileBackend`: the conformance suite with buffered and direct I/O, reopening, alignment
//! rules, and the O_DIRECT refusal message.

mod common;

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use r3map_backends::{FileBackend, FileOptions, DIRECT_IO_ALIGNMENT};
use r3map_core::testing::{self, block_on, pattern};
use r3map_core::{Backend, Error};

const BLOCK: u64 = DIRECT_IO_ALIGNMENT;

fn direct() -> FileOptions {
    FileOptions::new().direct_io(true)
}

/// A direct-I/O backend of `size` bytes in `dir`, or `None` (with a note) if O_DIRECT is refused.
fn direct_backend(dir: &Path, size: u64) -> Option<FileBackend> {
    match FileBackend::create(dir.join("direct.img"), size, direct()) {
        Ok(backend) => Some(backend),
        Err(Error::InvalidConfig(message)) => {
            testing::skip(&message);
            None
        }
        Err(err) => panic!("unexpected error: {err}"),
    }
}

proptest! {
    #![proptest_config(common::proptest_config(48))]
    #[test]
    fn buffered_matches_model(size in 1u64..40_000, ops in testing::ops_strategy(10_000, 40)) {
        let dir = common::tempdir();
        let backend = FileBackend::create(dir.path().join("file.img"), size, FileOptions::new()).unwrap();
        block_on(testing::check_against_model(&backend, 1, &ops))?;
    }
}

proptest! {
    #![proptest_config(common::proptest_config(16))]
    #[test]
    fn direct_io_matches_model(blocks in 0u64..8, tail in 0u64..BLOCK, ops in testing::ops_strategy(3 * BLOCK + 100, 30)) {
        let Some(dir) = common::disk_tempdir() else {
            testing::skip("no disk filesystem under /var/tmp or /work for O_DIRECT");
            return Ok(());
        };
        let size = (blocks * BLOCK + tail).max(1);
        if let Some(backend) = direct_backend(dir.path(), size) {
            block_on(testing::check_against_model(&backend, BLOCK, &ops))?;
        }
    }
}

#[test]
fn concurrent_buffered_access_matches_model() {
    let dir = common::tempdir();
    let backend = FileBackend::create(dir.path().join("file.img"), 300_017, FileOptions::new());
    block_on(testing::check_concurrent(Arc::new(backend.unwrap()), 1, 8, 200)).unwrap();
}

#[test]
fn concurrent_direct_access_matches_model() {
    let dir = common::disk_tempdir().expect("a disk filesystem under /var/tmp or /work");
    if let Some(backend) = direct_backend(dir.path(), 64 * BLOCK + 123) {
        block_on(testing::check_concurrent(Arc::new(backend), BLOCK, 8, 100)).unwrap();
    }
}

#[test]
fn reopen_after_drop_keeps_data() {
    let dir = common::disk_tempdir().unwrap_or_else(common::tempdir);
    let path = dir.path().join("file.img");
    let data = pattern(1, 5000);
    block_on(async {
        let backend = FileBackend::create(&path, 3 * BLOCK + 7, FileOptions::new()).unwrap();
        backend.write_at(BLOCK - 10, &data).await.unwrap();
        backend.sync().await.unwrap();
        drop(backend);

        let reopened = FileBackend::open(&path, FileOptions::new()).unwrap();
        assert_eq!(reopened.size(), 3 * BLOCK + 7);
        let mut back = vec![0; data.len()];
        reopened.read_at(BLOCK - 10, &mut back).await.unwrap();
        assert_eq!(back, data);
    });
}

#[test]
fn create_keeps_existing_content_and_sets_the_length() {
    let dir = common::tempdir();
    let path = dir.path().join("file.img");
    std::fs::write(&path, b"hello").unwrap();
    let backend = FileBackend::create(&path, 10, FileOptions::new()).unwrap();
    assert_eq!(backend.size(), 10);
    let mut back = [0xFF; 10];
    block_on(backend.read_at(0, &mut back)).unwrap();
    assert_eq!(&back, b"hello\0\0\0\0\0");
}

#[test]
fn direct_io_serves_aligned_and_unaligned_memory_and_keeps_the_size() {
    let dir = common::disk_tempdir().expect("a disk filesystem under /var/tmp or /work");
    // Over 2 MiB of whole blocks, so unaligned memory bounces in several pieces, plus a tail.
    let whole = (2 << 20) + 3 * BLOCK;
    let size = whole + 100;
    let Some(backend) = direct_backend(dir.path(), size) else {
        return;
    };
    assert!(backend.is_direct_io());
    // One vector gives a block-aligned slice and a misaligned one of the same length.
    let mut storage = vec![0u8; size as usize + 2 * BLOCK as usize];
    let aligned_at = (BLOCK as usize - storage.as_ptr() as usize % BLOCK as usize) % BLOCK as usize;
    block_on(async {
        for (seed, start) in [(1, aligned_at), (2, aligned_at + 1)] {
            let data = pattern(seed, size as usize);
            let buf = &mut storage[start..start + size as usize];
            buf.copy_from_slice(&data);
            backend.write_at(0, buf).await.unwrap();
            buf.fill(0);
            backend.read_at(0, buf).await.unwrap();
            assert!(buf == data.as_slice(), "round trip through memory at +{start}");
        }
        // The partial tail block alone, ending at the logical end.
        backend.write_at(whole, &[9; 100]).await.unwrap();
        backend.sync().await.unwrap();
    });
    let on_disk = std::fs::read(dir.path().join("direct.img")).unwrap();
    assert_eq!(on_disk.len() as u64, size, "direct writes must not grow the file");
    assert!(on_disk[..whole as usize] == pattern(2, size as usize)[..whole as usize]);
    assert_eq!(on_disk[whole as usize..], [9; 100]);
}

#[test]
fn direct_io_rejects_unaligned_requests_and_changes_nothing() {
    let dir = common::disk_tempdir().expect("a disk filesystem under /var/tmp or /work");
    let Some(backend) = direct_backend(dir.path(), 2 * BLOCK + 10) else {
        return;
    };
    block_on(async {
        let unaligned = |result| matches!(result, Err(Error::Unaligned { alignment: 4096, .. }));
        assert!(unaligned(backend.write_at(1, &[1; 4096]).await));
        assert!(unaligned(backend.write_at(0, &[1; 100]).await));
        assert!(unaligned(backend.read_at(BLOCK, &mut [0; 10]).await));
        assert!(unaligned(backend.trim(0, 10).await));
        assert!(unaligned(backend.write_zeroes(BLOCK + 1, 100).await));
        let message = backend.write_at(1, &[1; 4096]).await.unwrap_err().to_string();
        assert!(message.contains("not aligned to 4096-byte"), "{message}");
        let mut all = vec![0xFF; (2 * BLOCK + 10) as usize];
        backend.read_at(0, &mut all).await.unwrap();
        assert!(all.iter().all(|&b| b == 0));
    });
}

#[test]
fn direct_io_refusal_is_explained() {
    // procfs always refuses O_DIRECT; tmpfs did before Linux 6.6.
    let message = FileBackend::open("/proc/self/comm", direct())
        .unwrap_err()
        .to_string();
    assert!(message.contains("refuses O_DIRECT") && message.contains("/proc/self/comm"));

    let Some(dir) = common::tmpfs_tempdir() else {
        println!("skipped the tmpfs case: no writable tmpfs");
        return;
    };
    match FileBackend::create(dir.path().join("x.img"), BLOCK, direct()) {
        Ok(_) => println!("skipped the tmpfs case: this kernel's tmpfs supports O_DIRECT"),
        Err(err) => assert!(err.to_string().contains("refuses O_DIRECT"), "{err}"),
    }
}

#[test]
fn bad_input_fails_and_changes_nothing() {
    let dir = common::tempdir();
    let backend = FileBackend::create(dir.path().join("file.img"), 100, FileOptions::new()).unwrap();
    block_on(async {
        let out_of_bounds = |result| matches!(result, Err(Error::OutOfBounds { .. }));
        assert!(out_of_bounds(backend.write_at(u64::MAX, &[1; 2]).await));
        assert!(out_of_bounds(backend.write_at(99, &[1; 2]).await));
        assert!(out_of_bounds(backend.read_at(u64::MAX - 1, &mut [0; 4]).await));
        assert!(out_of_bounds(backend.trim(u64::MAX, 2).await));
        assert!(out_of_bounds(backend.write_zeroes(50, u64::MAX).await));
        let mut all = [0xFF; 100];
        backend.read_at(0, &mut all).await.unwrap();
        assert_eq!(all, [0; 100]);
    });
    assert_eq!(std::fs::metadata(dir.path().join("file.img")).unwrap().len(), 100);
}

#[test]
fn opening_a_missing_file_names_it() {
    let err = FileBackend::open("/nonexistent/r3map.img", FileOptions::new()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/r3map.img"), "{err}");
}
