//! First-byte latency (issue 17): the time from a ready mount's 4 KiB read of an untouched chunk
//! to its data, at 0 ms RTT (loopback TCP), with the connection made and the mount up before
//! the clock starts (setup is reported apart).
//!
//! Remotes: `nbdkit memory 1G` (a separate process) and our own NBD server over memory (in this
//! process, on its own runtime), both filled with pseudo-random bytes first (so no server can
//! answer with holes). Mounts as `r3map mount` builds them: direct (`Arbitrary` over the
//! reconnecting NBD client) and managed (memory cache; the background pull stopped, so every
//! sampled chunk is untouched and the link is idle when the read starts). Reads go through the
//! FUSE file (opened with `O_DIRECT`, each at a chunk never read before) and, for reference,
//! straight to the mount's backend. "Before" is range-first off: the remote is wrapped so it
//! reports no read unit, and every miss reads the whole chunk, as before issue 17.
//!
//! After each sample the whole chunk is read (untimed for direct mounts); for managed mounts
//! the time until it is local is reported (that read joins the background fill). So each
//! sample starts on an idle link, and every row does the same work between samples.
//!
//! Run as root: `CARGO_INCREMENTAL=0 cargo run --release -p r3map-mount --example
//! bench_first_read [samples]` (default 200 samples per row).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use r3map_core::stages::{Arbitrary, PullerOptions};
use r3map_core::testing::pattern;
use r3map_core::{Backend, MemoryBackend, Result, SharedBackend};
use r3map_fuse::FileMount;
use r3map_mount::{BackendSpec, ManagedMount, ManagedOptions, RemoteOptions};
use r3map_nbd::{Export, Server, ServerConfig};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIZE: u64 = 1024 * MIB;
const READ: usize = 4096;
/// Seed of the remote's content.
const SEED: u64 = 17;
/// Chunks below this are never sampled (the background pull may have touched them).
const UNSAMPLED: u64 = 64;

/// One page, aligned as `O_DIRECT` wants it.
#[repr(C, align(4096))]
struct Page([u8; READ]);

/// The remote as it was before issue 17 for the stages in front: no read unit, so they read
/// whole chunks.
struct WholeChunks(SharedBackend);

#[async_trait]
impl Backend for WholeChunks {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        self.0.sync().await
    }
}

#[derive(Clone, Copy)]
struct Row {
    managed: bool,
    chunk: u64,
    range_first: bool,
}

impl Row {
    fn label(&self) -> String {
        let chunk = if self.chunk >= MIB {
            format!("{} MiB", self.chunk / MIB)
        } else {
            format!("{} KiB", self.chunk / KIB)
        };
        let mode = if self.managed { "managed" } else { "direct" };
        let when = match (self.chunk >= MIB, self.range_first) {
            (false, _) => "reference",
            (true, false) => "before (whole chunk)",
            (true, true) => "after (range first)",
        };
        format!("{mode} | {chunk} | {when}")
    }
}

/// Percentiles of a sample, in microseconds.
fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.9), at(0.99))
}

/// Distinct chunk indices in a scrambled order (an odd multiplier permutes a power of two).
fn chunk_order(chunks: u64) -> impl Iterator<Item = u64> {
    (0..chunks).map(move |i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) % chunks)
}

struct Measured {
    connect: Duration,
    cache_up: Duration,
    stack: Duration,
    fuse_up: Duration,
    fuse: Vec<Duration>,
    backend: Vec<Duration>,
    whole_chunk: Vec<Duration>,
    range_reads: u64,
}

fn measure(rt: &tokio::runtime::Runtime, uri: &str, row: Row, samples: usize, content: &[u8]) -> Measured {
    let started = Instant::now();
    let spec: BackendSpec = uri.parse().expect("NBD URI");
    let remote = rt
        .block_on(spec.open_with(None, &RemoteOptions::default()))
        .expect("connect");
    let connect = started.elapsed();
    // A memory cache (zeroed now: the allocator may hand out used memory) is made before the
    // stack's clock starts; its time is reported apart.
    let started = Instant::now();
    let mut cache: Option<SharedBackend> = row
        .managed
        .then(|| Arc::new(MemoryBackend::new(SIZE)) as SharedBackend);
    let cache_up = started.elapsed();
    let started = Instant::now();
    let remote: SharedBackend = if row.range_first {
        remote
    } else {
        Arc::new(WholeChunks(remote))
    };
    let managed = row.managed.then(|| {
        let options = ManagedOptions {
            chunk_size: row.chunk,
            puller: PullerOptions {
                workers: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let mount = rt
            .block_on(ManagedMount::open(remote.clone(), cache.take().unwrap(), options))
            .expect("managed mount");
        mount.stop_pull();
        mount
    });
    let backend: SharedBackend = match &managed {
        Some(mount) => mount.backend(),
        None => Arc::new(Arbitrary::new(remote, row.chunk).expect("direct mount")),
    };
    let stack = started.elapsed();
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("r3map-bench-first-")
        .tempdir()
        .unwrap();
    let mut fuse = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone())
        .expect("FUSE mount (run as root)");
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(fuse.path())
        .expect("open with O_DIRECT");
    let fuse_up = started.elapsed();

    let mut page = Box::new(Page([0; READ]));
    let chunks = SIZE / row.chunk;
    let within = (row.chunk / READ as u64).max(1);
    // The pull ran for a moment before it was stopped, from chunk 0 on: the samples keep off
    // the first chunks, and each is checked to be untouched before it is read.
    let mut order = chunk_order(chunks).filter(|&c| c >= UNSAMPLED).enumerate();
    let mut fuse_times = Vec::new();
    let mut backend_times = Vec::new();
    let mut whole_times = Vec::new();
    let warm_up = 5;
    for round in 0..2 * (samples + warm_up) {
        let (i, chunk) = order.next().expect("enough chunks");
        let offset = chunk * row.chunk + (i as u64 * 7 % within) * READ as u64;
        let through_fuse = round % 2 == 0;
        if let Some(mount) = &managed {
            assert!(
                !mount.is_chunk_local(chunk),
                "chunk {chunk} was touched before its sample"
            );
        }
        let began = Instant::now();
        if through_fuse {
            file.read_exact_at(&mut page.0, offset)
                .expect("read through FUSE");
        } else {
            rt.block_on(backend.read_at(offset, &mut page.0)).expect("read");
        }
        let first = began.elapsed();
        assert_eq!(
            page.0[..],
            content[offset as usize..offset as usize + READ],
            "wrong bytes at {offset}"
        );
        // Wait for the rest of the chunk (joins the fill): the next sample starts on an idle
        // link. Direct mounts read it too (untimed), so every row does the same work between
        // samples.
        let mut whole = vec![0u8; row.chunk as usize];
        rt.block_on(backend.read_at(chunk * row.chunk, &mut whole))
            .expect("whole chunk");
        let complete = began.elapsed();
        if let Some(mount) = &managed {
            assert!(
                mount.is_chunk_local(chunk),
                "chunk {chunk} is not local after a whole read"
            );
        }
        if round < 2 * warm_up {
            continue;
        }
        if through_fuse {
            fuse_times.push(first);
            if row.managed {
                whole_times.push(complete);
            }
        } else {
            backend_times.push(first);
        }
    }
    let range_reads = managed.as_ref().map_or(0, |m| m.range_reads());
    drop(file);
    fuse.unmount_blocking().expect("unmount");
    if let Some(mount) = managed {
        rt.block_on(mount.close()).expect("close");
    }
    Measured {
        connect,
        cache_up,
        stack,
        fuse_up,
        fuse: fuse_times,
        backend: backend_times,
        whole_chunk: whole_times,
        range_reads,
    }
}

/// `nbdkit memory 1G` on a free loopback port, once it accepts connections; `None` (and a
/// note) where nbdkit is not installed.
fn start_nbdkit() -> Option<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["memory", "1G"])
        .stdout(Stdio::null())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "nbdkit is not installed (scripts/install-test-deps installs it): its rows are left out\n"
            );
            return None;
        }
        Err(err) => panic!("nbdkit: {err}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((child, format!("nbd://127.0.0.1:{port}")))
}

/// Writes `content` to the export at `uri` through our client.
fn fill(rt: &tokio::runtime::Runtime, uri: &str, content: &[u8]) {
    rt.block_on(async {
        let spec: BackendSpec = uri.parse().unwrap();
        let remote = spec.open_with(None, &RemoteOptions::default()).await.unwrap();
        use futures::StreamExt;
        futures::stream::iter(content.chunks(MIB as usize).enumerate())
            .map(|(i, piece)| {
                let remote = remote.clone();
                async move { remote.write_at(i as u64 * MIB, piece).await }
            })
            .buffer_unordered(16)
            .for_each(|r| async { r.expect("fill the remote") })
            .await;
        remote.sync().await.unwrap();
    });
}

fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("samples"))
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let content = pattern(SEED, SIZE as usize);

    let mut remotes = Vec::new();
    let nbdkit = start_nbdkit().map(|(child, uri)| {
        fill(&rt, &uri, &content);
        remotes.push(("nbdkit memory", uri));
        child
    });
    let ours_uri = server_rt.block_on(async {
        let export = MemoryBackend::new(SIZE);
        export.write_at(0, &content).await.unwrap();
        let config = ServerConfig::new(vec![Export::new("bench", Arc::new(export))]);
        let server = Server::bind_tcp(config, "127.0.0.1:0").await.unwrap();
        let uri = server.uri("bench");
        tokio::spawn(server.serve(std::future::pending()));
        uri
    });
    remotes.push(("r3map NBD server", ours_uri));

    let rows = [
        (false, MIB, false),
        (false, MIB, true),
        (false, 4 * KIB, true),
        (true, MIB, false),
        (true, MIB, true),
        (true, 4 * KIB, true),
    ]
    .map(|(managed, chunk, range_first)| Row {
        managed,
        chunk,
        range_first,
    });
    println!(
        "4 KiB reads of untouched chunks, {samples} samples per column, one at a time; 1 GiB \
         remotes over loopback TCP (0 ms RTT); latency in µs (median / p90 / p99)\n"
    );
    println!("| remote | mount | chunk | range first | FUSE file, O_DIRECT | backend call | whole chunk local (managed) | connect (ms) | cache alloc (ms) | stack up (ms) | FUSE up (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, uri) in &remotes {
        for row in rows {
            let m = measure(&rt, uri, row, samples, &content);
            let show = |v: Vec<Duration>| {
                if v.is_empty() {
                    return "–".to_string();
                }
                let (p50, p90, p99) = summary(v);
                format!("{p50:.0} / {p90:.0} / {p99:.0}")
            };
            let expect_range_reads = row.managed && row.range_first && row.chunk >= MIB;
            assert_eq!(
                m.range_reads > 0,
                expect_range_reads,
                "{}: {} range reads",
                row.label(),
                m.range_reads
            );
            println!(
                "| {name} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                row.label(),
                show(m.fuse),
                show(m.backend),
                show(m.whole_chunk),
                m.connect.as_secs_f64() * 1e3,
                m.cache_up.as_secs_f64() * 1e3,
                m.stack.as_secs_f64() * 1e3,
                m.fuse_up.as_secs_f64() * 1e3
            );
        }
    }
    if let Some(mut nbdkit) = nbdkit {
        let _ = nbdkit.kill();
        let _ = nbdkit.wait();
    }
}
