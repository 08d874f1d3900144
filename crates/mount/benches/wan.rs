//! Direct vs managed mounts over emulated WAN latency: an in-process NBD server behind the
//! delay proxy, at several round-trip times, in one run.
//!
//! Run: `cargo bench -p r3map-mount --bench wan [-- SIZE_MIB]` (default 64 MiB). Prints a
//! markdown table, and CSV rows (prefix `csv,`) for `scripts/plot-wan.py`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::stages::{Arbitrary, PullerOptions, PusherOptions};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_delay_proxy::{DelayConfig, DelayProxy};
use r3map_mount::{BackendSpec, ManagedMount, ManagedOptions};
use r3map_nbd::{Export, Server, ServerConfig};

const CHUNK: u64 = 1 << 20;
const RTTS_MS: [u64; 5] = [0, 2, 10, 25, 40];
const WORKERS: [usize; 4] = [1, 64, 512, 4096];
/// Direct reads and writes at high RTT are slow by nature; they move at most this much.
const DIRECT_BYTES: u64 = 16 << 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let size_mib: u64 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let size = size_mib << 20;
    let export = Arc::new(MemoryBackend::new(size));
    export.write_at(0, &vec![0x5A; size as usize]).await.unwrap();
    let server = Server::bind_tcp(
        ServerConfig::new(vec![Export::new("bench", export)]),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstream = server.local_addr().to_string();
    tokio::spawn(server.serve(std::future::pending()));

    println!(
        "# direct vs managed over the delay proxy ({size_mib} MiB export, {} KiB chunks)\n",
        CHUNK >> 10
    );
    println!("| RTT | mount | pull workers | first 4 KiB | seq. read | seq. write | write + sync |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut csv = Vec::new();
    for rtt in RTTS_MS {
        let proxy = DelayProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            upstream.clone(),
            DelayConfig {
                rtt: Duration::from_millis(rtt),
                rate: None,
            },
        )
        .await
        .unwrap();
        let uri = format!("nbd://{}/bench", proxy.local_addr());
        let direct = direct(&uri).await;
        print_row(rtt, "direct", "-", &direct);
        csv.push(format!(
            "csv,{rtt},direct,0,{},{},{},{}",
            direct.first_ms, direct.read, direct.write, direct.write_sync
        ));
        for workers in WORKERS {
            let managed = managed(&uri, size, workers).await;
            print_row(rtt, "managed", &workers.to_string(), &managed);
            csv.push(format!(
                "csv,{rtt},managed,{workers},{},{},{},{}",
                managed.first_ms, managed.read, managed.write, managed.write_sync
            ));
        }
    }
    println!();
    for line in csv {
        println!("{line}");
    }
}

struct Figures {
    first_ms: f64,
    /// MiB/s
    read: f64,
    write: f64,
    write_sync: f64,
}

fn print_row(rtt: u64, mount: &str, workers: &str, f: &Figures) {
    println!(
        "| {rtt} ms | {mount} | {workers} | {:.2} ms | {:.0} MiB/s | {:.0} MiB/s | {:.0} MiB/s |",
        f.first_ms, f.read, f.write, f.write_sync
    );
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1048576.0 / elapsed.as_secs_f64()
}

async fn open_remote(uri: &str) -> SharedBackend {
    uri.parse::<BackendSpec>().unwrap().open(None).await.unwrap()
}

/// Every read and write is a round trip to the remote.
async fn direct(uri: &str) -> Figures {
    let started = Instant::now();
    let remote = open_remote(uri).await;
    let backend = Arbitrary::new(remote, CHUNK).unwrap();
    let mut first = vec![0u8; 4096];
    backend.read_at(0, &mut first).await.unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let read = mib_per_s(DIRECT_BYTES, read_sequentially(&backend, DIRECT_BYTES).await);
    let write = mib_per_s(DIRECT_BYTES, write_sequentially(&backend, DIRECT_BYTES).await);
    let started = Instant::now();
    write_sequentially(&backend, DIRECT_BYTES).await;
    backend.sync().await.unwrap();
    let write_sync = mib_per_s(DIRECT_BYTES, started.elapsed());
    Figures {
        first_ms,
        read,
        write,
        write_sync,
    }
}

/// Reads hit the local cache after the first fetch; the puller races ahead of the reader.
async fn managed(uri: &str, size: u64, workers: usize) -> Figures {
    let options = || ManagedOptions {
        chunk_size: CHUNK,
        puller: PullerOptions {
            workers,
            ..Default::default()
        },
        pusher: PusherOptions {
            workers: 64,
            interval: Duration::from_secs(3600),
        },
        ..Default::default()
    };
    let started = Instant::now();
    let mount = ManagedMount::open(
        open_remote(uri).await,
        Arc::new(MemoryBackend::new(size)),
        options(),
    )
    .await
    .unwrap();
    let backend = mount.backend();
    let mut first = vec![0u8; 4096];
    backend.read_at(0, &mut first).await.unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    // The puller races ahead of this reader: reads of pulled chunks are local.
    let read = mib_per_s(size, read_sequentially(&*backend, size).await);
    mount.close().await.unwrap();

    // Writes on a fresh mount: they land locally; pushing is measured separately.
    let mount = ManagedMount::open(
        open_remote(uri).await,
        Arc::new(MemoryBackend::new(size)),
        options(),
    )
    .await
    .unwrap();
    let backend = mount.backend();
    let write_started = Instant::now();
    write_sequentially(&*backend, size).await;
    let write = mib_per_s(size, write_started.elapsed());
    mount.sync().await.unwrap();
    let write_sync = mib_per_s(size, write_started.elapsed());
    mount.close().await.unwrap();
    Figures {
        first_ms,
        read,
        write,
        write_sync,
    }
}

/// Reads `bytes` from the start in chunk-sized requests; returns the time taken.
async fn read_sequentially(backend: &dyn Backend, bytes: u64) -> Duration {
    let mut buf = vec![0u8; CHUNK as usize];
    let started = Instant::now();
    for offset in (0..bytes).step_by(CHUNK as usize) {
        backend.read_at(offset, &mut buf).await.unwrap();
    }
    started.elapsed()
}

/// Writes `bytes` from the start in chunk-sized requests; returns the time taken.
async fn write_sequentially(backend: &dyn Backend, bytes: u64) -> Duration {
    let data = vec![0xA5u8; CHUNK as usize];
    let started = Instant::now();
    for offset in (0..bytes).step_by(CHUNK as usize) {
        backend.write_at(offset, &data).await.unwrap();
    }
    started.elapsed()
}
