//! ublk's kernel ABI (`<linux/ublk_cmd.h>`): control commands on `/dev/ublk-control` and I/O
//! commands on `/dev/ublkcN`, both as `IORING_OP_URING_CMD` through io_uring, plus the mapping
//! of a queue's I/O descriptors.
//!
//! Commands use the ioctl encoding (`UBLK_U_*`, `UBLK_F_CMD_IOCTL_ENCODE`); the legacy opcodes
//! may be compiled out of a kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// `_IOWR('u', nr, struct ublksrv_ctrl_cmd)` (32 bytes).
const fn ctrl_iowr(nr: u32) -> u32 {
    (3 << 30) | (32 << 16) | ((b'u' as u32) << 8) | nr
}
/// `_IOWR('u', nr, struct ublksrv_io_cmd)` (16 bytes).
const fn io_iowr(nr: u32) -> u32 {
    (3 << 30) | (16 << 16) | ((b'u' as u32) << 8) | nr
}

const CMD_ADD_DEV: u32 = ctrl_iowr(0x04);
const CMD_DEL_DEV: u32 = ctrl_iowr(0x05);
const CMD_START_DEV: u32 = ctrl_iowr(0x06);
const CMD_STOP_DEV: u32 = ctrl_iowr(0x07);
const CMD_SET_PARAMS: u32 = ctrl_iowr(0x08);
const IO_FETCH_REQ: u32 = io_iowr(0x20);
const IO_COMMIT_AND_FETCH_REQ: u32 = io_iowr(0x21);

/// Use the ioctl encoding for commands.
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

/// Request operations (`ublksrv_io_desc.op_flags & 0xff`).
pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;
pub const OP_DISCARD: u8 = 3;
pub const OP_WRITE_ZEROES: u8 = 5;

/// The result of a fetch when the device is being stopped.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

const PARAM_TYPE_BASIC: u32 = 1 << 0;
const PARAM_TYPE_DISCARD: u32 = 1 << 1;
const ATTR_VOLATILE_CACHE: u32 = 1 << 2;

/// Most requests one queue can hold (`UBLK_MAX_QUEUE_DEPTH`); it sizes the descriptor areas.
pub const MAX_QUEUE_DEPTH: usize = 4096;
const IO_DESC_SIZE: usize = 24;

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct ParamBasic {
    attrs: u32,
    logical_bs_shift: u8,
    physical_bs_shift: u8,
    io_opt_shift: u8,
    io_min_shift: u8,
    max_sectors: u32,
    chunk_sectors: u32,
    dev_sectors: u64,
    virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct ParamDiscard {
    discard_alignment: u32,
    discard_granularity: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    max_discard_segments: u16,
    reserved0: u16,
}

/// The leading part of `struct ublk_params` that we set (basic and discard).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Params {
    len: u32,
    types: u32,
    basic: ParamBasic,
    discard: ParamDiscard,
}
/// Bytes of `Params` the kernel reads (the struct itself is padded to 8).
const PARAMS_LEN: u32 = 8 + 32 + 20;

/// Device geometry for `SET_PARAMS`.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub logical_block_shift: u8,
    pub sectors: u64,
    pub max_request_sectors: u32,
    pub discard_sectors: u32,
}

/// One request, read from the shared descriptor area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub op: u8,
    pub flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawIoDesc {
    op_flags: u32,
    nr_sectors: u32,
    start_sector: u64,
    addr: u64,
}

/// Encodes `struct ublksrv_ctrl_cmd` into the command area of a 128-byte SQE.
fn ctrl_cmd(dev_id: u32, queue_id: u16, len: u16, addr: u64, data: u64) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[0..4].copy_from_slice(&dev_id.to_ne_bytes());
    cmd[4..6].copy_from_slice(&queue_id.to_ne_bytes());
    cmd[6..8].copy_from_slice(&len.to_ne_bytes());
    cmd[8..16].copy_from_slice(&addr.to_ne_bytes());
    cmd[16..24].copy_from_slice(&data.to_ne_bytes());
    cmd
}

/// Encodes `struct ublksrv_io_cmd`.
fn io_cmd(queue: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut cmd = [0u8; 16];
    cmd[0..2].copy_from_slice(&queue.to_ne_bytes());
    cmd[2..4].copy_from_slice(&tag.to_ne_bytes());
    cmd[4..8].copy_from_slice(&result.to_ne_bytes());
    cmd[8..16].copy_from_slice(&addr.to_ne_bytes());
    cmd
}

fn cqe_result(res: i32) -> io::Result<i32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
    }
}

/// `/dev/ublk-control` with a small io_uring of 128-byte entries for its commands. Every
/// command is synchronous: submitted and awaited before the call returns.
pub struct ControlRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    control: File,
}

impl ControlRing {
    /// Opens `/dev/ublk-control`.
    pub fn open() -> io::Result<Self> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/ublk-control")?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Self { ring, control })
    }

    /// Runs one control command; `buf` is the command's in/out buffer (address and length).
    fn command(&mut self, op: u32, dev_id: u32, buf: Option<(u64, u16)>, data: u64) -> io::Result<i32> {
        let (addr, len) = buf.unwrap_or((0, 0));
        let entry = opcode::UringCmd80::new(types::Fd(self.control.as_raw_fd()), op)
            .cmd(ctrl_cmd(dev_id, u16::MAX, len, addr, data))
            .build()
            .user_data(1);
        // SAFETY: the only memory the command refers to is `buf`, which the callers borrow
        // for the whole call, and this call waits for the command's completion below.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("ublk control ring is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            if let Some(cqe) = self.ring.completion().next() {
                return cqe_result(cqe.result());
            }
        }
    }

    /// `UBLK_U_CMD_ADD_DEV`: creates `/dev/ublkcN`; the kernel fills in `info.dev_id`.
    pub fn add_dev(&mut self, info: &mut DevInfo) -> io::Result<()> {
        let buf = (info as *mut DevInfo as u64, std::mem::size_of::<DevInfo>() as u16);
        self.command(CMD_ADD_DEV, info.dev_id, Some(buf), 0).map(drop)
    }

    /// `UBLK_U_CMD_SET_PARAMS`.
    pub fn set_params(&mut self, dev_id: u32, geometry: Geometry) -> io::Result<()> {
        let shift = geometry.logical_block_shift;
        let mut params = Params {
            len: PARAMS_LEN,
            types: PARAM_TYPE_BASIC | PARAM_TYPE_DISCARD,
            basic: ParamBasic {
                attrs: ATTR_VOLATILE_CACHE,
                logical_bs_shift: shift,
                physical_bs_shift: shift.max(12),
                io_opt_shift: shift.max(12),
                io_min_shift: shift,
                max_sectors: geometry.max_request_sectors,
                chunk_sectors: 0,
                dev_sectors: geometry.sectors,
                virt_boundary_mask: 0,
            },
            discard: ParamDiscard {
                discard_alignment: 0,
                discard_granularity: 1 << shift,
                max_discard_sectors: geometry.discard_sectors,
                max_write_zeroes_sectors: geometry.discard_sectors,
                max_discard_segments: 1,
                reserved0: 0,
            },
        };
        let buf = (&mut params as *mut Params as u64, PARAMS_LEN as u16);
        self.command(CMD_SET_PARAMS, dev_id, Some(buf), 0).map(drop)
    }

    /// `UBLK_U_CMD_START_DEV`: returns once every queue fetched all its tags and the disk
    /// `/dev/ublkbN` was added (which reads the partition table through the queues).
    pub fn start_dev(&mut self, dev_id: u32, server_pid: i32) -> io::Result<()> {
        self.command(CMD_START_DEV, dev_id, None, server_pid as u64)
            .map(drop)
    }

    /// `UBLK_U_CMD_STOP_DEV`: removes the disk and aborts the fetches of every queue.
    pub fn stop_dev(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(CMD_STOP_DEV, dev_id, None, 0).map(drop)
    }

    /// `UBLK_U_CMD_DEL_DEV`: removes `/dev/ublkcN` (waits until it is closed everywhere).
    pub fn del_dev(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(CMD_DEL_DEV, dev_id, None, 0).map(drop)
    }
}

/// A queue's read-only mapping of its I/O descriptors (one per tag).
struct IoDescs {
    ptr: NonNull<RawIoDesc>,
    len: usize,
    depth: u16,
}

impl IoDescs {
    fn map(device: BorrowedFd<'_>, queue: u16, depth: u16) -> io::Result<Self> {
        let page = page_size();
        let round = |n: usize| n.div_ceil(page) * page;
        let len = round(usize::from(depth) * IO_DESC_SIZE);
        let offset = usize::from(queue) * round(MAX_QUEUE_DEPTH * IO_DESC_SIZE);
        // SAFETY: a fresh shared read-only mapping at an address the kernel chooses; it
        // aliases no Rust object. The result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                device.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, depth })
    }

    fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth, "tag {tag} out of range");
        // SAFETY: `tag < depth`, so the descriptor lies inside the mapping, which lives as long
        // as `self`; the kernel writes a tag's descriptor only while the tag belongs to the
        // kernel, and callers read it after the fetch completed, so a volatile read of plain
        // integers sees a complete descriptor.
        let raw = unsafe { self.ptr.as_ptr().add(usize::from(tag)).read_volatile() };
        IoDesc {
            op: (raw.op_flags & 0xff) as u8,
            flags: raw.op_flags >> 8,
            nr_sectors: raw.nr_sectors,
            start_sector: raw.start_sector,
        }
    }
}

impl Drop for IoDescs {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// A completion taken from a queue ring: the `user_data` and the result.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
}

/// One ublk queue: `/dev/ublkcN`, its descriptors, an io_uring and one buffer per tag.
///
/// Buffer ownership follows the tag: while a fetch or commit of a tag is in the kernel, the
/// tag's buffer sits in `buffers` and the kernel may read or write it; while the server handles
/// the request the buffer is taken out ([`QueueRing::take_buffer`]) and handed back with the
/// commit ([`QueueRing::commit`]).
pub struct QueueRing {
    // Field order is drop order: the ring (cancelling whatever is in flight) goes first.
    ring: IoUring,
    descs: IoDescs,
    device: Arc<File>,
    queue: u16,
    buffers: Vec<Option<Vec<u8>>>,
    in_kernel: usize,
}

impl QueueRing {
    /// Sets up queue `queue` of the device open as `device` (`/dev/ublkcN`, which the kernel
    /// lets one process open once) with `depth` tags of `buffer_bytes` each.
    pub fn open(device: Arc<File>, queue: u16, depth: u16, buffer_bytes: usize) -> io::Result<Self> {
        let descs = IoDescs::map(device.as_fd(), queue, depth)?;
        let ring = IoUring::builder().build((u32::from(depth) + 2).next_power_of_two())?;
        let buffers = (0..depth).map(|_| Some(vec![0u8; buffer_bytes])).collect();
        Ok(Self {
            ring,
            descs,
            device,
            queue,
            buffers,
            in_kernel: 0,
        })
    }

    /// The request of `tag` (valid after its fetch completed).
    pub fn desc(&self, tag: u16) -> IoDesc {
        self.descs.get(tag)
    }

    /// Takes the buffer of `tag` (whose request the server now handles).
    pub fn take_buffer(&mut self, tag: u16) -> Vec<u8> {
        self.buffers[usize::from(tag)]
            .take()
            .expect("a tag's buffer is taken once per request")
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: the entries built by this type refer to a tag's buffer, which stays in
        // `buffers` (not moved, not freed: see the type's ownership rule and `Drop`) until the
        // command completes, or to no memory at all (poll).
        unsafe { self.ring.submission().push(entry) }.map_err(|_| io::Error::other("ublk queue ring is full"))
    }

    fn io_entry(&self, op: u32, tag: u16, result: i32) -> squeue::Entry {
        let buffer = self.buffers[usize::from(tag)]
            .as_ref()
            .expect("the buffer of a tag given to the kernel is in place");
        opcode::UringCmd16::new(types::Fd(self.device.as_raw_fd()), op)
            .cmd(io_cmd(self.queue, tag, result, buffer.as_ptr() as u64))
            .build()
            .user_data(u64::from(tag))
    }

    /// Queues `UBLK_U_IO_FETCH_REQ` for `tag` (once per tag, before the device starts).
    pub fn fetch(&mut self, tag: u16) -> io::Result<()> {
        let entry = self.io_entry(IO_FETCH_REQ, tag, -1);
        self.push(&entry)?;
        self.in_kernel += 1;
        Ok(())
    }

    /// Queues `UBLK_U_IO_COMMIT_AND_FETCH_REQ`: completes `tag`'s request with `result` (bytes
    /// or a negative errno; a read's data is in `buffer`) and fetches the tag's next request.
    pub fn commit(&mut self, tag: u16, result: i32, buffer: Vec<u8>) -> io::Result<()> {
        self.buffers[usize::from(tag)] = Some(buffer);
        let entry = self.io_entry(IO_COMMIT_AND_FETCH_REQ, tag, result);
        self.push(&entry)?;
        self.in_kernel += 1;
        Ok(())
    }

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Queues a one-shot poll for readability of `fd` with `user_data`.
    pub fn poll(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Notes that an I/O command of a tag completed (the kernel gave the tag back).
    pub fn completed_io(&mut self) {
        self.in_kernel -= 1;
    }

    /// Submits what is queued, waits for at least one completion and appends every available
    /// one to `out`.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
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
            // Commands still refer to their buffers: leak them rather than let the kernel
            // write into freed memory (only on error paths; a stopped queue has none left).
            for buffer in self.buffers.drain(..).flatten() {
                std::mem::forget(buffer);
            }
        }
    }
}

/// Opens `/dev/ublkcN`.
pub fn open_char_device(dev_id: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/ublkc{dev_id}"))
}

/// A non-blocking eventfd (wakes a queue thread from its ring when a request finished).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_encodings_match_the_kernel_header() {
        // Values of the UBLK_U_* macros as the C preprocessor computes them.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn struct_sizes_match_the_kernel_header() {
        assert_eq!(std::mem::size_of::<DevInfo>(), 64);
        assert_eq!(std::mem::size_of::<ParamBasic>(), 32);
        assert_eq!(std::mem::size_of::<ParamDiscard>(), 20);
        assert_eq!(std::mem::offset_of!(Params, discard), 40);
        assert_eq!(std::mem::size_of::<RawIoDesc>(), IO_DESC_SIZE);
    }
}
