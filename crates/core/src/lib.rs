//! r3map core: the backend abstraction, chunk math, bitmaps and the composable stages.
//!
//! # Layout
//!
//! - [`backend`]: the [`Backend`] trait every storage and every stage implements.
//! - [`error`]: the shared [`Error`] type.
//! - [`layout`]: chunk math ([`ChunkLayout`]), including the short tail chunk.
//! - [`bitmap`]: [`AtomicBitmap`], one bit of state per chunk.
//! - [`mapped`]: bitmap words in a memory-mapped state file (persistent chunk state).
//! - [`locks`]: [`ChunkLocks`], per-chunk async locks that cost memory only while held.
//! - [`memory`]: [`MemoryBackend`], the in-process backend (local cache, tests).
//! - [`stages`]: wrappers that add one behaviour each (chunked, arbitrary, synced, puller,
//!   pusher, tracker, gate).
//! - `testing` (feature `testing`): the model-based conformance suite.

pub mod backend;
pub mod bitmap;
pub mod error;
pub mod layout;
pub mod locks;
pub mod mapped;
pub mod memory;
pub mod stages;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{Allocation, Backend, Extent, SharedBackend};
pub use bitmap::AtomicBitmap;
pub use error::{Error, Result};
pub use layout::{check_range, read_unit, ChunkLayout};
pub use locks::{ChunkGuard, ChunkLocks};
pub use memory::MemoryBackend;
