//! A process that mounted a disk and was killed leaves a dead FUSE mount (and a loop device
//! while anyone still holds it); `find_stale` finds both and `clean` removes them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use r3map_fuse::{clean, find_stale, StaleItem};

/// Kills the helper and removes its leftovers if the test fails half-way.
struct Cleanup {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn stale_mount_of_a_killed_process_is_found_and_cleaned() {
    if !loop_available() {
        return;
    }
    let dir = scratch();
    let mountpoint = subdir(dir.path(), "fuse").canonicalize().unwrap();
    let helper =
        r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "open_disk_and_wait");
    let child = Command::new(helper)
        .arg(&mountpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the helper");
    let mut guard = Cleanup {
        child,
        mountpoint: mountpoint.clone(),
    };
    let stdout = BufReader::new(guard.child.stdout.take().unwrap());
    let device = stdout
        .lines()
        .map(|line| line.expect("helper output"))
        .find_map(|line| line.strip_prefix("READY ").map(PathBuf::from))
        .expect("the helper opened a disk");

    // Someone still uses the device (as a crashed VM's disk would be), so autoclear cannot
    // detach it when the helper dies.
    let holder = std::fs::File::open(&device).unwrap();
    guard.child.kill().unwrap();
    guard.child.wait().unwrap();

    let err = std::fs::File::open(mountpoint.join("disk")).expect_err("the server is gone");
    eprintln!("opening a file of the dead mount: {err}");
    // ENOTCONN; ECONNABORTED when the server used FUSE over io_uring (the teardown of its
    // queues aborts the connection), ECANCELED when the open was being handed to the dying
    // server's ring (seen in about one run of three with io_uring on).
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
        ),
        "{err}"
    );

    let stale: Vec<StaleItem> = find_stale()
        .unwrap()
        .into_iter()
        .filter(|item| match item {
            StaleItem::LoopDevice { backing_file, .. } => backing_file.starts_with(&mountpoint),
            StaleItem::FuseMount { mountpoint: at, .. } => *at == mountpoint,
        })
        .collect();
    assert_eq!(
        stale,
        vec![
            StaleItem::LoopDevice {
                device: device.clone(),
                backing_file: mountpoint.join("disk"),
            },
            StaleItem::FuseMount {
                mountpoint: mountpoint.clone(),
                pid: Some(guard.child.id()),
            },
        ],
        "the loop device comes first, then the mount under it"
    );

    let messages: Vec<String> = stale.iter().map(|item| clean(item).unwrap()).collect();
    assert!(messages[0].contains(device.to_str().unwrap()), "{}", messages[0]);
    assert!(messages[1].contains("unmounted the stale"), "{}", messages[1]);
    assert!(
        !r3map_fuse::stale::r3map_mounts()
            .unwrap()
            .iter()
            .any(|m| m.mountpoint == mountpoint),
        "the mount is gone"
    );

    // The device detaches when its last user closes it.
    drop(holder);
    let number: u32 = device.to_str().unwrap()["/dev/loop".len()..].parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while r3map_fuse::loopdev::backing_file(number).is_some() {
        assert!(Instant::now() < deadline, "{device:?} was never detached");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(find_stale()
        .unwrap()
        .iter()
        .all(|item| !matches!(item, StaleItem::FuseMount { mountpoint: at, .. } if *at == mountpoint)));
}
