//! r3map remote stores as backends: Redis, Redis Cluster and S3, one key or object per chunk.
//!
//! # Layout
//!
//! - [`keyed`]: [`ChunkStore`], what a store must do (get, put, delete a chunk by its byte
//!   offset), and [`KeyedBackend`], the [`r3map_core::Backend`] over one: many chunk requests in
//!   flight, a deadline on each. [`open_backend`] adds the `Arbitrary` stage for unaligned I/O.
//! - [`redis`](mod@redis): [`RedisStore`] on a standalone server or a Redis Cluster.
//! - [`s3`]: [`S3Store`] in a bucket of any S3-compatible service, with [`s3::credentials`].
//!
//! Keys follow the Go r3map by default (`PREFIX-OFFSET`, the bare offset for Redis without a
//! prefix), so either implementation reads what the other wrote with the same chunk size;
//! [`KeyLayout::Folder`] (`PREFIX/OFFSET`) is the alternative. A chunk that was never written
//! reads as zeros.

#![forbid(unsafe_code)]

pub mod keyed;
pub mod redis;
pub mod s3;

pub use keyed::{open_backend, ChunkStore, KeyLayout, KeyedBackend, KeyedOptions};
pub use redis::{RedisOptions, RedisStore};
pub use rusty_s3::Credentials;
pub use s3::{S3Options, S3Store};
#[cfg(feature = "testing")]
pub mod testing;
