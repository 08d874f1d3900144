//! r3map NBD: a Network Block Device server that exports any r3map backend, and a client that
//! makes any NBD server (ours, `nbdkit`, `qemu-nbd`) usable as an r3map backend.
//!
//! # Layout
//!
//! - [`wire`]: protocol constants (magics, options, commands, flags, errors).
//! - [`codec`]: sans-IO frame encoding and decoding with length caps (fuzzable).
//! - [`server`]: listener, handshake and concurrent transmission phase ([`Server`]).
//! - [`client`]: an async client that implements [`r3map_core::Backend`] ([`Client`]).
//! - [`uri`]: `nbd://`, `nbds://`, `nbd+unix://` and `nbds+unix://` URIs.
//! - [`testing`]: a hostile-server harness for client tests and fuzzing.
//! - [`tls`]: TLS for `NBD_OPT_STARTTLS` (the shared `r3map-tls` configurations, mutual TLS).

pub mod client;
pub mod codec;
mod keepalive;
mod pool;
pub mod server;
pub mod testing;
pub mod tls;
pub mod uri;
pub mod wire;

pub use client::{Client, ClientError, ClientOptions, ExportInfo};
pub use server::{
    ConnectionError, Export, ListenAddr, OpenConnections, Server, ServerConfig, ServerError, Service,
};
pub use tls::{ClientTls, ServerTls, TlsError};
pub use uri::{NbdUri, Transport, UriError};
