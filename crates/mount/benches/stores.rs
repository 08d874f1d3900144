//! Every backend kind, direct and managed, side by side in one run: memory, file, directory,
//! Redis (one `redis-server`), a Redis Cluster (3 masters) and S3 (SeaweedFS: master, two volume
//! servers, filer and S3 gateway), all real processes on loopback started by this program.
//!
//! Run: `cargo bench -p r3map-mount --bench stores [-- SIZE_MIB]` (default 256 MiB). Prints a
//! markdown table with each figure's ratio to the file backend's (same mode, same run).
//!
//! Per backend: the resource is written sequentially (direct write, then `sync`), read back
//! sequentially by a fresh direct connection (first chunk latency, then throughput), then
//! through a fresh managed mount with an in-memory cache (first chunk, then the whole resource
//! while the puller races ahead), then written through another fresh managed mount (local
//! writes, then `sync`, which pushes everything: "write + sync").

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::stages::{Arbitrary, PullerOptions, PusherOptions};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_mount::spec::StoreCredentials;
use r3map_mount::{BackendSpec, ManagedMount, ManagedOptions, RemoteOptions};
use r3map_stores::testing::{RedisCluster, RedisServer, SeaweedFs, S3_ACCESS_KEY, S3_SECRET_KEY};

const CHUNK: u64 = 1 << 20;
const PULL_WORKERS: usize = 64;
const PUSH_WORKERS: usize = 64;

#[derive(Default, Clone, Copy)]
struct Figures {
    first_ms: f64,
    /// MiB/s
    read: f64,
    write: f64,
    write_sync: f64,
}

fn main() {
    let size_mib: u64 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let size = size_mib << 20;
    let dir = tempfile::tempdir().unwrap();
    // The servers start before the runtime: their harness blocks while polling readiness.
    let redis = RedisServer::start(&[]).expect("redis-server (scripts/install-test-deps)");
    let cluster = RedisCluster::start(3, 0).expect("redis cluster");
    let s3 = SeaweedFs::start().expect("weed (scripts/install-test-deps)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(s3.create_bucket("bench"));
    let credentials = dir.path().join("s3-credentials");
    std::fs::write(
        &credentials,
        format!("[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"),
    )
    .unwrap();
    let remote = RemoteOptions {
        stores: StoreCredentials {
            s3_credentials_file: Some(credentials),
            ..StoreCredentials::default()
        },
        ..RemoteOptions::default()
    };
    let specs = [
        ("memory", format!("memory:{size}")),
        (
            "file",
            format!("file:{}?size={size}", dir.path().join("file").display()),
        ),
        (
            "directory",
            format!(
                "dir:{}?size={size}&chunk={CHUNK}",
                dir.path().join("dir").display()
            ),
        ),
        (
            "Redis",
            format!("redis://{}/bench?size={size}&chunk={CHUNK}", redis.address()),
        ),
        (
            "Redis Cluster",
            format!(
                "redis+cluster://{}/bench?size={size}&chunk={CHUNK}",
                cluster.addresses().join(",")
            ),
        ),
        (
            "S3",
            format!(
                "s3://bench/bench?endpoint={}&size={size}&chunk={CHUNK}",
                s3.endpoint()
            ),
        ),
    ];
    println!(
        "# backends, direct and managed ({size_mib} MiB, {} KiB chunks, {PULL_WORKERS} pull and \
         {PUSH_WORKERS} push workers, in-memory cache)\n",
        CHUNK >> 10
    );
    let results: Vec<(&str, Figures, Figures)> = runtime.block_on(async {
        let mut results = Vec::new();
        for (name, spec) in &specs {
            let spec: BackendSpec = spec.parse().unwrap();
            // Memory is one process-local backend: "reopening" it would start from zeros.
            let shared = match spec {
                BackendSpec::Memory { .. } => Some(spec.open_with(None, &remote).await.unwrap()),
                _ => None,
            };
            let open = || {
                let (spec, remote, shared) = (spec.clone(), remote.clone(), shared.clone());
                async move {
                    match shared {
                        Some(backend) => backend,
                        None => spec.open_with(None, &remote).await.unwrap(),
                    }
                }
            };
            let direct = direct(&open, size).await;
            let managed = managed(&open, size).await;
            eprintln!("{name}: done");
            results.push((*name, direct, managed));
        }
        results
    });
    let file = |managed: bool| {
        let (_, d, m) = results.iter().find(|(n, _, _)| *n == "file").unwrap();
        if managed {
            *m
        } else {
            *d
        }
    };
    println!("| backend | mount | first chunk | seq. read | seq. write | write + sync | read / file | write + sync / file |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, direct, managed) in &results {
        for (mode, f, base) in [("direct", direct, file(false)), ("managed", managed, file(true))] {
            println!(
                "| {name} | {mode} | {:.2} ms | {:.0} MiB/s | {:.0} MiB/s | {:.0} MiB/s | {:.2} | {:.2} |",
                f.first_ms,
                f.read,
                f.write,
                f.write_sync,
                f.read / base.read,
                f.write_sync / base.write_sync
            );
        }
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1048576.0 / elapsed.as_secs_f64()
}

/// Writes the whole resource (measured), syncs, then reads it back on a fresh connection.
async fn direct<F, Fut>(open: &F, size: u64) -> Figures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = SharedBackend>,
{
    let backend = Arbitrary::new(open().await, CHUNK).unwrap();
    let write = mib_per_s(size, write_sequentially(&backend, size, 0x5A).await);
    let started = Instant::now();
    write_sequentially(&backend, size, 0xA5).await;
    backend.sync().await.unwrap();
    let write_sync = mib_per_s(size, started.elapsed());
    drop(backend);

    let started = Instant::now();
    let backend = Arbitrary::new(open().await, CHUNK).unwrap();
    let mut first = vec![0u8; CHUNK as usize];
    backend.read_at(0, &mut first).await.unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(
        first.iter().all(|&b| b == 0xA5),
        "the direct read missed the writes"
    );
    let read = mib_per_s(size, read_sequentially(&backend, size).await);
    Figures {
        first_ms,
        read,
        write,
        write_sync,
    }
}

fn options() -> ManagedOptions {
    ManagedOptions {
        chunk_size: CHUNK,
        puller: PullerOptions {
            workers: PULL_WORKERS,
            ..Default::default()
        },
        pusher: PusherOptions {
            workers: PUSH_WORKERS,
            interval: Duration::from_secs(3600),
        },
        ..Default::default()
    }
}

/// A fresh managed mount reads everything (the puller racing ahead); another writes everything
/// and pushes it on `sync`.
async fn managed<F, Fut>(open: &F, size: u64) -> Figures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = SharedBackend>,
{
    let started = Instant::now();
    let mount = ManagedMount::open(open().await, Arc::new(MemoryBackend::new(size)), options())
        .await
        .unwrap();
    let backend = mount.backend();
    let mut first = vec![0u8; CHUNK as usize];
    backend.read_at(0, &mut first).await.unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(
        first.iter().all(|&b| b == 0xA5),
        "the managed read missed the writes"
    );
    let read = mib_per_s(size, read_sequentially(&*backend, size).await);
    mount.close().await.unwrap();

    let mount = ManagedMount::open(open().await, Arc::new(MemoryBackend::new(size)), options())
        .await
        .unwrap();
    let backend = mount.backend();
    let started = Instant::now();
    write_sequentially(&*backend, size, 0x3C).await;
    let write = mib_per_s(size, started.elapsed());
    mount.sync().await.unwrap();
    let write_sync = mib_per_s(size, started.elapsed());
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

/// Writes `bytes` of `byte` from the start in chunk-sized requests; returns the time taken.
async fn write_sequentially(backend: &dyn Backend, bytes: u64, byte: u8) -> Duration {
    let data = vec![byte; CHUNK as usize];
    let started = Instant::now();
    for offset in (0..bytes).step_by(CHUNK as usize) {
        backend.write_at(offset, &data).await.unwrap();
    }
    started.elapsed()
}
