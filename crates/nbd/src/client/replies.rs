//! The transmission phase from the client side: a writer task sends requests, a reader task
//! matches replies to pending requests by handle and checks every reply against the request it
//! answers. The first protocol violation, I/O error or timeout fails every pending request,
//! refuses every later one and closes the connection: a stream that broke the protocol once
//! cannot be trusted to frame the next reply correctly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use r3map_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

use super::BoxStream;
use crate::codec::{self, Framing, ReplyHeader, StatusDescriptor};
use crate::wire::{self, cmd, errno, reply_type};

/// Largest error chunk the client accepts.
const MAX_CHUNK: u64 = 1 << 20;
/// Largest block status chunk the client accepts (2^17 extended descriptors, twice as many
/// compact ones; servers send at most 2^20 and may always send fewer).
const MAX_STATUS_CHUNK: u64 = 2 << 20;

/// Byte ranges of one read that chunks have filled, kept exactly so overlaps are caught.
#[derive(Debug, Default)]
pub(super) struct Coverage {
    /// Start → end of disjoint, non-adjacent-merged ranges.
    ranges: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    /// Records `start..end`; fails if it overlaps anything recorded before.
    pub(super) fn insert(&mut self, start: u64, end: u64) -> std::result::Result<(), String> {
        if start >= end {
            return Err(format!("empty chunk at {start}"));
        }
        if let Some((&before, &before_end)) = self.ranges.range(..end).next_back() {
            if before_end > start {
                return Err(format!(
                    "chunk {start}..{end} overlaps the chunk {before}..{before_end} sent before"
                ));
            }
        }
        self.ranges.insert(start, end);
        self.covered += end - start;
        Ok(())
    }

    /// Bytes covered so far.
    pub(super) fn covered(&self) -> u64 {
        self.covered
    }
}

/// A request waiting for its reply.
pub(super) struct Pending {
    pub(super) command: u16,
    pub(super) offset: u64,
    /// Payload or effect length (above 32 bits only with extended headers).
    pub(super) length: u64,
    /// A read's data, filled by the reader task.
    pub(super) data: Vec<u8>,
    /// A block status reply's descriptors.
    pub(super) status: Vec<StatusDescriptor>,
    /// Context id of `base:allocation` (block status requests only).
    pub(super) context: u32,
    /// Parts of a structured read filled so far.
    pub(super) coverage: Coverage,
    /// Whether a structured chunk of this reply arrived already.
    pub(super) chunked: bool,
    pub(super) error: Option<Error>,
    pub(super) done: oneshot::Sender<Result<Reply>>,
}

/// What a successful request returns.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// A read's data.
    pub(super) data: Vec<u8>,
    /// A block status query's descriptors (at least one).
    pub(super) status: Vec<StatusDescriptor>,
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) pending: HashMap<u64, Pending>,
    /// Set once the connection is gone; every later request fails with it.
    pub(super) closed: Option<Error>,
}

/// State the client, its writer task and its reader task share.
pub(super) struct Shared {
    pub(super) table: Mutex<Table>,
    /// The negotiated headers: which reply headers are valid, and whether reads must come
    /// as chunks.
    pub(super) framing: Framing,
    /// Size of the export, which no block status descriptor may reach past.
    export_size: u64,
    /// Turns true when the connection is closed; both tasks stop then.
    closing: watch::Sender<bool>,
}

impl Shared {
    pub(super) fn new(framing: Framing, export_size: u64) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            framing,
            export_size,
            closing: watch::channel(false).0,
        }
    }

    /// Fails every pending request and every later one with `error`, and stops both tasks
    /// (which closes the connection).
    pub(super) fn close(&self, error: Error) {
        let pending = {
            let mut table = self.table.lock();
            if table.closed.is_none() {
                tracing::debug!(%error, "NBD client connection closed");
                table.closed = Some(error.clone());
            }
            std::mem::take(&mut table.pending)
        };
        self.closing.send_replace(true);
        for (_, request) in pending {
            let _ = request.done.send(Err(error.clone()));
        }
    }

    /// Resolves once [`close`](Self::close) was called.
    pub(super) async fn closed(&self) {
        let mut closing = self.closing.subscribe();
        let _ = closing.wait_for(|closed| *closed).await;
    }
}

/// Closes the connection when the task holding it ends in any way, even by a panic, so no
/// caller waits for a reply nobody will deliver.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(connection_lost("the connection task stopped"));
    }
}

pub(super) fn connection_lost(detail: impl std::fmt::Display) -> Error {
    Error::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("NBD connection lost: {detail}"),
    ))
}

fn protocol(detail: impl std::fmt::Display) -> Error {
    Error::Remote(format!(
        "the NBD server broke the protocol (connection closed): {detail}"
    ))
}

pub(super) struct Outgoing {
    pub(super) head: BytesMut,
    pub(super) payload: Option<Bytes>,
}

pub(super) async fn write_requests(
    writer: WriteHalf<BoxStream>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let _guard = CloseOnDrop(shared.clone());
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    let work = async {
        while let Some(out) = outgoing.recv().await {
            writer.write_all(&out.head).await?;
            if let Some(payload) = &out.payload {
                writer.write_all(payload).await?;
            }
            if outgoing.is_empty() {
                writer.flush().await?;
            }
        }
        // The client was dropped: disconnect softly.
        let mut disc = BytesMut::new();
        codec::encode_request(&mut disc, 0, cmd::DISC, 0, 0, 0);
        writer.write_all(&disc).await?;
        writer.flush().await?;
        writer.shutdown().await
    };
    let result: std::io::Result<()> = tokio::select! {
        result = work => result,
        () = shared.closed() => Ok(()),
    };
    match result {
        Ok(()) => shared.close(Error::Closed),
        Err(err) => shared.close(connection_lost(err)),
    }
}

pub(super) async fn read_replies(reader: ReadHalf<BoxStream>, buf: BytesMut, shared: Arc<Shared>) {
    let _guard = CloseOnDrop(shared.clone());
    let mut replies = ReplyReader { reader, buf };
    let work = async {
        loop {
            match replies.next(&shared).await {
                Ok(true) => {}
                Ok(false) => break connection_lost("the server closed the connection"),
                Err(err @ Error::Remote(_)) => break err,
                Err(err) => break connection_lost(err),
            }
        }
    };
    tokio::select! {
        error = work => shared.close(error),
        () = shared.closed() => {}
    }
}

struct ReplyReader {
    reader: ReadHalf<BoxStream>,
    buf: BytesMut,
}

fn server_error(pending: &Pending, error: u32, message: &str) -> Error {
    let what = format!(
        "{} of {} bytes at offset {}",
        wire::command_name(pending.command),
        pending.length,
        pending.offset
    );
    let text = if message.is_empty() {
        format!("NBD server replied {} to {what}", errno::name(error))
    } else {
        format!("NBD server replied {} to {what}: {message}", errno::name(error))
    };
    match error {
        errno::EPERM if pending.command != cmd::READ => Error::ReadOnly,
        _ => Error::Remote(text),
    }
}

/// The part of a request that a chunk at `offset` of `len` bytes covers, relative to the
/// request's start; `None` if any of it lies outside the request (overflow-safe).
fn within(pending: &Pending, offset: u64, len: u64) -> Option<(u64, u64)> {
    let start = offset.checked_sub(pending.offset)?;
    let end = start.checked_add(len)?;
    (end <= pending.length).then_some((start, end))
}

/// Checks block status descriptors against the request they answer: they describe consecutive
/// ranges from the request's offset, each one starting inside the requested range (so all but
/// the last end inside it), and none reaching past the end of the export. The last one may reach
/// past the request: servers may describe more than was asked.
fn check_status(
    pending: &Pending,
    descriptors: &[StatusDescriptor],
    export_size: u64,
) -> std::result::Result<(), String> {
    // The client checked the request against the export, so this does not overflow.
    let request_end = pending.offset + pending.length;
    let mut at = pending.offset;
    for (i, descriptor) in descriptors.iter().enumerate() {
        if at >= request_end {
            return Err(format!(
                "block status descriptor {i} starts at {at}, past the requested range {}..{request_end}",
                pending.offset
            ));
        }
        at = at
            .checked_add(descriptor.length)
            .filter(|&end| end <= export_size)
            .ok_or_else(|| {
                format!(
                    "block status descriptor {i} of {} bytes at {at} reaches past the end of the export ({export_size} bytes)",
                    descriptor.length
                )
            })?;
    }
    Ok(())
}

impl ReplyReader {
    async fn fill(&mut self) -> Result<bool> {
        self.buf.reserve(64 << 10);
        Ok(self.reader.read_buf(&mut self.buf).await? != 0)
    }

    /// Reads exactly `out.len()` bytes, first from the buffer, then from the socket.
    async fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let buffered = self.buf.len().min(out.len());
        out[..buffered].copy_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        if buffered < out.len() {
            self.reader.read_exact(&mut out[buffered..]).await?;
        }
        Ok(())
    }

    /// Handles one reply message; `Ok(false)` on a clean end of stream.
    async fn next(&mut self, shared: &Shared) -> Result<bool> {
        let header = loop {
            match codec::decode_reply_header(&mut self.buf, shared.framing).map_err(protocol)? {
                Some(header) => break header,
                None => {
                    if !self.fill().await? {
                        return if self.buf.is_empty() {
                            Ok(false)
                        } else {
                            Err(protocol("connection closed in the middle of a reply"))
                        };
                    }
                }
            }
        };
        let handle = header.handle();
        let Some(mut pending) = shared.table.lock().pending.remove(&handle) else {
            return Err(protocol(format!("reply for unknown handle {handle}")));
        };
        // From here on an error drops `pending`, and `close` fails it with the others.
        match header {
            ReplyHeader::Simple { error, .. } => {
                if pending.chunked {
                    return Err(protocol("a simple reply to a request answered with chunks"));
                }
                if shared.framing.chunked() && pending.command == cmd::READ {
                    return Err(protocol("a simple reply to a read after structured replies"));
                }
                if error != 0 {
                    let err = server_error(&pending, error, "");
                    let _ = pending.done.send(Err(err));
                } else {
                    let mut data = std::mem::take(&mut pending.data);
                    if pending.command == cmd::READ {
                        self.read_exact(&mut data).await?;
                    } else {
                        data.clear();
                    }
                    let _ = pending.done.send(Ok(Reply {
                        data,
                        status: Vec::new(),
                    }));
                }
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                offset,
                length,
                ..
            } => {
                // The codec accepts chunks only in the negotiated framing.
                if offset.is_some_and(|offset| offset != pending.offset) {
                    return Err(protocol(format!(
                        "an extended reply with offset {} to a request at offset {}",
                        offset.unwrap_or_default(),
                        pending.offset
                    )));
                }
                pending.chunked = true;
                self.chunk(&mut pending, kind, length, shared).await?;
                if flags & wire::reply_flags::DONE != 0 {
                    let result = match pending.error.take() {
                        Some(err) => Err(err),
                        None if pending.command == cmd::READ
                            && pending.coverage.covered() < pending.length =>
                        {
                            return Err(protocol("a read reply did not cover the whole request"));
                        }
                        None if pending.command == cmd::BLOCK_STATUS && pending.status.is_empty() => {
                            return Err(protocol("a block status reply without extents"));
                        }
                        None => Ok(Reply {
                            data: std::mem::take(&mut pending.data),
                            status: std::mem::take(&mut pending.status),
                        }),
                    };
                    let _ = pending.done.send(result);
                } else {
                    shared.table.lock().pending.insert(handle, pending);
                }
            }
        }
        Ok(true)
    }

    async fn chunk(&mut self, pending: &mut Pending, kind: u16, length: u64, shared: &Shared) -> Result<()> {
        let framing = shared.framing;
        let is_read = pending.command == cmd::READ;
        let status_kind = if framing.extended() {
            reply_type::BLOCK_STATUS_EXT
        } else {
            reply_type::BLOCK_STATUS
        };
        match kind {
            reply_type::NONE => {
                if length != 0 {
                    return Err(protocol("NBD_REPLY_TYPE_NONE with a payload"));
                }
            }
            reply_type::OFFSET_DATA if is_read => {
                if length <= 8 || length - 8 > pending.length {
                    return Err(protocol(format!("data chunk of {length} bytes")));
                }
                let mut offset = [0u8; 8];
                self.read_exact(&mut offset).await?;
                let offset = u64::from_be_bytes(offset);
                let (start, end) = within(pending, offset, length - 8)
                    .ok_or_else(|| protocol("data chunk outside the requested range"))?;
                pending.coverage.insert(start, end).map_err(protocol)?;
                self.read_exact(&mut pending.data[start as usize..end as usize])
                    .await?;
            }
            reply_type::OFFSET_HOLE if is_read => {
                if length != 12 {
                    return Err(protocol("hole chunk must be 12 bytes"));
                }
                let mut raw = [0u8; 12];
                self.read_exact(&mut raw).await?;
                let mut raw = &raw[..];
                let offset = raw.get_u64();
                let len = u64::from(raw.get_u32());
                let (start, end) = within(pending, offset, len)
                    .ok_or_else(|| protocol("hole chunk outside the requested range"))?;
                pending.coverage.insert(start, end).map_err(protocol)?;
                pending.data[start as usize..end as usize].fill(0);
            }
            kind if kind & reply_type::ERROR_BIT != 0 => {
                if length > MAX_CHUNK {
                    return Err(protocol(format!("error chunk of {length} bytes")));
                }
                let mut payload = vec![0u8; length as usize];
                self.read_exact(&mut payload).await?;
                let (error, message) = codec::parse_error_chunk(&payload).map_err(protocol)?;
                if error == 0 {
                    return Err(protocol("an error chunk with error value 0"));
                }
                pending
                    .error
                    .get_or_insert(server_error(pending, error, &message));
            }
            kind if kind == status_kind && pending.command == cmd::BLOCK_STATUS => {
                if length > MAX_STATUS_CHUNK {
                    return Err(protocol(format!("block status chunk of {length} bytes")));
                }
                let mut payload = vec![0u8; length as usize];
                self.read_exact(&mut payload).await?;
                let (context, descriptors) =
                    codec::parse_block_status(&payload, framing.extended()).map_err(protocol)?;
                if context != pending.context || !pending.status.is_empty() {
                    return Err(protocol(format!(
                        "block status chunk for context {context} (asked for {} once)",
                        pending.context
                    )));
                }
                check_status(pending, &descriptors, shared.export_size).map_err(protocol)?;
                pending.status = descriptors;
            }
            other => {
                return Err(protocol(format!(
                    "unexpected chunk type {other} for {}",
                    wire::command_name(pending.command)
                )))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Coverage accepts a set of ranges exactly when they are pairwise disjoint, and then
        /// counts their total length (model: one flag per byte).
        #[test]
        fn coverage_matches_a_byte_model(ranges in proptest::collection::vec((0u64..64, 0u64..16), 0..12)) {
            let mut coverage = Coverage::default();
            let mut model = [false; 80];
            for (start, len) in ranges {
                let end = start + len;
                let overlaps = len == 0 || model[start as usize..end as usize].iter().any(|&b| b);
                let result = coverage.insert(start, end);
                prop_assert_eq!(result.is_err(), overlaps);
                if !overlaps {
                    model[start as usize..end as usize].fill(true);
                }
                prop_assert_eq!(coverage.covered(), model.iter().filter(|&&b| b).count() as u64);
            }
        }
    }
}
