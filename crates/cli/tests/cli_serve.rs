//! `r3map serve` as a separate process: a real NBD server that `r3map mirror`, qemu and the
//! shutdown signal all work with.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `r3map serve`; killed on drop if a test fails before stopping it.
struct Serve {
    child: Child,
    uri: String,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Serve {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_r3map"))
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start r3map serve");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut serve = Self {
            child,
            uri: String::new(),
            stderr,
        };
        let mut line = String::new();
        loop {
            line.clear();
            // On failure `serve` is dropped, which kills and reaps the child.
            assert!(
                serve.stderr.read_line(&mut line).unwrap() > 0,
                "r3map serve exited before serving"
            );
            if let Some(rest) = line.strip_prefix("serving ") {
                serve.uri = rest.split_whitespace().next().unwrap().to_string();
                return serve;
            }
        }
    }

    /// Sends SIGTERM and returns (exit success, the rest of stderr).
    fn stop(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        for line in (&mut self.stderr).lines() {
            rest.push_str(&line.unwrap());
            rest.push('\n');
        }
        (status.success(), rest)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_a_file_mirror_it_with_writes_and_stop_with_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let spec = format!("disk=file:{}?size=6MiB", image.display());
    let server = Serve::start(&[&spec]);
    assert!(
        server.uri.starts_with("nbd://127.0.0.1:") && server.uri.ends_with("/disk"),
        "{}",
        server.uri
    );

    let output = Command::new(env!("CARGO_BIN_EXE_r3map"))
        .args([
            "mirror",
            "--remote",
            &server.uri,
            "--chunk-size",
            "256KiB",
            "--write-percent",
            "25",
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
        stdout.contains("verified remote and local view are identical"),
        "{stdout}"
    );

    let (ok, rest) = server.stop();
    assert!(ok, "r3map serve failed to stop cleanly: {rest}");
    assert!(rest.contains("flushed every export"), "{rest}");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len(), 6 << 20);
    assert!(
        bytes.iter().any(|&b| b != 0),
        "the mirrored writes never reached the served file"
    );
}

#[test]
fn read_only_exports_refuse_writes_from_qemu() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        r3map_core::testing::skip("qemu-io is not installed (scripts/install-test-deps installs it)");
        return;
    }
    let server = Serve::start(&["ro=memory:1MiB", "--read-only"]);
    let read = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0 0 64k", &server.uri])
        .output()
        .unwrap();
    assert!(
        read.status.success() && !String::from_utf8_lossy(&read.stdout).contains("fail"),
        "{read:?}"
    );
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &server.uri])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&write.stdout),
        String::from_utf8_lossy(&write.stderr)
    );
    assert!(
        !write.status.success()
            || said.contains("ermission")
            || said.contains("read-only")
            || said.contains("Read-only"),
        "{said}"
    );
    let (ok, _) = server.stop();
    assert!(ok);
}

#[test]
fn bad_exports_are_explained() {
    let output = Command::new(env!("CARGO_BIN_EXE_r3map"))
        .args(["serve", "x=tape:/dev/st0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown backend kind"));
}
