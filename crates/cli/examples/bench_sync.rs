//! Delta sync benchmark (issue 15): rsync's delta algorithm (an rsync daemon on loopback,
//! `--no-whole-file`) against `r3map sync`, on one file with a share of its 64 KiB blocks
//! changed at random; time to converge and bytes on the wire, side by side in one run.
//!
//!   cargo build -p r3map-cli && cargo run -p r3map-cli --example bench_sync -- [SIZE_MIB] [PERCENT]
//!
//! Cases: "cold" starts r3map's advertiser and receiver from nothing (both hash their whole
//! file), like an rsync run; "following" changes the file under an advertiser and a receiver
//! that already run, which is what `r3map sync` is for (rsync has no such mode, so its row
//! is the same full run again).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const BLOCK: u64 = 64 * 1024;

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
    for path in [&source, &ours, &theirs] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    }
    write_random(&source, size, 1);
    std::fs::copy(&source, &ours).unwrap();
    std::fs::copy(&source, &theirs).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    change_blocks(&source, blocks, changed, &mut rng);
    let changed_bytes = changed * BLOCK;
    eprintln!("{size_mib} MiB, {changed} of {blocks} blocks changed ({changed_bytes} bytes)");

    let daemon = RsyncDaemon::start(dir.path());
    let (rsync_cold, rsync_cold_bytes) = daemon.sync(&source);
    assert_same(&source, &theirs);

    // r3map cold: from starting the advertiser to the receiver's exit.
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
    let ours_cold = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ours_cold_bytes = wire_bytes(
        stderr
            .lines()
            .find(|l| l.starts_with("published "))
            .expect("no published line"),
    );
    assert_same(&source, &ours);

    // Following: both sides running; the file changes again.
    let mut receiver = Lines::spawn(
        &r3map,
        &["sync", "receive", ours.to_str().unwrap(), "--from", &addr],
    );
    receiver.wait_for("up to date");
    change_blocks(&source, blocks, changed, &mut rng);
    let start = Instant::now();
    // A hash pass may see the writes half done and publish an intermediate version first:
    // converged is when the final version is published; every round's bytes count.
    let file = std::fs::File::open(&source).unwrap();
    let version = r3map_sync::source::hex8(
        &r3map_sync::BlockHashes::of_file(&file, BLOCK as u32, 2)
            .unwrap()
            .digest(),
    );
    let mut ours_follow_bytes = 0;
    let ours_follow = loop {
        let (at, line) = receiver.wait_for_timed("published ");
        ours_follow_bytes += wire_bytes(&line);
        if line.contains(&format!("version {version} ")) {
            break at - start;
        }
    };
    assert_same(&source, &ours);
    let (rsync_again, rsync_again_bytes) = daemon.sync(&source);
    assert_same(&source, &theirs);
    drop(receiver);
    drop(advertiser);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap();

    println!("**r3map sync vs rsync --no-whole-file (daemon on loopback), {size_mib} MiB, {changed} of {blocks} 64 KiB blocks changed ({percent}%)**\n");
    println!("| case | time to converge | time vs rsync | bytes on the wire | bytes vs changed bytes |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, time: Duration, rsync: Duration, bytes: u64| {
        println!(
            "| {name} | {:.2} s | {:.2} | {bytes} | {:.3} |",
            time.as_secs_f64(),
            time.as_secs_f64() / rsync.as_secs_f64(),
            bytes as f64 / changed_bytes as f64
        );
    };
    row("rsync, first change", rsync_cold, rsync_cold, rsync_cold_bytes);
    row(
        "r3map cold (advertiser start + receive --once)",
        ours_cold,
        rsync_cold,
        ours_cold_bytes,
    );
    row(
        "rsync, second change",
        rsync_again,
        rsync_again,
        rsync_again_bytes,
    );
    row(
        "r3map following (change event → published)",
        ours_follow,
        rsync_again,
        ours_follow_bytes,
    );
    println!(
        "\nload average before: {}, after: {}",
        load_before.trim(),
        load_after.trim()
    );
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

/// Overwrites `count` distinct random blocks with random bytes, in one open-write-close.
fn change_blocks(path: &Path, blocks: u64, count: u64, rng: &mut rand::rngs::SmallRng) {
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.gen_range(0..blocks));
    }
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

    /// Syncs `source` to the module's disk.img; returns the time and bytes sent + received.
    fn sync(&self, source: &Path) -> (Duration, u64) {
        let start = Instant::now();
        let out = Command::new("rsync")
            .args(["--no-whole-file", "--stats"])
            .arg(source)
            .arg(format!("rsync://127.0.0.1:{}/m/disk.img", self.port))
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
