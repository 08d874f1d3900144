//! `r3map serve` as a separate process: a real NBD server that `r3map mirror`, qemu and the
//! shutdown signal all work with.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run, serve};

const LONG: Duration = Duration::from_secs(60);

#[test]
fn serve_a_file_mirror_it_with_writes_and_stop_with_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let before = r3map_core::testing::pattern(5, 6 << 20);
    std::fs::write(&image, &before).unwrap();
    let (mut server, uri) = serve(&format!("disk=file:{}", image.display()), "127.0.0.1:0", &[]);
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/disk"),
        "{uri}"
    );

    let (ok, stdout, stderr) = run(&[
        "mirror",
        "--remote",
        &uri,
        "--chunk-size",
        "256KiB",
        "--write-percent",
        "25",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("verified remote and local view are identical"),
        "{stdout}"
    );

    server.signal("TERM");
    server.wait_for("flushed every export", LONG);
    assert!(server.terminate(LONG), "r3map serve failed to stop cleanly");
    common::assert_holds_the_mirrored_content(&image, &stdout, &before);
}

#[test]
fn read_only_exports_refuse_writes_from_qemu() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        r3map_core::testing::skip("qemu-io is not installed (scripts/install-test-deps installs it)");
        return;
    }
    let (mut server, uri) = serve("ro=memory:1MiB", "127.0.0.1:0", &["--read-only"]);
    let read = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0 0 64k", &uri])
        .output()
        .unwrap();
    assert!(
        read.status.success() && !String::from_utf8_lossy(&read.stdout).contains("fail"),
        "{read:?}"
    );
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &uri])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&write.stdout),
        String::from_utf8_lossy(&write.stderr)
    );
    assert!(
        said.contains("ermission") || said.contains("ead-only"),
        "a write to a read-only export was not refused: {said}"
    );
    server.signal("TERM");
    server.wait_for("flushed every export", LONG);
}

#[test]
fn bad_exports_are_explained() {
    let (ok, _, stderr) = run(&["serve", "x=tape:/dev/st0"]);
    assert!(!ok);
    assert!(stderr.contains("unknown backend kind"), "{stderr}");
}
