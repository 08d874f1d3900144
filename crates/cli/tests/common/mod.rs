//! Running `r3map` processes in tests and following what they print.

#![allow(dead_code)]

pub mod stores;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A background `r3map` process whose stdout and stderr lines are collected (each stream in
/// order; the two streams interleaved as they arrive); killed on drop.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn start(args: &[&str]) -> Self {
        Self::start_program(env!("CARGO_BIN_EXE_r3map"), args)
    }

    /// Any program (e.g. an example, or `ip netns exec NS r3map …`), followed the same way.
    pub fn start_program(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the program");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        forward_lines(stdout, tx.clone());
        forward_lines(stderr, tx);
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "no line with {needle:?} within {timeout:?} (exit status: {status:?}); saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Like [`Proc::wait_for`], but also accepts a line already seen: for a line on the other
    /// stream than the last one waited for, whose order relative to it is unknown.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        match self.seen.iter().find(|line| line.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_for(needle, timeout),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then waits (bounded) for the exit; returns whether it succeeded.
    pub fn terminate(mut self, timeout: Duration) -> bool {
        self.signal("TERM");
        self.wait_exit(timeout)
    }

    /// Waits (bounded) for the process to exit by itself; returns whether it succeeded.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                if !status.success() {
                    eprintln!(
                        "the process exited with {status}; it said:\n{}",
                        self.seen.join("\n")
                    );
                }
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {timeout:?}; saw:\n{}",
                self.seen.join("\n")
            );
            // Polling the exit status (not synchronisation: the deadline above bounds it).
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.seen.push(line);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(stream: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `r3map` to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_r3map"))
        .args(args)
        .output()
        .expect("run r3map");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Starts `r3map serve` with one export and `extra` flags; returns the process and its URI.
pub fn serve(export: &str, listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve", export, "--listen", listen];
    args.extend_from_slice(extra);
    let mut server = Proc::start(&args);
    // "serving nbd://…", or nbds:// with TLS.
    let line = server.wait_for("serving nbd", Duration::from_secs(20));
    let uri = line
        .trim_start_matches("serving ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (server, uri)
}

/// The CRC-32 that `r3map mirror` reports for the content it verified on both sides ("verified
/// remote and local view are identical (crc32 XXXXXXXX)").
pub fn mirror_checksum(stdout: &str) -> u32 {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("verified remote and local view are identical"))
        .unwrap_or_else(|| panic!("mirror did not verify: {stdout}"));
    let hex = line
        .rsplit("crc32 ")
        .next()
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no checksum in {line:?}"));
    u32::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("bad checksum in {line:?}"))
}

/// Checks that the file a mirror's remote wrote to holds what the mirror verified: the same
/// CRC-32, with the writes (the content differs from what it held before).
pub fn assert_holds_the_mirrored_content(path: &std::path::Path, stdout: &str, before: &[u8]) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), before.len(), "the remote file changed size");
    assert_eq!(
        crc32fast::hash(&bytes),
        mirror_checksum(stdout),
        "the remote file does not hold the content the mirror verified"
    );
    assert!(
        bytes != before,
        "the mirrored writes never reached the remote file"
    );
}

/// The address a process reports on a line with `marker` ("seeding … at grpc://ADDR" →
/// `grpc://ADDR`), waiting up to `timeout` for that line.
pub fn reported_address(proc: &mut Proc, marker: &str, timeout: Duration) -> String {
    let line = proc.wait_for(marker, timeout);
    line.rsplit(" at ").next().unwrap().trim().to_string()
}

/// A `r3map delay-proxy` in front of the seeder at `uri` (`grpc://HOST:PORT`), capped at
/// `rate` per second; returns the proxy and the `HOST:PORT` a leecher connects to.
pub fn slow_link(uri: &str, rate: &str) -> (Proc, String) {
    let upstream = uri.trim_start_matches("grpc://");
    let mut proxy = Proc::start(&[
        "delay-proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--rtt",
        "0ms",
        "--rate",
        rate,
    ]);
    let line = proxy.wait_for("127.0.0.1:", Duration::from_secs(120));
    let address = line
        .split_whitespace()
        .find(|word| word.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in the proxy's line {line:?}"))
        .to_string();
    (proxy, address)
}

/// The path a `mount` process reported ("mounted … at PATH").
pub fn mounted_path(line: &str) -> String {
    line.rsplit(" at ").next().unwrap().to_string()
}

/// True if `tool` runs (`tool VERSION_ARG`, e.g. `--version`); otherwise records the skip.
pub fn have_tool(tool: &str, version_arg: &str) -> bool {
    let found = Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        r3map_core::testing::skip(&format!(
            "{tool} is not installed (scripts/install-test-deps installs it)"
        ));
    }
    found
}

/// Whether this kernel gives the slice frontend what `r3map mount --frontend slice` asks for
/// (userfaultfd with UFFDIO_POISON; skips the test with the missing feature named if not).
pub fn have_userfaultfd() -> bool {
    let options = r3map_frontends::slice::RegionOptions::default();
    if let Err(err) = r3map_frontends::slice::probe(&options, false) {
        r3map_core::testing::skip(&format!("userfaultfd is unavailable here: {err}"));
        return false;
    }
    true
}

/// Whether this machine can run FUSE and loop devices (skips the test with a reason if not).
pub fn have_fuse() -> bool {
    if !std::path::Path::new("/dev/fuse").exists() {
        r3map_core::testing::skip("/dev/fuse is missing: this kernel or container has no FUSE");
        return false;
    }
    true
}
