//! Request sizes of the FUSE connection that INIT cannot set: the largest request the kernel
//! allows (`fs.fuse.max_pages_limit`) and the connection's read-ahead (its bdi in sysfs).

use std::path::Path;

/// The largest request buffer fuser reads into (its `MAX_WRITE_SIZE`).
const FUSER_MAX_REQUEST: u64 = 16 << 20;

/// The kernel's limit when the sysctl is missing (kernels before 6.13: `FUSE_MAX_MAX_PAGES`).
const DEFAULT_MAX_PAGES: u64 = 256;

const SYSCTL_MAX_PAGES: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// The largest read or write request this kernel lets a FUSE server negotiate, in bytes:
/// `fs.fuse.max_pages_limit` pages (256 pages = 1 MiB unless an administrator raised it), at
/// most 16 MiB (the request buffer of the FUSE library).
pub fn max_request_limit() -> u32 {
    let pages = std::fs::read_to_string(SYSCTL_MAX_PAGES)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&pages| pages > 0)
        .unwrap_or(DEFAULT_MAX_PAGES);
    (pages * crate::sys::page_size()).min(FUSER_MAX_REQUEST) as u32
}

/// The sysfs directory of the backing device info of the filesystem mounted at `mountpoint`
/// (`/sys/class/bdi/<major>:<minor>`; FUSE names its bdi after the anonymous device number).
fn bdi_of(mountpoint: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    Ok(format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev)).into())
}

/// Sets the read-ahead of the FUSE connection mounted at `mountpoint` to `bytes` (when given)
/// and returns the read-ahead then in effect, or `None` if sysfs cannot be read.
///
/// It must run after INIT: the kernel sets the read-ahead to the smaller of its own and the
/// server's INIT value when it receives the INIT reply, which would undo an earlier raise. A
/// `statfs` of the mountpoint is a request, and requests wait until INIT is done.
pub(super) fn apply_read_ahead(mountpoint: &Path, bytes: Option<u32>) -> Option<u32> {
    if let Err(err) = nix::sys::statfs::statfs(mountpoint) {
        tracing::warn!("statfs of {} failed: {err}", mountpoint.display());
    }
    let bdi = match bdi_of(mountpoint) {
        Ok(bdi) => bdi.join("read_ahead_kb"),
        Err(err) => {
            tracing::warn!(
                "cannot find the FUSE connection of {}: {err}",
                mountpoint.display()
            );
            return None;
        }
    };
    if let Some(bytes) = bytes {
        let kib = bytes.div_ceil(1024).max(4);
        if let Err(err) = std::fs::write(&bdi, format!("{kib}\n")) {
            tracing::warn!(
                "cannot raise the read-ahead of {} to {kib} KiB by writing {} ({err}); buffered reads \
                 arrive as smaller requests",
                mountpoint.display(),
                bdi.display()
            );
        }
    }
    match std::fs::read_to_string(&bdi) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .ok()
            .map(|kib| kib.saturating_mul(1024)),
        Err(err) => {
            tracing::warn!("cannot read {}: {err}", bdi.display());
            None
        }
    }
}
