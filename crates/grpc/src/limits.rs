//! The limits both sides enforce.

use std::time::Duration;

/// Largest chunk one message may carry, as in the Go r3map. Both sides refuse larger ones.
pub const MAX_CHUNK: u64 = 32 << 20;

/// Room in a message beyond its chunk (offsets, lengths, protobuf framing).
const MESSAGE_OVERHEAD: usize = 64 << 10;

/// tonic's message size limits (its 4 MiB default would refuse a full chunk with an opaque
/// error), raised to one chunk plus framing.
pub const MAX_MESSAGE: usize = MAX_CHUNK as usize + MESSAGE_OVERHEAD;

/// Ranges one streamed read may ask for.
pub const MAX_RANGES: usize = 4096;

/// How a server bounds its work.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Largest chunk accepted or sent.
    pub max_chunk: u64,
    /// Calls in flight on one connection (HTTP/2 streams).
    pub per_connection: usize,
    /// Calls in flight across every connection.
    pub server_wide: usize,
    /// Bytes of chunk data held in memory at once across every call.
    pub bytes_in_flight: u64,
    /// Connections at once.
    pub connections: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// After shutdown begins, time the calls in flight get to finish before every connection
    /// is cut (a client that keeps its connection busy cannot hold the server up longer).
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_chunk: MAX_CHUNK,
            per_connection: 64,
            server_wide: 256,
            bytes_in_flight: 256 << 20,
            connections: 128,
            handshake_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(10),
        }
    }
}

/// HTTP/2 flow-control windows. The 64 KiB default allows one window per round trip, which
/// caps a 25 ms link at ~2.6 MB/s; these let a whole chunk and more be on the way.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 64 << 20;
