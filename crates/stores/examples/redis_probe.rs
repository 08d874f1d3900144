//! Redis read throughput through `RedisStore` by pooled connections and concurrent readers,
//! with the server's and this process' CPU time (wall time far above the two together means the
//! run was starved of CPU, not limited by Redis or the client).
//!
//! Run: `cargo run --release -p r3map-stores --example redis_probe [-- SIZE_MIB [CHUNK_BYTES]]`
//! (defaults 256 and 1048576; needs `redis-server`, which it starts on loopback).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use r3map_core::Backend;
use r3map_stores::testing::RedisServer;
use r3map_stores::{open_backend, KeyedOptions, RedisOptions, RedisStore};

const CHUNK: u64 = 1 << 20;

fn self_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let size_mib = args.first().copied().unwrap_or(256);
    let chunk = args.get(1).copied().unwrap_or(CHUNK);
    let size = size_mib << 20;
    let redis = RedisServer::start(&[]).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let info_client = redis::Client::open(format!("redis://{}", redis.address())).unwrap();
        let mut info = info_client.get_multiplexed_async_connection().await.unwrap();
        let redis_cpu = |text: String| -> f64 {
            text.lines()
                .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
                .map(|l| l.split(':').nth(1).unwrap().trim().parse::<f64>().unwrap())
                .sum()
        };
        for connections in [1usize, 4, 16] {
            let mut options = RedisOptions::standalone(redis.address(), "probe");
            options.connections = connections;
            let store = RedisStore::connect(&options).await.unwrap();
            let backend = Arc::new(
                open_backend(store, size, chunk, KeyedOptions::default()).unwrap(),
            );
            if connections == 1 {
                let data = vec![0xA5u8; chunk as usize];
                for offset in (0..size).step_by(chunk as usize) {
                    backend.write_at(offset, &data).await.unwrap();
                }
            }
            for readers in [1usize, 4, 16, 64] {
                let before: String = redis::cmd("INFO").arg("cpu").query_async(&mut info).await.unwrap();
                let (server0, self0) = (redis_cpu(before), self_cpu());
                let next = Arc::new(AtomicU64::new(0));
                let started = Instant::now();
                let tasks: Vec<_> = (0..readers)
                    .map(|_| {
                        let (backend, next) = (backend.clone(), next.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; chunk as usize];
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                if i * chunk >= size {
                                    break;
                                }
                                backend.read_at(i * chunk, &mut buf).await.unwrap();
                                assert_eq!(buf[0], 0xA5);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                let elapsed = started.elapsed().as_secs_f64();
                let after: String = redis::cmd("INFO").arg("cpu").query_async(&mut info).await.unwrap();
                let (server1, self1) = (redis_cpu(after), self_cpu());
                println!(
                    "connections {connections:2} readers {readers:2}: {:7.1} MiB/s  redis cpu {:.2} s  client cpu {:.2} s  wall {:.2} s",
                    size as f64 / 1048576.0 / elapsed,
                    server1 - server0,
                    self1 - self0,
                    elapsed
                );
            }
        }
    });
}
