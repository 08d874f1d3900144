//! The NBD ioctls of `<linux/nbd.h>` (the interface before netlink): `NBD_SET_SOCK` hands a
//! connected socket to the device, `NBD_DO_IT` runs the device until it is disconnected.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

// _IO(0xab, n): no direction, no size.
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_SET_SIZE: libc::c_ulong = 0xab02;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

fn ioctl(device: BorrowedFd<'_>, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every NBD ioctl takes its argument by value (an integer or a file descriptor
    // number), never as a pointer, so the kernel reads no memory of ours; `device` is a valid
    // open descriptor for the duration of the call because it is borrowed.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Adds a connected socket to the device (`EBUSY` when another process configures it).
pub fn set_sock(device: BorrowedFd<'_>, socket: BorrowedFd<'_>) -> io::Result<()> {
    ioctl(device, NBD_SET_SOCK, socket.as_raw_fd() as libc::c_ulong)
}

/// Sets the logical block size in bytes.
pub fn set_blksize(device: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    ioctl(device, NBD_SET_BLKSIZE, bytes as libc::c_ulong)
}

/// Sets the device size in bytes.
pub fn set_size(device: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    ioctl(device, NBD_SET_SIZE, bytes as libc::c_ulong)
}

/// Sets the request timeout in seconds.
pub fn set_timeout(device: BorrowedFd<'_>, seconds: u64) -> io::Result<()> {
    ioctl(device, NBD_SET_TIMEOUT, seconds as libc::c_ulong)
}

/// Sets the transmission flags the server sent in the handshake.
pub fn set_flags(device: BorrowedFd<'_>, flags: u64) -> io::Result<()> {
    ioctl(device, NBD_SET_FLAGS, flags as libc::c_ulong)
}

/// Runs the device: returns only after a disconnect or when every connection died.
pub fn do_it(device: BorrowedFd<'_>) -> io::Result<()> {
    ioctl(device, NBD_DO_IT, 0)
}

/// Asks the device to disconnect (sends `NBD_CMD_DISC`; `NBD_DO_IT` then returns).
pub fn disconnect(device: BorrowedFd<'_>) -> io::Result<()> {
    ioctl(device, NBD_DISCONNECT, 0)
}

/// Drops the device's sockets after `NBD_DO_IT` returned.
pub fn clear_sock(device: BorrowedFd<'_>) -> io::Result<()> {
    ioctl(device, NBD_CLEAR_SOCK, 0)
}

/// Fails the requests still queued on the device.
pub fn clear_que(device: BorrowedFd<'_>) -> io::Result<()> {
    ioctl(device, NBD_CLEAR_QUE, 0)
}
