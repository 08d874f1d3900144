//! `DirectoryBackend`: the conformance suite with tiny open-file caches, missing chunks, sync
//! of evicted chunks, reopening and the layout record.

mod common;

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use r3map_backends::{DirectoryBackend, DirectoryOptions};
use r3map_core::testing::{self, block_on, pattern};
use r3map_core::{Backend, Error};

fn open(dir: &Path, size: u64, chunk_size: u64, open_files: usize) -> DirectoryBackend {
    let options = DirectoryOptions::new().open_files(open_files);
    DirectoryBackend::open(dir, size, chunk_size, options).unwrap()
}

/// Names in `dir` other than the layout record.
fn chunk_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "r3map-layout")
        .collect();
    names.sort();
    names
}

proptest! {
    #![proptest_config(common::proptest_config(48))]
    #[test]
    fn matches_model(
        chunk_size in 16u64..600,
        chunks in 0u64..12,
        tail_fraction in 0.01f64..1.0,
        open_files in 1usize..4,
        ops in testing::ops_strategy(1500, 40),
    ) {
        // A short tail chunk: the size is never a multiple of the chunk size.
        let tail = ((chunk_size as f64 * tail_fraction) as u64).clamp(1, chunk_size - 1);
        let dir = common::tempdir();
        let backend = open(dir.path(), chunks * chunk_size + tail, chunk_size, open_files);
        block_on(testing::check_against_model(&backend, 1, &ops))?;
    }
}

#[test]
fn concurrent_access_across_many_chunks_with_two_open_files() {
    let dir = common::tempdir();
    let backend = open(dir.path(), 64 * 512 + 100, 512, 2);
    block_on(testing::check_concurrent(Arc::new(backend), 1, 8, 200)).unwrap();
}

#[test]
fn missing_chunks_read_as_zeros_without_creating_files() {
    let dir = common::tempdir();
    let backend = open(dir.path(), 10_000, 1000, 2);
    block_on(async {
        let mut all = vec![0xFF; 10_000];
        backend.read_at(0, &mut all).await.unwrap();
        assert!(all.iter().all(|&b| b == 0));
        backend.trim(0, 10_000).await.unwrap();
        backend.write_zeroes(500, 3000).await.unwrap();
        backend.sync().await.unwrap();
    });
    assert!(chunk_files(dir.path()).is_empty());
    assert!(backend.existing_chunks().unwrap().is_empty());
}

#[test]
fn writes_create_only_the_touched_chunks_and_the_tail_file_is_short() {
    let dir = common::tempdir();
    let backend = open(dir.path(), 10_050, 1000, 2);
    block_on(async {
        backend.write_at(1990, &[1; 20]).await.unwrap(); // chunks 1 and 2
        backend.write_at(10_049, &[2]).await.unwrap(); // the 50-byte tail chunk 10
    });
    assert_eq!(backend.existing_chunks().unwrap(), vec![1, 2, 10]);
    assert_eq!(chunk_files(dir.path()).len(), 3);
    let len = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
    assert_eq!(len("chunk-00000001"), 1000);
    assert_eq!(len("chunk-00000010"), 50);
}

#[test]
fn trimming_a_whole_chunk_frees_its_space() {
    let dir = common::disk_tempdir().unwrap_or_else(common::tempdir);
    let backend = open(dir.path(), 3 << 20, 1 << 20, 2);
    let path = dir.path().join("chunk-00000001");
    let allocated = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
    block_on(backend.write_at(1 << 20, &pattern(3, 1 << 20))).unwrap();
    let before = allocated();
    block_on(backend.trim(1 << 20, 1 << 20)).unwrap();
    assert!(
        allocated() < before,
        "{} blocks before, {} after",
        before,
        allocated()
    );
    let mut back = vec![0xFF; 1 << 20];
    block_on(backend.read_at(1 << 20, &mut back)).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn sync_reaches_chunks_evicted_from_the_cache() {
    let dir = common::tempdir();
    let backend = open(dir.path(), 4000, 1000, 1);
    block_on(async {
        backend.write_at(0, &[1; 1000]).await.unwrap();
        backend.write_at(1000, &[2; 1000]).await.unwrap(); // evicts chunk 0's file
        backend.sync().await.unwrap();
        // Removing chunk 0's file behind the backend's back after an evicting write: a sync that
        // visits evicted chunks must notice, and keep failing until the chunk is handled.
        backend.write_at(0, &[3; 10]).await.unwrap();
        backend.write_at(2000, &[4; 10]).await.unwrap(); // evicts chunk 0 again
        std::fs::remove_file(dir.path().join("chunk-00000000")).unwrap();
        assert!(backend.sync().await.is_err());
        assert!(backend.sync().await.is_err(), "a failed sync must be retried");
    });
}

#[test]
fn reopen_after_drop_keeps_data() {
    let dir = common::tempdir();
    let data = pattern(5, 3500);
    block_on(async {
        let backend = open(dir.path(), 9999, 1000, 2);
        backend.write_at(1234, &data).await.unwrap();
        backend.sync().await.unwrap();
        drop(backend);

        let reopened = open(dir.path(), 9999, 1000, 3);
        let mut back = vec![0; data.len()];
        reopened.read_at(1234, &mut back).await.unwrap();
        assert_eq!(back, data);
    });
}

#[test]
fn reopening_with_another_layout_is_refused() {
    let dir = common::tempdir();
    drop(open(dir.path(), 9999, 1000, 2));
    for (size, chunk_size) in [(9999, 500), (10_000, 1000)] {
        let err = DirectoryBackend::open(dir.path(), size, chunk_size, DirectoryOptions::new()).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(err.to_string().contains("size=9999 chunk_size=1000"), "{err}");
    }
}

#[test]
fn bad_input_fails_and_changes_nothing() {
    let dir = common::tempdir();
    let backend = open(dir.path(), 100, 30, 2);
    block_on(async {
        let out_of_bounds = |result| matches!(result, Err(Error::OutOfBounds { .. }));
        assert!(out_of_bounds(backend.write_at(u64::MAX, &[1; 2]).await));
        assert!(out_of_bounds(backend.write_at(99, &[1; 2]).await));
        assert!(out_of_bounds(backend.read_at(u64::MAX - 1, &mut [0; 4]).await));
        assert!(out_of_bounds(backend.trim(u64::MAX, 2).await));
        assert!(out_of_bounds(backend.write_zeroes(50, u64::MAX).await));
    });
    assert!(chunk_files(dir.path()).is_empty());
}

#[test]
fn invalid_configuration_is_refused() {
    let dir = common::tempdir();
    let zero_chunks = DirectoryBackend::open(dir.path(), 100, 0, DirectoryOptions::new());
    assert!(matches!(zero_chunks, Err(Error::InvalidConfig(_))));
    let no_cache = DirectoryBackend::open(dir.path(), 100, 10, DirectoryOptions::new().open_files(0));
    assert!(matches!(no_cache, Err(Error::InvalidConfig(_))));
    let too_many_chunks = DirectoryBackend::open(dir.path(), 1 << 40, 1, DirectoryOptions::new());
    assert!(matches!(too_many_chunks, Err(Error::InvalidConfig(_))));
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written"
    );
}

#[test]
fn extents_report_missing_chunk_files_and_holes_inside_them() {
    use r3map_core::{Allocation, Extent};
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path(), 4 * MIB, MIB, 8);
    r3map_core::testing::block_on(async {
        assert_eq!(
            backend.extents(0, 4 * MIB).await.unwrap(),
            vec![Extent::hole(4 * MIB)]
        );
        backend.write_at(2 * MIB + 8192, &[9u8; 4096]).await.unwrap();
        let mut extents = Vec::new();
        let mut at = 0;
        while at < 4 * MIB {
            for extent in backend.extents(at, 4 * MIB - at).await.unwrap() {
                extents.push((at, extent));
                at += extent.len;
            }
        }
        let data: Vec<_> = extents
            .iter()
            .filter(|(_, e)| e.allocation == Allocation::Data)
            .collect();
        assert_eq!(data.len(), 1, "{extents:?}");
        let (start, extent) = data[0];
        // The written 4 KiB is data; filesystems may round to their block size, never more
        // than the chunk.
        assert!(
            *start <= 2 * MIB + 8192 && start + extent.len >= 2 * MIB + 12288,
            "{extents:?}"
        );
        assert!(*start >= 2 * MIB && start + extent.len <= 3 * MIB, "{extents:?}");
    });
}
