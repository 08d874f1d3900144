//! Helpers shared by the backend integration tests.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Filesystem type of the mount holding `path`, from /proc/mounts (longest mount point wins).
pub fn filesystem_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount_point)
                .then(|| (mount_point.len(), fs_type.to_string()))
        })
        .max()
        .map(|(_, fs_type)| fs_type)
}

/// A temporary directory on a disk filesystem (not tmpfs), for O_DIRECT tests, or `None`.
pub fn disk_tempdir() -> Option<TempDir> {
    ["/var/tmp", "/work"]
        .iter()
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir() && filesystem_type(dir).is_some_and(|t| t != "tmpfs"))
        .find_map(|dir| {
            tempfile::Builder::new()
                .prefix("r3map-test-")
                .tempdir_in(dir)
                .ok()
        })
}

/// A writable tmpfs directory, or `None`.
pub fn tmpfs_tempdir() -> Option<TempDir> {
    ["/dev/shm", "/tmp", "/run"]
        .iter()
        .map(PathBuf::from)
        .filter(|dir| filesystem_type(dir).as_deref() == Some("tmpfs"))
        .find_map(|dir| {
            tempfile::Builder::new()
                .prefix("r3map-test-")
                .tempdir_in(dir)
                .ok()
        })
}

/// Any temporary directory, for tests that do not care about the filesystem.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("r3map-test-")
        .tempdir()
        .expect("temporary directory")
}

/// Property-test settings: `cases` runs, failing cases kept next to the test file.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..Default::default()
    }
}
