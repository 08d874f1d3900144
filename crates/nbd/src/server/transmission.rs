//! The transmission phase of one connection: the reader decodes and checks requests, runs
//! each against the backend (as its own task, or inline for a write the backend completes at
//! once) under the per-connection and server-wide budgets, and hands replies to the writer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use r3map_core::{Allocation, SharedBackend};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::handshake::Session;
use super::ordering::PeerProbe;
use super::reply_writer::write_replies;
use super::{BoxStream, ConnectionError, State};
use crate::codec::{self, Framing, Payload, ReplyTo, Request, RequestDecoder, StatusDescriptor};
use crate::pool::{BufferPool, PooledBuf};
use crate::wire::{self, cmd, cmd_flags, errno};

/// Largest piece a `NBD_CMD_CACHE` reads at once.
const CACHE_PIECE: usize = 1 << 20;
/// Read data waiting for the writer above which a connection takes no new requests.
const BACKLOG_HIGH: usize = 2 << 20;
/// Read from the socket for request headers. A write's data goes straight into its own
/// buffer; only the part that arrived with its header is copied out of this one.
const READ_CHUNK: usize = 16 << 10;

/// Read data of one connection on its way out, shared by the reader, the request tasks and
/// the writer.
///
/// When the client reads replies more slowly than the backend produces them (a fast local
/// backend), data read from the backend now would only wait in memory and fall out of the CPU
/// caches before the kernel copies it into the socket, making both copies memory-bound. So the
/// reader takes no new request while more than [`BACKLOG_HIGH`] bytes of read data wait for the
/// writer. Reads still running at the backend are not limited by this (a slow remote backend
/// keeps up to `max_in_flight` requests busy); they only make the reader yield once, so tasks
/// it just spawned get to run and show whether their data is waiting.
#[derive(Default)]
pub(super) struct Backlog {
    /// Bytes of reads handed to tasks that have not finished yet.
    reading: AtomicUsize,
    /// Bytes of read data finished and not yet written.
    waiting: AtomicUsize,
    /// Signalled by the writer when `waiting` drops to `BACKLOG_HIGH` or below.
    drained: Notify,
}

impl Backlog {
    /// Waits until the connection may take another request.
    async fn admit(&self) {
        if self.reading.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire) > BACKLOG_HIGH {
            tokio::task::yield_now().await;
        }
        while self.waiting.load(Ordering::Acquire) > BACKLOG_HIGH {
            self.drained.notified().await;
        }
    }

    /// A read of `len` bytes finished; `produced` bytes of it go to the writer.
    fn finished(&self, len: usize, produced: usize) {
        self.waiting.fetch_add(produced, Ordering::AcqRel);
        self.reading.fetch_sub(len, Ordering::AcqRel);
    }

    /// The writer sent `len` bytes of read data.
    pub(super) fn sent(&self, len: usize) {
        if len > 0 && self.waiting.fetch_sub(len, Ordering::AcqRel) - len <= BACKLOG_HIGH {
            // A stored permit if the reader is not waiting yet: it then re-checks and goes on.
            self.drained.notify_one();
        }
    }
}

/// A reply ready to be written, with the permits that account for its memory.
pub(super) struct Outgoing {
    pub(super) head: Bytes,
    /// A read's data, sent right after `head` (one vectored write, no copy).
    pub(super) data: Option<PooledBuf>,
    // Fields drop in order: the buffer is back in the pool before its bytes are released.
    _permits: Option<Permits>,
}

/// A request refused before it reached the backend.
struct Refusal {
    error: u32,
    message: String,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        error,
        message: message.into(),
    }
}

/// Checks a request against the command, its flags, the export and the session.
fn check_request(request: &Request, session: &Session, max_request: u32) -> Result<(), Refusal> {
    let export = &session.export;
    let name = wire::command_name(request.command);
    let extended = session.framing.extended();
    let allowed = cmd_flags::FUA
        | match request.command {
            cmd::READ if session.framing.chunked() => cmd_flags::DF,
            cmd::WRITE if extended => cmd_flags::PAYLOAD_LEN,
            cmd::WRITE_ZEROES => cmd_flags::NO_HOLE,
            cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
            _ => 0,
        };
    if !matches!(
        request.command,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
    ) {
        return Err(refuse(
            errno::EINVAL,
            format!("unknown command {}", request.command),
        ));
    }
    if request.payload == Payload::Oversized {
        return Err(refuse(
            errno::EINVAL,
            format!(
                "write of {} bytes exceeds the maximum payload of {max_request} bytes",
                request.length
            ),
        ));
    }
    if extended && request.command == cmd::WRITE && request.flags & cmd_flags::PAYLOAD_LEN == 0 {
        // Without the flag the length is an effect length and no data followed.
        return Err(refuse(
            errno::EINVAL,
            "WRITE without NBD_CMD_FLAG_PAYLOAD_LEN (required with extended headers)",
        ));
    }
    if request.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} are not valid for {name}", request.flags & !allowed),
        ));
    }
    let writes = matches!(request.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && export.read_only {
        return Err(refuse(
            errno::EPERM,
            format!("export {:?} is read-only", export.name),
        ));
    }
    if request.command == cmd::FLUSH {
        return Ok(());
    }
    let size = export.backend.size();
    let end = request.offset.checked_add(request.length);
    if end.is_none_or(|end| end > size) {
        let error = if matches!(request.command, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(refuse(
            error,
            format!(
                "{name} of {} bytes at offset {} reaches past the end of the {size}-byte export",
                request.length, request.offset
            ),
        ));
    }
    if request.command == cmd::READ && request.length > u64::from(max_request) {
        let error = if session.framing.chunked() {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return Err(refuse(
            error,
            format!(
                "read of {} bytes exceeds the maximum payload of {max_request} bytes",
                request.length
            ),
        ));
    }
    if request.command == cmd::BLOCK_STATUS {
        if !session.block_status {
            return Err(refuse(
                errno::EINVAL,
                "BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT",
            ));
        }
        if request.length == 0 {
            return Err(refuse(errno::EINVAL, "BLOCK_STATUS of 0 bytes"));
        }
    }
    Ok(())
}

fn reply_to(session: &Session, request: &Request) -> ReplyTo {
    ReplyTo {
        framing: session.framing,
        handle: request.handle,
        offset: request.offset,
    }
}

fn error_reply(to: ReplyTo, error: u32, message: &str) -> Bytes {
    let mut head = BytesMut::with_capacity(wire::EXTENDED_HEADER_LEN + 6 + message.len());
    codec::encode_error_reply(&mut head, to, error, message);
    head.freeze()
}

fn ok_reply(to: ReplyTo) -> Bytes {
    let mut head = BytesMut::with_capacity(wire::EXTENDED_HEADER_LEN);
    codec::encode_ok_reply(&mut head, to);
    head.freeze()
}

/// Runs one validated request against the backend and builds its reply. A read's data goes
/// into a buffer from `pool`, whose class the caller holds in its byte permit; a write's data
/// is `payload` (`None` for an empty write).
async fn execute(
    request: Request,
    payload: Option<PooledBuf>,
    session: &Session,
    pool: &Arc<BufferPool>,
    cache_piece: usize,
) -> (Bytes, Option<PooledBuf>) {
    let backend = &session.export.backend;
    let to = reply_to(session, &request);
    let fua = request.flags & cmd_flags::FUA != 0;
    let handle = request.handle;
    let offset = request.offset;
    let length = request.length;
    let result = match request.command {
        cmd::READ => {
            let mut data = (request.length > 0).then(|| pool.take(request.length as usize));
            let read = match &mut data {
                Some(data) => backend.read_at(offset, data.as_mut_slice()).await,
                None => backend.read_at(offset, &mut []).await,
            };
            match read {
                Ok(()) => {
                    let mut head = BytesMut::with_capacity(wire::EXTENDED_HEADER_LEN + 8);
                    // At most `max_request` (checked), so it fits a chunk's 32-bit length.
                    codec::encode_read_reply_header(&mut head, to, request.length as u32);
                    return (head.freeze(), data);
                }
                Err(err) => Err(err),
            }
        }
        cmd::WRITE => {
            let data = payload.as_ref().map_or(&[][..], |data| data.as_ref());
            let written = backend.write_at(offset, data).await;
            // Back to the pool before the (possibly slow) sync.
            drop(payload);
            match written {
                Ok(()) if fua => backend.sync().await,
                other => other,
            }
        }
        cmd::FLUSH => backend.sync().await,
        cmd::TRIM => match backend.trim(offset, length).await {
            Ok(()) if fua => backend.sync().await,
            other => other,
        },
        cmd::WRITE_ZEROES => match backend.write_zeroes(offset, length).await {
            Ok(()) if fua => backend.sync().await,
            other => other,
        },
        cmd::CACHE => cache(backend, offset, length, pool, cache_piece).await,
        cmd::BLOCK_STATUS => {
            let one = request.flags & cmd_flags::REQ_ONE != 0;
            match block_status(backend, offset, length, one, session.framing).await {
                Ok(descriptors) => {
                    let mut head =
                        BytesMut::with_capacity(wire::EXTENDED_HEADER_LEN + 8 + 16 * descriptors.len());
                    codec::encode_block_status_reply(&mut head, to, wire::BASE_ALLOCATION_ID, &descriptors);
                    return (head.freeze(), None);
                }
                Err(err) => Err(err),
            }
        }
        _ => unreachable!("checked by check_request"),
    };
    match result {
        Ok(()) => (ok_reply(to), None),
        Err(err) => {
            let error = errno::from_os(err.errno());
            let message = format!("{} failed: {err}", wire::command_name(request.command));
            tracing::debug!(handle, %message, "request failed");
            (error_reply(to, error, &message), None)
        }
    }
}

/// Descriptors one block status reply carries at most (the protocol asks for at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// `base:allocation` descriptors for `length` bytes at `offset`, from the backend's extents:
/// holes read as zeros, so they are `HOLE | ZERO`; data is 0. Each descriptor is at most the
/// longest length the framing expresses (32 bits unless extended headers are in use), kept a
/// multiple of 4 KiB.
async fn block_status(
    backend: &SharedBackend,
    offset: u64,
    length: u64,
    one: bool,
    framing: Framing,
) -> r3map_core::Result<Vec<StatusDescriptor>> {
    let max_descriptor = framing.max_length() & !4095;
    let mut descriptors = Vec::new();
    let mut left = length;
    for extent in backend.extents(offset, length).await? {
        let status = u64::from(match extent.allocation {
            Allocation::Hole => wire::state::HOLE | wire::state::ZERO,
            Allocation::Data => 0,
        });
        // A backend that over-reports is cut to the request.
        let mut len = extent.len.min(left);
        left -= len;
        while len > 0 && descriptors.len() < MAX_DESCRIPTORS {
            let piece = len.min(max_descriptor);
            descriptors.push(StatusDescriptor {
                length: piece,
                status,
            });
            len -= piece;
        }
        if one || left == 0 || descriptors.len() >= MAX_DESCRIPTORS {
            break;
        }
    }
    descriptors.truncate(if one { 1 } else { MAX_DESCRIPTORS });
    if descriptors.is_empty() {
        // Status 0 ("allocated, contents unknown") is always allowed.
        descriptors.push(StatusDescriptor {
            length: length.min(max_descriptor),
            status: 0,
        });
    }
    Ok(descriptors)
}

/// `NBD_CMD_CACHE`: reads the range in pieces of `piece` bytes into one pooled buffer (the
/// request holds its class of the budgets), so caching stages fetch it.
async fn cache(
    backend: &SharedBackend,
    offset: u64,
    length: u64,
    pool: &Arc<BufferPool>,
    piece: usize,
) -> r3map_core::Result<()> {
    if length == 0 {
        return Ok(());
    }
    let mut buffer = pool.take(piece);
    let buffer = buffer.as_mut_slice();
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(piece as u64) as usize;
        backend.read_at(offset + done, &mut buffer[..n]).await?;
        done += n as u64;
    }
    Ok(())
}

/// The budgets one request holds until its reply is written: a request slot, its bytes of the
/// connection's budget and the same bytes of the server's budget.
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Why the reader stopped taking requests.
enum Stop {
    /// The client disconnected (or broke the stream: the error is in `result`).
    Client,
    /// The server shuts down: requests already received are answered with `ESHUTDOWN`.
    Shutdown,
}

pub(super) async fn transmission(
    state: Arc<State>,
    io: BoxStream,
    mut buf: BytesMut,
    session: Session,
    shutdown: watch::Receiver<bool>,
    probe: Option<PeerProbe>,
) -> Result<(), ConnectionError> {
    tracing::debug!(
        export = %session.export.name,
        framing = ?session.framing,
        "client entered transmission"
    );
    let writes = state.writes_of(&session.export);
    let session = Arc::new(session);
    let (mut reader, writer) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Outgoing>(state.max_in_flight);
    let backlog = Arc::new(Backlog::default());
    let mut writer = tokio::spawn(write_replies(writer, rx, backlog.clone(), state.write_timeout));
    let count = Arc::new(Semaphore::new(state.max_in_flight));
    let bytes = Arc::new(Semaphore::new(state.max_in_flight_bytes));
    let pool = &state.pool;
    let mut decoder = RequestDecoder::for_framing(state.max_request, session.framing);
    let mut result = Ok(());
    let stop = 'read: loop {
        loop {
            let request = match decoder.decode_header(&mut buf) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(err) => {
                    result = Err(err.into());
                    break 'read Stop::Client;
                }
            };
            if request.command == cmd::DISC {
                break 'read Stop::Client;
            }
            let follows = request.payload == Payload::Follows;
            if let Err(refusal) = check_request(&request, &session, state.max_request) {
                if follows {
                    decoder.discard(request.length);
                }
                tracing::debug!(handle = request.handle, message = %refusal.message, "request refused");
                let head = error_reply(reply_to(&session, &request), refusal.error, &refusal.message);
                let out = Outgoing {
                    head,
                    data: None,
                    _permits: None,
                };
                tokio::select! {
                    sent = tx.send(out) => if sent.is_err() { break 'read Stop::Client },
                    () = shutting_down(&shutdown) => break 'read Stop::Shutdown,
                }
                continue;
            }
            // A read or write holds the whole class of its pooled buffer, a cache its piece
            // (all at most `max_request`); other commands hold no buffer.
            let cost = match request.command {
                cmd::READ | cmd::WRITE if request.length > 0 => pool.class_of(request.length as usize),
                cmd::CACHE if request.length > 0 => pool.class_of(cache_piece(&state, request.length)),
                _ => 1,
            } as u32;
            let acquire = async {
                backlog.admit().await;
                let count = count.clone().acquire_owned().await.expect("never closed");
                let bytes = bytes
                    .clone()
                    .acquire_many_owned(cost)
                    .await
                    .expect("never closed");
                let memory = state
                    .memory
                    .clone()
                    .acquire_many_owned(cost)
                    .await
                    .expect("never closed");
                (count, bytes, memory)
            };
            let permits: Permits = tokio::select! {
                permits = acquire => permits,
                () = shutting_down(&shutdown) => {
                    // Received but not started: answered like every later request.
                    refuse_for_shutdown(&tx, &session, &request).await;
                    if follows {
                        decoder.discard(request.length);
                    }
                    break 'read Stop::Shutdown;
                }
                _ = tx.closed() => break 'read Stop::Client,
            };
            let payload = if follows && request.length > 0 {
                let mut data = pool.take(request.length as usize);
                let target = data.as_mut_slice();
                let buffered = buf.len().min(target.len());
                target[..buffered].copy_from_slice(&buf[..buffered]);
                buf.advance(buffered);
                let read = tokio::select! {
                    read = reader.read_exact(&mut target[buffered..]) => read,
                    () = shutting_down(&shutdown) => break 'read Stop::Shutdown,
                    _ = tx.closed() => break 'read Stop::Client,
                    () = tokio::time::sleep(state.idle_timeout) => {
                        result = Err(ConnectionError::Idle(state.idle_timeout));
                        break 'read Stop::Client;
                    }
                };
                if let Err(err) = read {
                    result = Err(if err.kind() == std::io::ErrorKind::UnexpectedEof {
                        ConnectionError::Truncated
                    } else {
                        err.into()
                    });
                    break 'read Stop::Client;
                }
                Some(data)
            } else {
                None
            };
            // Registered before the probe looks, so a write either runs before a FLUSH taken
            // after its client's close, with the FLUSH waiting for it, or never (ordering.rs).
            let changes = matches!(request.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
            let running = changes.then(|| writes.begin());
            if changes && probe.as_ref().is_some_and(PeerProbe::peer_gone) {
                tracing::debug!(
                    handle = request.handle,
                    "the client closed the connection before this write started: not applied"
                );
                break 'read Stop::Client;
            }
            let barrier = (request.command == cmd::FLUSH).then(|| writes.clone());
            let session = session.clone();
            let pool = pool.clone();
            let backlog = backlog.clone();
            let tx = tx.clone();
            let reading = if request.command == cmd::READ {
                request.length as usize
            } else {
                0
            };
            backlog.reading.fetch_add(reading, Ordering::AcqRel);
            let is_write = request.command == cmd::WRITE;
            let piece = cache_piece(&state, request.length);
            let mut task = Box::pin(async move {
                if let Some(barrier) = barrier {
                    barrier.wait_for_earlier().await;
                }
                let (head, data) = execute(request, payload, &session, &pool, piece).await;
                drop(running);
                backlog.finished(reading, data.as_ref().map_or(0, |d| d.as_ref().len()));
                let _ = tx
                    .send(Outgoing {
                        head,
                        data,
                        _permits: Some(permits),
                    })
                    .await;
            });
            // A write's data was just received on this thread and is in its cache: a backend
            // that completes at once (local memory or page cache) copies it here. One that
            // must wait (a remote backend) continues as its own task, as every other request.
            if !is_write || poll_once(task.as_mut()).await.is_pending() {
                tokio::spawn(task);
            }
        }
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            () = shutting_down(&shutdown) => break Stop::Shutdown,
            _ = tx.closed() => break Stop::Client,
            () = tokio::time::sleep(state.idle_timeout) => {
                if count.available_permits() < state.max_in_flight {
                    // Not idle: the client waits for replies. Keep reading.
                    continue;
                }
                result = Err(ConnectionError::Idle(state.idle_timeout));
                break Stop::Client;
            }
        };
        match read {
            Ok(0) => {
                if !buf.is_empty() || decoder.skipping() > 0 {
                    result = Err(ConnectionError::Truncated);
                }
                break Stop::Client;
            }
            Ok(_) => {}
            Err(err) => {
                result = Err(err.into());
                break Stop::Client;
            }
        }
    };
    if let Stop::Shutdown = stop {
        // Requests already received get `ESHUTDOWN` rather than silence.
        while let Ok(Some(request)) = decoder.decode_header(&mut buf) {
            if request.command == cmd::DISC || request.payload == Payload::Follows {
                break;
            }
            refuse_for_shutdown(&tx, &session, &request).await;
        }
    }
    // Requests in flight hold their own senders: the writer ends after their replies. After a
    // shutdown they get the grace period; a client that stopped reading gets the write deadline.
    drop(tx);
    let finished = match stop {
        Stop::Client => Ok((&mut writer).await),
        Stop::Shutdown => tokio::time::timeout(state.shutdown_grace, &mut writer).await,
    };
    match finished {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => {
            if result.is_ok() {
                result = Err(err);
            }
        }
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => {
            writer.abort();
            result = Err(ConnectionError::ShutdownGrace(state.shutdown_grace));
        }
    }
    result
}

/// Resolves once the server shuts down.
async fn shutting_down(shutdown: &watch::Receiver<bool>) {
    let _ = shutdown.clone().wait_for(|down| *down).await;
}

/// Answers `request` with `ESHUTDOWN` (best effort: the writer may be gone).
async fn refuse_for_shutdown(tx: &mpsc::Sender<Outgoing>, session: &Session, request: &Request) {
    let head = error_reply(
        reply_to(session, request),
        errno::ESHUTDOWN,
        "the server is shutting down",
    );
    let out = Outgoing {
        head,
        data: None,
        _permits: None,
    };
    let _ = tx.try_send(out);
}

/// Bytes a `NBD_CMD_CACHE` of `length` reads at once.
fn cache_piece(state: &State, length: u64) -> usize {
    length.min(CACHE_PIECE as u64).min(u64::from(state.max_request)) as usize
}

/// Polls `future` once from the calling task.
async fn poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}
