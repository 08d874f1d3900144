//! Delta sync benchmark (issue 15): rsync's delta algorithm (an rsync daemon on loopback,
//! `--no-whole-file`, with and without `--fsync`) against `r3map sync`, on one file with a
//! share of its 64 KiB blocks changed at random; time to converge and bytes on the wire, side
//! by side in one run.
//!
//!   cargo build --release -p r3map-cli --bin r3map --example bench_sync
//!   ./target/release/examples/bench_sync [SIZE_MIB] [PERCENT]
//!
//! Three changes, each synced by every contender:
//! 1. "cold": r3map's advertiser and receiver start from nothing (both hash their whole file),
//!    like an rsync run.
//! 2. "following": the file changes (plain writes) under an advertiser and a receiver that
//!    already run, which is what `r3map sync` is for; the advertiser learns of it from inotify
//!    and hashes the whole file again.
//! 3. "mapped": this program advertises the file itself through `r3map_sync::MappedSource`,
//!    writes the change through the mapping and calls `sync()`, which hashes only the blocks
//!    written; the receiver is the same `r3map sync receive` process kind.
//!
//! rsync has no following mode, so its rows are full runs after each change. rsync writes a new
//! file and renames it without fsync unless `--fsync`; r3map fsyncs every version. Before each
//! timed run the filesystem is flushed (`sync -f`, so no run pays for the previous one's
//! writeback) and the source and that contender's replica are read once, so all start with
//! them in the page cache.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const BLOCK: u64 = 64 * 1024;

struct Row {
    name: String,
    time: Duration,
    bytes: u64,
    /// The rsync rows of the same change (without, with --fsync).
    rsync: (Duration, Duration),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).map_or(1024, |a| a.parse().expect("SIZE_MIB"));
    let percent: f64 = args.get(2).map_or(1.0, |a| a.parse().expect("PERCENT"));
    let r3map = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("r3map");
    assert!(
        r3map.exists(),
        "build the r3map binary first ({})",
        r3map.display()
    );
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap();
    let size = size_mib << 20;
    let blocks = size / BLOCK;
    let changed = ((blocks as f64) * percent / 100.0).round().max(1.0) as u64;
    let source = dir.path().join("src/disk.img");
    let ours = dir.path().join("r3map/disk.img");
    let theirs = dir.path().join("rsync/disk.img");
    let theirs_fsync = dir.path().join("rsync/disk-fsync.img");
    for path in [&source, &ours, &theirs] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    }
    write_random(&source, size, 1);
    for copy in [&ours, &theirs, &theirs_fsync] {
        std::fs::copy(&source, copy).unwrap();
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let changed_bytes = changed * BLOCK;
    eprintln!("{size_mib} MiB, {changed} of {blocks} blocks changed ({changed_bytes} bytes)");
    let daemon = RsyncDaemon::start(dir.path());
    // The second rsync run after a change finds the source in the page cache: which variant
    // goes first alternates between changes.
    let rsync_both = |rows: &mut Vec<Row>, change: &str, fsync_first: bool| {
        let plain_run = || {
            warm(&[&source, &theirs]);
            let run = daemon.sync(&source, "disk.img", false);
            assert_same(&source, &theirs);
            run
        };
        let fsync_run = || {
            warm(&[&source, &theirs_fsync]);
            let run = daemon.sync(&source, "disk-fsync.img", true);
            assert_same(&source, &theirs_fsync);
            run
        };
        let ((plain, plain_bytes), (fsync, fsync_bytes)) = if fsync_first {
            let fsync = fsync_run();
            (plain_run(), fsync)
        } else {
            let plain = plain_run();
            (plain, fsync_run())
        };
        let times = (plain, fsync);
        rows.push(Row {
            name: format!("rsync, {change}"),
            time: plain,
            bytes: plain_bytes,
            rsync: times,
        });
        rows.push(Row {
            name: format!("rsync --fsync, {change}"),
            time: fsync,
            bytes: fsync_bytes,
            rsync: times,
        });
        times
    };
    let mut rows = Vec::new();

    // Change 1, cold: from starting the advertiser to the receiver's exit.
    change_blocks(&source, blocks, changed, &mut rng);
    let rsync = rsync_both(&mut rows, "change 1", false);
    warm(&[&source, &ours]);
    let start = Instant::now();
    let mut advertiser = Lines::spawn(
        &r3map,
        &[
            "sync",
            "advertise",
            source.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let addr = advertiser.address("listening on");
    let out = Command::new(&r3map)
        .args([
            "sync",
            "receive",
            ours.to_str().unwrap(),
            "--from",
            &addr,
            "--once",
        ])
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("published "))
        .expect("no published line");
    eprintln!("{line}");
    rows.push(Row {
        name: "r3map cold (advertiser start + receive --once)".into(),
        time: elapsed,
        bytes: wire_bytes(line),
        rsync,
    });
    assert_same(&source, &ours);

    // Change 2, following: both sides running; the file is written again.
    let mut receiver = Lines::spawn(
        &r3map,
        &["sync", "receive", ours.to_str().unwrap(), "--from", &addr],
    );
    receiver.wait_for("up to date");
    warm(&[&source, &ours]);
    change_blocks(&source, blocks, changed, &mut rng);
    let start = Instant::now();
    let (elapsed, bytes) = converge(&mut receiver, &source, start);
    assert_same(&source, &ours);
    let rsync = rsync_both(&mut rows, "change 2", true);
    rows.push(Row {
        name: "r3map following, plain writer (inotify → published)".into(),
        time: elapsed,
        bytes,
        rsync,
    });
    drop(receiver);
    drop(advertiser);

    // Change 3, mapped: this process advertises the file it maps and writes.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let log: r3map_sync::Log = Arc::new(|_| {});
    let config = r3map_sync::source::SourceConfig {
        path: source.clone(),
        name: "disk.img".into(),
        block_size: BLOCK as u32,
        threads: 2,
        timeout: Duration::from_secs(30),
    };
    let mut mapped = runtime
        .block_on(r3map_sync::MappedSource::open(config, log))
        .expect("cannot map the file with write tracking");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    runtime.spawn(mapped.source().clone().listen(listener, None, Vec::new()));
    let mut receiver = Lines::spawn(
        &r3map,
        &["sync", "receive", ours.to_str().unwrap(), "--from", &addr],
    );
    receiver.wait_for("up to date");
    warm(&[&source, &ours]);
    let start = Instant::now();
    for block in choose(blocks, changed, &mut rng) {
        let at = (block * BLOCK) as usize;
        rng.fill(&mut mapped.data()[at..at + BLOCK as usize]);
    }
    let report = mapped.sync().unwrap();
    assert_eq!(report.blocks.len() as u64, changed);
    let (elapsed, bytes) = converge(&mut receiver, &source, start);
    assert_same(&source, &ours);
    let rsync = rsync_both(&mut rows, "change 3", false);
    rows.push(Row {
        name: "r3map mapped (writes + sync() → published)".into(),
        time: elapsed,
        bytes,
        rsync,
    });
    drop(receiver);
    drop(mapped);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap();

    println!("**r3map sync vs rsync --no-whole-file (daemon on loopback), {size_mib} MiB, {changed} of {blocks} 64 KiB blocks changed ({percent}%) per change**\n");
    println!("| case | time to converge | vs rsync | vs rsync --fsync | bytes on the wire | bytes vs changed bytes |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {:.2} s | {:.2} | {:.2} | {} | {:.3} |",
            row.name,
            row.time.as_secs_f64(),
            row.time.as_secs_f64() / row.rsync.0.as_secs_f64(),
            row.time.as_secs_f64() / row.rsync.1.as_secs_f64(),
            row.bytes,
            row.bytes as f64 / changed_bytes as f64
        );
    }
    println!(
        "\nload average before: {}, after: {}",
        load_before.trim(),
        load_after.trim()
    );
}

/// Waits until `receiver` published the version `source` holds now: a hash pass may see the
/// writes half done and publish an intermediate version first, so converged is when the final
/// one is published and every round's bytes count. Returns the time since `start` and the
/// bytes.
fn converge(receiver: &mut Lines, source: &Path, start: Instant) -> (Duration, u64) {
    let file = std::fs::File::open(source).unwrap();
    let version = r3map_sync::source::hex8(
        &r3map_sync::BlockHashes::of_file(&file, BLOCK as u32, 2)
            .unwrap()
            .digest(),
    );
    let mut bytes = 0;
    loop {
        let (at, line) = receiver.wait_for_timed("published ");
        bytes += wire_bytes(&line);
        if line.contains(&format!("version {version} ")) {
            eprintln!("{line}");
            return (at - start, bytes);
        }
    }
}

fn write_random(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let file = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0;
    while at < size {
        let n = buf.len().min((size - at) as usize);
        rng.fill(&mut buf[..n]);
        file.write_all_at(&buf[..n], at).unwrap();
        at += n as u64;
    }
}

/// Flushes the filesystem, then reads `paths` whole, so every contender starts with nothing
/// left to write back and its files in the page cache (other programs on a loaded machine
/// evict them between runs).
fn warm(paths: &[&Path]) {
    // Writeback a previous run left behind (rsync without --fsync leaves its whole new file
    // dirty) is done first, untimed, so it does not land in the next contender's time.
    let status = Command::new("sync").arg("-f").arg(paths[0]).status().unwrap();
    assert!(status.success(), "sync -f failed");
    let mut buf = vec![0u8; 8 << 20];
    for path in paths {
        let mut file = std::fs::File::open(path).unwrap();
        while read_full(&mut file, &mut buf) > 0 {}
    }
}

/// `count` distinct random block indices, ascending.
fn choose(blocks: u64, count: u64, rng: &mut rand::rngs::SmallRng) -> std::collections::BTreeSet<u64> {
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.gen_range(0..blocks));
    }
    chosen
}

/// Overwrites `count` distinct random blocks with random bytes, in one open-write-close.
fn change_blocks(path: &Path, blocks: u64, count: u64, rng: &mut rand::rngs::SmallRng) {
    let chosen = choose(blocks, count, rng);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut data = vec![0u8; BLOCK as usize];
    for block in chosen {
        rng.fill(&mut data[..]);
        file.write_all_at(&data, block * BLOCK).unwrap();
    }
}

fn assert_same(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert!(
            n == m && ba[..n] == bb[..m],
            "{} and {} differ",
            a.display(),
            b.display()
        );
        if n == 0 {
            return;
        }
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

fn wire_bytes(line: &str) -> u64 {
    let head = &line[..line
        .find(" bytes on the wire")
        .unwrap_or_else(|| panic!("{line}"))];
    head.rsplit(' ').next().unwrap().parse().unwrap()
}

/// An `rsync --daemon` on loopback serving a writable module at DIR/rsync.
struct RsyncDaemon {
    child: Child,
    port: u16,
}

impl RsyncDaemon {
    fn start(dir: &Path) -> Self {
        let conf = dir.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = false\nuid = root\ngid = root\n[m]\npath = {}\nread only = false\n",
                dir.join("rsync").display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("rsync")
            .args([
                "--daemon",
                "--no-detach",
                "--address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--config",
            ])
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .expect("rsync is not installed (scripts/install-test-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the rsync daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    /// Syncs `source` to the module's `name`, with `--fsync` if `fsync`; returns the time and
    /// bytes sent + received.
    fn sync(&self, source: &Path, name: &str, fsync: bool) -> (Duration, u64) {
        let start = Instant::now();
        let out = Command::new("rsync")
            // --ignore-times: a change within the mtime's granularity must not be skipped.
            .args(["--no-whole-file", "--ignore-times", "--stats"])
            .args(fsync.then_some("--fsync"))
            .arg(source)
            .arg(format!("rsync://127.0.0.1:{}/m/{name}", self.port))
            .output()
            .unwrap();
        let elapsed = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rsync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stat = |name: &str| -> u64 {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {stdout}"));
            line[name.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .replace(',', "")
                .parse()
                .unwrap()
        };
        (elapsed, stat("Total bytes sent:") + stat("Total bytes received:"))
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process whose stderr lines are collected; killed on drop.
struct Lines {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Lines {
    fn spawn(program: &PathBuf, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_timed(needle).1
    }

    /// The next line containing `needle`, with the time it was read.
    fn wait_for_timed(&mut self, needle: &str) -> (Instant, String) {
        loop {
            let (at, line) = self
                .lines
                .recv_timeout(Duration::from_secs(600))
                .expect("the process went quiet");
            if line.contains(needle) {
                return (at, line);
            }
        }
    }

    fn address(&mut self, prefix: &str) -> String {
        let line = self.wait_for(prefix);
        line.split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap()
            .to_string()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
