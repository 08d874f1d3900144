//! Streamed reads shared by the Backend and Seeder extensions: the ranges are read a few at a
//! time ahead of the client, each within the server's byte budget, and encoded per chunk.

use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tonic::Status;

use super::shared::{CallPermit, Shared};
use crate::chunk::{self, Accept};
use crate::pb::ext::{Chunk, Range};

/// Reads in flight ahead of the client on one streamed read.
const READ_AHEAD: usize = 4;

pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

/// Reads `len` bytes at an offset.
pub(crate) type ReadFn =
    Arc<dyn Fn(u64, Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, Status>> + Send + Sync>;

/// The stream answering a `ReadChunks` call whose ranges were checked.
pub(crate) fn read_chunks(
    shared: Arc<Shared>,
    read: ReadFn,
    ranges: Vec<Range>,
    accept: Accept,
    call: CallPermit,
) -> ChunkStream {
    let send = accept.and(shared.send);
    let stream = futures::stream::iter(ranges)
        .map(move |range| {
            let (shared, read) = (shared.clone(), read.clone());
            async move {
                let _budget = shared.bytes(range.length).await;
                let buf = read(range.offset, vec![0u8; range.length as usize]).await?;
                Ok(chunk::encode(range.offset, &buf, send))
            }
        })
        .buffered(READ_AHEAD)
        // The call's place is held until the stream is done or dropped.
        .map(move |item| {
            let _ = &call;
            item
        });
    Box::pin(stream)
}
