//! FUSE over io_uring (`Documentation/filesystems/fuse-io-uring.rst`; `<linux/fuse.h>` from
//! protocol 7.42): the kernel hands requests to the server through `IORING_OP_URING_CMD`
//! commands on `/dev/fuse` instead of `read(2)`, and takes replies with the next command
//! instead of `write(2)`.
//!
//! One ring per queue; the kernel has one queue per possible CPU and puts a request on the
//! queue of the CPU its sender runs on. Each queue gets `depth` *entries*: a 288-byte header
//! buffer and a payload buffer of at least the connection's largest request. An entry is
//! registered once (`FUSE_IO_URING_CMD_REGISTER`); its command completes when a request was
//! copied into its buffers, and `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` returns the reply from
//! the same buffers and waits for the entry's next request. The kernel switches the connection
//! to the ring once every queue has an entry waiting; until then (and for FORGET, INTERRUPT
//! and notifications always) `/dev/fuse` carries the requests.
//!
//! Buffer ownership follows the entry, as in the ublk queue: while a command of an entry is in
//! the kernel its [`Slot`] sits in the ring and the kernel may read or write it; while the
//! server handles the request the slot is taken out ([`QueueRing::take`]) and handed back with
//! the commit ([`QueueRing::commit`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Sizes of the two fixed areas of `struct fuse_uring_req_header`.
const IN_OUT_SIZE: usize = 128;
const OP_IN_SIZE: usize = 128;

/// `struct fuse_in_header` (40 bytes) and `struct fuse_out_header` (16 bytes).
pub(crate) const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;

/// Offset of `len` in `struct io_uring_sqe` (`opcode, flags, ioprio, fd, off, addr, len`).
const SQE_LEN_OFFSET: usize = 24;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct EntInOut {
    flags: u64,
    /// The request's `unique`, to be echoed in the commit.
    commit_id: u64,
    /// Valid bytes in the payload buffer, in either direction.
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`: `fuse_in_header` (on fetch) or `fuse_out_header` (on
/// commit), the opcode's fixed argument struct, and the entry's in/out record.
#[repr(C, align(8))]
struct ReqHeader {
    in_out: [u8; IN_OUT_SIZE],
    op_in: [u8; OP_IN_SIZE],
    ent: EntInOut,
}

const _: () = assert!(std::mem::size_of::<ReqHeader>() == 288);

/// `struct fuse_uring_cmd_req`, in the 80-byte command area of a 128-byte SQE.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    // flags (u64) stay zero.
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// The buffers of one ring entry.
pub(crate) struct Slot {
    header: Box<ReqHeader>,
    payload: Vec<u8>,
    /// `iov[0]` = header, `iov[1]` = payload, as REGISTER expects; it points into the two boxes
    /// above, whose heap addresses never change.
    iov: Box<[libc::iovec; 2]>,
}

// SAFETY: the raw pointers in `iov` point into the slot's own heap buffers; moving the slot to
// another thread moves the owner of those buffers with it.
unsafe impl Send for Slot {}

impl Slot {
    fn new(payload_bytes: usize) -> Self {
        let mut header = Box::new(ReqHeader {
            in_out: [0; IN_OUT_SIZE],
            op_in: [0; OP_IN_SIZE],
            ent: EntInOut::default(),
        });
        let mut payload = vec![0u8; payload_bytes];
        let iov = Box::new([
            libc::iovec {
                iov_base: (&mut *header as *mut ReqHeader).cast(),
                iov_len: std::mem::size_of::<ReqHeader>(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ]);
        Self { header, payload, iov }
    }

    /// The request's `struct fuse_in_header`.
    pub(crate) fn in_header(&self) -> &[u8; IN_HEADER_SIZE] {
        self.header.in_out[..IN_HEADER_SIZE]
            .try_into()
            .expect("the in/out area holds an in header")
    }

    /// The opcode's fixed argument struct (zero-padded to 128 bytes).
    pub(crate) fn op_in(&self) -> &[u8; OP_IN_SIZE] {
        &self.header.op_in
    }

    /// The rest of the request's arguments (a name, a write's data), as the kernel sized them.
    pub(crate) fn payload(&self) -> &[u8] {
        let len = (self.header.ent.payload_sz as usize).min(self.payload.len());
        &self.payload[..len]
    }

    /// The whole payload buffer, for writing a reply into.
    pub(crate) fn payload_buf(&mut self) -> &mut [u8] {
        &mut self.payload
    }

    fn commit_id(&self) -> u64 {
        self.header.ent.commit_id
    }

    /// Sets the reply: `error` (0 or a negative errno) and, on success, `payload_len` bytes
    /// at the start of the payload buffer.
    pub(crate) fn set_reply(&mut self, unique: u64, error: i32, payload_len: usize) {
        let payload_len = if error == 0 {
            payload_len.min(self.payload.len())
        } else {
            0
        };
        let len = (OUT_HEADER_SIZE + payload_len) as u32;
        self.header.in_out = [0; IN_OUT_SIZE];
        self.header.in_out[0..4].copy_from_slice(&len.to_ne_bytes());
        self.header.in_out[4..8].copy_from_slice(&error.to_ne_bytes());
        self.header.in_out[8..16].copy_from_slice(&unique.to_ne_bytes());
        self.header.ent.payload_sz = payload_len as u32;
    }
}

/// A completion taken from a queue ring: the `user_data` and the result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub user_data: u64,
    pub result: i32,
}

/// The ring of one FUSE queue with its entries' buffers.
pub(crate) struct QueueRing {
    // Field order is drop order: the ring (cancelling its commands) goes before the buffers.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    device: OwnedFd,
    qid: u16,
    slots: Vec<Option<Slot>>,
    in_kernel: usize,
}

impl QueueRing {
    /// A ring for queue `qid` of the connection open as `device` (a duplicate of the session's
    /// `/dev/fuse` descriptor), with `depth` entries of `payload_bytes` each.
    pub(crate) fn open(
        device: BorrowedFd<'_>,
        qid: u16,
        depth: u16,
        payload_bytes: usize,
    ) -> io::Result<Self> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((u32::from(depth) + 2).next_power_of_two())?;
        Ok(Self {
            ring,
            device: device.try_clone_to_owned()?,
            qid,
            slots: (0..depth).map(|_| Some(Slot::new(payload_bytes))).collect(),
            in_kernel: 0,
        })
    }

    fn push(&mut self, entry: &squeue::Entry128) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: the commands built by this type refer to an entry's slot (its iovec array,
        // header and payload), which stays in `slots` — not moved, not freed: see the type's
        // ownership rule and `Drop` — until the command completes, or to no memory (poll).
        unsafe { self.ring.submission().push(entry) }.map_err(|_| io::Error::other("FUSE queue ring is full"))
    }

    fn command(&self, op: u32, index: u16, commit_id: u64) -> squeue::Entry128 {
        let slot = self.slots[usize::from(index)]
            .as_ref()
            .expect("the slot of an entry given to the kernel is in place");
        let entry = opcode::UringCmd80::new(types::Fd(self.device.as_raw_fd()), op)
            .cmd(cmd_req(commit_id, self.qid))
            .addr(Some(slot.iov.as_ptr() as u64))
            .build()
            .user_data(u64::from(index));
        with_sqe_len(entry, 2)
    }

    /// Queues `FUSE_IO_URING_CMD_REGISTER` for entry `index` (once per entry).
    pub(crate) fn register(&mut self, index: u16) -> io::Result<()> {
        let entry = self.command(CMD_REGISTER, index, 0);
        self.push(&entry)?;
        self.in_kernel += 1;
        Ok(())
    }

    /// Takes the slot of entry `index`, whose command completed with a request.
    pub(crate) fn take(&mut self, index: u16) -> Slot {
        self.slots[usize::from(index)]
            .take()
            .expect("an entry's slot is taken once per request")
    }

    /// Queues `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: the reply set in `slot` (with
    /// [`Slot::set_reply`]) completes the entry's request, and the entry waits for the next.
    pub(crate) fn commit(&mut self, index: u16, slot: Slot) -> io::Result<()> {
        let commit_id = slot.commit_id();
        self.slots[usize::from(index)] = Some(slot);
        let entry = self.command(CMD_COMMIT_AND_FETCH, index, commit_id);
        self.push(&entry)?;
        self.in_kernel += 1;
        Ok(())
    }

    /// Notes that a command of an entry completed (the kernel gave the entry back).
    pub(crate) fn completed(&mut self) {
        self.in_kernel -= 1;
    }

    /// Entries whose command is in the kernel.
    pub(crate) fn in_kernel(&self) -> usize {
        self.in_kernel
    }

    /// Queues a one-shot poll for readability of `fd` with `user_data`.
    pub(crate) fn poll(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let entry: squeue::Entry128 = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data)
            .into();
        self.push(&entry)
    }

    /// Submits what is queued without waiting.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// The completions available now, without waiting.
    pub(crate) fn ready_completions(&mut self) -> Vec<Completion> {
        self.ring
            .completion()
            .map(|cqe| Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
            })
            .collect()
    }

    /// Submits what is queued, waits for at least one completion and appends every available
    /// one to `out`.
    pub(crate) fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
        out.extend(self.ring.completion().map(|cqe| Completion {
            user_data: cqe.user_data(),
            result: cqe.result(),
        }));
        Ok(())
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        if self.in_kernel > 0 {
            // Commands still refer to their slots: leak them rather than let the kernel write
            // into freed memory (only on error paths; a torn-down queue has none left).
            for slot in self.slots.drain(..).flatten() {
                std::mem::forget(slot);
            }
        }
    }
}

/// Sets `len` of a 128-byte SQE, which `UringCmd80` leaves zero: REGISTER needs the number of
/// iovecs there.
fn with_sqe_len(entry: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `repr(C)`: a `struct io_uring_sqe` (64 bytes of plain integers)
    // followed by 64 bytes; every bit pattern of its 128 bytes is a valid value, so it can be
    // viewed as bytes and back (transmute checks the sizes match).
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
    bytes[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above; only the `len` field changed.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

/// Whether the running kernel lets FUSE servers use io_uring: the `fuse` module's
/// `enable_uring` parameter (only present when built with `CONFIG_FUSE_IO_URING`).
pub(crate) fn uring_enabled() -> Result<bool, String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(text) => Ok(matches!(text.trim(), "Y" | "y" | "1")),
        Err(err) => Err(format!(
            "{ENABLE_URING}: {err} (the kernel lacks CONFIG_FUSE_IO_URING, added in Linux 6.14)"
        )),
    }
}

/// The module parameter that allows FUSE over io_uring (off by default).
pub(crate) const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1`): the kernel
/// makes one FUSE queue per possible CPU and starts using the ring once each has an entry.
pub(crate) fn possible_cpus() -> io::Result<usize> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(POSSIBLE)?;
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{POSSIBLE}: unexpected {text:?}"),
        )
    };
    let mut count = 0usize;
    for range in text.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (usize, usize) = (
            first.parse().map_err(|_| invalid())?,
            last.parse().map_err(|_| invalid())?,
        );
        count += last.checked_sub(first).ok_or_else(invalid)? + 1;
    }
    Ok(count)
}

/// A non-blocking eventfd (wakes a queue thread from its ring when a request finished).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Pins the calling thread to `cpu`, so a queue's thread runs where its requests come from.
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_len_lands_where_the_kernel_reads_it() {
        let entry = opcode::UringCmd80::new(types::Fd(7), CMD_REGISTER)
            .cmd(cmd_req(0x1122, 3))
            .addr(Some(0xdead_beef))
            .build()
            .user_data(9);
        let entry = with_sqe_len(entry, 2);
        // SAFETY: as in `with_sqe_len`.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
        assert_eq!(bytes[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(i32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 7, "fd");
        assert_eq!(
            u64::from_ne_bytes(bytes[16..24].try_into().unwrap()),
            0xdead_beef,
            "addr"
        );
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2, "len");
        assert_eq!(
            u64::from_ne_bytes(bytes[32..40].try_into().unwrap()),
            9,
            "user_data"
        );
        // cmd_op shares the `off` union (offset 8); the command area starts at offset 48.
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), CMD_REGISTER);
        assert_eq!(
            u64::from_ne_bytes(bytes[56..64].try_into().unwrap()),
            0x1122,
            "commit_id"
        );
        assert_eq!(u16::from_ne_bytes(bytes[64..66].try_into().unwrap()), 3, "qid");
    }
}
