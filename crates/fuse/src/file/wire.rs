//! The FUSE wire format (`<linux/fuse.h>`) of the requests the io_uring queues answer: the
//! fixed argument structs the kernel puts in an entry's `op_in` area and the reply structs
//! written to its payload. (The classic transport uses fuser's codec.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

pub(super) const LOOKUP: u32 = 1;
pub(super) const GETATTR: u32 = 3;
pub(super) const SETATTR: u32 = 4;
pub(super) const MKNOD: u32 = 8;
pub(super) const MKDIR: u32 = 9;
pub(super) const UNLINK: u32 = 10;
pub(super) const OPEN: u32 = 14;
pub(super) const READ: u32 = 15;
pub(super) const WRITE: u32 = 16;
pub(super) const STATFS: u32 = 17;
pub(super) const RELEASE: u32 = 18;
pub(super) const FSYNC: u32 = 20;
pub(super) const FLUSH: u32 = 25;
pub(super) const OPENDIR: u32 = 27;
pub(super) const READDIR: u32 = 28;
pub(super) const RELEASEDIR: u32 = 29;
pub(super) const FSYNCDIR: u32 = 30;
pub(super) const CREATE: u32 = 35;
pub(super) const DESTROY: u32 = 38;
pub(super) const FALLOCATE: u32 = 43;

/// `fuse_setattr_in.valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;

pub(super) const ATTR_OUT_SIZE: usize = 104;
pub(super) const ENTRY_OUT_SIZE: usize = 128;
pub(super) const OPEN_OUT_SIZE: usize = 16;
pub(super) const WRITE_OUT_SIZE: usize = 8;
pub(super) const STATFS_OUT_SIZE: usize = 80;
const ATTR_SIZE: usize = 88;
const DIRENT_HEADER: usize = 24;

pub(super) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

pub(super) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

fn put_u32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(out: &mut [u8], at: usize, value: u64) {
    out[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub(super) struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
}

impl InHeader {
    pub(super) fn parse(bytes: &[u8; 40]) -> Self {
        Self {
            opcode: u32_at(bytes, 4),
            unique: u64_at(bytes, 8),
            nodeid: u64_at(bytes, 16),
            uid: u32_at(bytes, 24),
        }
    }
}

/// The SETATTR changes (`struct fuse_setattr_in`).
pub(super) fn setattr_changes(op_in: &[u8]) -> super::core::AttrChanges {
    let valid = u32_at(op_in, 0);
    let time = |secs_at: usize, nsecs_at: usize, now: u32| {
        if valid & now != 0 {
            fuser::TimeOrNow::Now
        } else {
            let at =
                UNIX_EPOCH + Duration::new(u64_at(op_in, secs_at), u32_at(op_in, nsecs_at).min(999_999_999));
            fuser::TimeOrNow::SpecificTime(at)
        }
    };
    super::core::AttrChanges {
        mode: (valid & FATTR_MODE != 0).then(|| u32_at(op_in, 68)),
        uid: (valid & FATTR_UID != 0).then(|| u32_at(op_in, 76)),
        gid: (valid & FATTR_GID != 0).then(|| u32_at(op_in, 80)),
        size: (valid & FATTR_SIZE != 0).then(|| u64_at(op_in, 16)),
        atime: (valid & FATTR_ATIME != 0).then(|| time(32, 56, FATTR_ATIME_NOW)),
        mtime: (valid & FATTR_MTIME != 0).then(|| time(40, 60, FATTR_MTIME_NOW)),
    }
}

fn split_time(t: SystemTime) -> (u64, u32) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs(), since.subsec_nanos())
}

/// `struct fuse_attr` at `out[..88]`.
fn put_attr(out: &mut [u8], attr: &FileAttr) {
    let kind = match attr.kind {
        FileType::Directory => libc::S_IFDIR,
        _ => libc::S_IFREG,
    };
    let (atime, atime_ns) = split_time(attr.atime);
    let (mtime, mtime_ns) = split_time(attr.mtime);
    let (ctime, ctime_ns) = split_time(attr.ctime);
    put_u64(out, 0, attr.ino.0);
    put_u64(out, 8, attr.size);
    put_u64(out, 16, attr.blocks);
    put_u64(out, 24, atime);
    put_u64(out, 32, mtime);
    put_u64(out, 40, ctime);
    put_u32(out, 48, atime_ns);
    put_u32(out, 52, mtime_ns);
    put_u32(out, 56, ctime_ns);
    put_u32(out, 60, kind | u32::from(attr.perm));
    put_u32(out, 64, attr.nlink);
    put_u32(out, 68, attr.uid);
    put_u32(out, 72, attr.gid);
    put_u32(out, 76, attr.rdev);
    put_u32(out, 80, attr.blksize);
    put_u32(out, 84, 0);
}

/// `struct fuse_attr_out`; returns its size.
pub(super) fn attr_out(out: &mut [u8], attr: &FileAttr, ttl: Duration) -> usize {
    out[..ATTR_OUT_SIZE].fill(0);
    put_u64(out, 0, ttl.as_secs());
    put_u32(out, 8, ttl.subsec_nanos());
    put_attr(&mut out[16..16 + ATTR_SIZE], attr);
    ATTR_OUT_SIZE
}

/// `struct fuse_entry_out`; returns its size.
pub(super) fn entry_out(out: &mut [u8], attr: &FileAttr, ttl: Duration) -> usize {
    out[..ENTRY_OUT_SIZE].fill(0);
    put_u64(out, 0, attr.ino.0);
    put_u64(out, 16, ttl.as_secs());
    put_u64(out, 24, ttl.as_secs());
    put_u32(out, 32, ttl.subsec_nanos());
    put_u32(out, 36, ttl.subsec_nanos());
    put_attr(&mut out[40..40 + ATTR_SIZE], attr);
    ENTRY_OUT_SIZE
}

/// `struct fuse_open_out` with file handle 0; returns its size.
pub(super) fn open_out(out: &mut [u8], open_flags: u32) -> usize {
    out[..OPEN_OUT_SIZE].fill(0);
    put_u32(out, 8, open_flags);
    OPEN_OUT_SIZE
}

/// `struct fuse_write_out`; returns its size.
pub(super) fn write_out(out: &mut [u8], written: u32) -> usize {
    out[..WRITE_OUT_SIZE].fill(0);
    put_u32(out, 0, written);
    WRITE_OUT_SIZE
}

/// `struct fuse_statfs_out` of a filesystem of `blocks` blocks of `block_size`, none free.
pub(super) fn statfs_out(out: &mut [u8], blocks: u64, block_size: u32) -> usize {
    out[..STATFS_OUT_SIZE].fill(0);
    put_u64(out, 0, blocks);
    put_u64(out, 24, 1);
    put_u32(out, 40, block_size);
    put_u32(out, 44, 255);
    put_u32(out, 48, block_size);
    STATFS_OUT_SIZE
}

/// Appends `struct fuse_dirent` records from `entries` (starting after directory offset
/// `offset`) while they fit in `max` bytes of `out`; returns the bytes written.
pub(super) fn dirents(
    out: &mut [u8],
    max: usize,
    offset: u64,
    entries: &[(fuser::INodeNo, FileType, &std::ffi::OsStr)],
) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let max = max.min(out.len());
    let mut used = 0;
    for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
        let name = name.as_bytes();
        let record = (DIRENT_HEADER + name.len()).next_multiple_of(8);
        if used + record > max {
            break;
        }
        let at = &mut out[used..used + record];
        at.fill(0);
        put_u64(at, 0, ino.0);
        put_u64(at, 8, index as u64 + 1);
        put_u32(at, 16, name.len() as u32);
        put_u32(
            at,
            20,
            if *kind == FileType::Directory {
                u32::from(libc::DT_DIR)
            } else {
                u32::from(libc::DT_REG)
            },
        );
        at[DIRENT_HEADER..DIRENT_HEADER + name.len()].copy_from_slice(name);
        used += record;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setattr_reads_the_fields_at_their_kernel_offsets() {
        let mut op_in = [0u8; 128];
        put_u32(
            &mut op_in,
            0,
            FATTR_SIZE | FATTR_MTIME | FATTR_ATIME | FATTR_ATIME_NOW,
        );
        put_u64(&mut op_in, 16, 4096);
        put_u64(&mut op_in, 40, 1000);
        put_u32(&mut op_in, 60, 5);
        let changes = setattr_changes(&op_in);
        assert_eq!(changes.size, Some(4096));
        assert!(changes.mode.is_none() && changes.uid.is_none() && changes.gid.is_none());
        assert!(matches!(changes.atime, Some(fuser::TimeOrNow::Now)));
        assert!(
            matches!(changes.mtime, Some(fuser::TimeOrNow::SpecificTime(t)) if t == UNIX_EPOCH + Duration::new(1000, 5))
        );
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_stop_when_full() {
        let names = [
            (fuser::INodeNo(1), FileType::Directory, std::ffi::OsStr::new(".")),
            (fuser::INodeNo(1), FileType::Directory, std::ffi::OsStr::new("..")),
            (
                fuser::INodeNo(2),
                FileType::RegularFile,
                std::ffi::OsStr::new("data"),
            ),
        ];
        let mut out = [0u8; 256];
        assert_eq!(dirents(&mut out, 256, 0, &names), 32 * 3);
        assert_eq!(u64_at(&out, 64), 2, "the file's inode");
        assert_eq!(u64_at(&out, 72), 3, "its offset is the next entry's index");
        assert_eq!(&out[64 + 24..64 + 28], b"data");
        assert_eq!(dirents(&mut out, 40, 0, &names), 32, "only what fits");
        assert_eq!(
            dirents(&mut out, 256, 3, &names),
            0,
            "nothing after the last entry"
        );
    }
}
