//! One ublk queue: a thread that owns the queue's io_uring and the tasks it spawns per request.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use r3map_core::{Backend, SharedBackend};

use super::UblkError;
use crate::sys::ublk::{
    self, Completion, IoDesc, QueueRing, IO_RES_ABORT, OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE,
    OP_WRITE_ZEROES,
};

/// `user_data` of the eventfd poll; tags are below 4096.
const WAKE: u64 = u64::MAX;
const SECTOR: u64 = 512;

pub(super) struct QueueSpec {
    pub device: Arc<File>,
    pub queue: u16,
    pub depth: u16,
    pub buffer_bytes: usize,
    pub size: u64,
}

/// A finished request on its way back to the queue thread.
struct Done {
    tag: u16,
    result: i32,
    buffer: Vec<u8>,
}

/// Hands a request's result back to the queue thread. If the task ends without replying (a
/// panicking backend, a runtime shutting down) the request fails with `EIO` instead of
/// hanging its tag forever.
struct Reply {
    tag: u16,
    buffer: Option<Vec<u8>>,
    results: Sender<Done>,
    wake: Arc<File>,
}

impl Reply {
    fn send(mut self, result: i32) {
        self.finish(result);
    }

    fn finish(&mut self, result: i32) {
        if let Some(buffer) = self.buffer.take() {
            let _ = self.results.send(Done {
                tag: self.tag,
                result,
                buffer,
            });
            let _ = (&*self.wake).write(&1u64.to_ne_bytes());
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.finish(-libc::EIO);
    }
}

/// Runs the queue until the device is stopped; reports on `ready` once every tag's fetch is
/// queued in the kernel (or setup failed).
pub(super) fn run(
    spec: QueueSpec,
    backend: SharedBackend,
    runtime: tokio::runtime::Handle,
    ready: Sender<Result<(), UblkError>>,
) -> Result<(), UblkError> {
    let queue = spec.queue;
    let fail = |source: io::Error| UblkError::Queue { queue, source };
    let setup = || -> io::Result<(QueueRing, Arc<File>)> {
        let mut ring = QueueRing::open(spec.device.clone(), queue, spec.depth, spec.buffer_bytes)?;
        let wake = Arc::new(File::from(ublk::eventfd()?));
        for tag in 0..spec.depth {
            ring.fetch(tag)?;
        }
        ring.poll(wake.as_fd(), WAKE)?;
        ring.submit()?;
        Ok((ring, wake))
    };
    let (mut ring, wake) = match setup() {
        Ok(done) => {
            let _ = ready.send(Ok(()));
            done
        }
        Err(err) => {
            let _ = ready.send(Err(fail(io::Error::new(err.kind(), err.to_string()))));
            return Err(fail(err));
        }
    };
    drop(ready);
    let (results_tx, results_rx) = std::sync::mpsc::channel();
    let mut active = usize::from(spec.depth);
    let mut in_server = 0usize;
    let mut completions: Vec<Completion> = Vec::with_capacity(usize::from(spec.depth) + 1);
    while active > 0 || in_server > 0 {
        ring.wait(&mut completions).map_err(fail)?;
        for completion in completions.drain(..) {
            if completion.user_data == WAKE {
                in_server -= commit_finished(&mut ring, &wake, &results_rx).map_err(fail)?;
                ring.poll(wake.as_fd(), WAKE).map_err(fail)?;
                continue;
            }
            let tag = completion.user_data as u16;
            ring.completed_io();
            match completion.result {
                0 => {
                    let desc = ring.desc(tag);
                    let reply = Reply {
                        tag,
                        buffer: Some(ring.take_buffer(tag)),
                        results: results_tx.clone(),
                        wake: wake.clone(),
                    };
                    in_server += 1;
                    let backend = backend.clone();
                    let size = spec.size;
                    runtime.spawn(async move { handle(&*backend, size, desc, reply).await });
                }
                IO_RES_ABORT => active -= 1,
                result => {
                    // The kernel refused a fetch or commit: the tag is out of service.
                    active -= 1;
                    let err = io::Error::from_raw_os_error(-result);
                    tracing::error!(queue, tag, "ublk I/O command failed: {err}");
                }
            }
        }
    }
    Ok(())
}

/// Commits every finished request; returns how many.
fn commit_finished(ring: &mut QueueRing, wake: &File, results: &Receiver<Done>) -> io::Result<usize> {
    let mut counter = [0u8; 8];
    // The eventfd is non-blocking; a spurious wakeup reads nothing.
    let _ = (&*wake).read(&mut counter);
    let mut count = 0;
    while let Ok(done) = results.try_recv() {
        ring.commit(done.tag, done.result, done.buffer)?;
        count += 1;
    }
    Ok(count)
}

/// Runs one request against the backend and replies with the byte count or `-errno`.
async fn handle(backend: &dyn Backend, size: u64, desc: IoDesc, mut reply: Reply) {
    if desc.op == OP_FLUSH {
        // A flush carries no range (its sector field is not meaningful).
        match backend.sync().await {
            Ok(()) => reply.send(0),
            Err(err) => {
                tracing::warn!("ublk flush failed: {err}");
                reply.send(-err.errno());
            }
        }
        return;
    }
    let offset = desc.start_sector.saturating_mul(SECTOR);
    let len = u64::from(desc.nr_sectors) * SECTOR;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        tracing::warn!(op = desc.op, offset, len, size, "ublk request beyond the device");
        reply.send(-libc::EIO);
        return;
    }
    let buffer = reply.buffer.as_mut().expect("a fresh reply holds its buffer");
    let fits = len as usize <= buffer.len();
    let outcome = match desc.op {
        OP_READ if fits => backend
            .read_at(offset, &mut buffer[..len as usize])
            .await
            .map(|()| len as i32),
        OP_WRITE if fits => backend
            .write_at(offset, &buffer[..len as usize])
            .await
            .map(|()| len as i32),
        OP_READ | OP_WRITE => {
            reply.send(-libc::EIO);
            return;
        }
        OP_DISCARD => backend.trim(offset, len).await.map(|()| 0),
        OP_WRITE_ZEROES => backend.write_zeroes(offset, len).await.map(|()| 0),
        _ => {
            reply.send(-libc::EOPNOTSUPP);
            return;
        }
    };
    match outcome {
        Ok(result) => reply.send(result),
        Err(err) => {
            tracing::warn!(op = desc.op, offset, len, "ublk request failed: {err}");
            reply.send(-err.errno());
        }
    }
}
