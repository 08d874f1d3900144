//! The Go-compatible `Seeder` service and r3map's `SeederExtension` around a migration
//! [`Seeder`]. Go's calls belong to the anonymous session; its dirty list is byte offsets.

use std::sync::Arc;

use r3map_migration::link::to_unix_nanos;
use r3map_migration::{MigrationError, Seeder, SeederLink, SessionId};
use tonic::{Request, Response, Status};

use super::shared::{go_range, Shared};
use super::stream::{read_chunks, ChunkStream, ReadFn};
use crate::chunk::{Accept, SUPPORTED};
use crate::pb::ext::{
    seeder_extension_server::SeederExtension, AbortReply, DirtyChunks, Empty, HashesArgs, HashesReply,
    InfoArgs, ReadChunksArgs, SeederInfoReply, Session, SyncReport,
};
use crate::pb::migration::{
    seeder_server, CloseArgs, CloseReply, ReadAtArgs, ReadAtReply, SyncArgs, SyncReply, TrackArgs, TrackReply,
};
use crate::status::from_migration;

/// Hashes one call may ask for (32 bytes each: one maximal message).
const MAX_HASHES: u64 = crate::limits::MAX_CHUNK / 32;

#[derive(Clone)]
pub(crate) struct SeederService {
    pub seeder: Arc<Seeder>,
    pub shared: Arc<Shared>,
}

fn status(err: MigrationError) -> Status {
    from_migration(&err)
}

impl SeederService {
    async fn size(&self) -> Result<u64, Status> {
        Ok(self.seeder.info().await.map_err(status)?.size)
    }
}

#[tonic::async_trait]
impl seeder_server::Seeder for SeederService {
    async fn read_at(&self, request: Request<ReadAtArgs>) -> Result<Response<ReadAtReply>, Status> {
        let (offset, len) = go_range(request.get_ref().off, request.get_ref().length)?;
        self.shared.check_chunk(offset, len, self.size().await?)?;
        let _call = self.shared.call().await?;
        let _budget = self.shared.bytes(len).await;
        let mut buf = vec![0u8; len as usize];
        self.seeder.read_at(offset, &mut buf).await.map_err(status)?;
        Ok(Response::new(ReadAtReply {
            n: len as i32,
            p: buf.into(),
        }))
    }

    async fn track(&self, _: Request<TrackArgs>) -> Result<Response<TrackReply>, Status> {
        let _call = self.shared.call().await?;
        self.seeder.track(SessionId::ANONYMOUS).await.map_err(status)?;
        Ok(Response::new(TrackReply {}))
    }

    async fn sync(&self, _: Request<SyncArgs>) -> Result<Response<SyncReply>, Status> {
        let _call = self.shared.call().await?;
        let chunk_size = self.seeder.info().await.map_err(status)?.chunk_size;
        let report = self.seeder.sync(SessionId::ANONYMOUS).await.map_err(status)?;
        Ok(Response::new(SyncReply {
            dirty_offsets: report
                .dirty
                .iter()
                .map(|chunk| (chunk * chunk_size) as i64)
                .collect(),
        }))
    }

    async fn close(&self, _: Request<CloseArgs>) -> Result<Response<CloseReply>, Status> {
        let _call = self.shared.call().await?;
        self.seeder.close(SessionId::ANONYMOUS).await.map_err(status)?;
        Ok(Response::new(CloseReply {}))
    }
}

#[tonic::async_trait]
impl SeederExtension for SeederService {
    async fn info(&self, _: Request<InfoArgs>) -> Result<Response<SeederInfoReply>, Status> {
        let info = self.seeder.info().await.map_err(status)?;
        Ok(Response::new(SeederInfoReply {
            size: info.size,
            chunk_size: info.chunk_size,
            max_chunk: self.shared.limits.max_chunk,
            encodings: SUPPORTED.iter().map(|e| *e as i32).collect(),
        }))
    }

    type ReadChunksStream = ChunkStream;

    async fn read_chunks(
        &self,
        request: Request<ReadChunksArgs>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let args = request.into_inner();
        self.shared.check_ranges(&args.ranges, self.size().await?)?;
        let call = self.shared.call().await?;
        let seeder = self.seeder.clone();
        let read: ReadFn = Arc::new(move |offset, mut buf| {
            let seeder = seeder.clone();
            Box::pin(async move {
                seeder.read_at(offset, &mut buf).await.map_err(status)?;
                Ok(buf)
            })
        });
        Ok(Response::new(read_chunks(
            self.shared.clone(),
            read,
            args.ranges,
            Accept::from_wire(&args.accept),
            call,
        )))
    }

    async fn track(&self, request: Request<Session>) -> Result<Response<Empty>, Status> {
        let _call = self.shared.call().await?;
        let session = SessionId(request.get_ref().id);
        self.seeder.track(session).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn dirty_round(&self, request: Request<Session>) -> Result<Response<DirtyChunks>, Status> {
        let _call = self.shared.call().await?;
        let session = SessionId(request.get_ref().id);
        let chunks = self.seeder.dirty_round(session).await.map_err(status)?;
        Ok(Response::new(DirtyChunks { chunks }))
    }

    async fn sync(&self, request: Request<Session>) -> Result<Response<SyncReport>, Status> {
        let _call = self.shared.call().await?;
        let session = SessionId(request.get_ref().id);
        let report = self.seeder.sync(session).await.map_err(status)?;
        Ok(Response::new(SyncReport {
            dirty: report.dirty,
            suspended_at_unix_nanos: to_unix_nanos(report.suspended_at),
        }))
    }

    async fn commit(&self, request: Request<Session>) -> Result<Response<Empty>, Status> {
        let _call = self.shared.call().await?;
        let session = SessionId(request.get_ref().id);
        self.seeder.commit(session).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn hashes(&self, request: Request<HashesArgs>) -> Result<Response<HashesReply>, Status> {
        let HashesArgs {
            session,
            first,
            count,
        } = *request.get_ref();
        if count > MAX_HASHES {
            return Err(Status::invalid_argument(format!(
                "{count} hashes in one call; at most {MAX_HASHES} are allowed"
            )));
        }
        let _call = self.shared.call().await?;
        let hashes = self
            .seeder
            .hashes(SessionId(session), first, count)
            .await
            .map_err(status)?;
        Ok(Response::new(HashesReply {
            hashes: hashes
                .iter()
                .map(|hash| bytes::Bytes::copy_from_slice(hash))
                .collect(),
        }))
    }

    async fn close(&self, request: Request<Session>) -> Result<Response<Empty>, Status> {
        let _call = self.shared.call().await?;
        let session = SessionId(request.get_ref().id);
        self.seeder.close(session).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn abort(&self, _: Request<Empty>) -> Result<Response<AbortReply>, Status> {
        let _call = self.shared.call().await?;
        let was = self.seeder.abort().await.map_err(status)?;
        Ok(Response::new(AbortReply { was: was.to_string() }))
    }
}
