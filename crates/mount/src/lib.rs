//! r3map mounts: the compositions users run.
//!
//! - [`cache`]: a persistent local cache (data + chunk state) that survives restarts.
//! - [`managed`]: a remote behind a local cache, with background pull and push (the WAN mode).
//! - [`slice`]: the slice frontend (`&mut [u8]`) as a direct or managed mount.
//! - [`spec`]: backend specifications as users write them (`memory:1GiB`, `file:/path`, ...).
//! - [`size`]: human-readable byte sizes and durations.

#![forbid(unsafe_code)]

pub mod cache;
pub mod managed;
pub mod size;
pub mod slice;
pub mod spec;

pub use cache::PersistentCache;
pub use managed::{ManagedMount, ManagedOptions, MountStats, StatsReader, SyncTo};
pub use size::{format_bytes, parse_duration, parse_size};
pub use slice::SliceMount;
pub use spec::{BackendSpec, RemoteOptions};
