//! Background pull of a sparse export by a managed mount's pull stack, with hole skipping off
//! (every chunk transferred) and on (the default: holes become local zeros without a transfer),
//! same run.
//!
//! ```text
//! cargo run --release -p r3map-nbd --example bench_sparse_pull -- [SIZE_MIB] [DATA_PERCENT] [RUNS] [RTT_MS...]
//! ```
//!
//! Defaults: 1024 MiB, 10 % data, 3 runs, RTT 0 and 5 ms. The export is our NBD server over
//! loopback TCP (through an in-process delay proxy when the RTT is not 0) serving a memory
//! backend whose data lies in scattered 1 MiB extents (chunk-aligned, random positions, random
//! bytes); the rest was never written. The pull is `r3map mount --managed`'s, built as
//! `ManagedMount` builds it (`Synced` over an in-memory cache, a `Puller` over `SkipHoles` or
//! over `Synced` alone; the pusher and the unaligned-access stage play no part in a pull):
//! 1 MiB chunks, 512 pull workers, our NBD client with its default options behind the
//! reconnecting stage. (It lives in this crate, not in r3map-mount, so that its release build
//! needs no gRPC or store dependencies.) Each run connects afresh, times connect → everything
//! local, counts the bytes the server's backend read and the
//! bytes the proxy released to the client, then checks every chunk against the model (not
//! timed). The modes alternate within each run; the best time of each is kept. Prints a
//! markdown table.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::stages::{
    sparse, Connector, PullTarget, Puller, PullerOptions, ReconnectOptions, Reconnecting, SkipHoles, Synced,
};
use r3map_core::testing::{pattern, ReadCounting};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_delay_proxy::{DelayConfig, DelayProxy};
use r3map_nbd::{Client, ClientOptions, Export, Server, ServerConfig};

const MIB: u64 = 1 << 20;
/// `r3map mount --managed`'s defaults.
const CHUNK: u64 = MIB;
const PULL_WORKERS: usize = 512;

/// `count` distinct chunk indexes of `chunks`, from a fixed seed.
fn data_chunks(chunks: u64, count: u64) -> Vec<u64> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count.min(chunks) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        picked.insert(state % chunks);
    }
    picked.into_iter().collect()
}

struct Figures {
    time: Duration,
    server_read: u64,
    downstream: Option<u64>,
    fetched: u64,
    skipped: u64,
}

async fn pull_once(
    uri: &str,
    size: u64,
    skip_holes: bool,
    export: &ReadCounting,
    proxy: Option<&DelayProxy>,
    data: &[u64],
) -> Figures {
    let (read_before, down_before) = (
        export.read.load(Ordering::Relaxed),
        proxy.map(|p| p.bytes_downstream()),
    );
    let started = Instant::now();
    let connector: Connector = {
        let uri = uri.to_string();
        Arc::new(move || {
            let uri = uri.clone();
            Box::pin(async move {
                let client = Client::connect(&uri, ClientOptions::default())
                    .await
                    .map_err(|e| r3map_core::Error::Remote(e.to_string()))?;
                Ok(Arc::new(client) as SharedBackend)
            })
        })
    };
    let remote = Arc::new(
        Reconnecting::connect(connector, ReconnectOptions::default())
            .await
            .unwrap(),
    );
    let synced = Arc::new(Synced::new(Arc::new(MemoryBackend::new(size)), remote, CHUNK).unwrap());
    let target: Arc<dyn PullTarget> = if skip_holes {
        Arc::new(SkipHoles::new(synced.clone(), sparse::DEFAULT_REGION))
    } else {
        synced.clone()
    };
    let puller = Puller::start(
        target,
        PullerOptions {
            workers: PULL_WORKERS,
            ..PullerOptions::default()
        },
    )
    .unwrap();
    puller.wait().await.unwrap();
    let time = started.elapsed();
    let figures = Figures {
        time,
        server_read: export.read.load(Ordering::Relaxed) - read_before,
        downstream: proxy.map(|p| p.bytes_downstream() - down_before.unwrap_or(0)),
        fetched: synced.fetch_count(),
        skipped: synced.hole_count(),
    };
    // Every chunk as the model says: its pattern where data was written, zeros elsewhere.
    let mut buf = vec![0u8; CHUNK as usize];
    for chunk in 0..size / CHUNK {
        synced.read_at(chunk * CHUNK, &mut buf).await.unwrap();
        let ok = if data.binary_search(&chunk).is_ok() {
            buf == pattern(chunk, CHUNK as usize)
        } else {
            buf.iter().all(|&b| b == 0)
        };
        assert!(
            ok,
            "chunk {chunk} differs from the model (skip_holes {skip_holes})"
        );
    }
    assert_eq!(synced.fetch_count(), figures.fetched, "the check fetched");
    figures
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let number = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let size = number(0, 1024) * MIB;
    let percent = number(1, 10);
    let runs = number(2, 3).max(1);
    let rtts: Vec<u64> = if args.len() > 3 {
        args[3..].iter().map(|a| a.parse().expect("RTT in ms")).collect()
    } else {
        vec![0, 5]
    };
    let chunks = size / CHUNK;
    let data = data_chunks(chunks, chunks * percent / 100);
    let data_bytes = data.len() as u64 * CHUNK;
    let export = Arc::new(ReadCounting::new(size));
    for &chunk in &data {
        export
            .inner
            .write_at(chunk * CHUNK, &pattern(chunk, CHUNK as usize))
            .await
            .unwrap();
    }
    let server = Server::bind_tcp(
        ServerConfig::new(vec![Export::new("sparse", export.clone())]),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstream = server.local_addr().to_string();
    tokio::spawn(server.serve(std::future::pending()));

    println!(
        "# managed-mount pull of a sparse export: {} MiB, {} data extents of 1 MiB ({:.1} % data), {} KiB chunks, {PULL_WORKERS} pull workers, best of {runs}\n",
        size / MIB,
        data.len(),
        100.0 * data_bytes as f64 / size as f64,
        CHUNK >> 10
    );
    println!("| RTT | skip holes | pull time | fetched chunks | skipped chunks | server read | sent to the client | sent / data | time off / on |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for rtt in rtts {
        let proxy = if rtt == 0 {
            None
        } else {
            Some(
                DelayProxy::start(
                    "127.0.0.1:0".parse().unwrap(),
                    upstream.clone(),
                    DelayConfig {
                        rtt: Duration::from_millis(rtt),
                        rate: None,
                    },
                )
                .await
                .unwrap(),
            )
        };
        let uri = match &proxy {
            Some(proxy) => format!("nbd://{}/sparse", proxy.local_addr()),
            None => format!("nbd://{upstream}/sparse"),
        };
        let mut best: [Option<Figures>; 2] = [None, None];
        for run in 0..runs {
            let order = if run % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for skip in order {
                let figures = pull_once(&uri, size, skip, &export, proxy.as_ref(), &data).await;
                let slot = &mut best[skip as usize];
                if slot.as_ref().is_none_or(|b| figures.time < b.time) {
                    *slot = Some(figures);
                }
            }
        }
        let [off, on] = best.map(Option::unwrap);
        let ratio = off.time.as_secs_f64() / on.time.as_secs_f64();
        for (name, f) in [("off", &off), ("on (default)", &on)] {
            let sent = f.downstream.unwrap_or(f.server_read);
            println!(
                "| {rtt} ms | {name} | {:.3} s | {} | {} | {:.0} MiB | {} | {:.3} | {} |",
                f.time.as_secs_f64(),
                f.fetched,
                f.skipped,
                mib(f.server_read),
                match f.downstream {
                    Some(bytes) => format!("{:.1} MiB", mib(bytes)),
                    None => "(no proxy)".into(),
                },
                sent as f64 / data_bytes as f64,
                if name == "off" {
                    String::new()
                } else {
                    format!("{ratio:.1}x")
                },
            );
        }
    }
}
