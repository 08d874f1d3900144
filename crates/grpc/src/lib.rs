//! r3map gRPC: the transport that crosses proxies and load balancers where NBD cannot, and
//! the transport of migration.
//!
//! # Services
//!
//! - `com.pojtinger.felicitas.r3map.mount.v1.Backend` (ReadAt, WriteAt, Sync) and
//!   `com.pojtinger.felicitas.r3map.migration.v1.Seeder` (ReadAt, Track, Sync, Close): the Go
//!   r3map's services, with its message names, field names and numbers, so Go and Rust peers
//!   talk to each other (`tests/descriptor.rs` checks the table).
//! - `r3map.v1.BackendExtension` and `r3map.v1.SeederExtension`: what the Go services lack
//!   (size, trim and zeroing, streamed reads and writes of many chunks per call, per-chunk
//!   compression, migration sessions, pre-copy rounds, the suspend time, commit, hashes,
//!   abort). A Go server answers them UNIMPLEMENTED and the clients fall back to the Go calls.
//!
//! # Public API
//!
//! - Server: [`GrpcServer::new`]`(exports)` with [`Export`]s, optionally
//!   [`.seeder(Arc<r3map_migration::Seeder>)`](GrpcServer::seeder), `.tls(ServerTls)`,
//!   `.token(Token)`, `.limits(ServerLimits)`, `.compress(bool)`, then
//!   [`.serve(listener, shutdown)`](GrpcServer::serve).
//! - Remote backend: [`GrpcBackend::connect`]`(addr, export, ClientOptions)`, an
//!   `r3map_core::Backend`.
//! - Migration: [`GrpcSeederLink::connect`]`(addr, ClientOptions)`, an
//!   `r3map_migration::SeederLink` for `Leecher::open`, plus
//!   [`GrpcSeederLink::abort`] for the operator's abort.
//! - [`ClientOptions`]: TLS (`r3map_tls::ClientTls`), [`Token`], connect and per-call
//!   deadlines, compression, piece size, and the size (and chunk size) a Go peer cannot report.
//!
//! # Limits
//!
//! Chunks are at most [`limits::MAX_CHUNK`] (32 MiB, as in Go) on both sides; tonic's message
//! limits are raised to that deliberately. Calls are bounded per connection (HTTP/2 streams)
//! and server-wide, and so are the chunk bytes held in memory ([`ServerLimits`]). Out-of-range
//! requests get OUT_OF_RANGE, oversized and wrong-size ones INVALID_ARGUMENT, writes to a
//! read-only export PERMISSION_DENIED; r3map peers get the typed error back ([`status`]).
//!
//! # Compression
//!
//! Per chunk ([`chunk`]): zero chunks travel without data; otherwise lz4 (pure Rust,
//! `lz4_flex`) when the receiver accepts it and it makes the chunk smaller, else raw.

pub mod auth;
pub mod chunk;
pub mod client;
pub mod limits;
pub mod pb;
pub mod server;
pub mod status;

pub use auth::Token;
pub use client::{ClientOptions, GrpcBackend, GrpcSeederLink};
pub use limits::ServerLimits;
pub use server::{Export, GrpcServer};
