//! r3map local backends: storage on this machine behind the [`r3map_core::Backend`] trait.
//!
//! # Layout
//!
//! - [`MemoryBackend`] (from `r3map-core`): a region of process memory.
//! - [`file`](mod@file): [`FileBackend`], one regular file or block device, optionally with O_DIRECT
//!   (the rules for that live in `direct`).
//! - [`directory`]: [`DirectoryBackend`], one file per chunk in a directory, with a bounded
//!   cache of open files.
//! - `fileops`: helpers both file-based backends share (zeroing with fallback, sync offload).
//! - `sys`: the crate's only unsafe code, the `fallocate(2)` call.
//!
//! # Blocking calls
//!
//! Reads and writes are positional syscalls made on the calling task: on a page-cache hit they
//! cost microseconds, less than handing the borrowed buffer to a thread pool (which would also
//! need a copy). Syncs, which can take milliseconds, run on tokio's blocking pool.

#![deny(unsafe_code)]

mod direct;
pub mod directory;
pub mod file;
mod fileops;
mod sys;

pub use direct::DIRECT_IO_ALIGNMENT;
pub use directory::{DirectoryBackend, DirectoryOptions};
pub use file::{FileBackend, FileOptions};
pub use r3map_core::MemoryBackend;
