//! Live migration downtime against stop-and-copy: an in-process seeder whose application
//! keeps writing, served over gRPC behind the delay proxy, and a leecher, in one run.
//!
//! Run: `cargo bench -p r3map-cli --bench migration [-- SIZE_MIB [WRITES_PER_SECOND]]`
//! (default 1024 MiB, 1000 writes/s). Prints a markdown table, and CSV rows (prefix `csv,`)
//! for `scripts/plot-migration.py`.
//!
//! Modes, each on a fresh seeder of the same resource:
//! - stop-and-copy: the application is suspended, everything is copied, then it could resume
//!   on the destination (downtime = the whole copy);
//! - single round: the background pull, then finalize (the Go r3map's migration);
//! - pre-copy: rounds that re-pull what the source wrote meanwhile, then finalize.
//!
//! The application writes 4 KiB blocks at a steady rate into a hot set of chunks (0.1%, 1% or
//! 10% of all chunks) for as long as it runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_delay_proxy::{DelayConfig, DelayProxy};
use r3map_grpc::{ClientOptions, GrpcSeederLink, GrpcServer};
use r3map_migration::{hook, Leecher, LeecherOptions, RoundPolicy, Seeder, SeederHooks};
use tokio::sync::watch;

const CHUNK: u64 = 1 << 20;
const RTTS_MS: [u64; 2] = [0, 25];
const HOT_PERMILLE: [u64; 3] = [1, 10, 100];
/// The application's default steady write rate (4 KiB blocks per second).
const WRITES_PER_SECOND: u64 = 1000;
const MAX_ROUNDS: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    StopAndCopy,
    SingleRound,
    PreCopy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::SingleRound => "single round",
            Mode::PreCopy => "pre-copy",
        }
    }
}

struct Row {
    downtime: Duration,
    total: Duration,
    final_dirty: u64,
    rounds: Vec<u64>,
    /// Blocks the application wrote during the migration.
    writes: u64,
}

/// The application: writes into its hot chunks at a steady rate until suspended.
struct Writer {
    backend: SharedBackend,
    hot: Vec<u64>,
    suspended: AtomicBool,
    /// Becomes true once the writer has made its last write.
    stopped: watch::Sender<bool>,
    written: AtomicU64,
    /// Writes per second.
    rate: u64,
}

impl Writer {
    async fn run(self: Arc<Self>) {
        self.write_until_suspended().await;
        self.stopped.send_replace(true);
    }

    async fn write_until_suspended(&self) {
        let started = Instant::now();
        let block = vec![0xA5u8; 4096];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0u64.. {
            if self.suspended.load(Ordering::Acquire) {
                return;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let chunk = self.hot[(state % self.hot.len() as u64) as usize];
            let offset = chunk * CHUNK + (state >> 32) % (CHUNK / 4096) * 4096;
            // The fence refuses writes once the seeder has synced: the application is
            // suspended by then, so a refused write is one it never made.
            if self.backend.write_at(offset, &block).await.is_err() {
                return;
            }
            self.written.fetch_add(1, Ordering::Relaxed);
            let due = started + Duration::from_secs_f64((n + 1) as f64 / self.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(|a| {
            a.parse()
                .expect("usage: migration [SIZE_MIB [WRITES_PER_SECOND]]")
        })
        .collect();
    let size_mib = numbers.first().copied().unwrap_or(1024);
    let rate = numbers.get(1).copied().unwrap_or(WRITES_PER_SECOND);
    let size = size_mib << 20;
    let resource: SharedBackend = Arc::new(MemoryBackend::new(size));
    // Incompressible-enough, non-zero content (zero chunks would travel for free).
    let mut piece = vec![0u8; CHUNK as usize];
    for (c, offset) in (0..size).step_by(CHUNK as usize).enumerate() {
        for (i, byte) in piece.iter_mut().enumerate() {
            *byte = (i as u64 * 31 + c as u64 * 17 + (i as u64 >> 9)) as u8;
        }
        resource.write_at(offset, &piece).await.unwrap();
    }
    println!(
        "# live migration vs stop-and-copy ({size_mib} MiB, {} KiB chunks, writer {rate} x 4 KiB/s)\n",
        CHUNK >> 10
    );
    println!("| RTT | hot chunks | mode | downtime | total | writes | dirty at finalize | rounds (dirty per round) |");
    println!("|---:|---:|---|---:|---:|---:|---:|---|");
    let mut csv = Vec::new();
    for rtt in RTTS_MS {
        for (i, permille) in HOT_PERMILLE.into_iter().enumerate() {
            for mode in [Mode::StopAndCopy, Mode::SingleRound, Mode::PreCopy] {
                // Stop-and-copy does not depend on the writer: measured once per RTT.
                if mode == Mode::StopAndCopy && i > 0 {
                    continue;
                }
                let row = run(resource.clone(), size, rtt, permille, mode, rate).await;
                let hot = if mode == Mode::StopAndCopy {
                    "-".to_string()
                } else {
                    format!("{:.1}%", permille as f64 / 10.0)
                };
                let rounds: Vec<String> = row.rounds.iter().map(u64::to_string).collect();
                println!(
                    "| {rtt} ms | {hot} | {} | {:.2} ms | {:.2} s | {} | {} | {} |",
                    mode.name(),
                    row.downtime.as_secs_f64() * 1e3,
                    row.total.as_secs_f64(),
                    row.writes,
                    row.final_dirty,
                    if rounds.is_empty() {
                        "-".into()
                    } else {
                        format!("{} ({})", rounds.len(), rounds.join(", "))
                    }
                );
                csv.push(format!(
                    "csv,{rtt},{permille},{},{:.3},{:.3},{}",
                    mode.name(),
                    row.downtime.as_secs_f64() * 1e3,
                    row.total.as_secs_f64(),
                    row.final_dirty
                ));
            }
        }
    }
    println!();
    for line in csv {
        println!("{line}");
    }
}

async fn run(resource: SharedBackend, size: u64, rtt: u64, permille: u64, mode: Mode, rate: u64) -> Row {
    let chunks = size / CHUNK;
    let hot_count = (chunks * permille / 1000).max(1);
    // Spread over the resource, so the pull meets them everywhere.
    let hot: Vec<u64> = (0..hot_count).map(|i| i * chunks / hot_count).collect();
    let writer_cell: Arc<std::sync::OnceLock<Arc<Writer>>> = Arc::default();
    let (suspend_cell, resume_cell) = (writer_cell.clone(), writer_cell.clone());
    let hooks = SeederHooks {
        suspend: Some(hook(move || {
            let cell = suspend_cell.clone();
            async move {
                if let Some(writer) = cell.get() {
                    writer.suspended.store(true, Ordering::Release);
                    // The writer notices between two writes (within one write period).
                    let mut stopped = writer.stopped.subscribe();
                    let _ = stopped.wait_for(|stopped| *stopped).await;
                }
                Ok(())
            }
        })),
        resume: Some(hook(move || {
            let cell = resume_cell.clone();
            async move {
                if let Some(writer) = cell.get() {
                    writer.suspended.store(false, Ordering::Release);
                }
                Ok(())
            }
        })),
        flush: None,
    };
    let seeder = Seeder::new(resource, CHUNK, hooks).unwrap();
    let writer = Arc::new(Writer {
        backend: seeder.backend(),
        hot,
        suspended: AtomicBool::new(false),
        stopped: watch::channel(false).0,
        written: AtomicU64::new(0),
        rate,
    });
    let _ = writer_cell.set(writer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(GrpcServer::new(Vec::new()).seeder(seeder.clone()).serve(
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let proxy = DelayProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        DelayConfig {
            rtt: Duration::from_millis(rtt),
            rate: None,
        },
    )
    .await
    .unwrap();
    let link = GrpcSeederLink::connect(&proxy.local_addr().to_string(), ClientOptions::default())
        .await
        .unwrap();
    let writing = tokio::spawn(writer.clone().run());
    let started = Instant::now();
    let stopped_at = if mode == Mode::StopAndCopy {
        writer.suspended.store(true, Ordering::Release);
        let _ = writing.await;
        Some(Instant::now())
    } else {
        None
    };
    let rounds = RoundPolicy {
        max_rounds: if mode == Mode::PreCopy { MAX_ROUNDS } else { 0 },
        max_dirty: 0,
    };
    let options = LeecherOptions {
        rounds,
        ..LeecherOptions::default()
    };
    let leecher = Leecher::open(Arc::new(link), Arc::new(MemoryBackend::new(size)), options)
        .await
        .unwrap();
    let rounds = leecher.precopy().await.unwrap();
    let finalized = leecher.finalize().await.unwrap();
    let downtime = match stopped_at {
        Some(at) => at.elapsed(),
        None => finalized.downtime,
    };
    leecher.complete(false).await.unwrap();
    let total = started.elapsed();
    let _ = stop.send(());
    let _ = server.await;
    Row {
        downtime,
        total,
        final_dirty: finalized.dirty_chunks,
        rounds,
        writes: writer.written.load(Ordering::Relaxed),
    }
}
