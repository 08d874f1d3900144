//! The path frontend: a loop device over the FUSE file, formatted with ext4, mounted, written,
//! remounted after dropping caches, and reopened over the same backend.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use r3map_core::testing::pattern;
use r3map_core::{MemoryBackend, SharedBackend};
use r3map_fuse::{DiskMount, FuseError};

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An ext4 mount that is unmounted (lazily, as a last resort) when dropped.
struct Ext4 {
    at: PathBuf,
    mounted: bool,
}

impl Ext4 {
    fn mount(device: &Path, at: &Path, read_only: bool) -> Self {
        let device = device.to_str().unwrap();
        let at_str = at.to_str().unwrap();
        let options = if read_only { "ro" } else { "rw" };
        run("mount", &["-t", "ext4", "-o", options, device, at_str]);
        Self {
            at: at.to_path_buf(),
            mounted: true,
        }
    }
    fn unmount(&mut self) {
        run("umount", &[self.at.to_str().unwrap()]);
        self.mounted = false;
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.at, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop caches");
}

fn verify(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, content) in files {
        let back = std::fs::read(dir.join(name)).expect(name);
        assert!(back == *content, "{name} has the content written before");
    }
}

#[test]
fn ext4_on_the_loop_device_survives_remount_and_reopen() {
    if !loop_available() || !tool_available("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let dir = scratch();
    let (fuse_dir, ext4_dir) = (subdir(dir.path(), "fuse"), subdir(dir.path(), "ext4"));
    let rt = runtime();
    let backend: SharedBackend = Arc::new(MemoryBackend::new(64 << 20));
    let mut disk =
        DiskMount::open(backend.clone(), &fuse_dir, "disk", rt.handle().clone()).expect("open the disk");
    let device = disk.path().to_path_buf();
    assert!(device.to_str().unwrap().starts_with("/dev/loop"), "{device:?}");
    assert_eq!(
        r3map_fuse::loopdev::backing_file(disk.device().number()).as_deref(),
        Some(disk.file().path()),
        "the loop device is bound to the FUSE file"
    );

    let flags = disk.device().status_flags().unwrap();
    assert_ne!(flags & r3map_fuse::loopdev::FLAG_AUTOCLEAR, 0, "autoclear is set");
    assert_eq!(
        flags & r3map_fuse::loopdev::FLAG_DIRECT_IO != 0,
        disk.device().direct_io(),
        "sysfs and the ioctl agree on direct I/O"
    );

    run("mkfs.ext4", &["-q", "-F", device.to_str().unwrap()]);
    let files = [
        ("small.txt", b"hello from r3map\n".to_vec()),
        ("one-mib.bin", pattern(1, 1 << 20)),
        ("odd.bin", pattern(2, 3 * (1 << 20) + 777)),
    ];
    let mut ext4 = Ext4::mount(&device, &ext4_dir, false);
    for (name, content) in &files {
        std::fs::write(ext4_dir.join(name), content).unwrap();
    }

    // Busy: a filesystem is mounted on the device. Nothing is detached or lost.
    let busy = disk.close_blocking().expect_err("ext4 is mounted on the device");
    let message = busy.to_string();
    assert!(matches!(busy, FuseError::Busy { .. }), "{busy:?}");
    assert!(
        message.contains(ext4_dir.to_str().unwrap()),
        "names the mountpoint: {message}"
    );
    verify(&ext4_dir, &files);

    ext4.unmount();
    drop_caches();
    let mut ext4 = Ext4::mount(&device, &ext4_dir, false);
    verify(&ext4_dir, &files);
    ext4.unmount();
    run("e2fsck", &["-f", "-n", device.to_str().unwrap()]);

    disk.close_blocking().expect("close once unmounted");
    assert!(
        !r3map_fuse::loopdev::bound_devices()
            .iter()
            .any(|(_, backing)| backing.starts_with(&fuse_dir)),
        "the loop device is detached"
    );

    // Everything is in the backend: a new disk over it shows the same files.
    drop_caches();
    let mut again =
        DiskMount::open(backend.clone(), &fuse_dir, "disk", rt.handle().clone()).expect("reopen the disk");
    let mut ext4 = Ext4::mount(again.path(), &ext4_dir, true);
    verify(&ext4_dir, &files);
    ext4.unmount();
    rt.block_on(again.close()).expect("async close");
    assert!(!again.file().is_mounted());
}
