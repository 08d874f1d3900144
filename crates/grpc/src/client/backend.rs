//! [`GrpcBackend`]: a remote r3map `Backend` over gRPC (`grpc://HOST:PORT/EXPORT`). Against an
//! r3map server it streams many chunks per call with per-chunk compression; against a Go
//! r3map server (no extension) it falls back to one `ReadAt`/`WriteAt` per chunk.

use async_trait::async_trait;
use futures::future::try_join_all;
use r3map_core::{check_range, Backend, Error, Result};
use tonic::Code;

use super::reads::{encode_pieces, fill, pieces};
use super::{piece_size, ClientOptions, Connection};
use crate::chunk::Accept;
use crate::limits::{MAX_CHUNK, MAX_MESSAGE};
use crate::pb::ext::backend_extension_client::BackendExtensionClient;
use crate::pb::ext::{InfoArgs, Range, ReadChunksArgs};
use crate::pb::mount::backend_client::BackendClient;
use crate::pb::mount::{ReadAtArgs, SyncArgs, WriteAtArgs};

/// A remote backend on a gRPC server.
pub struct GrpcBackend {
    conn: Connection,
    size: u64,
    /// Bytes per chunk message.
    piece: u64,
    /// `None` for a Go peer.
    extension: Option<Extension>,
}

#[derive(Clone, Copy)]
struct Extension {
    /// What the client sends (what the server decodes, narrowed by the client's choice).
    send: Accept,
    /// What the client asks the server to send.
    receive: Accept,
    read_only: bool,
}

impl std::fmt::Debug for GrpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcBackend")
            .field("size", &self.size)
            .field("piece", &self.piece)
            .field("go_peer", &self.extension.is_none())
            .finish()
    }
}

impl GrpcBackend {
    /// Connects to the export `export` (`""`: the server's first) of the server at `addr`
    /// (`HOST:PORT`). An r3map server reports the size; a Go peer needs `options.size`.
    pub async fn connect(addr: &str, export: &str, options: ClientOptions) -> Result<Self> {
        let conn = Connection::open(addr, export, &options).await?;
        let info = BackendExtensionClient::new(conn.channel.clone())
            .info(conn.request(InfoArgs {}))
            .await;
        let (size, piece, extension) = match info {
            Ok(reply) => {
                let info = reply.into_inner();
                let server = Accept::from_wire(&info.encodings);
                let mine = Accept::all(options.compress);
                let extension = Extension {
                    send: server.and(mine),
                    receive: mine,
                    read_only: info.read_only,
                };
                (info.size, piece_size(&options, info.max_chunk), Some(extension))
            }
            Err(status) if status.code() == Code::Unimplemented => {
                let size = options.size.ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "the gRPC server at {addr} does not report its size (a Go r3map server?); give the size (?size=BYTES)"
                    ))
                })?;
                (size, piece_size(&options, MAX_CHUNK), None)
            }
            Err(status) => return Err(conn.error(&status)),
        };
        if let Some(expected) = options.size.filter(|s| *s != size) {
            return Err(Error::InvalidConfig(format!(
                "the export is {size} bytes, not the {expected} bytes given"
            )));
        }
        Ok(Self {
            conn,
            size,
            piece,
            extension,
        })
    }

    /// Whether the server is an r3map server (streamed I/O, compression), not a Go peer.
    pub fn has_extension(&self) -> bool {
        self.extension.is_some()
    }

    fn go(&self) -> BackendClient<tonic::transport::Channel> {
        BackendClient::new(self.conn.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn ext(&self) -> BackendExtensionClient<tonic::transport::Channel> {
        BackendExtensionClient::new(self.conn.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    async fn go_read(&self, range: Range, buf: &mut [u8]) -> Result<()> {
        let reply = self
            .go()
            .read_at(self.conn.request(ReadAtArgs {
                length: range.length as i32,
                off: range.offset as i64,
            }))
            .await
            .map_err(|status| self.conn.error(&status))?
            .into_inner();
        if reply.n as u64 != range.length || reply.p.len() as u64 != range.length {
            return Err(Error::Remote(format!(
                "the server answered a read of {} bytes at {} with {} bytes (N = {})",
                range.length,
                range.offset,
                reply.p.len(),
                reply.n
            )));
        }
        buf.copy_from_slice(&reply.p);
        Ok(())
    }

    async fn zeroes(&self, offset: u64, len: u64, trim: bool) -> Result<()> {
        check_range(offset, len, self.size)?;
        if let Some(ext) = self.extension {
            if ext.read_only {
                return Err(Error::ReadOnly);
            }
            let range = Range { offset, length: len };
            let result = if trim {
                self.ext().trim(self.conn.request(range)).await
            } else {
                self.ext().write_zeroes(self.conn.request(range)).await
            };
            return result.map(|_| ()).map_err(|status| self.conn.error(&status));
        }
        // A Go peer: zeros are written like any data.
        let zeros = vec![0u8; self.piece.min(len) as usize];
        for range in pieces(offset, len, self.piece) {
            self.write_at(range.offset, &zeros[..range.length as usize])
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for GrpcBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_alignment(&self) -> Option<u64> {
        Some(1)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let ranges = pieces(offset, buf.len() as u64, self.piece);
        if ranges.is_empty() {
            return Ok(());
        }
        match self.extension {
            Some(ext) => {
                let stream = self
                    .ext()
                    .read_chunks(self.conn.request(ReadChunksArgs {
                        ranges: ranges.clone(),
                        accept: ext.receive.to_wire(),
                    }))
                    .await
                    .map_err(|status| self.conn.error(&status))?
                    .into_inner();
                fill(stream, &ranges, buf, |status| self.conn.error(status)).await
            }
            None => {
                let reads = ranges
                    .iter()
                    .zip(buf.chunks_mut(self.piece as usize))
                    .map(|(range, piece)| self.go_read(*range, piece));
                try_join_all(reads).await.map(|_| ())
            }
        }
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        match self.extension {
            Some(ext) if ext.read_only => Err(Error::ReadOnly),
            Some(ext) => {
                let chunks = encode_pieces(offset, data, self.piece, ext.send);
                let reply = self
                    .ext()
                    .write_chunks(self.conn.request(futures::stream::iter(chunks)))
                    .await
                    .map_err(|status| self.conn.error(&status))?
                    .into_inner();
                if reply.written != data.len() as u64 {
                    return Err(Error::Remote(format!(
                        "the server wrote {} of {} bytes",
                        reply.written,
                        data.len()
                    )));
                }
                Ok(())
            }
            None => {
                let writes = pieces(offset, data.len() as u64, self.piece)
                    .into_iter()
                    .map(|range| {
                        let at = (range.offset - offset) as usize;
                        let piece = bytes::Bytes::copy_from_slice(&data[at..at + range.length as usize]);
                        async move {
                            let reply = self
                                .go()
                                .write_at(self.conn.request(WriteAtArgs {
                                    off: range.offset as i64,
                                    p: piece,
                                }))
                                .await
                                .map_err(|status| self.conn.error(&status))?
                                .into_inner();
                            if reply.length as u64 != range.length {
                                return Err(Error::Remote(format!(
                                    "the server wrote {} of {} bytes at {}",
                                    reply.length, range.length, range.offset
                                )));
                            }
                            Ok(())
                        }
                    });
                try_join_all(writes).await.map(|_| ())
            }
        }
    }

    async fn sync(&self) -> Result<()> {
        self.go()
            .sync(self.conn.request(SyncArgs {}))
            .await
            .map(|_| ())
            .map_err(|status| self.conn.error(&status))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes(offset, len, true).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes(offset, len, false).await
    }
}
