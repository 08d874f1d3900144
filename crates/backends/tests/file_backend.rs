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

/// A directory on a disk filesystem that accepts O_DIRECT, or `None` after recording why the
/// test cannot run here. Call it first: a test skips before it checks anything.
fn direct_io_dir() -> Option<tempfile::TempDir> {
    let Some(dir) = common::disk_tempdir() else {
        testing::skip("no disk filesystem under /var/tmp or /work for O_DIRECT");
        return None;
    };
    match FileBackend::create(dir.path().join("probe.img"), BLOCK, direct()) {
        Ok(_) => Some(dir),
        Err(Error::InvalidConfig(_)) => {
            let fs = common::filesystem_type(dir.path()).unwrap_or_else(|| "unknown".into());
            testing::skip(&format!("the disk filesystem ({fs}) refuses O_DIRECT"));
            None
        }
        Err(err) => panic!("unexpected error probing O_DIRECT: {err}"),
    }
}

/// A direct-I/O backend of `size` bytes in `dir` (which [`direct_io_dir`] accepted).
fn direct_backend(dir: &Path, size: u64) -> FileBackend {
    FileBackend::create(dir.join("direct.img"), size, direct()).expect("O_DIRECT backend")
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

#[test]
fn direct_io_matches_model() {
    // The filesystem check runs once, before any case: all cases run, or the test is skipped.
    let Some(dir) = direct_io_dir() else {
        return;
    };
    let strategy = (0u64..8, 0u64..BLOCK, testing::ops_strategy(3 * BLOCK + 100, 30));
    let config = proptest::test_runner::Config {
        source_file: Some(file!()),
        ..common::proptest_config(16)
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&strategy, |(blocks, tail, ops)| {
        let size = (blocks * BLOCK + tail).max(1);
        let case = tempfile::tempdir_in(dir.path()).expect("a directory for this case");
        let backend = direct_backend(case.path(), size);
        block_on(testing::check_against_model(&backend, BLOCK, &ops))
    });
    if let Err(failure) = result {
        panic!("{failure}");
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
    let Some(dir) = direct_io_dir() else {
        return;
    };
    let backend = direct_backend(dir.path(), 64 * BLOCK + 123);
    block_on(testing::check_concurrent(Arc::new(backend), BLOCK, 8, 100)).unwrap();
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
    let Some(dir) = direct_io_dir() else {
        return;
    };
    // Over 2 MiB of whole blocks, so unaligned memory bounces in several pieces, plus a tail.
    let whole = (2 << 20) + 3 * BLOCK;
    let size = whole + 100;
    let backend = direct_backend(dir.path(), size);
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
    let Some(dir) = direct_io_dir() else {
        return;
    };
    let backend = direct_backend(dir.path(), 2 * BLOCK + 10);
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
    // procfs always refuses O_DIRECT.
    let message = FileBackend::open("/proc/self/comm", direct())
        .unwrap_err()
        .to_string();
    assert!(message.contains("refuses O_DIRECT") && message.contains("/proc/self/comm"));
}

#[test]
fn direct_io_refusal_on_tmpfs_is_explained() {
    let Some(dir) = common::tmpfs_tempdir() else {
        return testing::skip("no writable tmpfs under /dev/shm, /tmp or /run");
    };
    let path = dir.path().join("x.img");
    match FileBackend::create(&path, BLOCK, direct()) {
        // tmpfs refused O_DIRECT before Linux 6.6.
        Ok(_) => testing::skip("this kernel's tmpfs supports O_DIRECT: no refusal to explain"),
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("refuses O_DIRECT"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
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

#[test]
fn extents_find_the_holes_of_a_sparse_file() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::create(dir.path().join("sparse.img"), 4 * MIB, FileOptions::new()).unwrap();
    block_on(async {
        use r3map_core::Extent;
        assert_eq!(
            backend.extents(0, 4 * MIB).await.unwrap(),
            vec![Extent::hole(4 * MIB)]
        );
        backend.write_at(MIB, &pattern(1, MIB as usize)).await.unwrap();
        let expected = vec![Extent::hole(MIB), Extent::data(MIB), Extent::hole(2 * MIB)];
        assert_eq!(backend.extents(0, 4 * MIB).await.unwrap(), expected);
        // A query inside the data, and one inside the trailing hole.
        assert_eq!(
            backend.extents(MIB + 5, 10).await.unwrap(),
            vec![Extent::data(10)]
        );
        assert_eq!(
            backend.extents(3 * MIB, MIB).await.unwrap(),
            vec![Extent::hole(MIB)]
        );
        // Trimming punches the hole back.
        backend.trim(MIB, MIB).await.unwrap();
        assert_eq!(
            backend.extents(0, 4 * MIB).await.unwrap(),
            vec![Extent::hole(4 * MIB)]
        );
    });
}
