//! `r3map mount` against a remote that fails: a server frozen with SIGSTOP (its TCP connections
//! stay open but nothing answers) or killed. Every remote request ends at its deadline, and
//! SIGTERM ends the mount within a stated bound, saying what it could not push.
//!
//! Bounds are measured with the wall clock and asserted with room for a loaded 2-core machine;
//! they stay far below what the failures used to cost (forever).

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, have_fuse, mounted_path, run, serve, Proc};
use r3map_core::testing::pattern;

const LONG: Duration = Duration::from_secs(60);

/// The deadline the mounts in these tests run with.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The CLI's stated shutdown bound: a remote taking no data for --remote-timeout + 5 s.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(2 + 5);

/// Slack for a loaded machine (process start-up, FUSE unmount, the line collector's drain).
const SLACK: Duration = Duration::from_secs(5);

/// Runs `dd` with `args`; returns whether it succeeded, its stderr and how long it took.
fn dd(args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = Command::new("dd").args(args).output().expect("run dd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// SIGSTOP, then waits (bounded) until every thread of the process has stopped: `kill` returns
/// before a running thread notices the signal, and one could still answer a request.
fn freeze(server: &Proc) {
    server.signal("STOP");
    let tasks = format!("/proc/{}/task", server.pid());
    let deadline = Instant::now() + LONG;
    loop {
        let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|task| {
            let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('T'))
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::yield_now();
    }
}

fn all_seen(proc: &Proc) -> String {
    proc.seen.join("\n")
}

/// A direct mount of a server that froze: `dd` reading and writing the file gets EIO within the
/// deadline (not when the server resumes), the loss is logged once with the server's address,
/// and after the server resumes the mount works again on a new connection.
#[test]
fn dd_on_a_frozen_server_fails_with_eio_within_the_deadline_and_the_mount_recovers() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    std::fs::write(&image, pattern(4, 8 << 20)).unwrap();
    let (server, uri) = serve(&format!("disk=file:{}", image.display()), "127.0.0.1:0", &[]);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&["mount", &uri, mnt.to_str().unwrap(), "--remote-timeout", "2s"]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    let input = format!("if={path}");
    let output = format!("of={path}");

    freeze(&server);
    let (ok, stderr, took) = dd(&[&input, "of=/dev/null", "bs=64k", "count=1", "skip=17"]);
    eprintln!("dd read of a frozen server: EIO after {took:?}");
    assert!(!ok && stderr.contains("Input/output error"), "dd read: {stderr}");
    assert!(
        took >= TIMEOUT - Duration::from_millis(100) && took < 2 * TIMEOUT + SLACK,
        "the read of the frozen server failed after {took:?} (deadline {TIMEOUT:?})"
    );
    let (ok, stderr, took) = dd(&[
        "if=/dev/zero",
        &output,
        "bs=64k",
        "count=1",
        "seek=33",
        "conv=notrunc",
    ]);
    eprintln!("dd write to a frozen server: EIO after {took:?}");
    assert!(!ok && stderr.contains("Input/output error"), "dd write: {stderr}");
    assert!(
        took < 2 * TIMEOUT + SLACK,
        "the write to the frozen server failed after {took:?} (deadline {TIMEOUT:?})"
    );

    server.signal("CONT");
    let (ok, stderr, _) = dd(&[&input, "of=/dev/null", "bs=64k", "count=1", "skip=50"]);
    assert!(ok, "the mount did not recover after the server resumed: {stderr}");
    let mut back = vec![0u8; 65536];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, 50 * 65536)
        .unwrap();
    assert_eq!(back[..], pattern(4, 8 << 20)[50 * 65536..51 * 65536]);

    mount.signal("TERM");
    assert!(
        mount.wait_exit(LONG),
        "the mount failed to end after the server resumed"
    );
    let lost: Vec<_> = mount
        .seen
        .iter()
        .filter(|line| line.contains("lost the connection to"))
        .collect();
    assert!(
        !lost.is_empty() && lost.iter().all(|line| line.contains(&uri)),
        "the loss was not logged with the server's address {uri}: {lost:?}"
    );
    assert!(
        lost.len() <= 3,
        "the loss was logged per request, not per connection: {lost:?}"
    );
}

/// Starts a managed mount of `uri` with chunk size 64 KiB, no background push and `extra`
/// flags; returns it and the mounted file's path once everything is pulled.
fn managed_mount(uri: &str, mnt: &std::path::Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "mount",
        uri,
        mnt.to_str().unwrap(),
        "--managed",
        "--chunk-size",
        "64KiB",
        "--push-interval",
        "1h",
    ];
    args.extend_from_slice(extra);
    let mut mount = Proc::start(&args);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    mount.wait_for("pulled:", LONG);
    (mount, path)
}

/// Writes three whole 64 KiB chunks (196608 bytes) at chunk 5.
fn write_three_chunks(path: &str) -> Vec<u8> {
    let data = pattern(8, 3 * 65536);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&data, 5 * 65536).unwrap();
    data
}

/// SIGTERM to a managed mount (in-memory cache) whose server froze: it exits non-zero within
/// the bound and says how much was not pushed, that it is lost, and how to keep it next time.
#[test]
fn sigterm_ends_a_managed_mount_of_a_frozen_server_within_the_bound() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, uri) = serve("disk=memory:4MiB", "127.0.0.1:0", &[]);
    let mnt = dir.path().join("mnt");
    let (mut mount, path) = managed_mount(&uri, &mnt, &["--remote-timeout", "2s"]);
    write_three_chunks(&path);

    freeze(&server);
    let signalled = Instant::now();
    mount.signal("TERM");
    let ok = mount.wait_exit(LONG);
    let took = signalled.elapsed();
    eprintln!("SIGTERM to exit with a frozen server: {took:?}");
    assert!(!ok, "a mount that could not push exited successfully");
    assert!(
        took < SHUTDOWN_BOUND + SLACK,
        "SIGTERM took {took:?} to end the mount (bound {SHUTDOWN_BOUND:?})"
    );
    let said = all_seen(&mount);
    assert!(
        said.contains("(196608 bytes) written through the mount were not pushed to")
            && said.contains("are lost")
            && said.contains("--cache DIR"),
        "no account of the lost writes: {said}"
    );
    assert!(
        std::fs::metadata(&path).is_err(),
        "the file is still mounted after the exit"
    );
    server.signal("CONT");
}

/// The server died: SIGTERM ends the mount within the bound, the unpushed writes are kept in
/// the persistent cache, and the next start (with the server back) pushes them.
#[test]
fn a_dead_server_leaves_the_writes_in_the_persistent_cache_for_the_next_start() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let export = format!("disk=file:{}?size=4MiB", image.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let (server, uri) = serve(&export, &listen, &[]);
    let mnt = dir.path().join("mnt");
    let cache = dir.path().join("cache");
    let cache_flags = ["--cache", cache.to_str().unwrap(), "--remote-timeout", "2s"];
    let (mut mount, path) = managed_mount(&uri, &mnt, &cache_flags);
    let data = write_three_chunks(&path);

    server.kill();
    let signalled = Instant::now();
    mount.signal("TERM");
    let ok = mount.wait_exit(LONG);
    let took = signalled.elapsed();
    eprintln!("SIGTERM to exit with a dead server: {took:?}");
    assert!(!ok, "a mount that could not push exited successfully");
    assert!(
        took < SHUTDOWN_BOUND + SLACK,
        "SIGTERM took {took:?} to end the mount (bound {SHUTDOWN_BOUND:?})"
    );
    let said = all_seen(&mount);
    let kept = format!(
        "(196608 bytes) written through the mount were not pushed to {uri}; they are kept in the cache at {}",
        cache.display()
    );
    assert!(said.contains(&kept), "no account of the kept writes: {said}");
    assert_ne!(
        std::fs::read(&image).unwrap()[5 * 65536..8 * 65536],
        data[..],
        "the writes reached the server although it was dead"
    );

    let (server, _) = serve(&export, &listen, &[]);
    let (mount, _) = managed_mount(&uri, &mnt, &cache_flags);
    assert!(mount.terminate(LONG), "the next start could not push");
    assert!(server.terminate(LONG));
    assert_eq!(
        std::fs::read(&image).unwrap()[5 * 65536..8 * 65536],
        data[..],
        "the next start did not push the writes kept in the cache"
    );
}

/// A second signal while the final push waits for a frozen server (deadline one minute) exits
/// at once, with the same account.
#[test]
fn a_second_signal_exits_at_once_with_the_account() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, uri) = serve("disk=memory:4MiB", "127.0.0.1:0", &[]);
    let mnt = dir.path().join("mnt");
    let (mut mount, path) = managed_mount(&uri, &mnt, &["--remote-timeout", "60s"]);
    write_three_chunks(&path);

    freeze(&server);
    mount.signal("TERM");
    mount.wait_for("unmounting and pushing", LONG);
    let signalled = Instant::now();
    mount.signal("TERM");
    let ok = mount.wait_exit(LONG);
    let took = signalled.elapsed();
    eprintln!("second SIGTERM to exit: {took:?}");
    assert!(!ok);
    assert!(
        took < SLACK,
        "the second signal took {took:?} to end the mount (the deadline was 60 s)"
    );
    let said = all_seen(&mount);
    assert!(
        said.contains("stopped by a second signal")
            && said.contains("(196608 bytes) written through the mount were not pushed to"),
        "no account after the second signal: {said}"
    );
    server.signal("CONT");
}

/// An offline-capable drive (`--sync-to cache`, persistent cache) whose remote is down: an
/// fsync succeeds (the cache holds the writes), then the mount is killed with SIGKILL. After
/// `r3map umount` and a restart on the same cache (the remote back), the writes read back
/// without a fetch and reach the remote.
#[test]
fn fsynced_offline_writes_survive_a_killed_mount_and_reach_the_returned_remote() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let export = format!("disk=file:{}?size=4MiB", image.display());
    let listen = format!("127.0.0.1:{}", free_port());
    let (server, uri) = serve(&export, &listen, &[]);
    let mnt = dir.path().join("mnt");
    let cache = dir.path().join("cache");
    let flags = [
        "--cache",
        cache.to_str().unwrap(),
        "--sync-to",
        "cache",
        "--remote-timeout",
        "2s",
    ];
    let (mount, path) = managed_mount(&uri, &mnt, &flags);

    server.kill();
    // Unaligned, across chunks 5 to 8: partial first and last chunks.
    let data = pattern(9, 200_000);
    let at = 5 * 65536 + 1000;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&data, at).unwrap();
    file.sync_all()
        .expect("fsync with --sync-to cache while the remote is down");
    drop(file);
    mount.kill();
    let on_remote =
        |image: &std::path::Path| std::fs::read(image).unwrap()[at as usize..][..data.len()].to_vec();
    assert_ne!(on_remote(&image), data, "the writes reached the dead remote");
    let (ok, _, stderr) = run(&["umount"]);
    assert!(
        ok && stderr.contains(mnt.to_str().unwrap()),
        "the stale mount was not cleaned up: {stderr}"
    );

    let (server, _) = serve(&export, &listen, &[]);
    let (mount, path) = managed_mount(&uri, &mnt, &flags);
    let pulled = all_seen(&mount);
    assert!(
        pulled.contains("(0 fetched from the remote,"),
        "the restarted mount fetched again: {pulled}"
    );
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, at)
        .unwrap();
    assert_eq!(back, data, "the fsynced writes did not survive the kill");
    assert!(mount.terminate(LONG), "the restarted mount could not push");
    assert!(server.terminate(LONG));
    assert_eq!(
        on_remote(&image),
        data,
        "the fsynced writes never reached the remote"
    );
}
