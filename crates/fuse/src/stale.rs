//! Finding and cleaning what a crashed r3map process left behind: FUSE mounts whose server is
//! gone (every access fails with "Transport endpoint is not connected") and loop devices bound
//! to a file on such a mount.
//!
//! Our mounts have the filesystem type `fuse.r3map` and the source `r3map-<pid>` (see
//! [`crate::file::SOURCE_PREFIX`]). A mount is stale when that process no longer exists or no
//! longer holds `/dev/fuse` open (so a reused pid is not mistaken for the server).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{FuseError, Result};
use crate::file::{SOURCE_PREFIX, SUBTYPE};
use crate::loopdev;

/// One line of /proc/self/mountinfo (the fields used here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.r3map` or `ext4`.
    pub fstype: String,
    /// Mount source, e.g. `r3map-1234` or `/dev/loop3`.
    pub source: String,
}

/// An r3map FUSE mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R3mapMount {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The process that serves (or served) it, from the mount source.
    pub pid: Option<u32>,
    /// Whether that process still serves it.
    pub alive: bool,
}

/// Something a crashed run left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleItem {
    /// A loop device bound to a file on a stale r3map mount.
    LoopDevice {
        /// `/dev/loopN`.
        device: PathBuf,
        /// The file it is bound to.
        backing_file: PathBuf,
    },
    /// An r3map FUSE mount whose server is gone.
    FuseMount {
        /// Where it is mounted.
        mountpoint: PathBuf,
        /// The process that served it.
        pid: Option<u32>,
    },
}

impl std::fmt::Display for StaleItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleItem::LoopDevice { device, backing_file } => write!(
                f,
                "loop device {} bound to {}",
                device.display(),
                backing_file.display()
            ),
            StaleItem::FuseMount { mountpoint, pid } => {
                write!(f, "r3map FUSE mount at {}", mountpoint.display())?;
                if let Some(pid) = pid {
                    write!(f, " (its server, process {pid}, is gone)")?;
                }
                Ok(())
            }
        }
    }
}

/// Undoes the octal escapes of mountinfo fields (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|digits| digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let (b'\\', Some(value)) = (bytes[i], octal) {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let source = right.next()?;
            Some(MountInfo {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// Every mount of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountInfo>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| FuseError::Inspect {
        path: path.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Whether process `pid` exists and holds `/dev/fuse` open.
fn serves_fuse(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target == Path::new("/dev/fuse"))
}

/// Every r3map FUSE mount, live or stale.
pub fn r3map_mounts() -> Result<Vec<R3mapMount>> {
    let fstype = format!("fuse.{SUBTYPE}");
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.fstype == fstype || (m.fstype == "fuse" && m.source.starts_with(SOURCE_PREFIX)))
        .map(|m| {
            let pid = m
                .source
                .strip_prefix(SOURCE_PREFIX)
                .and_then(|pid| pid.parse().ok());
            R3mapMount {
                mountpoint: m.mountpoint,
                pid,
                alive: pid.is_some_and(serves_fuse),
            }
        })
        .collect())
}

/// The stale r3map mounts and the loop devices bound to files on them, loop devices first
/// (they have to go before the mounts under them).
pub fn find_stale() -> Result<Vec<StaleItem>> {
    let dead: Vec<R3mapMount> = r3map_mounts()?.into_iter().filter(|m| !m.alive).collect();
    let mut items: Vec<StaleItem> = loopdev::bound_devices()
        .into_iter()
        .filter(|(_, backing)| dead.iter().any(|m| backing.starts_with(&m.mountpoint)))
        .map(|(number, backing_file)| StaleItem::LoopDevice {
            device: PathBuf::from(format!("/dev/loop{number}")),
            backing_file,
        })
        .collect();
    items.extend(dead.into_iter().map(|m| StaleItem::FuseMount {
        mountpoint: m.mountpoint,
        pid: m.pid,
    }));
    Ok(items)
}

/// Cleans one stale item and says what was done: a loop device is detached (at once, or when
/// its last user closes it), a FUSE mount is detached lazily (processes that still hold files
/// on it keep them until they close them; their I/O fails). A loop device with a filesystem
/// mounted on it is left alone and reported as busy.
pub fn clean(item: &StaleItem) -> Result<String> {
    match item {
        StaleItem::LoopDevice { device, backing_file } => {
            let name = device.display().to_string();
            let busy = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(device);
            if let Err(err) = &busy {
                if err.raw_os_error() == Some(libc::EBUSY) {
                    let holder = crate::stale::mounts()
                        .ok()
                        .and_then(|all| all.into_iter().find(|m| Path::new(&m.source) == device.as_path()))
                        .map_or("another program holds it exclusively".into(), |m| {
                            format!("it is mounted at {}; unmount that first", m.mountpoint.display())
                        });
                    return Err(FuseError::Busy {
                        path: device.clone(),
                        holder,
                    });
                }
            }
            drop(busy);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .open(device)
                .map_err(|source| FuseError::Loop {
                    device: name.clone(),
                    op: "open",
                    source,
                })?;
            match crate::sys::loop_clr_fd(&file) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENXIO) => {}
                Err(source) => {
                    return Err(FuseError::Loop {
                        device: name,
                        op: "LOOP_CLR_FD",
                        source,
                    })
                }
            }
            drop(file);
            let number = name.trim_start_matches("/dev/loop").parse().unwrap_or(u32::MAX);
            if loopdev::backing_file(number).is_some() {
                Ok(format!(
                    "{name} (bound to {}) will be detached when the programs that still have it open close it",
                    backing_file.display()
                ))
            } else {
                Ok(format!(
                    "detached {name} (was bound to {})",
                    backing_file.display()
                ))
            }
        }
        StaleItem::FuseMount { mountpoint, .. } => {
            nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(|errno| {
                FuseError::Unmount {
                    mountpoint: mountpoint.clone(),
                    source: errno.into(),
                }
            })?;
            Ok(format!("unmounted the stale {item}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines_with_escapes() {
        let text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 25 0:50 / /var/tmp/my\\040mount rw,nosuid,nodev - fuse.r3map r3map-1234 rw,user_id=0\n\
                    garbage\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts,
            vec![
                MountInfo {
                    mountpoint: "/mnt1".into(),
                    fstype: "ext3".into(),
                    source: "/dev/root".into()
                },
                MountInfo {
                    mountpoint: "/var/tmp/my mount".into(),
                    fstype: "fuse.r3map".into(),
                    source: "r3map-1234".into()
                },
            ]
        );
    }

    #[test]
    fn unescape_keeps_plain_backslashes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\x"), "a\\x");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
