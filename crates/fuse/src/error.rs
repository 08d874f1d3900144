//! The error type of the FUSE frontends: one variant per step that can fail, each with the path
//! involved and what to do about it.

use std::io;
use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = FuseError> = std::result::Result<T, E>;

/// What went wrong while mounting, serving, unmounting or cleaning up a FUSE frontend.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mountpoint is unusable (missing, not a directory, not empty, or already a mount).
    #[error("cannot mount at {mountpoint}: {reason}")]
    Mountpoint { mountpoint: PathBuf, reason: String },

    /// The file name is not a single path component.
    #[error(
        "invalid file name {name:?}: it must be one path component (no '/', not '.' or '..', not empty)"
    )]
    InvalidName { name: String },

    /// The kernel refused the mount (no /dev/fuse, not root and no fusermount3, ...).
    #[error("mounting the FUSE filesystem at {mountpoint} failed: {source}; r3map needs /dev/fuse and root (or the `fusermount3` helper from the fuse3 package)")]
    Mount { mountpoint: PathBuf, source: io::Error },

    /// The file or device is still in use; nothing was unmounted and no data was lost.
    #[error("{path} is busy: {holder}; close it (or unmount what is mounted on it) and try again; the mount stays up and no data was lost")]
    Busy { path: PathBuf, holder: String },

    /// The unmount syscall failed for a reason other than "busy".
    #[error("unmounting {mountpoint} failed: {source}")]
    Unmount { mountpoint: PathBuf, source: io::Error },

    /// Flushing the backend (before or after unmounting) failed.
    #[error("flushing the backend of {mountpoint} failed: {source}; the data written since the last successful flush may not have reached the backend")]
    Sync {
        mountpoint: PathBuf,
        source: r3map_core::Error,
    },

    /// A loop-device operation failed.
    #[error("loop device {device}: {op} failed: {source}")]
    Loop {
        device: String,
        op: &'static str,
        source: io::Error,
    },

    /// The tokio runtime the mount was given has shut down.
    #[error("the tokio runtime serving {mountpoint} has shut down")]
    RuntimeGone { mountpoint: PathBuf },

    /// The kernel refused to drop cached pages of the file (`FUSE_NOTIFY_INVAL_INODE`).
    #[error("invalidating the cached bytes {offset}..+{len} of {path} failed: {source}")]
    Invalidate {
        path: PathBuf,
        offset: u64,
        len: u64,
        source: io::Error,
    },

    /// Reading /proc or /sys (to find mounts and loop devices) failed.
    #[error("cannot read {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
}
