//! The Go-compatible `Backend` service and r3map's `BackendExtension` over the server's exports.

use std::sync::Arc;

use futures::StreamExt;
use r3map_core::{Backend as _, Error};
use tonic::{Request, Response, Status, Streaming};

use super::shared::{check_range, go_range, Shared};
use super::stream::{read_chunks, ChunkStream, ReadFn};
use crate::chunk::{self, Accept, SUPPORTED};
use crate::pb::ext::{
    backend_extension_server::BackendExtension, Chunk, Encoding, InfoArgs, InfoReply, Range, RangeReply,
    ReadChunksArgs, WriteChunksReply,
};
use crate::pb::mount::{
    backend_server, ReadAtArgs, ReadAtReply, SyncArgs, SyncReply, WriteAtArgs, WriteAtReply,
};
use crate::status::from_core;

/// Both backend services (they share everything).
#[derive(Clone)]
pub(crate) struct BackendService {
    pub shared: Arc<Shared>,
}

fn refuse_read_only(read_only: bool) -> Result<(), Status> {
    if read_only {
        return Err(from_core(&Error::ReadOnly));
    }
    Ok(())
}

#[tonic::async_trait]
impl backend_server::Backend for BackendService {
    async fn read_at(&self, request: Request<ReadAtArgs>) -> Result<Response<ReadAtReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        let (offset, len) = go_range(request.get_ref().off, request.get_ref().length)?;
        self.shared.check_chunk(offset, len, export.backend.size())?;
        let _call = self.shared.call().await?;
        let _budget = self.shared.bytes(len).await;
        let mut buf = vec![0u8; len as usize];
        export
            .backend
            .read_at(offset, &mut buf)
            .await
            .map_err(|err| from_core(&err))?;
        Ok(Response::new(ReadAtReply {
            n: len as i32,
            p: buf.into(),
        }))
    }

    async fn write_at(&self, request: Request<WriteAtArgs>) -> Result<Response<WriteAtReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        refuse_read_only(export.read_only)?;
        let args = request.get_ref();
        let len = args.p.len() as u64;
        let (offset, _) = go_range(args.off, 0)?;
        self.shared.check_chunk(offset, len, export.backend.size())?;
        let _call = self.shared.call().await?;
        export
            .backend
            .write_at(offset, &args.p)
            .await
            .map_err(|err| from_core(&err))?;
        Ok(Response::new(WriteAtReply { length: len as i32 }))
    }

    async fn sync(&self, request: Request<SyncArgs>) -> Result<Response<SyncReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        let _call = self.shared.call().await?;
        export.backend.sync().await.map_err(|err| from_core(&err))?;
        Ok(Response::new(SyncReply {}))
    }
}

#[tonic::async_trait]
impl BackendExtension for BackendService {
    async fn info(&self, request: Request<InfoArgs>) -> Result<Response<InfoReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        Ok(Response::new(InfoReply {
            size: export.backend.size(),
            max_chunk: self.shared.limits.max_chunk,
            encodings: SUPPORTED.iter().map(|e| *e as i32).collect(),
            read_only: export.read_only,
        }))
    }

    async fn trim(&self, request: Request<Range>) -> Result<Response<RangeReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        refuse_read_only(export.read_only)?;
        let Range { offset, length } = *request.get_ref();
        check_range(offset, length, export.backend.size())?;
        let _call = self.shared.call().await?;
        export
            .backend
            .trim(offset, length)
            .await
            .map_err(|err| from_core(&err))?;
        Ok(Response::new(RangeReply {}))
    }

    async fn write_zeroes(&self, request: Request<Range>) -> Result<Response<RangeReply>, Status> {
        let export = self.shared.export(request.metadata())?;
        refuse_read_only(export.read_only)?;
        let Range { offset, length } = *request.get_ref();
        check_range(offset, length, export.backend.size())?;
        let _call = self.shared.call().await?;
        export
            .backend
            .write_zeroes(offset, length)
            .await
            .map_err(|err| from_core(&err))?;
        Ok(Response::new(RangeReply {}))
    }

    type ReadChunksStream = ChunkStream;

    async fn read_chunks(
        &self,
        request: Request<ReadChunksArgs>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let backend = self.shared.export(request.metadata())?.backend.clone();
        let args = request.into_inner();
        self.shared.check_ranges(&args.ranges, backend.size())?;
        let call = self.shared.call().await?;
        let read: ReadFn = Arc::new(move |offset, mut buf| {
            let backend = backend.clone();
            Box::pin(async move {
                backend
                    .read_at(offset, &mut buf)
                    .await
                    .map_err(|err| from_core(&err))?;
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

    async fn write_chunks(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<WriteChunksReply>, Status> {
        let export = self.shared.export(request.metadata())?.clone();
        refuse_read_only(export.read_only)?;
        let size = export.backend.size();
        let _call = self.shared.call().await?;
        let mut chunks = request.into_inner();
        let mut written = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            self.shared.check_chunk(chunk.offset, chunk.length, size)?;
            let result = match Encoding::try_from(chunk.encoding) {
                Ok(Encoding::Zero) if chunk.data.is_empty() => {
                    export.backend.write_zeroes(chunk.offset, chunk.length).await
                }
                Ok(Encoding::Raw) if chunk.data.len() as u64 == chunk.length => {
                    export.backend.write_at(chunk.offset, &chunk.data).await
                }
                _ => {
                    // Compressed (or malformed: decoding says what is wrong).
                    let _budget = self.shared.bytes(chunk.length).await;
                    let mut buf = vec![0u8; chunk.length as usize];
                    chunk::decode_into(&chunk, &mut buf)?;
                    export.backend.write_at(chunk.offset, &buf).await
                }
            };
            result.map_err(|err| from_core(&err))?;
            written += chunk.length;
        }
        Ok(Response::new(WriteChunksReply { written }))
    }
}
