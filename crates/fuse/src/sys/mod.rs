//! The raw kernel calls of this crate (loop-driver ioctls, the page size) behind small safe
//! functions, and FUSE over io_uring in [`uring`]. It is the only module with `unsafe`.

pub(crate) mod uring;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use linux_raw_sys::loop_device as raw;

pub(crate) use raw::loop_info64 as LoopInfo;

/// `LO_FLAGS_*` values of `loop_info64::lo_flags`.
pub(crate) const LO_FLAGS_READ_ONLY: u32 = raw::LO_FLAGS_READ_ONLY as u32;
pub(crate) const LO_FLAGS_AUTOCLEAR: u32 = raw::LO_FLAGS_AUTOCLEAR as u32;
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = raw::LO_FLAGS_DIRECT_IO as u32;

/// Turns the return value of `ioctl(2)` into a result.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: the number of a free loop device (the kernel
/// creates one if none is free).
pub(crate) fn loop_ctl_get_free(control: &File) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an integer; the fd is valid
    // for the call because `control` borrows an open file.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), raw::LOOP_CTL_GET_FREE as _) };
    check(rc).map(|n| n as u32)
}

/// `LOOP_CONFIGURE`: binds `backing` to the loop device `device` with `flags` and
/// `block_size` (0 = the kernel's default) in one call.
pub(crate) fn loop_configure(device: &File, backing: &File, flags: u32, block_size: u32) -> io::Result<()> {
    // SAFETY: loop_config is a plain-old-data kernel struct for which all-zero bytes is a valid
    // (empty) value.
    let mut config: raw::loop_config = unsafe { std::mem::zeroed() };
    config.fd = backing.as_raw_fd() as u32;
    config.block_size = block_size;
    config.info.lo_flags = flags;
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` through the pointer, which points to
    // an initialised value that outlives the call; both fds are open for the call.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            raw::LOOP_CONFIGURE as _,
            &config as *const raw::loop_config,
        )
    };
    check(rc).map(drop)
}

/// `LOOP_GET_STATUS64`: the flags and backing-file name of a bound loop device.
pub(crate) fn loop_get_status(device: &File) -> io::Result<LoopInfo> {
    // SAFETY: loop_info64 is plain old data; all-zero bytes is a valid value.
    let mut info: LoopInfo = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` through the pointer, which
    // points to a writable value that outlives the call.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            raw::LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo,
        )
    };
    check(rc).map(|_| info)
}

/// `LOOP_CLR_FD`: detaches the backing file. The kernel defers the detach to the last close of
/// the device (it sets autoclear) while other openers remain.
pub(crate) fn loop_clr_fd(device: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is open for the call.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), raw::LOOP_CLR_FD as _) };
    check(rc).map(drop)
}

/// The size of a memory page in bytes.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads its integer argument and returns an integer.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}
