//! The processes of a recipe (`r3map serve`, `r3map mount`), followed line by line and stopped
//! with SIGTERM, bounded in time; and one-shot tools (mkfs, mount, sqlite3, ffprobe).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The r3map binary: `--r3map PATH`, else the one built next to this example.
pub fn r3map_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/usecases -> target/<profile>/r3map
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("r3map"))
        .context("cannot locate the r3map binary")?;
    ensure!(
        path.exists(),
        "{} is missing: build it (cargo build -p r3map-cli) or pass --r3map PATH",
        path.display()
    );
    Ok(path)
}

/// A running process whose stdout and stderr lines are collected; killed on drop.
pub struct Running {
    name: String,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(program: &Path, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            name: format!("{} {}", program.display(), args.join(" ")),
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits (bounded) for a line containing `needle`, also among the lines seen already.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "`{}` printed no line with {needle:?} within {timeout:?}; it said:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether a line containing `needle` has been printed so far (without waiting).
    pub fn has_said(&mut self, needle: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.iter().any(|l| l.contains(needle))
    }

    /// SIGTERM, then waits (bounded) for a successful exit.
    pub fn terminate(mut self, timeout: Duration) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                ensure!(
                    status.success(),
                    "`{}` exited with {status}:\n{}",
                    self.name,
                    self.seen.join("\n")
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "`{}` did not exit within {timeout:?}",
                self.name
            );
            // Polls the exit status; the deadline above bounds it.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.seen.push(line);
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool to completion; returns its stdout, or an error with its stderr.
pub fn tool(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (scripts/install-test-deps installs it)"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The URI `r3map serve` printed ("serving nbd://…").
pub fn served_uri(line: &str) -> Result<String> {
    line.trim_start_matches("serving ")
        .split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no URI in {line:?}"))
}

/// The path `r3map mount` printed ("mounted … at PATH").
pub fn mounted_path(line: &str) -> String {
    line.rsplit(" at ").next().unwrap_or_default().to_string()
}

/// Unmounts a filesystem when dropped (lazily, ignoring "not mounted"), so a failed recipe
/// leaves no filesystem on a device whose mount process is about to be killed. Declare it after
/// the mount process, so that it drops first.
pub struct UnmountOnDrop<'a>(pub &'a Path);

impl Drop for UnmountOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.0)
            .stderr(Stdio::null())
            .status();
    }
}
