//! Managed mounts over gRPC vs NBD, and gRPC's per-chunk compression on a capped link, in one
//! run. One `r3map serve --grpc` process serves the same exports over both transports; the
//! round-trip time and the rate cap come from `r3map delay-proxy` processes in front of it
//! (one per transport and link); the managed mount runs in this process and is measured
//! through its backend interface (frontend costs are measured elsewhere).
//!
//! Run: `cargo bench -p r3map-cli --bench grpc [-- SIZE_MIB]` (default 64; as any user; the
//! image row needs `mkfs.ext4`). Files go to a temporary directory under `$BENCH_DIR`
//! (default /var/tmp). Prints markdown tables.
//!
//! Every read is compared with the export's content, and after every write + sync the export
//! is read back over an undelayed NBD connection and compared with what was written.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::stages::{PullerOptions, PusherOptions};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_grpc::chunk::{encode, Accept};
use r3map_mount::{BackendSpec, ManagedMount, ManagedOptions};

/// The CLI's defaults for a managed mount.
const CHUNK: u64 = 1 << 20;
const PULL_WORKERS: usize = 512;
const PUSH_WORKERS: usize = 64;
const RTTS_MS: [u64; 3] = [0, 10, 25];
/// 100 Mbit/s in bytes per second, per direction.
const CAPPED_RATE: u64 = 100_000_000 / 8;

#[tokio::main]
async fn main() {
    let size_mib: u64 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let size = size_mib << 20;
    let base = std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();

    let random = pseudo_random(1, size);
    let random_writes = pseudo_random(2, size);
    let text = text(size);
    let image = image(dir.path(), size);
    for (name, data) in [("random", &random), ("text", &text)] {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let mut exports = vec![
        format!("random=file:{}", dir.path().join("random").display()),
        format!("text=file:{}", dir.path().join("text").display()),
    ];
    if image.is_some() {
        exports.push(format!("image=file:{}", dir.path().join("image").display()));
    }
    std::fs::write(dir.path().join("scratch"), &random).unwrap();
    exports.push(format!("scratch=file:{}", dir.path().join("scratch").display()));
    let server = Serve::start(&exports);
    let check = Checker {
        nbd: server.nbd.clone(),
    };

    println!(
        "# managed mounts over gRPC vs NBD ({size_mib} MiB exports, {} KiB chunks, {PULL_WORKERS} pull and \
         {PUSH_WORKERS} push workers, one connection)\n",
        CHUNK >> 10
    );
    println!("Random (incompressible) data; gRPC with the default compression (lz4 tried per chunk) and without (`?compress=false`).\n");
    println!("| RTT | NBD read | gRPC read | gRPC / NBD | gRPC read, no lz4 | / NBD | NBD write + sync | gRPC write + sync | gRPC / NBD | gRPC write + sync, no lz4 | / NBD |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for rtt in RTTS_MS {
        let link = Link::start(&server, Duration::from_millis(rtt), None);
        let read = |uri: String| {
            let random = &random;
            async move { read_managed(&uri, random).await }
        };
        let nbd_read = read(link.nbd("random")).await;
        let grpc_read = read(link.grpc("random", true)).await;
        let plain_read = read(link.grpc("random", false)).await;
        let nbd_write = write_managed(&link.nbd("scratch"), &random_writes, &check).await;
        let grpc_write = write_managed(&link.grpc("scratch", true), &random_writes, &check).await;
        let plain_write = write_managed(&link.grpc("scratch", false), &random_writes, &check).await;
        println!(
            "| {rtt} ms | {} | {} | **{:.2}** | {} | {:.2} | {} | {} | **{:.2}** | {} | {:.2} |",
            rate(nbd_read),
            rate(grpc_read),
            grpc_read / nbd_read,
            rate(plain_read),
            plain_read / nbd_read,
            rate(nbd_write),
            rate(grpc_write),
            grpc_write / nbd_write,
            rate(plain_write),
            plain_write / nbd_write,
        );
    }

    println!(
        "\n# gRPC compression on a link capped at 100 Mbit/s ({} MB/s per direction, no added RTT), {size_mib} MiB per case\n",
        CAPPED_RATE as f64 / 1e6
    );
    println!("\"lz4 / raw\" is the bytes gRPC sends for the data (zero chunks elided, lz4 where it shrinks a chunk) over its size; \"no lz4\" still elides zero chunks.\n");
    println!("| data | zero chunks | lz4 / raw | NBD read | gRPC read, no lz4 | gRPC read, lz4 | lz4 / no lz4 | NBD write + sync | gRPC write + sync, no lz4 | gRPC write + sync, lz4 | lz4 / no lz4 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let link = Link::start(&server, Duration::ZERO, Some(CAPPED_RATE));
    let mut cases = vec![("random", &random), ("text", &text)];
    if let Some(image) = &image {
        cases.push(("image", image));
    }
    for (name, data) in cases {
        let (zero_chunks, wire) = wire_size(data);
        let nbd_read = read_managed(&link.nbd(name), data).await;
        let plain_read = read_managed(&link.grpc(name, false), data).await;
        let lz4_read = read_managed(&link.grpc(name, true), data).await;
        let nbd_write = write_managed(&link.nbd("scratch"), data, &check).await;
        let plain_write = write_managed(&link.grpc("scratch", false), data, &check).await;
        let lz4_write = write_managed(&link.grpc("scratch", true), data, &check).await;
        println!(
            "| {} | {zero_chunks} of {} | {:.3} | {} | {} | {} | **{:.2}** | {} | {} | {} | **{:.2}** |",
            describe(name),
            data.len() as u64 / CHUNK,
            wire as f64 / data.len() as f64,
            rate(nbd_read),
            rate(plain_read),
            rate(lz4_read),
            lz4_read / plain_read,
            rate(nbd_write),
            rate(plain_write),
            rate(lz4_write),
            lz4_write / plain_write,
        );
    }
    if image.is_none() {
        println!("\n(no image row: mkfs.ext4 is missing)");
    }
    drop(link);
    drop(server);
}

fn describe(name: &str) -> &str {
    match name {
        "random" => "random bytes",
        "text" => "text (this repository's sources, repeated)",
        "image" => "ext4 image (mkfs.ext4 -d: text, programs, some random files; ~25 % free)",
        other => other,
    }
}

fn rate(mib_per_s: f64) -> String {
    format!("{mib_per_s:.1} MiB/s")
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1048576.0 / elapsed.as_secs_f64()
}

fn managed_options() -> ManagedOptions {
    ManagedOptions {
        chunk_size: CHUNK,
        puller: PullerOptions {
            workers: PULL_WORKERS,
            ..Default::default()
        },
        pusher: PusherOptions {
            workers: PUSH_WORKERS,
            // Pushed by the measured sync, not by the timer.
            interval: Duration::from_secs(3600),
        },
        ..Default::default()
    }
}

async fn open_remote(uri: &str) -> SharedBackend {
    uri.parse::<BackendSpec>()
        .unwrap()
        .open(None)
        .await
        .unwrap_or_else(|err| panic!("cannot open {uri}: {err}"))
}

/// A fresh managed mount reads the whole export sequentially (the puller racing ahead, as in
/// `r3map mount --managed`); MiB/s from the first read to the last, content checked.
async fn read_managed(uri: &str, expected: &[u8]) -> f64 {
    let size = expected.len() as u64;
    let mount = ManagedMount::open(
        open_remote(uri).await,
        Arc::new(MemoryBackend::new(size)),
        managed_options(),
    )
    .await
    .unwrap();
    let backend = mount.backend();
    let mut got = vec![0u8; size as usize];
    let started = Instant::now();
    for (i, piece) in got.chunks_mut(CHUNK as usize).enumerate() {
        backend.read_at(i as u64 * CHUNK, piece).await.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        got == expected,
        "{uri}: the mount read other data than the export holds"
    );
    mount.close().await.unwrap();
    mib_per_s(size, elapsed)
}

/// A fresh managed mount writes `data` over the whole export sequentially and syncs (which
/// pushes everything); MiB/s from the first write until the sync returned, checked on the
/// server afterwards.
async fn write_managed(uri: &str, data: &[u8], check: &Checker) -> f64 {
    let size = data.len() as u64;
    let mount = ManagedMount::open(
        open_remote(uri).await,
        Arc::new(MemoryBackend::new(size)),
        managed_options(),
    )
    .await
    .unwrap();
    let backend = mount.backend();
    let started = Instant::now();
    for (i, piece) in data.chunks(CHUNK as usize).enumerate() {
        backend.write_at(i as u64 * CHUNK, piece).await.unwrap();
    }
    mount.sync().await.unwrap();
    let elapsed = started.elapsed();
    mount.close().await.unwrap();
    check.scratch_holds(data).await;
    mib_per_s(size, elapsed)
}

/// Reads the scratch export over an undelayed NBD connection.
struct Checker {
    nbd: String,
}

impl Checker {
    async fn scratch_holds(&self, data: &[u8]) {
        let remote = open_remote(&format!("{}/scratch", self.nbd)).await;
        let mut on_server = vec![0u8; data.len()];
        remote.read_at(0, &mut on_server).await.unwrap();
        assert!(
            on_server == data,
            "the server does not hold what the mount wrote and synced"
        );
    }
}

/// Zero chunks and the bytes gRPC puts on the wire for `data` in chunks (lz4 where it shrinks
/// a chunk, nothing for a zero chunk).
fn wire_size(data: &[u8]) -> (u64, u64) {
    let mut zero = 0;
    let mut wire = 0;
    for (i, piece) in data.chunks(CHUNK as usize).enumerate() {
        let chunk = encode(i as u64 * CHUNK, piece, Accept::all(true));
        zero += u64::from(chunk.data.is_empty());
        wire += chunk.data.len() as u64;
    }
    (zero, wire)
}

fn pseudo_random(seed: u64, size: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; size as usize];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// The text files of this repository (sources and docs), in a fixed order.
fn repository_text() -> Vec<u8> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    walk(&path, files);
                }
            } else if [".rs", ".md", ".toml", ".proto"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                files.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    walk(&root.join("crates"), &mut files);
    walk(&root.join("docs"), &mut files);
    files
        .iter()
        .flat_map(|path| std::fs::read(path).unwrap())
        .collect()
}

/// `size` bytes of text: the repository's text, repeated.
fn text(size: u64) -> Vec<u8> {
    let source = repository_text();
    source.iter().copied().cycle().take(size as usize).collect()
}

/// An ext4 image of `size` bytes made by `mkfs.ext4 -d` from a directory of text files,
/// programs from /usr/bin and a few random files (like compressed media), about three
/// quarters full; `None` without mkfs.ext4.
fn image(dir: &Path, size: u64) -> Option<Vec<u8>> {
    let root = dir.join("image-root");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("media")).unwrap();
    // Text: 40 %, in files of 64 KiB.
    let text = text(size * 2 / 5);
    for (i, piece) in text.chunks(64 << 10).enumerate() {
        std::fs::write(root.join("src").join(format!("file{i:05}.txt")), piece).unwrap();
    }
    // Programs: 25 %.
    let mut budget = size / 4;
    let mut programs: Vec<_> = std::fs::read_dir("/usr/bin")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    programs.sort();
    for path in programs {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > budget || meta.len() < 4096 {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else { continue };
        budget -= data.len() as u64;
        std::fs::write(root.join("bin").join(path.file_name().unwrap()), data).unwrap();
    }
    // Random ("media"): 10 %, in files of 1 MiB.
    let media = pseudo_random(3, size / 10);
    for (i, piece) in media.chunks(1 << 20).enumerate() {
        std::fs::write(root.join("media").join(format!("clip{i:03}.bin")), piece).unwrap();
    }
    let image = dir.join("image");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{}k", size >> 10))
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .status();
    std::fs::remove_dir_all(&root).unwrap();
    match status {
        Ok(status) if status.success() => Some(std::fs::read(&image).unwrap()),
        Ok(status) => panic!("mkfs.ext4 failed: {status}"),
        Err(_) => None,
    }
}

/// A child process that is sent SIGTERM and waited for when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Starts `r3map ARGS`, reads its stderr until `ready` returns true for a line (collecting the
/// lines), and keeps draining stderr (echoing warnings) so that the child never blocks on it.
fn start_r3map(args: &[String], ready: impl Fn(&str) -> bool) -> (Process, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_r3map"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start r3map");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("r3map {args:?} exited before it was ready: {seen:?}"))
            .unwrap();
        let done = ready(&line);
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("r3map: {line}");
            }
        }
    });
    (Process(child), seen)
}

/// `r3map serve --grpc` on loopback: the exports over NBD and gRPC from one process.
struct Serve {
    _process: Process,
    /// `nbd://HOST:PORT`
    nbd: String,
    /// `HOST:PORT`
    nbd_addr: String,
    grpc_addr: String,
}

impl Serve {
    fn start(exports: &[String]) -> Self {
        let mut args: Vec<String> = vec!["serve".into()];
        args.extend(exports.iter().cloned());
        args.extend(["--listen", "127.0.0.1:0", "--grpc", "127.0.0.1:0"].map(String::from));
        let (process, lines) = start_r3map(&args, |line| line.starts_with("Ctrl-C"));
        let uri = |scheme: &str| {
            lines
                .iter()
                .find_map(|line| line.strip_prefix(&format!("serving {scheme}://")))
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_else(|| panic!("r3map serve printed no {scheme} URI: {lines:?}"))
                .to_string()
        };
        let (nbd_addr, grpc_addr) = (uri("nbd"), uri("grpc"));
        Self {
            _process: process,
            nbd: format!("nbd://{nbd_addr}"),
            nbd_addr,
            grpc_addr,
        }
    }
}

/// A pair of `r3map delay-proxy` processes (one per transport) with the same settings.
struct Link {
    _processes: [Process; 2],
    nbd_addr: String,
    grpc_addr: String,
}

impl Link {
    fn start(server: &Serve, rtt: Duration, rate: Option<u64>) -> Self {
        let proxy = |upstream: &str| {
            let mut args: Vec<String> = ["delay-proxy", "--listen", "127.0.0.1:0", "--upstream", upstream]
                .map(String::from)
                .into();
            args.extend(["--rtt".into(), format!("{}ms", rtt.as_millis())]);
            if let Some(rate) = rate {
                args.extend(["--rate".into(), rate.to_string()]);
            }
            let (process, lines) = start_r3map(&args, |line| line.starts_with("delaying "));
            let addr = lines.last().unwrap().split(' ').nth(1).unwrap().to_string();
            (process, addr)
        };
        let (nbd, nbd_addr) = proxy(&server.nbd_addr);
        let (grpc, grpc_addr) = proxy(&server.grpc_addr);
        Self {
            _processes: [nbd, grpc],
            nbd_addr,
            grpc_addr,
        }
    }

    fn nbd(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd_addr)
    }

    fn grpc(&self, export: &str, compress: bool) -> String {
        format!("grpc://{}/{export}?compress={compress}", self.grpc_addr)
    }
}
