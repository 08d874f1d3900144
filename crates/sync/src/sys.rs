//! The one kernel interface this crate calls without a safe wrapper from a dependency: a file
//! lease (`fcntl(F_SETLEASE)`), used to ask whether a file is open anywhere else.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Whether `file` is open (or mapped) through any other open file description, in this process
/// or another. Only then can a write lease not be had (`fcntl(F_SETLEASE, F_WRLCK)`); the lease
/// is released at once. `Err` when the kernel cannot tell (leases disabled, a filesystem
/// without them, a file we do not own): callers must then assume it is open elsewhere.
///
/// While the lease is held (two system calls), another process opening the file would make
/// the kernel send us SIGIO to break it; nobody opens the files this is used on by name.
pub fn open_elsewhere(file: &File) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: F_SETLEASE takes an integer argument and touches no memory of ours; `fd` is a
    // descriptor `file` owns for the duration of the call.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EBUSY) => Ok(true),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(false)
}
