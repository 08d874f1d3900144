//! `r3map mount` across processes: a server in one process, the mount in another, real FUSE,
//! real loop devices, real kills.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, have_fuse, mounted_path, run, serve, Proc};
use r3map_core::testing::pattern;

const LONG: Duration = Duration::from_secs(60);

/// The demo as a user runs it, and its claim checked from outside: after it unmounted, another
/// NBD client reads the demo's writes from the demo's server.
#[test]
fn the_demo_mounts_reads_writes_pushes_and_verifies() {
    if !have_fuse() {
        return;
    }
    let mut demo = Proc::start(&["mount", "--keep-serving"]);
    demo.wait_for("unmounted after", LONG);
    let line = demo.wait_for("demo: still serving", LONG);
    let uri = line
        .trim_start_matches("demo: still serving ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // What it reports (stdout) came before; the order across the two streams is unknown.
    demo.wait_for_line("demo: read 256.00 MiB through the kernel", LONG);
    demo.wait_for_line("pushed and verified on the server", LONG);
    // The demo writes bytes i % 251 over 16 MiB at 100 MiB (crates/cli/src/commands/mount.rs).
    let (offset, len) = (100u64 << 20, 16usize << 20);
    let on_server = read_from_server(&uri, offset - 4096, len + 8192);
    let expected: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    assert!(
        on_server[4096..4096 + len] == expected[..],
        "the demo's server does not hold its writes"
    );
    // Around the writes the demo data is untouched (not the pattern).
    assert_ne!(&on_server[..4096], &expected[len - 4096..]);
    assert!(demo.terminate(LONG), "the demo did not stop cleanly");
}

/// Reads `len` bytes at `offset` from an NBD server with our client, in its own runtime.
fn read_from_server(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    use r3map_core::Backend;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = r3map_nbd::Client::connect(uri, Default::default())
            .await
            .expect("connect to the server");
        let mut buf = vec![0u8; len];
        client
            .read_at(offset, &mut buf)
            .await
            .expect("read from the server");
        buf
    })
}

/// serve → managed disk mount → mkfs + files → unmount → a new mount process → files intact.
#[test]
fn ext4_on_a_managed_disk_mount_survives_unmount_and_remount() {
    if !have_fuse() {
        return;
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        r3map_core::testing::skip("mkfs.ext4 is not installed (e2fsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let (server, uri) = serve(
        &format!("disk=file:{}?size=64MiB", image.display()),
        "127.0.0.1:0",
        &[],
    );
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("file{i}"), pattern(i, 300_000 + i as usize * 7)))
        .collect();

    for round in 0..2 {
        let mnt = dir.path().join(format!("mnt{round}"));
        let mnt_s = mnt.to_str().unwrap();
        let mut mount = Proc::start(&[
            "mount",
            &uri,
            mnt_s,
            "--managed",
            "--frontend",
            "disk",
            "--chunk-size",
            "256KiB",
        ]);
        let device = mounted_path(&mount.wait_for("mounted ", LONG));
        assert!(device.starts_with("/dev/loop"), "{device}");
        if round == 0 {
            let mkfs = Command::new("mkfs.ext4")
                .args(["-q", "-F", &device])
                .output()
                .unwrap();
            assert!(mkfs.status.success(), "{mkfs:?}");
        }
        let ok = Command::new("mount")
            .args([&device, fs_dir.to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting ext4 on {device} failed");
        for (name, data) in &files {
            let path = fs_dir.join(name);
            if round == 0 {
                std::fs::write(&path, data).unwrap();
            } else {
                assert_eq!(
                    &std::fs::read(&path).unwrap(),
                    data,
                    "{name} changed across the remount"
                );
            }
        }
        assert!(Command::new("umount").arg(&fs_dir).status().unwrap().success());
        assert!(
            mount.terminate(LONG),
            "the mount process failed to unmount and push"
        );
    }
    assert!(server.terminate(LONG));
}

/// `fsync` on a managed mount is an acknowledgement: the server holds the bytes when it returns
/// (the background push is an hour away, so only the fsync can have pushed them). Then the server
/// dies (SIGKILL) while the mount keeps running; writes keep landing locally and reach the
/// restarted server; nothing acknowledged is lost.
#[test]
fn a_killed_and_restarted_server_loses_no_acknowledged_write() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let export = format!("disk=file:{}?size=16MiB", image.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let (server, uri) = serve(&export, &listen, &[]);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        mnt.to_str().unwrap(),
        "--managed",
        "--chunk-size",
        "64KiB",
        "--push-interval",
        "1h",
        // A write that waited for the dead server would hang the test (and nextest's per-test
        // timeout would name it) instead of failing after a timeout.
        "--remote-timeout",
        "1h",
    ]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    mount.wait_for("pulled:", LONG);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let before = pattern(1, 200_000);
    file.write_all_at(&before, 1_000_000).unwrap();
    assert!(
        std::fs::read(&image).unwrap()[1_000_000..1_200_000] != before[..],
        "the write reached the server before any push"
    );
    file.sync_all().unwrap(); // acknowledged: the server holds it now
    assert_eq!(
        &std::fs::read(&image).unwrap()[1_000_000..1_200_000],
        &before[..],
        "fsync returned before the server held the write"
    );

    server.kill();
    let during = pattern(2, 300_000);
    // Lands in the local cache while no server runs (it would hang if it waited for one).
    file.write_all_at(&during, 5_000_000).unwrap();
    let mut back = vec![0u8; during.len()];
    file.read_exact_at(&mut back, 5_000_000).unwrap();
    assert_eq!(
        back, during,
        "local reads stopped working while the server was down"
    );

    let (server, _) = serve(&export, &listen, &[]);
    drop(file);
    assert!(
        mount.terminate(LONG),
        "the mount could not push after the server came back"
    );
    assert!(server.terminate(LONG));
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(
        &bytes[1_000_000..1_200_000],
        &before[..],
        "the acknowledged write was lost"
    );
    assert_eq!(
        &bytes[5_000_000..5_300_000],
        &during[..],
        "the write made during the outage was lost"
    );
}

/// The mounting process is killed; `r3map umount` cleans up; a new process on the same cache
/// downloads nothing again and pushes what the dead one had not.
#[test]
fn a_restarted_mount_on_its_cache_does_not_download_again_and_pushes() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    // Data in every chunk: a never-written image is all holes, which the pull skips.
    let original = pattern(8, 8 << 20);
    std::fs::write(&image, &original).unwrap();
    let (server, uri) = serve(
        &format!("disk=file:{}?size=8MiB", image.display()),
        "127.0.0.1:0",
        &[],
    );
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("mnt");
    let args = |cache: &str, mnt: &str| -> Vec<String> {
        [
            "mount",
            &uri,
            mnt,
            "--managed",
            "--cache",
            cache,
            "--chunk-size",
            "64KiB",
            "--push-interval",
            "1h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let first_args = args(cache.to_str().unwrap(), mnt.to_str().unwrap());
    let mut first = Proc::start(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    let path = mounted_path(&first.wait_for("mounted ", LONG));
    let pulled = first.wait_for("pulled:", LONG);
    assert!(
        pulled.contains("(128 fetched from the remote, 0 skipped as holes)"),
        "{pulled}"
    );
    let data = pattern(3, 100_000);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&data, 3_000_000).unwrap(); // in the cache, not pushed (interval 1h)
    drop(file);
    first.kill();
    assert!(
        std::fs::read(&image).unwrap()[3_000_000..3_100_000] == original[3_000_000..3_100_000],
        "pushed before the kill?"
    );

    let (ok, _, stderr) = run(&["umount"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(mnt.to_str().unwrap()),
        "the stale mount was not reported: {stderr}"
    );

    let mut second = Proc::start(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    second.wait_for("mounted ", LONG);
    let pulled = second.wait_for("pulled:", LONG);
    assert!(
        pulled.contains("(0 fetched from the remote, 0 skipped as holes)"),
        "the restarted mount downloaded again: {pulled}"
    );
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, 3_000_000)
        .unwrap();
    assert_eq!(back, data);
    assert!(second.terminate(LONG));
    assert!(server.terminate(LONG));
    assert_eq!(
        &std::fs::read(&image).unwrap()[3_000_000..3_100_000],
        &data[..],
        "the unpushed write never reached the server"
    );
}

/// A direct mount whose server stays down: a read fails with EIO after the timeout, not never.
#[test]
fn reads_fail_with_eio_after_the_timeout_when_the_remote_stays_down() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, uri) = serve("disk=memory:4MiB", "127.0.0.1:0", &[]);
    let mnt = dir.path().join("mnt");
    let mount = {
        let mut mount = Proc::start(&["mount", &uri, mnt.to_str().unwrap(), "--remote-timeout", "1s"]);
        let path = mounted_path(&mount.wait_for("mounted ", LONG));
        (mount, path)
    };
    server.kill();
    let started = Instant::now();
    let file = std::fs::File::open(&mount.1).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact_at(&mut buf, 1 << 20).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    // Not before the timeout (timers never fire early); that it returned at all shows it does
    // not wait forever.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    drop(file);
    // It cannot flush to a dead remote: the first signal tries once, then it exits with an
    // error that says nothing is held locally, and the mount is gone.
    let (mut mount, path) = mount;
    mount.signal("TERM");
    assert!(!mount.wait_exit(LONG), "giving up must be reported as a failure");
    let said = mount.seen.join("\n");
    assert!(
        said.contains("gave up unmounting cleanly") && said.contains("direct mount: nothing is held locally"),
        "{said}"
    );
    assert!(
        std::fs::metadata(&path).is_err(),
        "the mount is still there after giving up"
    );
}

/// Where the kernel lacks NBD or ublk, the frontend is refused up front with the missing kernel
/// feature named and the FUSE + loop alternative suggested (the guest VM test covers kernels
/// that have them).
#[test]
fn kernel_block_device_frontends_name_what_the_kernel_lacks() {
    let mut checked = 0;
    for (frontend, supported, feature) in [
        (
            "nbd",
            r3map_blockdev::check_nbd_support().is_ok(),
            "CONFIG_BLK_DEV_NBD",
        ),
        (
            "ublk",
            r3map_blockdev::check_ublk_support().is_ok(),
            "CONFIG_BLK_DEV_UBLK",
        ),
    ] {
        if supported {
            continue;
        }
        checked += 1;
        let (ok, _, stderr) = run(&["mount", "--frontend", frontend]);
        assert!(!ok);
        assert!(
            stderr.contains(feature) && stderr.contains("--frontend disk"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("demo: serving"),
            "it did work before refusing: {stderr}"
        );
    }
    if checked == 0 {
        r3map_core::testing::skip("this kernel has both NBD and ublk; the refusal cannot be shown here");
    }
}

/// `--frontend slice`: an unmodified program hands r3map its userfaultfd; its memory shows the
/// remote's bytes, and its writes reach the server after it asks for a sync.
#[test]
fn the_slice_frontend_serves_another_programs_memory() {
    if !common::have_userfaultfd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let content = pattern(9, 2 << 20);
    std::fs::write(&image, &content).unwrap();
    let (server, uri) = serve(&format!("disk=file:{}", image.display()), "127.0.0.1:0", &[]);
    let socket = dir.path().join("r3map.sock");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        socket.to_str().unwrap(),
        "--frontend",
        "slice",
        "--managed",
        "--chunk-size",
        "256KiB",
    ]);
    mount.wait_for("mounted ", LONG);

    let client =
        r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "slice_client");
    let output = Command::new(&client)
        .args([
            socket.to_str().unwrap(),
            &(2usize << 20).to_string(),
            "1000000=hello from a program",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("crc32 {:08x}", crc32fast::hash(&content))),
        "the program saw other bytes: {stdout}"
    );
    assert!(stdout.contains("synced"), "{stdout}");

    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
    assert_eq!(
        &std::fs::read(&image).unwrap()[1_000_000..1_000_020],
        b"hello from a program"
    );
}

/// `--frontend slice` stopped by SIGTERM writes back what a connected program changed but never
/// synced, and stops serving it: a page the program never touched then raises SIGBUS there
/// instead of reading as zeros.
#[test]
fn a_stopped_slice_mount_writes_back_unsynced_changes_and_never_serves_zeros() {
    if !common::have_userfaultfd() {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let content = pattern(11, 4 << 20);
    std::fs::write(&image, &content).unwrap();
    let (server, uri) = serve(&format!("disk=file:{}", image.display()), "127.0.0.1:0", &[]);
    let socket = dir.path().join("r3map.sock");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        socket.to_str().unwrap(),
        "--frontend",
        "slice",
        "--managed",
        "--chunk-size",
        "256KiB",
        "--push-interval",
        "1h",
    ]);
    mount.wait_for("mounted ", LONG);
    let client =
        r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "slice_client");
    let untouched = 3 << 20;
    let mut program = Command::new(&client)
        .args([
            socket.to_str().unwrap(),
            &(4usize << 20).to_string(),
            &format!("--hold={untouched}"),
            "1000000=never synced by the program",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(program.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "written");
    mount.signal("TERM");
    assert!(mount.wait_exit(LONG), "the mount did not exit cleanly");
    let said = mount.seen.join("\n");
    assert!(
        said.contains("wrote back") && said.contains("since its last sync"),
        "{said}"
    );
    assert!(server.terminate(LONG));
    let on_remote = std::fs::read(&image).unwrap();
    let text = b"never synced by the program";
    assert_eq!(&on_remote[1_000_000..1_000_000 + text.len()], text);
    assert_eq!(&on_remote[..1_000_000], &content[..1_000_000]);
    let status = program.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGBUS as i32),
        "the program read an unserved page without SIGBUS: {status} {rest:?}"
    );
}

/// Go: opening a mount hung forever when the connection failed. Here it fails at once and says
/// why: a refused connection is not retried for the remote timeout (an hour here, so retrying
/// would hang the test until nextest's per-test timeout names it).
#[test]
fn mounting_an_unreachable_remote_fails_at_once_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("nbd://127.0.0.1:{}/x", free_port());
    let (ok, _, stderr) = run(&[
        "mount",
        &uri,
        dir.path().join("mnt").to_str().unwrap(),
        "--remote-timeout",
        "1h",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to NBD server") && stderr.contains("refused"),
        "{stderr}"
    );
}

/// `r3map umount TARGET` asks the running mount to flush, push and unmount, and waits for it.
#[test]
fn umount_of_a_running_mount_waits_for_it_to_finish() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, uri) = serve("disk=memory:4MiB", "127.0.0.1:0", &[]);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&["mount", &uri, mnt.to_str().unwrap(), "--managed"]);
    mount.wait_for("mounted ", LONG);
    let (ok, _, stderr) = run(&["umount", mnt.to_str().unwrap()]);
    assert!(ok && stderr.contains("flushed and pushed"), "{stderr}");
    mount.wait_for("unmounted after", LONG);
    assert!(
        mount.terminate(LONG),
        "the mount process did not exit cleanly after umount"
    );
    let (ok, _, stderr) = run(&["umount", mnt.to_str().unwrap()]);
    assert!(!ok && stderr.contains("is not an r3map mount"), "{stderr}");
    assert!(server.terminate(LONG));
}

/// Kibibytes locked in RAM by a process (VmLck in /proc/PID/status).
fn locked_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmLck:"))
        .expect("VmLck in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `--mlock` (for a mount that backs swap): the mount process's pages stay in RAM, the ones it
/// had before and the buffers it uses while serving; without it nothing is locked.
#[test]
fn mlock_keeps_the_mount_process_in_ram() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let (server, uri) = serve(
        &format!("swap=file:{}?size=8MiB", image.display()),
        "127.0.0.1:0",
        &[],
    );
    for mlock in [false, true] {
        let mnt = dir.path().join(format!("mnt-{mlock}"));
        let mut args = vec!["mount", &uri, mnt.to_str().unwrap(), "--chunk-size", "4KiB"];
        if mlock {
            args.push("--mlock");
        }
        let mut mount = Proc::start(&args);
        let path = mounted_path(&mount.wait_for("mounted ", LONG));
        let data = pattern(3, 4 << 20);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&data, 0).unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "read back differs (mlock {mlock})");
        drop(file);
        let locked = locked_kib(mount.pid());
        if mlock {
            // At least the binary's text it ran and the runtime's memory: megabytes.
            assert!(locked >= 1024, "--mlock locked only {locked} KiB");
        } else {
            assert_eq!(locked, 0, "{locked} KiB locked without --mlock");
        }
        assert!(mount.terminate(LONG), "the mount did not stop cleanly");
    }
    assert!(server.terminate(LONG));
}
