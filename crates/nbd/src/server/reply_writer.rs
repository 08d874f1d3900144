//! The reply writer of one connection: sends replies as they complete, each batch with one
//! vectored write where the stream supports it, and gives up on a client that makes no write
//! progress within the write deadline (it stopped reading).

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::transmission::{Backlog, Outgoing};
use super::{BoxStream, ConnectionError};

/// Buffer gathering small replies on streams without vectored writes; larger pieces bypass it.
const WRITE_BUFFER: usize = 256 << 10;
/// Replies sent with one write at most.
const WRITE_BATCH: usize = 64;

/// Runs `io` (one write call) under the write deadline.
async fn deadline<T>(
    limit: Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ConnectionError> {
    match tokio::time::timeout(limit, io).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::WriteTimeout(limit)),
    }
}

/// Writes replies as they complete. Whatever is ready is sent together: with a vectored
/// stream (TCP, UNIX socket) as one `writev` of every header and data buffer, without copying;
/// otherwise small pieces are gathered in a buffer and large data is written directly. A
/// single write that makes no progress within `limit` ends the connection.
pub(super) async fn write_replies(
    mut writer: tokio::io::WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<Outgoing>,
    backlog: Arc<Backlog>,
    limit: Duration,
) -> Result<(), ConnectionError> {
    let vectored = writer.is_write_vectored();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut staging = BytesMut::new();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        if vectored {
            write_vectored_batch(&mut writer, &batch, limit).await?;
        } else {
            write_staged_batch(&mut writer, &batch, &mut staging, limit).await?;
        }
        let sent = batch
            .iter()
            .filter_map(|out| out.data.as_ref())
            .map(|data| data.as_ref().len())
            .sum();
        // Frees the buffers and the permits of the sent replies.
        batch.clear();
        backlog.sent(sent);
    }
    deadline(limit, writer.flush()).await?;
    deadline(limit, writer.shutdown()).await
}

async fn write_vectored_batch(
    writer: &mut tokio::io::WriteHalf<BoxStream>,
    batch: &[Outgoing],
    limit: Duration,
) -> Result<(), ConnectionError> {
    let mut slices = Vec::with_capacity(2 * batch.len());
    for out in batch {
        slices.push(IoSlice::new(&out.head));
        if let Some(data) = &out.data {
            slices.push(IoSlice::new(data.as_ref()));
        }
    }
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = deadline(limit, writer.write_vectored(slices)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    deadline(limit, writer.flush()).await
}

async fn write_staged_batch(
    writer: &mut tokio::io::WriteHalf<BoxStream>,
    batch: &[Outgoing],
    staging: &mut BytesMut,
    limit: Duration,
) -> Result<(), ConnectionError> {
    let pieces = batch
        .iter()
        .flat_map(|out| [&out.head[..], out.data.as_ref().map_or(&[][..], |d| d.as_ref())]);
    for piece in pieces {
        if staging.len() + piece.len() > WRITE_BUFFER && !staging.is_empty() {
            write_all(writer, staging, limit).await?;
            staging.clear();
        }
        if piece.len() >= WRITE_BUFFER {
            write_all(writer, piece, limit).await?;
        } else {
            staging.extend_from_slice(piece);
        }
    }
    if !staging.is_empty() {
        write_all(writer, staging, limit).await?;
        staging.clear();
    }
    deadline(limit, writer.flush()).await
}

/// `write_all` with the deadline applied to every single write (no progress within `limit`).
async fn write_all(
    writer: &mut tokio::io::WriteHalf<BoxStream>,
    mut data: &[u8],
    limit: Duration,
) -> Result<(), ConnectionError> {
    while !data.is_empty() {
        let n = deadline(limit, writer.write(data)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        data = &data[n..];
    }
    Ok(())
}
