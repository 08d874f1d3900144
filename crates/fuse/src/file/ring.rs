//! The io_uring transport: one thread per FUSE queue (one queue per possible CPU, the thread
//! pinned to that CPU) owns the queue's ring (`sys::uring`) and answers its requests from
//! [`FileCore`].
//!
//! A request's answer is computed in place, in the entry's own buffers: the thread polls the
//! answering future once; a backend that answers at once (a local cache hit) is replied to
//! without any thread hop. A future that has to wait moves, with the entry's buffers, to a task
//! on the runtime, which sends the finished entry back; an eventfd wakes the thread to commit it.
//! Reads and writes larger than [`INLINE_MAX`] go to a task at once, so that the large requests
//! of one queue are copied in parallel.

use std::ffi::OsStr;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use fuser::{Errno, INodeNo};
use tokio::runtime::Handle;

use super::core::{self, FileCore};
use super::wire::{self, InHeader};
use super::{BLOCK_SIZE, TTL};
use crate::sys::uring::{self, Completion, QueueRing, Slot};

/// Entries per queue: how many requests of one CPU's queue are in service at once.
pub(super) const DEPTH: u16 = 32;

/// `user_data` of the eventfd poll; entries are below `DEPTH`.
const WAKE: u64 = u64::MAX;

/// An entry whose reply is set, on its way back to its queue thread.
struct Done {
    index: u16,
    slot: Slot,
}

/// What the queues have served, for the mount's status.
#[derive(Debug, Default)]
pub(super) struct RingStats {
    pub requests: AtomicU64,
}

/// Hands a finished entry back to its queue thread and wakes it. If the task ends without
/// replying (a panicking backend, a runtime shutting down) the request fails with `EIO` instead
/// of holding its entry forever.
struct Reply {
    index: u16,
    unique: u64,
    slot: Option<Slot>,
    results: Sender<Done>,
    wake: Arc<std::fs::File>,
}

impl Reply {
    fn send(mut self, slot: Slot) {
        self.slot = Some(slot);
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = self.results.send(Done {
                index: self.index,
                slot,
            });
            let _ = (&*self.wake).write(&1u64.to_ne_bytes());
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.as_mut() {
            slot.set_reply(self.unique, -libc::EIO, 0);
        }
        self.finish();
    }
}

/// The queues of a mount: their threads, which end when the connection is torn down.
pub(super) struct Rings {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Set once the connection is known to be gone; each thread's eventfd wakes it to look.
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<std::fs::File>>,
}

impl Rings {
    /// Starts one queue per possible CPU on the connection `device` (the session's `/dev/fuse`)
    /// with payload buffers of `payload_bytes`, and waits until each has registered its entries.
    /// On error the started queues are left to the kernel's teardown at unmount.
    pub(super) fn start(
        core: Arc<FileCore>,
        runtime: Handle,
        device: BorrowedFd<'_>,
        payload_bytes: usize,
        stats: Arc<RingStats>,
    ) -> io::Result<Self> {
        let queues = uring::possible_cpus()?;
        // Every ring is made before any entry is registered: once one queue has registered,
        // the kernel serves nothing until all have (a failed registration, instead, makes it
        // fall back to /dev/fuse).
        let rings = (0..queues)
            .map(|qid| {
                let ring = QueueRing::open(device, qid as u16, DEPTH, payload_bytes)?;
                Ok((ring, Arc::new(std::fs::File::from(uring::eventfd()?))))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(queues);
        let stop = Arc::new(AtomicBool::new(false));
        let wakes: Vec<_> = rings.iter().map(|(_, wake)| wake.clone()).collect();
        for (qid, (ring, wake)) in rings.into_iter().enumerate() {
            let (core, runtime, stats, ready, stop) = (
                core.clone(),
                runtime.clone(),
                stats.clone(),
                ready_tx.clone(),
                stop.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("r3map-fuse-q{qid}"))
                .spawn(move || {
                    if let Err(err) = uring::pin_to_cpu(qid) {
                        tracing::debug!("cannot pin FUSE queue {qid} to its CPU: {err}");
                    }
                    if let Err(err) = run(ring, wake, core, runtime, stats, ready, &stop) {
                        tracing::warn!("FUSE io_uring queue {qid} stopped: {err}");
                    }
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..queues {
            match ready_rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(_) => {
                    return Err(io::Error::other(
                        "a FUSE io_uring queue did not start within 10 s",
                    ))
                }
            }
        }
        Ok(Self { threads, stop, wakes })
    }

    /// Waits for the queue threads, once the connection is gone (unmounted, or the `/dev/fuse`
    /// session ended): they end when the kernel has handed back their entries, without waiting
    /// for backend calls still in service.
    pub(super) fn join(self) {
        self.stop.store(true, Ordering::SeqCst);
        for wake in &self.wakes {
            let _ = (&**wake).write(&1u64.to_ne_bytes());
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Registers every entry of the queue, reports on `ready`, then serves until the kernel has
/// torn down every entry.
fn run(
    mut ring: QueueRing,
    wake: Arc<std::fs::File>,
    core: Arc<FileCore>,
    runtime: Handle,
    stats: Arc<RingStats>,
    ready: Sender<io::Result<()>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    // Inline polls of backend futures need the runtime's context (timers, spawn).
    let _context = runtime.enter();
    let setup = |ring: &mut QueueRing| -> io::Result<()> {
        for index in 0..DEPTH {
            ring.register(index)?;
        }
        ring.poll(wake.as_fd(), WAKE)?;
        ring.submit()?;
        // A refused registration completes at once; an accepted one only with a request.
        if let Some(refused) = ring
            .ready_completions()
            .iter()
            .find(|c| c.user_data != WAKE && c.result < 0)
        {
            return Err(io::Error::from_raw_os_error(-refused.result));
        }
        Ok(())
    };
    match setup(&mut ring) {
        Ok(()) => {
            let _ = ready.send(Ok(()));
        }
        Err(err) => {
            let _ = ready.send(Err(io::Error::new(
                err.kind(),
                format!("registering the queue's entries: {err}"),
            )));
            return Err(err);
        }
    };
    drop(ready);
    let (results_tx, results_rx) = std::sync::mpsc::channel();
    // Entries whose request is in service here (the others' commands are in the kernel:
    // `ring.in_kernel()`).
    let mut in_service = 0usize;
    // The connection is gone: the kernel ended the commands of its waiting entries, and at the
    // same teardown released the entries in service here (it never touches their buffers
    // again and has failed their requests), so their backend calls are not waited for: a
    // call that never returns must not keep the unmount from finishing.
    let mut closing = false;
    let mut completions: Vec<Completion> = Vec::with_capacity(usize::from(DEPTH) + 1);
    while ring.in_kernel() > 0 || (in_service > 0 && !closing) {
        ring.wait(&mut completions)?;
        for completion in completions.drain(..) {
            if completion.user_data == WAKE {
                if stop.load(Ordering::SeqCst) {
                    closing = true;
                }
                in_service -= commit_finished(&mut ring, &wake, &results_rx)?;
                ring.poll(wake.as_fd(), WAKE)?;
                continue;
            }
            ring.completed();
            let index = completion.user_data as u16;
            if completion.result != 0 {
                // ENOTCONN (entries waiting at teardown), ECONNABORTED (a commit after the
                // abort), ECANCELED (the ring's task is exiting): the connection is gone.
                // Anything else means the kernel refused the command and the entry is out of
                // service.
                if matches!(
                    -completion.result,
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED
                ) {
                    closing = true;
                } else {
                    tracing::warn!(
                        index,
                        "FUSE io_uring command failed: {}",
                        io::Error::from_raw_os_error(-completion.result)
                    );
                }
                continue;
            }
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let slot = ring.take(index);
            let header = InHeader::parse(slot.in_header());
            let inline = inline(&header, &slot);
            let mut answer = answer(core.clone(), header, slot);
            let polled = if inline {
                answer.as_mut().poll(&mut Context::from_waker(Waker::noop()))
            } else {
                Poll::Pending
            };
            match polled {
                Poll::Ready(slot) => ring.commit(index, slot)?,
                Poll::Pending => {
                    in_service += 1;
                    let reply = Reply {
                        index,
                        unique: header.unique,
                        slot: None,
                        results: results_tx.clone(),
                        wake: wake.clone(),
                    };
                    drop(runtime.spawn(async move { reply.send(answer.await) }));
                }
            }
        }
        ring.submit()?;
    }
    if in_service > 0 {
        tracing::debug!(
            in_service,
            "FUSE queue torn down with requests still in the backend"
        );
    }
    Ok(())
}

/// Commits every finished entry; returns how many.
fn commit_finished(
    ring: &mut QueueRing,
    wake: &std::fs::File,
    results: &Receiver<Done>,
) -> io::Result<usize> {
    let mut counter = [0u8; 8];
    // The eventfd is non-blocking; a spurious wakeup reads nothing.
    let _ = (&*wake).read(&mut counter);
    let mut committed = 0;
    while let Ok(done) = results.try_recv() {
        ring.commit(done.index, done.slot)?;
        committed += 1;
    }
    Ok(committed)
}

/// Largest READ or WRITE answered on the queue's thread. A larger one goes to a task at once:
/// one reader's requests all arrive on its CPU's queue, and answered inline they would be
/// served one after another by that queue's thread, while on tasks the runtime's workers copy
/// several at once (readahead and the loop device keep a few large requests in flight).
const INLINE_MAX: u32 = 64 << 10;

/// Whether to poll the request's answer on the queue's thread first.
fn inline(header: &InHeader, slot: &Slot) -> bool {
    match header.opcode {
        wire::READ => wire::u32_at(slot.op_in(), 16) <= INLINE_MAX,
        wire::WRITE => slot.payload().len() <= INLINE_MAX as usize,
        _ => true,
    }
}

type Answer = Pin<Box<dyn Future<Output = Slot> + Send>>;

/// Answers the request in `slot` and returns the slot with its reply set.
fn answer(core: Arc<FileCore>, header: InHeader, mut slot: Slot) -> Answer {
    let ino = INodeNo(header.nodeid);
    let unique = header.unique;
    let reply = move |mut slot: Slot, outcome: Result<usize, Errno>| {
        match outcome {
            Ok(len) => slot.set_reply(unique, 0, len),
            Err(errno) => slot.set_reply(unique, -errno.code(), 0),
        }
        slot
    };
    if header.uid != core.owner() && !kernel_issued(header.opcode) {
        // As the classic transport (fuser's `SessionACL::Owner`) does.
        return Box::pin(std::future::ready(reply(slot, Err(Errno::EACCES))));
    }
    let op_in = *slot.op_in();
    let outcome = match header.opcode {
        wire::LOOKUP => {
            // The name, NUL-terminated.
            let name = slot
                .payload()
                .split(|&b| b == 0)
                .next()
                .unwrap_or_default()
                .to_vec();
            core.lookup(ino, OsStr::from_bytes(&name))
                .map(|attr| wire::entry_out(slot.payload_buf(), &attr, TTL))
        }
        wire::GETATTR => core
            .getattr(ino)
            .map(|attr| wire::attr_out(slot.payload_buf(), &attr, TTL)),
        wire::SETATTR => core
            .setattr(ino, wire::setattr_changes(&op_in))
            .map(|attr| wire::attr_out(slot.payload_buf(), &attr, TTL)),
        wire::OPEN => core
            .open(ino, wire::u32_at(&op_in, 0) as i32)
            .map(|flags| wire::open_out(slot.payload_buf(), flags.bits())),
        wire::OPENDIR => Ok(wire::open_out(slot.payload_buf(), 0)),
        wire::READDIR => {
            let (offset, size) = (wire::u64_at(&op_in, 8), wire::u32_at(&op_in, 16) as usize);
            core.entries(ino)
                .map(|entries| wire::dirents(slot.payload_buf(), size, offset, &entries))
        }
        wire::STATFS => Ok(wire::statfs_out(slot.payload_buf(), core.blocks(), BLOCK_SIZE)),
        wire::RELEASE | wire::RELEASEDIR | wire::FLUSH | wire::FSYNCDIR | wire::DESTROY => Ok(0),
        wire::CREATE | wire::MKNOD | wire::MKDIR | wire::UNLINK => Err(Errno::EPERM),
        wire::READ => {
            let (offset, size) = (wire::u64_at(&op_in, 8), wire::u32_at(&op_in, 16));
            return match core.read_len(ino, offset, size) {
                Ok(len) if len > 0 && len <= slot.payload_buf().len() => Box::pin(async move {
                    let backend = core.backend().clone();
                    let outcome = core::read_into(&backend, offset, &mut slot.payload_buf()[..len]).await;
                    reply(slot, outcome.map(|()| len))
                }),
                Ok(0) => Box::pin(std::future::ready(reply(slot, Ok(0)))),
                Ok(_) => Box::pin(std::future::ready(reply(slot, Err(Errno::EIO)))),
                Err(errno) => Box::pin(std::future::ready(reply(slot, Err(errno)))),
            };
        }
        wire::WRITE => {
            let offset = wire::u64_at(&op_in, 8);
            let given = (wire::u32_at(&op_in, 16) as usize).min(slot.payload().len());
            return match core.write_len(ino, offset, given) {
                Ok(len) => Box::pin(async move {
                    let backend = core.backend().clone();
                    let outcome = core::write_from(&backend, offset, &slot.payload()[..len]).await;
                    let outcome = outcome.map(|()| wire::write_out(slot.payload_buf(), len as u32));
                    reply(slot, outcome)
                }),
                Err(errno) => Box::pin(std::future::ready(reply(slot, Err(errno)))),
            };
        }
        wire::FSYNC => {
            return Box::pin(async move {
                let outcome = core::sync(core.backend().clone()).await.map(|()| 0);
                reply(slot, outcome)
            });
        }
        wire::FALLOCATE => {
            let (offset, length, mode) = (
                wire::u64_at(&op_in, 8),
                wire::u64_at(&op_in, 16),
                wire::u32_at(&op_in, 24),
            );
            return match core.fallocate(ino, offset, length, mode as i32) {
                Ok(action) => Box::pin(async move {
                    let outcome = core::fallocate(core.backend().clone(), action).await.map(|()| 0);
                    reply(slot, outcome)
                }),
                Err(errno) => Box::pin(std::future::ready(reply(slot, Err(errno)))),
            };
        }
        _ => Err(Errno::ENOSYS),
    };
    Box::pin(std::future::ready(reply(slot, outcome)))
}

/// Requests the kernel sends on its own behalf (writeback, readahead, release), which fuser's
/// owner check lets through whatever their uid.
fn kernel_issued(opcode: u32) -> bool {
    matches!(
        opcode,
        wire::DESTROY
            | wire::READ
            | wire::READDIR
            | wire::WRITE
            | wire::FSYNC
            | wire::FSYNCDIR
            | wire::RELEASE
            | wire::RELEASEDIR
    )
}
