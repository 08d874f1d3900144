//! [`GrpcSeederLink`]: a migration seeder over gRPC, as a leecher uses it. Against an r3map
//! seeder every call of [`SeederLink`] maps to one `SeederExtension` call; against a Go seeder
//! the Go calls stand in (no sessions, no pre-copy rounds, no commit: `close` hands over).

use std::time::SystemTime;

use async_trait::async_trait;
use futures::future::try_join_all;
use r3map_core::{check_range, Error};
use r3map_migration::link::from_unix_nanos;
use r3map_migration::{MigrationError, ResourceInfo, Result, SeederLink, SessionId, SyncReport};
use tonic::{Code, Status};

use super::reads::{fill, pieces};
use super::{piece_size, ClientOptions, Connection};
use crate::chunk::Accept;
use crate::limits::{MAX_CHUNK, MAX_MESSAGE};
use crate::pb::ext::seeder_extension_client::SeederExtensionClient;
use crate::pb::ext::{Empty, HashesArgs, InfoArgs, Range, ReadChunksArgs, Session};
use crate::pb::migration::seeder_client::SeederClient;
use crate::pb::migration::{CloseArgs, ReadAtArgs, SyncArgs, TrackArgs};

/// A seeder on a gRPC server.
pub struct GrpcSeederLink {
    conn: Connection,
    info: ResourceInfo,
    piece: u64,
    receive: Accept,
    /// Whether the server has r3map's extension (false: a Go seeder).
    extension: bool,
}

impl std::fmt::Debug for GrpcSeederLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcSeederLink")
            .field("info", &self.info)
            .field("go_peer", &!self.extension)
            .finish()
    }
}

impl GrpcSeederLink {
    /// Connects to the seeder at `addr` (`HOST:PORT`). An r3map seeder reports its size and
    /// chunk size; a Go seeder needs `options.size` and `options.chunk_size`.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Self> {
        let conn = Connection::open(addr, "", &options).await?;
        let reply = SeederExtensionClient::new(conn.channel.clone())
            .info(conn.request(InfoArgs {}))
            .await;
        let (info, piece, extension) = match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                let info = ResourceInfo {
                    size: reply.size,
                    chunk_size: reply.chunk_size,
                };
                (info, piece_size(&options, reply.max_chunk), true)
            }
            Err(status) if status.code() == Code::Unimplemented => {
                let (Some(size), Some(chunk_size)) = (options.size, options.chunk_size) else {
                    return Err(MigrationError::InvalidConfig(format!(
                        "the seeder at {addr} does not report its size and chunk size (a Go r3map seeder?); give both"
                    )));
                };
                let info = ResourceInfo { size, chunk_size };
                (info, piece_size(&options, MAX_CHUNK), false)
            }
            Err(status) => return Err(crate::status::to_migration(&status, conn.timeout)),
        };
        if info.chunk_size == 0 {
            return Err(MigrationError::InvalidConfig(
                "the seeder reports a chunk size of 0".into(),
            ));
        }
        Ok(Self {
            conn,
            info,
            piece,
            receive: Accept::all(options.compress),
            extension,
        })
    }

    /// Whether the seeder is an r3map seeder, not a Go one.
    pub fn has_extension(&self) -> bool {
        self.extension
    }

    /// Operator abort (`r3map migrate abort`): the source resumes unless it already handed
    /// off. Returns the phase the seeder left, in words.
    pub async fn abort(&self) -> Result<String> {
        self.require_extension("abort")?;
        let reply = self.ext().abort(self.conn.request(Empty {})).await;
        Ok(self.check(reply)?.was)
    }

    fn go(&self) -> SeederClient<tonic::transport::Channel> {
        SeederClient::new(self.conn.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn ext(&self) -> SeederExtensionClient<tonic::transport::Channel> {
        SeederExtensionClient::new(self.conn.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn check<T>(&self, reply: std::result::Result<tonic::Response<T>, Status>) -> Result<T> {
        reply
            .map(tonic::Response::into_inner)
            .map_err(|status| crate::status::to_migration(&status, self.conn.timeout))
    }

    fn require_extension(&self, call: &'static str) -> Result<()> {
        if self.extension {
            return Ok(());
        }
        Err(MigrationError::WrongPhase {
            call,
            phase: "a Go r3map seeder, which has no such call".into(),
        })
    }

    fn session(session: SessionId) -> Session {
        Session { id: session.0 }
    }

    async fn go_read(&self, range: Range, buf: &mut [u8]) -> Result<()> {
        let reply = self
            .go()
            .read_at(self.conn.request(ReadAtArgs {
                length: range.length as i32,
                off: range.offset as i64,
            }))
            .await;
        let reply = self.check(reply)?;
        if reply.n as u64 != range.length || reply.p.len() as u64 != range.length {
            return Err(Error::Remote(format!(
                "the seeder answered a read of {} bytes at {} with {} bytes",
                range.length,
                range.offset,
                reply.p.len()
            ))
            .into());
        }
        buf.copy_from_slice(&reply.p);
        Ok(())
    }
}

#[async_trait]
impl SeederLink for GrpcSeederLink {
    async fn info(&self) -> Result<ResourceInfo> {
        Ok(self.info)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.info.size)?;
        let ranges = pieces(offset, buf.len() as u64, self.piece);
        if ranges.is_empty() {
            return Ok(());
        }
        if !self.extension {
            let reads = ranges
                .iter()
                .zip(buf.chunks_mut(self.piece as usize))
                .map(|(range, piece)| self.go_read(*range, piece));
            return try_join_all(reads).await.map(|_| ());
        }
        let reply = self
            .ext()
            .read_chunks(self.conn.request(ReadChunksArgs {
                ranges: ranges.clone(),
                accept: self.receive.to_wire(),
            }))
            .await;
        let stream = self.check(reply)?;
        let timeout = self.conn.timeout;
        // A failure inside the stream may be a migration error (the seeder closed).
        let mut failure = None;
        let result = fill(stream, &ranges, buf, |status| {
            failure = Some(crate::status::to_migration(status, timeout));
            Error::Remote(status.message().to_owned())
        })
        .await;
        match (result, failure) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(err)) => Err(err),
            (Err(err), None) => Err(err.into()),
        }
    }

    async fn track(&self, session: SessionId) -> Result<()> {
        if !self.extension {
            self.check(self.go().track(self.conn.request(TrackArgs {})).await)?;
            return Ok(());
        }
        let reply = self.ext().track(self.conn.request(Self::session(session))).await;
        self.check(reply)?;
        Ok(())
    }

    async fn dirty_round(&self, session: SessionId) -> Result<Vec<u64>> {
        self.require_extension("a pre-copy round")?;
        let reply = self
            .ext()
            .dirty_round(self.conn.request(Self::session(session)))
            .await;
        Ok(self.check(reply)?.chunks)
    }

    async fn sync(&self, session: SessionId) -> Result<SyncReport> {
        if !self.extension {
            // Go has no suspend time; the reply's arrival is the closest bound we have.
            let reply = self.check(self.go().sync(self.conn.request(SyncArgs {})).await)?;
            let chunk_size = self.info.chunk_size;
            let dirty = reply
                .dirty_offsets
                .iter()
                .map(|&offset| {
                    if offset < 0
                        || !(offset as u64).is_multiple_of(chunk_size)
                        || offset as u64 >= self.info.size
                    {
                        return Err(MigrationError::Backend(Error::Remote(format!(
                            "the seeder's dirty offset {offset} is not a chunk of the resource"
                        ))));
                    }
                    Ok(offset as u64 / chunk_size)
                })
                .collect::<Result<Vec<u64>>>()?;
            return Ok(SyncReport {
                dirty,
                suspended_at: SystemTime::now(),
            });
        }
        let reply = self.ext().sync(self.conn.request(Self::session(session))).await;
        let report = self.check(reply)?;
        Ok(SyncReport {
            dirty: report.dirty,
            suspended_at: from_unix_nanos(report.suspended_at_unix_nanos),
        })
    }

    async fn commit(&self, session: SessionId) -> Result<()> {
        if !self.extension {
            // The Go protocol has no commit: its close after sync hands the resource over.
            return Ok(());
        }
        let reply = self.ext().commit(self.conn.request(Self::session(session))).await;
        self.check(reply)?;
        Ok(())
    }

    async fn hashes(&self, session: SessionId, first: u64, count: u64) -> Result<Vec<[u8; 32]>> {
        self.require_extension("hashes")?;
        let reply = self
            .ext()
            .hashes(self.conn.request(HashesArgs {
                session: session.0,
                first,
                count,
            }))
            .await;
        let reply = self.check(reply)?;
        if reply.hashes.len() as u64 != count {
            return Err(Error::Remote(format!(
                "the seeder sent {} hashes for {count} chunks",
                reply.hashes.len()
            ))
            .into());
        }
        reply
            .hashes
            .iter()
            .map(|hash| {
                <[u8; 32]>::try_from(hash.as_ref())
                    .map_err(|_| Error::Remote(format!("the seeder sent a {}-byte hash", hash.len())).into())
            })
            .collect()
    }

    async fn close(&self, session: SessionId) -> Result<()> {
        if !self.extension {
            self.check(self.go().close(self.conn.request(CloseArgs {})).await)?;
            return Ok(());
        }
        let reply = self.ext().close(self.conn.request(Self::session(session))).await;
        self.check(reply)?;
        Ok(())
    }
}
