//! The `r3map` command line in the guest, as a user runs it: `r3map serve` and `r3map mount
//! --frontend nbd|ublk [--managed]` as separate processes, the block device used through the
//! kernel, the mount closed by SIGTERM, and the data checked on the server's file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use r3map_core::testing::pattern;

use super::{open_direct, Aligned};

/// The static `r3map` binary in the initramfs (scripts/vm-test puts it there).
const R3MAP: &str = "/bin/r3map";
/// Bounded waits for what the processes print; TCG is slow, so generous.
const WAIT: Duration = Duration::from_secs(60);
const SIZE: usize = 16 << 20;
const MIB: usize = 1 << 20;

/// An `r3map` process whose stderr lines are collected; killed on drop.
pub struct Proc {
    name: String,
    /// `None` once waited for.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub fn start(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(R3MAP)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {R3MAP} {}", args.join(" ")))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: format!("r3map {}", args[0]),
            child: Some(child),
            lines,
            seen: Vec::new(),
        })
    }

    /// The first line containing `needle`, waiting at most [`WAIT`].
    pub fn wait_for(&mut self, needle: &str) -> Result<String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "{} printed no {needle:?} within {WAIT:?}; it said:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// SIGTERM, then the exit status (waiting at most [`WAIT`]) and everything it printed.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        let mut child = self.child.take().expect("not waited for yet");
        let pid = child.id().to_string();
        // The waiter first, so the child is reaped whatever happens next.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let signalled = Command::new("kill").args(["-TERM", &pid]).status();
        if !signalled.as_ref().is_ok_and(|status| status.success()) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            bail!("kill -TERM {pid} failed: {signalled:?}");
        }
        let Ok(status) = rx.recv_timeout(WAIT) else {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            bail!(
                "{} did not exit within {WAIT:?} of SIGTERM; it said:\n{}",
                self.name,
                self.seen.join("\n")
            );
        };
        let status = status?;
        // The stream ends when the process is gone: collect the rest.
        while let Ok(line) = self.lines.recv_timeout(WAIT) {
            self.seen.push(line);
        }
        Ok((status, self.seen.join("\n")))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_file_range(path: &Path, at: usize, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact_at(&mut buf, at as u64)?;
    Ok(buf)
}

/// Whether the kernel still has the device of `path` attached.
fn attached(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default();
    if name.to_string_lossy().starts_with("nbd") {
        // A connected NBD device has a pid (of whoever configured it) in sysfs.
        Path::new("/sys/block").join(name).join("pid").exists()
    } else {
        path.exists()
    }
}

/// `r3map serve` a file, `r3map mount` it with `frontend`, use the device, SIGTERM the mount.
pub fn mount_and_close(frontend: &str, managed: bool) -> Result<()> {
    let kind = if managed { "managed" } else { "direct" };
    let dir = PathBuf::from(format!("/tmp/cli-{frontend}-{kind}"));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.img");
    let seed = if managed { 20 } else { 10 } + frontend.len() as u64;
    let mut expected = pattern(seed, SIZE);
    std::fs::write(&image, &expected)?;

    let mut server = Proc::start(&[
        "serve",
        &format!("disk=file:{}", image.display()),
        "--listen",
        "127.0.0.1:0",
    ])?;
    let line = server.wait_for("serving nbd://")?;
    let uri = line
        .trim_start_matches("serving ")
        .split_whitespace()
        .next()
        .context("no URI in the serve line")?
        .to_string();

    let mut args = vec!["mount", &uri, "--frontend", frontend, "--chunk-size", "256KiB"];
    if managed {
        // Only an fsync or the close can push: the background push is an hour away.
        args.extend(["--managed", "--push-interval", "1h"]);
    }
    let mut mount = Proc::start(&args)?;
    let line = mount.wait_for("mounted ")?;
    let device = PathBuf::from(line.rsplit(" at ").next().unwrap_or_default());
    let prefix = if frontend == "nbd" {
        "/dev/nbd"
    } else {
        "/dev/ublkb"
    };
    ensure!(
        device.to_string_lossy().starts_with(prefix),
        "mounted at {}, not a {prefix}N device: {line}",
        device.display()
    );

    // Reads through the kernel's block device show the server's bytes.
    let file = open_direct(&device)?;
    let mut all = Aligned::new(SIZE);
    file.read_exact_at(all.as_mut(), 0)
        .context("reading the whole device")?;
    ensure!(
        all.as_ref() == expected,
        "the device shows other bytes than the server's file"
    );

    // An fsync'd write is on the server when fsync returns.
    let synced = pattern(seed + 1, MIB);
    file.write_all_at(Aligned::from(&synced).as_ref(), 4 * MIB as u64)?;
    file.sync_all().context("fsync of the device")?;
    ensure!(
        read_file_range(&image, 4 * MIB, MIB)? == synced,
        "fsync returned before the server held the write"
    );
    expected[4 * MIB..5 * MIB].copy_from_slice(&synced);

    // A write left unsynced: a managed mount keeps it in its cache until the close.
    let unsynced = pattern(seed + 2, MIB);
    file.write_all_at(Aligned::from(&unsynced).as_ref(), 9 * MIB as u64)?;
    if managed {
        ensure!(
            read_file_range(&image, 9 * MIB, MIB)? != unsynced,
            "a managed write reached the server before any push"
        );
    }
    expected[9 * MIB..10 * MIB].copy_from_slice(&unsynced);
    drop(file);

    // SIGTERM closes the mount: flush, push, detach, exit 0.
    let (status, said) = mount.terminate()?;
    ensure!(status.success(), "r3map mount exited with {status}:\n{said}");
    ensure!(said.contains("unmounted after"), "no unmount report:\n{said}");
    ensure!(
        !attached(&device),
        "{} is still attached after the mount exited",
        device.display()
    );
    ensure!(
        std::fs::read(&image)? == expected,
        "after the close the server's file does not hold every write"
    );

    let (status, said) = server.terminate()?;
    ensure!(status.success(), "r3map serve exited with {status}:\n{said}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
