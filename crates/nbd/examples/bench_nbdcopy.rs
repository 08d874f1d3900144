//! nbdcopy throughput of our server against nbdkit serving the same kind of backend.
//!
//! ```text
//! cargo run --release -p r3map-nbd --example bench_nbdcopy -- [SIZE_MIB] [RUNS]
//! ```
//!
//! For each backend (memory, file) and transport (TCP loopback, UNIX socket) it starts our
//! server (in this process) and `nbdkit` (`memory` / `file` plugin), then times
//! `nbdcopy SOURCE URI` (write) and `nbdcopy URI null:` (read) of SIZE MiB of random data,
//! alternating between the two servers, keeping the best of RUNS, and prints a markdown table with the ratio ours/nbdkit (higher is
//! better for us), and the CPU time each server process spent per GiB over all runs (with its
//! ratio nbdkit/ours: the figure a loaded machine disturbs least). Needs `nbdkit` and `nbdcopy`
//! (Debian: nbdkit, libnbd-bin).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_backends::{FileBackend, FileOptions};
use r3map_core::{MemoryBackend, SharedBackend};
use r3map_nbd::{Export, Server, ServerConfig};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    File,
}

#[derive(Clone, Copy, PartialEq)]
enum Net {
    Tcp,
    Unix,
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdcopy(args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new("nbdcopy").args(args).status().expect("nbdcopy runs");
    assert!(status.success(), "nbdcopy {args:?} failed");
    start.elapsed()
}

/// CPU time (user + system, all threads, live and exited) process `pid` has used so far, from
/// `/proc/PID/stat` (in USER_HZ ticks, 100 a second on Linux).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which is in parentheses and may hold spaces): state is
    // field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Per server: best (write, read) times over `runs`, and the CPU time the server process
/// (`pids`) used over all runs of each direction. The servers take turns within every run, so a
/// burst of load on the machine hits both rather than one, and which one goes first alternates
/// between runs (the one after the other may find the page cache or the CPU caches in a
/// different state). CPU time is the figure a loaded machine disturbs least: it is what the
/// server spends, whatever share of the CPUs the scheduler gives it.
fn measure(uris: [&str; 2], pids: [u32; 2], source: &Path, runs: usize) -> [[(Duration, Duration); 2]; 2] {
    let source = source.to_str().unwrap();
    let mut best = [[(Duration::MAX, Duration::ZERO); 2]; 2];
    let timed = |slot: &mut (Duration, Duration), pid: u32, args: &[&str]| {
        let before = cpu_time(pid);
        slot.0 = slot.0.min(nbdcopy(args));
        slot.1 += cpu_time(pid) - before;
    };
    for run in 0..runs {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            timed(&mut best[i][0], pids[i], &[source, uris[i]]);
        }
        for i in order {
            timed(&mut best[i][1], pids[i], &[uris[i], "null:"]);
        }
    }
    best
}

fn wait_for_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nbdkit did not listen on {port}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nbdkit(kind: Kind, net: Net, size: u64, dir: &Path) -> (Killed, String) {
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f").stdout(Stdio::null());
    let socket = dir.join("kit.sock");
    let _ = std::fs::remove_file(&socket);
    let port = free_port();
    let uri = match net {
        Net::Tcp => {
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            format!("nbd://127.0.0.1:{port}/")
        }
        Net::Unix => {
            cmd.arg("-U").arg(&socket);
            format!("nbd+unix:///?socket={}", socket.display())
        }
    };
    match kind {
        Kind::Memory => {
            cmd.args(["memory", &size.to_string()]);
        }
        Kind::File => {
            let file = dir.join("kit.img");
            std::fs::File::create(&file).unwrap().set_len(size).unwrap();
            cmd.arg("file").arg(&file);
        }
    }
    let child = Killed(cmd.spawn().expect("nbdkit runs"));
    match net {
        Net::Tcp => wait_for_port(port),
        Net::Unix => {
            while !socket.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    (child, uri)
}

fn our_backend(kind: Kind, size: u64, dir: &Path) -> SharedBackend {
    match kind {
        Kind::Memory => Arc::new(MemoryBackend::new(size)),
        Kind::File => {
            let file = dir.join("ours.img");
            let _ = std::fs::remove_file(&file);
            Arc::new(FileBackend::create(&file, size, FileOptions::new()).unwrap())
        }
    }
}

fn mib_s(size: u64, time: Duration) -> f64 {
    size as f64 / (1 << 20) as f64 / time.as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let runs: usize = args.next().map_or(2, |s| s.parse().expect("RUNS"));
    let size = size_mib << 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source: PathBuf = dir.path().join("source.raw");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&source).unwrap());
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            for word in block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            out.write_all(&block).unwrap();
        }
    }
    println!("| backend | transport | direction | r3map MiB/s | nbdkit MiB/s | ratio | r3map CPU ms/GiB | nbdkit CPU ms/GiB | CPU ratio |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    for kind in [Kind::Memory, Kind::File] {
        for net in [Net::Tcp, Net::Unix] {
            // Ours.
            let backend = our_backend(kind, size, dir.path());
            let socket = dir.path().join("ours.sock");
            let _ = std::fs::remove_file(&socket);
            let config = ServerConfig::new(vec![Export::new("", backend)]);
            let server = runtime
                .block_on(async {
                    match net {
                        Net::Tcp => Server::bind_tcp(config, "127.0.0.1:0").await,
                        Net::Unix => Server::bind_unix(config, &socket).await,
                    }
                })
                .unwrap();
            let uri = server.uri("");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = runtime.spawn(server.serve(async move {
                let _ = stopped.await;
            }));
            let (kit, kit_uri) = start_nbdkit(kind, net, size, dir.path());
            let pids = [std::process::id(), kit.0.id()];
            let [ours, theirs] = measure([&uri, &kit_uri], pids, &source, runs);
            drop(kit);
            let _ = stop.send(());
            runtime.block_on(task).unwrap().unwrap();
            let kind_name = if kind == Kind::Memory { "memory" } else { "file" };
            let net_name = if net == Net::Tcp { "TCP" } else { "UNIX" };
            // CPU per GiB copied, over all runs.
            let per_gib = |cpu: Duration| {
                cpu.as_secs_f64() * 1000.0 / (runs as f64 * size as f64 / (1u64 << 30) as f64)
            };
            for (direction, ours, theirs) in [("write", ours[0], theirs[0]), ("read", ours[1], theirs[1])] {
                println!(
                    "| {kind_name} | {net_name} | {direction} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
                    mib_s(size, ours.0),
                    mib_s(size, theirs.0),
                    theirs.0.as_secs_f64() / ours.0.as_secs_f64(),
                    per_gib(ours.1),
                    per_gib(theirs.1),
                    theirs.1.as_secs_f64() / ours.1.as_secs_f64().max(1e-9)
                );
            }
            let _ = std::fs::remove_file(dir.path().join("ours.img"));
            let _ = std::fs::remove_file(dir.path().join("kit.img"));
        }
    }
}
