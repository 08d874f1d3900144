//! Issue 17's tables, on a fully local managed stack (a memory "remote" behind a file cache in
//! /var/tmp, every chunk already local, writes pushed in the background): buffered sequential
//! reads against the cache file's own bytes from the page cache, and 4 KiB random reads and
//! writes at queue depth 1 and 32, for the FUSE file and the loop device over it with each
//! FUSE transport (classic `/dev/fuse`, io_uring), and for the slice frontend over the same
//! stack.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_backends::{FileBackend, FileOptions as CacheOptions};
use r3map_core::stages::{Arbitrary, Pusher, PusherOptions, Synced};
use r3map_core::{AtomicBitmap, Backend, ChunkLayout, MemoryBackend, SharedBackend};
use r3map_frontends::slice::{Region, RegionOptions};
use r3map_fuse::{DiskMount, FileOptions, LoopOptions, Transport};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::direct_io::{mb_per_s, open_direct, Aligned, KIB, MIB};

const CHUNK: u64 = MIB;
const OPS_QD1: usize = 4096;
const THREADS_QD32: usize = 32;
const OPS_PER_THREAD: usize = 512;

/// The managed stack and the cache file it keeps its local bytes in.
struct Managed {
    stack: SharedBackend,
}

fn managed(rt: &tokio::runtime::Runtime, size: u64, cache_path: &Path) -> Managed {
    let remote: SharedBackend = Arc::new(MemoryBackend::new(size));
    let cache: SharedBackend =
        Arc::new(FileBackend::create(cache_path, size, CacheOptions::new()).expect("create the cache file"));
    let piece: Vec<u8> = (0..MIB).map(|i| (i * 131 + 7) as u8 | 1).collect();
    rt.block_on(async {
        for offset in (0..size).step_by(MIB as usize) {
            remote.write_at(offset, &piece).await.unwrap();
            cache.write_at(offset, &piece).await.unwrap();
        }
        cache.sync().await.unwrap();
    });
    let chunks = ChunkLayout::new(size, CHUNK).unwrap().chunk_count();
    let local = AtomicBitmap::new(chunks);
    local.set_all();
    let _context = rt.enter();
    let synced = Arc::new(Synced::with_local_chunks(cache, remote.clone(), CHUNK, local).unwrap());
    let pusher = Arc::new(Pusher::start(synced, remote, CHUNK, PusherOptions::default()).unwrap());
    Managed {
        stack: Arc::new(Arbitrary::new(pusher, CHUNK).unwrap()),
    }
}

/// Reads `file` from start to end in 1 MiB `read(2)`s (like `dd bs=1M`); MB/s.
fn sequential_read(mut file: &File) -> f64 {
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        match file.read(&mut buf).expect("read") {
            0 => break,
            n => total += n as u64,
        }
    }
    mb_per_s(total, start.elapsed())
}

/// The 4 KiB figures of one path.
#[derive(Default, Clone, Copy)]
struct Small {
    read_median: Duration,
    read_p99: Duration,
    read_qd32_iops: f64,
    write_median: Duration,
    write_qd32_iops: f64,
}

fn offsets(size: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count).map(|_| rng.gen_range(0..size / 4096) * 4096).collect()
}

fn percentile(mut times: Vec<Duration>, at: f64) -> Duration {
    times.sort();
    times[((times.len() - 1) as f64 * at) as usize]
}

/// One 4 KiB operation at an offset, timed.
fn qd1(offsets: &[u64], mut op: impl FnMut(u64)) -> Vec<Duration> {
    offsets
        .iter()
        .map(|&offset| {
            let start = Instant::now();
            op(offset);
            start.elapsed()
        })
        .collect()
}

/// `THREADS_QD32` threads doing `OPS_PER_THREAD` operations each; operations per second.
fn qd32(size: u64, op: impl Fn(u64) + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS_QD32 {
            let op = &op;
            scope.spawn(move || {
                for offset in offsets(size, OPS_PER_THREAD, 100 + thread as u64) {
                    op(offset);
                }
            });
        }
    });
    (THREADS_QD32 * OPS_PER_THREAD) as f64 / start.elapsed().as_secs_f64()
}

/// The 4 KiB figures of an `O_DIRECT` file or device.
fn small_direct(path: &Path, size: u64) -> Small {
    let file = open_direct(path);
    let reads = offsets(size, OPS_QD1, 1);
    let mut buf = Aligned::new(4096);
    // Warm-up: an eighth of the measured operations.
    let _ = qd1(&reads[..OPS_QD1 / 8], |offset| {
        file.read_exact_at(buf.get(), offset).unwrap()
    });
    let read_times = qd1(&reads, |offset| file.read_exact_at(buf.get(), offset).unwrap());
    let write_times = qd1(&offsets(size, OPS_QD1, 2), |offset| {
        file.write_all_at(buf.get(), offset).unwrap()
    });
    let read_qd32_iops = qd32(size, |offset| {
        let mut buf = Aligned::new(4096);
        file.read_exact_at(buf.get(), offset).unwrap();
    });
    let write_qd32_iops = qd32(size, |offset| {
        let mut buf = Aligned::new(4096);
        file.write_all_at(buf.get(), offset).unwrap();
    });
    Small {
        read_median: percentile(read_times.clone(), 0.5),
        read_p99: percentile(read_times, 0.99),
        read_qd32_iops,
        write_median: percentile(write_times, 0.5),
        write_qd32_iops,
    }
}

fn small_backend(rt: &tokio::runtime::Runtime, backend: &SharedBackend, size: u64) -> Small {
    let mut buf = vec![0u8; 4096];
    let reads = offsets(size, OPS_QD1, 1);
    let (read_times, write_times) = rt.block_on(async {
        let mut read_times = Vec::with_capacity(OPS_QD1);
        for &offset in &reads {
            let start = Instant::now();
            backend.read_at(offset, &mut buf).await.unwrap();
            read_times.push(start.elapsed());
        }
        let mut write_times = Vec::with_capacity(OPS_QD1);
        for offset in offsets(size, OPS_QD1, 2) {
            let start = Instant::now();
            backend.write_at(offset, &buf).await.unwrap();
            write_times.push(start.elapsed());
        }
        (read_times, write_times)
    });
    Small {
        read_median: percentile(read_times.clone(), 0.5),
        read_p99: percentile(read_times, 0.99),
        write_median: percentile(write_times, 0.5),
        ..Small::default()
    }
}

fn small_row(name: &str, small: &Small) {
    let iops = |v: f64| {
        if v > 0.0 {
            format!("{:.1}", v / 1000.0)
        } else {
            "–".into()
        }
    };
    println!(
        "| {name} | {:.1} | {:.1} | {} | {:.1} | {} |",
        small.read_median.as_secs_f64() * 1e6,
        small.read_p99.as_secs_f64() * 1e6,
        iops(small.read_qd32_iops),
        small.write_median.as_secs_f64() * 1e6,
        iops(small.write_qd32_iops),
    );
}

/// Figures of the FUSE file and the loop device over it with one transport.
struct FuseFigures {
    transport: Transport,
    file_buffered: f64,
    loop_buffered: f64,
    file_direct_1m: f64,
    loop_direct_1m: f64,
    file_small: Small,
    loop_small: Small,
}

fn fuse_figures(
    rt: &tokio::runtime::Runtime,
    stack: &SharedBackend,
    dir: &Path,
    io_uring: bool,
) -> FuseFigures {
    let size = stack.size();
    let options = FileOptions {
        io_uring,
        ..FileOptions::default()
    };
    let mut disk = DiskMount::open_with(
        stack.clone(),
        dir,
        "data",
        rt.handle().clone(),
        &options,
        &LoopOptions::default(),
    )
    .expect("open the disk (run as root)");
    let transport = disk.file().transport().clone();
    // A fresh loop device has nothing cached: its first buffered pass reads through FUSE.
    let loop_buffered = sequential_read(&File::open(disk.path()).unwrap());
    disk.file().invalidate(0, size).unwrap();
    let file_buffered = sequential_read(&File::open(disk.file().path()).unwrap());
    let direct_1m = |path: &Path| {
        let file = open_direct(path);
        let mut buf = Aligned::new(MIB as usize);
        let start = Instant::now();
        for offset in (0..size).step_by(MIB as usize) {
            file.read_exact_at(buf.get(), offset).unwrap();
        }
        mb_per_s(size, start.elapsed())
    };
    let file_direct_1m = direct_1m(disk.file().path());
    let loop_direct_1m = direct_1m(disk.path());
    let file_small = small_direct(disk.file().path(), size);
    let loop_small = small_direct(disk.path(), size);
    disk.close_blocking().expect("close");
    FuseFigures {
        transport,
        file_buffered,
        loop_buffered,
        file_direct_1m,
        loop_direct_1m,
        file_small,
        loop_small,
    }
}

/// Buffered sequential reads of a fresh FUSE file mount (cold page cache) for each read-ahead
/// of the connection, over the transport asked for: (read-ahead in KiB as the kernel reports
/// it, MB/s).
fn buffered_by_read_ahead(
    rt: &tokio::runtime::Runtime,
    stack: &SharedBackend,
    dir: &Path,
    io_uring: bool,
) -> Vec<(u32, f64)> {
    [1u32 << 20, 4 << 20, 16 << 20]
        .into_iter()
        .map(|read_ahead| {
            let options = FileOptions {
                io_uring,
                read_ahead: Some(read_ahead),
                ..FileOptions::default()
            };
            let mut mount =
                r3map_fuse::FileMount::mount_with(stack.clone(), dir, "data", rt.handle().clone(), &options)
                    .expect("mount");
            let figure = sequential_read(&File::open(mount.path()).unwrap());
            let kib = mount.read_ahead().unwrap_or(0) / 1024;
            mount.unmount_blocking().unwrap();
            (kib, figure)
        })
        .collect()
}

/// The slice frontend over the same stack: first read (faults fetch every chunk), a populated
/// re-read, and 4 KiB copies in and out of the populated region.
fn slice_figures(stack: &SharedBackend) -> (f64, f64, Small) {
    let size = stack.size();
    let options = RegionOptions {
        chunk_size: CHUNK,
        ..RegionOptions::default()
    };
    let mut region = Region::new(stack.clone(), options).expect("slice region (userfaultfd)");
    let mut dst = vec![1u8; size as usize];
    let start = Instant::now();
    dst.copy_from_slice(region.as_slice());
    let cold = mb_per_s(size, start.elapsed());
    let start = Instant::now();
    dst.copy_from_slice(region.as_slice());
    let populated = mb_per_s(size, start.elapsed());
    let mut buf = [0u8; 4096];
    let read_times = qd1(&offsets(size, OPS_QD1, 1), |offset| {
        let at = offset as usize;
        buf.copy_from_slice(&region.as_slice()[at..at + 4096]);
    });
    let read_qd32_iops = qd32(size, |offset| {
        let at = offset as usize;
        let mut buf = [0u8; 4096];
        buf.copy_from_slice(&region.as_slice()[at..at + 4096]);
        std::hint::black_box(&buf);
    });
    let write_times = qd1(&offsets(size, OPS_QD1, 2), |offset| {
        let at = offset as usize;
        region.as_mut_slice()[at..at + 4096].copy_from_slice(&buf);
    });
    drop(region);
    let small = Small {
        read_median: percentile(read_times.clone(), 0.5),
        read_p99: percentile(read_times, 0.99),
        read_qd32_iops,
        write_median: percentile(write_times, 0.5),
        write_qd32_iops: 0.0,
    };
    (cold, populated, small)
}

pub fn run(rt: &tokio::runtime::Runtime, size_mib: u64) {
    let size = size_mib * MIB;
    let scratch = tempfile::Builder::new()
        .prefix("r3map-bench-fuse17-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cache_path = scratch.path().join("cache.img");
    let managed = managed(rt, size, &cache_path);

    // The cache's own bytes from the page cache: a second buffered pass over the cache file.
    let _ = sequential_read(&File::open(&cache_path).unwrap());
    let page_cache = sequential_read(&File::open(&cache_path).unwrap());

    let mut runs = Vec::new();
    for io_uring in [false, true] {
        let dir = scratch.path().join(if io_uring { "uring" } else { "classic" });
        std::fs::create_dir(&dir).unwrap();
        runs.push(fuse_figures(rt, &managed.stack, &dir, io_uring));
    }
    let by_read_ahead: Vec<_> = [false, true]
        .into_iter()
        .map(|io_uring| {
            let dir = scratch
                .path()
                .join(if io_uring { "ra-uring" } else { "ra-classic" });
            std::fs::create_dir(&dir).unwrap();
            (
                io_uring,
                buffered_by_read_ahead(rt, &managed.stack, &dir, io_uring),
            )
        })
        .collect();
    // The per-request cost of the transports alone: the same 4 KiB figures over a plain memory
    // backend (the managed stack reads a whole 1 MiB chunk from its cache for a 4 KiB read).
    let memory: SharedBackend = Arc::new(MemoryBackend::new(size));
    rt.block_on(memory.write_zeroes(0, size)).unwrap();
    let mut memory_small = Vec::new();
    for io_uring in [false, true] {
        let dir = scratch.path().join(if io_uring {
            "memory-uring"
        } else {
            "memory-classic"
        });
        std::fs::create_dir(&dir).unwrap();
        let options = FileOptions {
            io_uring,
            ..FileOptions::default()
        };
        let mut mount =
            r3map_fuse::FileMount::mount_with(memory.clone(), &dir, "data", rt.handle().clone(), &options)
                .expect("mount");
        let small = small_direct(mount.path(), size);
        let name = if matches!(mount.transport(), Transport::IoUring { .. }) {
            "io_uring"
        } else {
            "classic"
        };
        memory_small.push((name, small));
        mount.unmount_blocking().unwrap();
    }
    let memory_direct = small_backend(rt, &memory, size);
    let (slice_cold, slice_populated, slice_small) = slice_figures(&managed.stack);
    let stack_small = small_backend(rt, &managed.stack, size);

    println!(
        "managed stack: memory remote, file cache ({size_mib} MiB, {} KiB chunks, all local); \
         classic run: {}; io_uring run: {}\n",
        CHUNK / KIB,
        runs[0].transport,
        runs[1].transport
    );
    println!("Buffered sequential read, 1 MiB read(2)s, page cache of the frontend cold:\n");
    println!("| path | MB/s | / page cache |");
    println!("|---|---|---|");
    println!("| cache file from the page cache (warm) | {page_cache:.0} | 1.000 |");
    for run in &runs {
        let name = if matches!(run.transport, Transport::IoUring { .. }) {
            "io_uring"
        } else {
            "classic"
        };
        println!(
            "| FUSE file, {name} | {:.0} | {:.3} |",
            run.file_buffered,
            run.file_buffered / page_cache
        );
        println!(
            "| loop over FUSE, {name} (fresh device) | {:.0} | {:.3} |",
            run.loop_buffered,
            run.loop_buffered / page_cache
        );
    }
    println!(
        "| slice, first read (faults) | {slice_cold:.0} | {:.3} |",
        slice_cold / page_cache
    );
    println!(
        "| slice, populated | {slice_populated:.0} | {:.3} |",
        slice_populated / page_cache
    );
    println!(
        "\nThe same buffered read of the FUSE file by the connection's read-ahead (fresh mount each):\n"
    );
    println!("| transport | read-ahead (KiB) | MB/s | / page cache |");
    println!("|---|---|---|---|");
    for (io_uring, figures) in &by_read_ahead {
        for (kib, figure) in figures {
            println!(
                "| {} | {kib} | {figure:.0} | {:.3} |",
                if *io_uring { "io_uring" } else { "classic" },
                figure / page_cache
            );
        }
    }
    println!("\nO_DIRECT sequential read, 1 MiB requests, QD1:\n");
    println!("| transport | FUSE file (MB/s) | loop over FUSE (MB/s) | loop / file |");
    println!("|---|---|---|---|");
    for run in &runs {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} |",
            run.transport,
            run.file_direct_1m,
            run.loop_direct_1m,
            run.loop_direct_1m / run.file_direct_1m
        );
    }
    println!(
        "\n4 KiB random, O_DIRECT for FUSE and loop ({OPS_QD1} operations at QD1; QD32 = \
         {THREADS_QD32} threads x {OPS_PER_THREAD}):\n"
    );
    println!("| path | read QD1 median (µs) | read QD1 p99 (µs) | read QD32 (k IOPS) | write QD1 median (µs) | write QD32 (k IOPS) |");
    println!("|---|---|---|---|---|---|");
    small_row("managed stack called directly", &stack_small);
    for run in &runs {
        let name = if matches!(run.transport, Transport::IoUring { .. }) {
            "io_uring"
        } else {
            "classic"
        };
        small_row(&format!("FUSE file, {name}"), &run.file_small);
        small_row(&format!("loop over FUSE, {name}"), &run.loop_small);
    }
    small_row("slice (populated; writes QD1 only)", &slice_small);
    small_row("memory backend called directly", &memory_direct);
    for (name, small) in &memory_small {
        small_row(&format!("FUSE file over the memory backend, {name}"), small);
    }

    // Issue 17's goals, from the io_uring run where there is one.
    let best = runs
        .iter()
        .find(|run| matches!(run.transport, Transport::IoUring { .. }))
        .unwrap_or(&runs[0]);
    let verdict = |met: bool| if met { "met" } else { "missed" };
    println!("\nGoals ({}):\n", best.transport);
    println!("| goal | figure | |");
    println!("|---|---|---|");
    let buffered = best.file_buffered / page_cache;
    println!(
        "| buffered sequential read >= 0.5 of the page-cache read | {buffered:.3} | {} |",
        verdict(buffered >= 0.5)
    );
    let qd1 = best.file_small.read_median.as_secs_f64() * 1e6;
    println!(
        "| 4 KiB QD1 read median <= 10 µs (FUSE file, managed stack) | {qd1:.1} µs | {} |",
        verdict(qd1 <= 10.0)
    );
    let loop_ratio = best.loop_direct_1m / best.file_direct_1m;
    println!(
        "| loop over FUSE >= 0.8 of the FUSE file at 1 MiB | {loop_ratio:.3} | {} |",
        verdict(loop_ratio >= 0.8)
    );
    let uffd = slice_cold / slice_populated;
    println!(
        "| uffd cold sequential read >= 0.25 of warm memcpy | {uffd:.3} | {} |",
        verdict(uffd >= 0.25)
    );
}
