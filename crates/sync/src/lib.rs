//! r3map delta file sync: the thesis' push-based method for plain files, driven by change
//! events instead of polling.
//!
//! # Layout
//! - [`wire`]: frames and their sans-IO codec (bounded sizes, versioned `Hello`).
//! - [`hashes`]: per-block xxh3 (change detection) and blake3 (end-to-end digest).
//! - [`delta`]: the I/O-free engine: which blocks a receiver lacks, and the checks on what a
//!   peer sends.
//! - [`conn`]: a framed connection with a deadline on every read and byte counters.
//! - [`replica`]: the receiver's file: a staging file (the previous version's inode, brought
//!   up to date, when nobody holds it open), published atomically by rename.
//! - [`source`]: the advertiser: hashes kept current from inotify events, one session per
//!   receiver.
//! - [`mapped`]: an advertised file the application maps and writes itself; its writes are
//!   tracked in the page tables, so a sync msyncs and rehashes only the blocks written.
//! - [`receiver`]: the receiving loop (resumes from its staging copy after a lost connection).
//! - [`hub`]: relays receivers to advertisers; peers are grouped by the common name of their
//!   client certificate (the sync id).
//! - [`transport`]: TCP with optional TLS (r3map-tls), identities from certificates.
//! - `sys`: the file lease check, the crate's only `unsafe`.

#![deny(unsafe_code)]

pub mod conn;
pub mod delta;
pub mod hashes;
pub mod hub;
pub mod mapped;
pub mod receiver;
pub mod replica;
pub mod source;
#[allow(unsafe_code)]
mod sys;
pub mod transport;
pub mod watch;
pub mod wire;

/// Where a component reports notable events, one line each (the CLI prints them).
pub type Log = std::sync::Arc<dyn Fn(String) + Send + Sync>;

pub use delta::{DeltaError, Plan};
pub use hashes::BlockHashes;
pub use mapped::{MappedError, MappedSource, SyncReport};
pub use wire::{Message, Role, WireError};
