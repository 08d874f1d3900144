//! Whether this kernel can run a block-device frontend, and if not, which feature is missing.

use std::io;
use std::path::Path;

use crate::nbd::genl::NbdNetlink;
use crate::nbd::NbdMethod;

/// A frontend this kernel cannot run. The message names the missing kernel feature and
/// suggests the frontend that works everywhere FUSE does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {frontend} frontend needs {feature}, which this kernel does not offer ({detail}); \
     use `--frontend disk` (FUSE + loop device) instead"
)]
pub struct Unsupported {
    /// `nbd` or `ublk`.
    pub frontend: &'static str,
    /// The kernel feature (config option and module) that is missing.
    pub feature: &'static str,
    /// What was checked and found missing.
    pub detail: String,
}

const NBD_FEATURE: &str = "the kernel NBD client (CONFIG_BLK_DEV_NBD; load it with `modprobe nbd`)";
const UBLK_FEATURE: &str = "ublk (CONFIG_BLK_DEV_UBLK, Linux 6.0 or later; load it with `modprobe ublk_drv`)";
const IO_URING_FEATURE: &str = "io_uring (CONFIG_IO_URING, enabled by sysctl kernel.io_uring_disabled=0)";

/// Checks for the kernel NBD client and says how to configure it: through netlink where the
/// `nbd` generic netlink family exists (Linux 4.12+), else through the ioctls on `/dev/nbd0`.
pub fn check_nbd_support() -> Result<NbdMethod, Unsupported> {
    match NbdNetlink::open() {
        Ok(_) => Ok(NbdMethod::Netlink),
        Err(_) if Path::new("/dev/nbd0").exists() => Ok(NbdMethod::Ioctl),
        Err(err) => Err(Unsupported {
            frontend: "nbd",
            feature: NBD_FEATURE,
            detail: if err.raw_os_error() == Some(libc::ENOENT) {
                "no generic netlink family \"nbd\" and no /dev/nbd0".into()
            } else {
                format!("looking up the generic netlink family \"nbd\" failed: {err}; no /dev/nbd0")
            },
        }),
    }
}

/// Checks for ublk (`/dev/ublk-control`) and io_uring.
pub fn check_ublk_support() -> Result<(), Unsupported> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err(Unsupported {
            frontend: "ublk",
            feature: UBLK_FEATURE,
            detail: "/dev/ublk-control does not exist".into(),
        });
    }
    io_uring::IoUring::new(2)
        .map(drop)
        .map_err(|err| io_uring_unsupported(&err))
}

pub(crate) fn io_uring_unsupported(err: &io::Error) -> Unsupported {
    Unsupported {
        frontend: "ublk",
        feature: IO_URING_FEATURE,
        detail: format!("io_uring_setup failed: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_feature_and_alternative() {
        let err = Unsupported {
            frontend: "ublk",
            feature: UBLK_FEATURE,
            detail: "/dev/ublk-control does not exist".into(),
        };
        let text = err.to_string();
        assert!(text.contains("CONFIG_BLK_DEV_UBLK"), "{text}");
        assert!(text.contains("ublk_drv"), "{text}");
        assert!(text.contains("--frontend disk"), "{text}");
    }
}
