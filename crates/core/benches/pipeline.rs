//! Throughput of the managed pipeline (`Arbitrary(Pusher(Synced(memory, memory)))`) against a
//! plain memcpy of the same bytes, measured side by side in one run.
//!
//! Run: `cargo bench -p r3map-core --bench pipeline [-- SIZE_MIB [REQUEST_KIB]]`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::stages::{Arbitrary, Pusher, PusherOptions, Synced};
use r3map_core::{Backend, MemoryBackend, SharedBackend};

const CHUNK: u64 = 1 << 20;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let size_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let request_kib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let size = size_mib << 20;
    let request = request_kib << 10;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    warm_up_guest_memory(3 * size as usize);
    // Best of three rounds, baseline and pipeline alternating, to damp a noisy shared machine.
    let (mut base, mut figures) = (
        memcpy_baselines(size as usize, request),
        runtime.block_on(pipeline(size, request)),
    );
    for _ in 0..2 {
        let b = memcpy_baselines(size as usize, request);
        base = Baselines {
            first_touch: base.first_touch.max(b.first_touch),
            read_like: base.read_like.max(b.read_like),
            write_like: base.write_like.max(b.write_like),
        };
        let f = runtime.block_on(pipeline(size, request));
        figures = Figures {
            cold_read: figures.cold_read.max(f.cold_read),
            warm_read: figures.warm_read.max(f.warm_read),
            write: figures.write.max(f.write),
            write_and_push: figures.write_and_push.max(f.write_and_push),
        };
    }

    println!("# managed pipeline vs memcpy, best of 3 ({size_mib} MiB, {request_kib} KiB requests, {CHUNK} B chunks, both sides in-process memory)\n");
    println!("| case | throughput | ratio | baseline |");
    println!("|---|---:|---:|---|");
    let row = |name: &str, bytes_per_s: f64, base: f64, base_name: &str| {
        println!(
            "| {name} | {:.0} MiB/s | {:.2} | {base_name} ({:.0} MiB/s) |",
            bytes_per_s / 1048576.0,
            bytes_per_s / base,
            base / 1048576.0
        );
    };
    row(
        "cold read (fetch, fill cache, copy out)",
        figures.cold_read,
        base.first_touch,
        "memcpy region to region",
    );
    row(
        "warm read (from the local cache)",
        figures.warm_read,
        base.read_like,
        "memcpy out of memory",
    );
    row(
        "write (lands in the cache, marked dirty)",
        figures.write,
        base.write_like,
        "memcpy into memory",
    );
    row(
        "write + sync (pushed to the remote)",
        figures.write_and_push,
        base.write_like,
        "memcpy into memory",
    );
}

struct Figures {
    cold_read: f64,
    warm_read: f64,
    write: f64,
    write_and_push: f64,
}

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64()
}

/// memcpy baselines with the same access patterns as the pipeline cases, all over `size` bytes
/// in `request`-sized pieces.
struct Baselines {
    /// Large region into another large region, as a cold read fills the cache (in the first
    /// round the destination is freshly mapped; best-of-3 then reflects reused memory on both
    /// sides, so page-fault cost is left out of the ratio).
    first_touch: f64,
    /// Large touched region into one reused request buffer, as a read returns data.
    read_like: f64,
    /// One request buffer into a large touched region, as a write lands in the cache.
    write_like: f64,
}

/// In a VM, the first touch of guest memory that was never used costs a fault in the host too;
/// whichever case ran first would pay for it. Touch (and free) that much memory up front.
fn warm_up_guest_memory(bytes: usize) {
    let mut memory = vec![0u8; bytes];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    black_box(&memory);
}

fn memcpy_baselines(size: usize, request: usize) -> Baselines {
    let source = vec![0x5Au8; size];
    let mut region = vec![0u8; size]; // calloc: pages are mapped on first write
    let started = Instant::now();
    for (dst, src) in region.chunks_mut(request).zip(source.chunks(request)) {
        dst.copy_from_slice(src);
    }
    let first_touch = rate(size as u64, started.elapsed());
    let mut buf = vec![0u8; request];
    let started = Instant::now();
    for src in source.chunks(request) {
        buf.copy_from_slice(black_box(src));
        black_box(&mut buf);
    }
    let read_like = rate(size as u64, started.elapsed());
    let started = Instant::now();
    for dst in region.chunks_mut(request) {
        dst.copy_from_slice(black_box(&buf));
    }
    let write_like = rate(size as u64, started.elapsed());
    black_box(&region);
    Baselines {
        first_touch,
        read_like,
        write_like,
    }
}

async fn pipeline(size: u64, request: usize) -> Figures {
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    let fill = vec![0xA5u8; request];
    let mut offset = 0;
    while offset < size {
        remote.write_at(offset, &fill).await.unwrap();
        offset += request as u64;
    }
    // No background puller and a huge push interval: the reads themselves fetch, and the push
    // happens in the measured sync.
    let local: SharedBackend = Arc::new(MemoryBackend::new(size));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let pusher_options = PusherOptions {
        interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let pusher = Arc::new(Pusher::start(synced, remote, CHUNK, pusher_options).unwrap());
    let backend = Arbitrary::new(pusher.clone(), CHUNK).unwrap();
    let mut buf = vec![0u8; request];
    let cold_read = read_pass(&backend, &mut buf).await;
    let warm_read = read_pass(&backend, &mut buf).await;
    let data = vec![0x3Cu8; request];
    let write = write_pass(&backend, &data).await;
    let started = Instant::now();
    write_pass(&backend, &data).await;
    backend.sync().await.unwrap();
    let write_and_push = rate(size, started.elapsed());
    pusher.close().await.unwrap();
    Figures {
        cold_read,
        warm_read,
        write,
        write_and_push,
    }
}

/// Reads the whole backend sequentially in `buf`-sized requests; returns bytes per second.
async fn read_pass(backend: &dyn Backend, buf: &mut [u8]) -> f64 {
    let started = Instant::now();
    let mut offset = 0;
    while offset < backend.size() {
        backend.read_at(offset, buf).await.unwrap();
        offset += buf.len() as u64;
    }
    rate(backend.size(), started.elapsed())
}

/// Writes the whole backend sequentially in `data`-sized requests; returns bytes per second.
async fn write_pass(backend: &dyn Backend, data: &[u8]) -> f64 {
    let started = Instant::now();
    let mut offset = 0;
    while offset < backend.size() {
        backend.write_at(offset, data).await.unwrap();
        offset += data.len() as u64;
    }
    rate(backend.size(), started.elapsed())
}
